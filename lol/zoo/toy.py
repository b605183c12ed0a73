"""A toy zoo that costs milliseconds: the smallest complete example of the recipe contract (`lol.zoo.recipe`).

`ToyBase` "trains" a frozen two-layer MLP (a fixed random init) and saves its weights with safetensors; `ToyRecipe`
finetunes rank-2 LoRAs of both layers on per-job random linear-regression targets, K jobs at a time with
`lol.zoo.multilora`. Used by the build machinery's tests and as a template for new recipes. ``ToyRecipe(sleep=s)``
waits s seconds per group so tests can interrupt a build mid-way.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Hashable

import numpy as np
import torch
from torch import nn

from .recipe import Job, JobResult, stage_of

__all__ = ["ToyBase", "ToyRecipe"]

DIM = 8
PRESETS = {"ci": dict(n=12, steps=(5, 10)), "default": dict(n=40, steps=(10, 20))}


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, DIM))


class ToyBase:
    name = "toy"
    requires: tuple[str, ...] = ()

    def is_built(self, out_dir: Path) -> bool:
        return (Path(out_dir) / "record.json").is_file()

    def build(self, preset: str, out_dir: Path, device: str, seed: int) -> dict[str, Any]:
        from safetensors.torch import save_file

        torch.manual_seed(seed)
        model = _mlp()
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out_dir) / "model.safetensors"))
        return {"kind": "toy", "seed": seed, "preset": preset, "n_parameters": sum(p.numel() for p in model.parameters())}


class ToyRecipe:
    name = "toy"
    requires: tuple[str, ...] = ("toy",)
    unrecorded = ("rank", "seed", "stage")   # job settings its rows do not record (`CollectionRecipe`)

    def __init__(self, sleep: float = 0.0):
        self.sleep = float(sleep)  # seconds per group, not part of any job: results do not depend on it

    def jobs(self, preset: str, seed: int) -> list[Job]:
        P = PRESETS[preset]
        out = []
        for i in range(P["n"]):
            rng = np.random.default_rng([seed, i])
            params = {"lr": float(10 ** rng.uniform(-3, -1.5)), "steps": int(rng.integers(*P["steps"])), "rank": 2}
            if P.get("stages"):  # a collection grown in stages: jobs past each stage's size train in groups of their own
                params["stage"] = stage_of(i, P)
            out.append(Job(f"toy-{i:04d}", seed * 1000 + i, params))
        return out

    def group_key(self, job: Job) -> Hashable:
        return job.params["rank"]

    def label_schema(self) -> dict[str, dict[str, Any]]:
        return {"final_loss": {"kind": "regression", "task": "final_loss", "description": "last training loss"},
                "slope_sign": {"kind": "binary", "task": "slope_sign", "description": "sign of the target's trace"}}

    def run_group(self, jobs: list[Job], bases: dict[str, Path], device: str) -> list[JobResult]:
        from safetensors.torch import load_file

        from .multilora import PerLoRAAdam, accumulation_schedule, inject_multilora, sum_of_means

        model = _mlp()
        model.load_state_dict(load_file(str(Path(bases["toy"]) / "model.safetensors")))
        K = len(jobs)
        ml = inject_multilora(model, lambda p, m: isinstance(m, nn.Linear), K, rank=2, alpha=4.0,
                              seeds=[j.seed for j in jobs])
        opt = PerLoRAAdam(ml, lr=torch.tensor([j.params["lr"] for j in jobs]), weight_decay=torch.zeros(K))
        gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
        targets = [torch.randn(DIM, DIM, generator=g) / DIM ** 0.5 for g in gens]
        last = torch.zeros(K)
        for part, step, _ in accumulation_schedule([j.params["steps"] for j in jobs], [1] * K):
            ks = part.nonzero().flatten().tolist()
            xs = [torch.randn(4, DIM, generator=gens[k]) for k in ks]
            idx = torch.cat([torch.full((4,), k) for k in ks])
            x = torch.cat(xs)
            y = torch.cat([xi @ targets[k].T for xi, k in zip(xs, ks)])
            ml.set_index(idx)
            per = ((model(x) - y) ** 2).mean(1)
            loss = sum_of_means(per, idx, K)
            loss.backward()
            with torch.no_grad():
                for k in ks:
                    last[k] = per[idx == k].mean()
            opt.step(step)
            opt.zero_grad(step)
        time.sleep(self.sleep)
        out = []
        for k, j in enumerate(jobs):
            row = {"id": j.id, "group": j.id, "final_loss": float(last[k]),
                   "slope_sign": int(float(torch.trace(targets[k])) > 0), "lr": j.params["lr"],
                   "steps": j.params["steps"]}
            out.append(JobResult(j.id, ml.export(k), row))
        return out
