"""A batch of LoRAs over one module spec: the tensor layout every LoL model and featurizer consumes.

Per module ℓ, ``U[ℓ]`` is (B, out_ℓ, r_ℓ) and ``V[ℓ]`` is (B, in_ℓ, r_ℓ), where r_ℓ is the largest rank of that module
in the batch. A LoRA of smaller rank is padded with zero columns; ``ranks[b, ℓ]`` keeps its true rank. Zero columns
change nothing: ``U Vᵀ`` is the same, and the GL action acts on the first ``ranks[b, ℓ]`` columns only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .lora import LoRA, LoRAModule, ModuleSpec

__all__ = ["LoRABatch"]


@dataclass
class LoRABatch:
    spec: ModuleSpec
    U: list[torch.Tensor]
    V: list[torch.Tensor]
    ranks: torch.Tensor  # (B, L) int64

    def __post_init__(self):
        L = len(self.spec)
        if len(self.U) != L or len(self.V) != L:
            raise ValueError(f"LoRABatch: spec has {L} modules but got {len(self.U)} U and {len(self.V)} V tensors")
        if self.ranks.shape != (len(self), L):
            raise ValueError(f"LoRABatch: ranks has shape {tuple(self.ranks.shape)}, expected ({len(self)}, {L})")

    def __len__(self) -> int:
        return int(self.U[0].shape[0]) if self.U else 0

    @property
    def device(self) -> torch.device:
        return self.U[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.U[0].dtype

    @property
    def uniform_rank(self) -> int | None:
        """The one rank shared by every module of every LoRA, or None when ranks differ."""
        r = torch.unique(self.ranks)
        return int(r[0]) if r.numel() == 1 and all(u.shape[-1] == int(r[0]) for u in self.U) else None

    @classmethod
    def from_loras(cls, loras: Sequence[LoRA], spec: ModuleSpec | None = None,
                   dtype: torch.dtype = torch.float32, device=None) -> "LoRABatch":
        """Stack LoRAs into one batch; each is matched to ``spec`` by module name (`ModuleSpec.match`: exact key, else
        the key without a component prefix such as ``unet.``; never by position)."""
        if not loras:
            raise ValueError("LoRABatch.from_loras: no LoRAs given")
        spec = spec or loras[0].spec
        keyed = []
        for lora in loras:
            keyed.append(spec.match(lora, what="this batch"))
        Us, Vs = [], []
        ranks = torch.tensor([[m.rank for m in mods] for mods in keyed], dtype=torch.long)
        for ell, (out_f, in_f) in enumerate(spec.shapes):
            r_max = int(ranks[:, ell].max())
            U = torch.zeros(len(loras), out_f, r_max, dtype=dtype, device=device)
            V = torch.zeros(len(loras), in_f, r_max, dtype=dtype, device=device)
            for b, mods in enumerate(keyed):
                m = mods[ell]
                U[b, :, : m.rank] = m.U.to(dtype)
                V[b, :, : m.rank] = m.V.to(dtype)
            Us.append(U)
            Vs.append(V)
        return cls(spec, Us, Vs, ranks)

    def lora(self, b: int, **kwargs) -> LoRA:
        """The b-th LoRA, with padding columns removed. ``alpha`` is not stored in a batch; it defaults to the rank
        and ``scale`` to 1 (the scale is already folded into U)."""
        mods = []
        for ell, name in enumerate(self.spec.names):
            r = int(self.ranks[b, ell])
            mods.append(LoRAModule(name, self.U[ell][b, :, :r], self.V[ell][b, :, :r], alpha=float(r), scale=1.0))
        return LoRA.from_modules(mods, **kwargs)

    def select(self, index) -> "LoRABatch":
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(self, U=[u[index] for u in self.U], V=[v[index] for v in self.V], ranks=self.ranks[index])

    def to(self, device=None, dtype=None) -> "LoRABatch":
        return replace(self, U=[u.to(device=device, dtype=dtype) for u in self.U],
                       V=[v.to(device=device, dtype=dtype) for v in self.V],
                       ranks=self.ranks.to(device=device))

    def with_factors(self, U: list[torch.Tensor], V: list[torch.Tensor]) -> "LoRABatch":
        return replace(self, U=list(U), V=list(V))
