"""A batch of LoRAs over one module spec: the tensor layout every LoL model and featurizer consumes.

Per module ℓ, ``U[ℓ]`` is (B, out_ℓ, r_ℓ) and ``V[ℓ]`` is (B, in_ℓ, r_ℓ), where r_ℓ is the largest rank of that module
in the batch. A LoRA of smaller rank is padded with zero columns; ``ranks[b, ℓ]`` keeps its true rank. Zero columns
change nothing: ``U Vᵀ`` is the same, and the GL action acts on the first ``ranks[b, ℓ]`` columns only.

Memory layout: the batches `Collection.batch`, `LoRABatch.from_loras` and `lol.synth` make are *rank-major*: each
``U[ℓ]`` is a (B, r_ℓ, out_ℓ) contiguous tensor seen as (B, out_ℓ, r_ℓ) (`rank_major`), so each LoRA's r columns lie
as r contiguous rows. Then ``U[ℓ].mT`` is a plain (B·r, out) matrix and a learned left map ``Φ U`` over the whole batch
is one large GEMM ``(B·r, out) @ (out, h)`` instead of B tiny (r × out) @ (out × h) ones (GL-net's first layer, 1.3–1.4×
faster on a CPU), and LAPACK, which is column-major, reads each U in place (the singular-value featurizer, 1.7×).
Values, shapes and every result are the same in any layout; a batch built by hand in the default layout works, only
slower. Indexing (`select`) and `to` keep the layout.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .lora import LoRA, LoRAModule, ModuleSpec

__all__ = ["LoRABatch", "rank_major", "empty_factors"]


def empty_factors(B: int, d: int, r: int, dtype=torch.float32, device=None, zero: bool = False) -> torch.Tensor:
    """A new (B, d, r) factor tensor in the rank-major layout (module docstring): (B, r, d) storage, transposed."""
    make = torch.zeros if zero else torch.empty
    return make(B, r, d, dtype=dtype, device=device).mT


def rank_major(X: torch.Tensor) -> torch.Tensor:
    """X (…, d, r) with the same values in the rank-major layout (``X.mT`` contiguous); X itself when it already is."""
    return X if X.mT.is_contiguous() else X.mT.contiguous().mT


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
            U = empty_factors(len(loras), out_f, r_max, dtype, device, zero=True)
            V = empty_factors(len(loras), in_f, r_max, dtype, device, zero=True)
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
