"""One LoRA representation: an ordered set of adapted modules, each with factors U, V such that ΔW = U Vᵀ.

A LoRA file stores, per adapted linear layer, ``A`` (r × in), ``B`` (out × r) and a scale ``s`` (``alpha / r``, or
``alpha / sqrt(r)`` for rsLoRA). In LoL notation (paper §1)::

    U = s · B   ∈ R^{out × r}        V = Aᵀ ∈ R^{in × r}        ΔW = U Vᵀ

The scale is folded into exactly one factor (U). For a conv LoRA the kernel is flattened into the input side, so
``in_features = in_channels · kh · kw`` and ``kernel_shape`` remembers ``(kh, kw)``.

The symmetry: for any invertible R ∈ GL(r), ``(U, V) ↦ (U R, V R⁻ᵀ)`` leaves ΔW unchanged; a LoRA over L modules
carries one independent GL(r_ℓ) per module (see `lol.symmetry`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Iterator, Mapping

import torch

__all__ = ["LoRAModule", "LoRA", "ModuleSpec", "lora_scale", "module_key"]


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor a LoRA applies to ``B A``: ``alpha / r`` (PEFT default) or ``alpha / sqrt(r)`` (rsLoRA)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def module_key(name: str) -> str:
    """Format-independent identity of a module name: dots and underscores are the same separator.

    kohya writes ``lora_unet_down_blocks_0_..._to_q`` where diffusers writes ``unet.down_blocks.0....to_q``;
    both give the same key, so modules are matched by key, never by position.
    """
    return re.sub(r"[._]+", "_", name).strip("_").lower()


@dataclass(frozen=True)
class LoRAModule:
    """One adapted layer: ``ΔW = U Vᵀ`` with U (out × r, scale folded in) and V (in × r)."""

    name: str
    U: torch.Tensor
    V: torch.Tensor
    alpha: float
    scale: float
    kernel_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.U.ndim != 2 or self.V.ndim != 2:
            raise ValueError(f"module {self.name!r}: U and V must be 2-D, got {tuple(self.U.shape)} and "
                             f"{tuple(self.V.shape)}")
        if self.U.shape[1] != self.V.shape[1]:
            raise ValueError(f"module {self.name!r}: U {tuple(self.U.shape)} and V {tuple(self.V.shape)} "
                             f"disagree on the rank")

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.U.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.V.shape[0])

    @property
    def key(self) -> str:
        return module_key(self.name)

    @property
    def B(self) -> torch.Tensor:
        """The file's up factor (out × r), scale taken back out."""
        return self.U / self.scale

    @property
    def A(self) -> torch.Tensor:
        """The file's down factor (r × in)."""
        return self.V.T

    def delta(self) -> torch.Tensor:
        """The dense weight change ΔW = U Vᵀ (out × in). Costs O(out · in); features avoid it."""
        return self.U @ self.V.T

    def delta_norm(self) -> float:
        """‖U Vᵀ‖_F computed in O((out + in) r²) from the r × r Gram matrices, never forming ΔW."""
        U, V = self.U.double(), self.V.double()
        return float(torch.sqrt(torch.clamp(((U.T @ U) * (V.T @ V)).sum(), min=0.0)))

    def with_factors(self, U: torch.Tensor, V: torch.Tensor) -> "LoRAModule":
        return replace(self, U=U, V=V)

    def to(self, *args, **kwargs) -> "LoRAModule":
        return replace(self, U=self.U.to(*args, **kwargs), V=self.V.to(*args, **kwargs))


@dataclass(frozen=True)
class ModuleSpec:
    """The weight space a LoRA lives in: module names and (out, in) shapes, in order. Ranks are not part of it."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if len(self.names) != len(self.shapes):
            raise ValueError("ModuleSpec: names and shapes differ in length")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(module_key(n) for n in self.names)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def total_out_plus_in(self) -> int:
        """Σ(n + m): the size of one rank-1 slice of the factors."""
        return sum(o + i for o, i in self.shapes)

    @property
    def total_dense(self) -> int:
        """Σ n·m: the number of entries of all ΔW."""
        return sum(o * i for o, i in self.shapes)

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, d: Mapping) -> "ModuleSpec":
        return cls(tuple(d["names"]), tuple((int(o), int(i)) for o, i in d["shapes"]))

    def check(self, lora: "LoRA", what: str = "the model") -> None:
        """Raise `SpecMismatchError` naming the first differences between this spec and a LoRA's modules."""
        from .errors import SpecMismatchError

        want = dict(zip(self.keys, zip(self.names, self.shapes)))
        have = {m.key: (m.name, (m.out_features, m.in_features)) for m in lora}
        missing = [want[k][0] for k in want if k not in have]
        extra = [have[k][0] for k in have if k not in want]
        wrong = [f"{want[k][0]} is {have[k][1][0]}×{have[k][1][1]}, expected {want[k][1][0]}×{want[k][1][1]}"
                 for k in want if k in have and have[k][1] != want[k][1]]
        if missing or extra or wrong:
            src = f"{lora.source}: " if lora.source else ""
            parts = []
            if missing:
                parts.append(f"{len(missing)} module(s) missing (e.g. {', '.join(missing[:3])})")
            if extra:
                parts.append(f"{len(extra)} unexpected module(s) (e.g. {', '.join(extra[:3])})")
            if wrong:
                parts.append("shape mismatch: " + "; ".join(wrong[:3]))
            raise SpecMismatchError(f"{src}LoRA does not match the base model of {what}: " + "; ".join(parts))


@dataclass
class LoRA:
    """An ordered set of adapted modules plus where it came from.

    ``format`` is the source format (``"peft"``, ``"diffusers"``, ``"kohya"``, ``"synthetic"``, ...);
    ``metadata`` holds the file's string metadata (safetensors ``__metadata__``); ``config`` the PEFT config, if any.
    """

    modules: dict[str, LoRAModule]
    format: str = "unknown"
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    source: str | None = None

    @classmethod
    def from_modules(cls, modules: Iterable[LoRAModule], **kwargs) -> "LoRA":
        mods: dict[str, LoRAModule] = {}
        for m in modules:
            if m.name in mods:
                raise ValueError(f"duplicate module {m.name!r}")
            mods[m.name] = m
        return cls(mods, **kwargs)

    def __iter__(self) -> Iterator[LoRAModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, name: str) -> LoRAModule:
        return self.modules[name]

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self]

    @property
    def spec(self) -> ModuleSpec:
        return ModuleSpec(tuple(self.modules), tuple((m.out_features, m.in_features) for m in self))

    def map(self, fn) -> "LoRA":
        """A new LoRA with ``fn(module) -> module`` applied to every module; provenance is kept."""
        return replace(self, modules={n: fn(m) for n, m in self.modules.items()})

    def to(self, *args, **kwargs) -> "LoRA":
        return self.map(lambda m: m.to(*args, **kwargs))

    def deltas(self) -> dict[str, torch.Tensor]:
        return {n: m.delta() for n, m in self.modules.items()}

    def num_parameters(self) -> int:
        return sum(m.U.numel() + m.V.numel() for m in self)

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks))
        return (f"LoRA(format={self.format!r}, modules={len(self)}, ranks={ranks}, "
                f"source={self.source!r})")
