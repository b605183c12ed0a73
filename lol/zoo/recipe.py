"""The contract between the zoo's build machinery and what it builds.

A build has two kinds of recipes:

* a `BaseRecipe` trains (or, with a user-given path, just loads) one base model — ``"sd"`` (a real
  `StableDiffusionPipeline`), ``"clip"`` (a real `CLIPModel` scorer) or ``"lm"`` (a real causal LM) — and saves it with
  the library's own ``save_pretrained`` under ``OUT/base/<name>/``;
* a `CollectionRecipe` turns a preset into seeded `Job`s (one LoRA each), trains them in groups of jobs that can share
  one batched forward/backward pass, and labels them. The machinery packs the results into ``OUT/collections/<name>/``.

Presets are names (``"ci"``, ``"default"``); each recipe keeps its own settings per preset.
A job's result depends only on its own ``seed`` and ``params``, never on which other jobs share its group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Mapping, Protocol, runtime_checkable

from ..lora import LoRA

__all__ = ["Job", "JobResult", "BaseRecipe", "CollectionRecipe", "GROWTH_KEYS", "stage_of", "single_stage"]

# A collection grown in stages (its first LoRAs shipped first, the rest later): a preset's ``stages`` are the job
# indices at which each later stage starts, and ``retest_until`` keeps the second measurements in the first stage.
GROWTH_KEYS = ("stages", "retest_until")


def stage_of(i: int, preset: Mapping[str, Any]) -> int:
    """The stage of a grown collection that job ``i`` belongs to (0 below the first of ``preset["stages"]``, 0 for a
    preset without stages). `lol.zoo.jobs.make_manifest` groups each stage apart, so growing a collection trains only
    its new stage and adopts the packed ones."""
    return sum(i >= s for s in preset.get("stages", ()))


def single_stage(preset: Mapping[str, Any]) -> dict[str, Any]:
    """``preset`` without its growth keys: a collection drawn from it (a sibling) is built in one stage."""
    return {k: v for k, v in preset.items() if k not in GROWTH_KEYS}


@dataclass(frozen=True)
class Job:
    id: str                      # unique and stable across runs, e.g. "faces-00042"
    seed: int
    params: dict[str, Any]       # JSON-able: data choice (identity, class subset, sources), hyperparameters


@dataclass
class JobResult:
    job_id: str
    lora: LoRA
    row: dict[str, Any]          # one row of the collection table: labels, hyperparameters, group (e.g. identity)
    extras: dict[str, Any] = field(default_factory=dict)  # JSON-able, e.g. the exact finetuning image ids


@runtime_checkable
class BaseRecipe(Protocol):
    name: str                    # "sd", "clip", "lm"
    requires: tuple[str, ...]    # other base models it needs first (e.g. the CLIP scorer may need none)

    def build(self, preset: str, out_dir: Path, device: str, seed: int) -> dict[str, Any]:
        """Train and save the base model into ``out_dir`` (atomically); return its record: training time,
        quality figures, config. Must be deterministic for a given seed."""

    def is_built(self, out_dir: Path) -> bool: ...


@runtime_checkable
class CollectionRecipe(Protocol):
    name: str                    # "faces", "fashion", "lm"
    requires: tuple[str, ...]    # base models used, e.g. ("sd", "clip")
    # Optional ``unrecorded: tuple[str, ...]``: the scalar job settings its rows do not record. With it, a packed
    # row that lacks any other setting of its job is not adopted by a later build (`lol.zoo.jobs.job_mismatch`): the
    # recipe gained a setting since. Without it, only the recorded settings are compared.

    def jobs(self, preset: str, seed: int) -> list[Job]: ...

    def group_key(self, job: Job) -> Hashable:
        """Jobs with equal keys may be trained together in one batched pass (e.g. equal rank)."""

    def run_group(self, jobs: list[Job], bases: dict[str, Path], device: str) -> list[JobResult]:
        """Train and label every job of the group; ``bases`` maps base-model names to their folders."""

    def label_schema(self) -> dict[str, dict[str, Any]]:
        """Label name -> {"kind": "regression" | "binary" | "category", "description": ..., "task": group name}."""
