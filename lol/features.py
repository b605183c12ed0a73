"""Featurizers: fixed (parameter-free) maps from a `LoRABatch` to a feature matrix (B, D), and canonical forms.

Each featurizer is a small ``nn.Module`` whose fitted state (if any) lives in buffers, so it is saved with a model's
weights. ``fit(train_batch)`` sets that state from the training split; ``__call__(batch)`` returns (B, D). Each
docstring says exactly what the features are invariant to:

============== ====================================================== =========================================
name            features                                               invariant to
============== ====================================================== =========================================
flatten         raw U, V of every module                               nothing
dense           ΔW = U Vᵀ of every module (the only one forming ΔW)    ∏ GL(r_ℓ), complete
svals           singular values of every ΔW, via QR (never forms ΔW)  ∏ GL(r_ℓ), not complete
oalign          factors rotated onto a training template (Procrustes)  ∏ O(r_ℓ) only, not GL
canon           SVD canonical form U' = Q₁P√S, V' = Q₂Q√S, sign-fixed  ∏ GL(r_ℓ) for generic inputs
============== ====================================================== =========================================

All work on whole batches (one batched QR/SVD per module, never a loop over LoRAs). Ranks: a batch may be
zero-padded (mixed ranks); `svals`, `oalign` and `canon` pad every module to the fitted ``rank`` so their width is
fixed, and raise `SpecMismatchError` for a LoRA of larger rank; `flatten` needs every module at exactly its rank.
"""
from __future__ import annotations

import torch
from torch import nn

from .batch import LoRABatch
from .errors import SpecMismatchError
from .lora import ModuleSpec

__all__ = ["Featurizer", "FlattenFactors", "DenseDelta", "SingularValues", "OAlign", "SVDCanonical",
           "qr_core", "singular_values", "canonical_factors", "pad_rank", "FEATURIZERS"]


# ---------------------------------------------------------------------------------------------------------------
# batched linear algebra on one module: U (B, n, r), V (B, m, r)

def pad_rank(X: torch.Tensor, r: int) -> torch.Tensor:
    """Zero-pad (or keep) the last dimension to ``r``; zero columns change no ΔW."""
    k = X.shape[-1]
    if k == r:
        return X
    if k > r:
        raise ValueError(f"cannot pad rank {k} down to {r}")
    return torch.nn.functional.pad(X, (0, r - k))


def qr_core(U: torch.Tensor, V: torch.Tensor):
    """``U = Q₁R₁``, ``V = Q₂R₂`` (reduced QR) and the r×r core ``C = R₁R₂ᵀ``, so ΔW = Q₁ C Q₂ᵀ. Cost O((n+m)r²)."""
    Q1, R1 = torch.linalg.qr(U)
    Q2, R2 = torch.linalg.qr(V)
    return Q1, Q2, R1 @ R2.mT


def singular_values(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Singular values of ΔW = U Vᵀ (descending, (B, r)) as ``svdvals(R₁R₂ᵀ)``; ΔW is never formed."""
    _, _, C = qr_core(U, V)
    return torch.linalg.svdvals(C)


def canonical_factors(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD canonical form: ``C = R₁R₂ᵀ = P S Qᵀ``, ``U' = Q₁P√S``, ``V' = Q₂Q√S`` with U'V'ᵀ = UVᵀ.

    Columns are ordered by singular value (descending) and each column pair's sign is fixed so that the
    largest-magnitude entry of the U' column is positive. The result depends on ΔW only — hence is invariant to
    (U, V) ↦ (UR, VR⁻ᵀ) for every R ∈ GL(r) — whenever the nonzero singular values are distinct and no U' column
    has two entries tied for largest magnitude (generic inputs). Zero singular values give zero columns.
    """
    Q1, Q2, C = qr_core(U, V)
    P, S, Qh = torch.linalg.svd(C)
    rs = torch.sqrt(S).unsqueeze(-2)
    Uc = (Q1 @ P) * rs
    Vc = (Q2 @ Qh.mT) * rs
    idx = Uc.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(Uc, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return Uc * sign, Vc * sign


def _check_max_rank(batch: LoRABatch, rank: int, what: str):
    too = batch.ranks > rank
    if bool(too.any()):
        b, ell = (int(i) for i in torch.nonzero(too)[0])
        raise SpecMismatchError(f"{what} was fitted for ranks ≤ {rank}, but LoRA {b} has rank "
                                f"{int(batch.ranks[b, ell])} at module {batch.spec.names[ell]!r}")


# ---------------------------------------------------------------------------------------------------------------

class Featurizer(nn.Module):
    """Base class. ``invariant_to`` is one of ``"nothing"``, ``"O(r)"``, ``"GL(r)"``."""

    name = "base"
    invariant_to = "nothing"
    forms_delta = False

    def __init__(self, spec: ModuleSpec, rank: int | None = None):
        super().__init__()
        self.spec = spec
        self.rank = rank

    def fit(self, batch: LoRABatch) -> "Featurizer":
        if self.rank is None:
            self.rank = int(batch.ranks.max())
        return self

    def dim(self) -> int:
        """Feature width D (needs ``rank`` for the rank-dependent featurizers)."""
        return sum(o + i for o, i in self.spec.shapes) * self._need_rank()

    def _need_rank(self) -> int:
        if self.rank is None:
            raise RuntimeError(f"{type(self).__name__}: call fit(train_batch) or pass rank= first")
        return int(self.rank)

    def per_module(self, batch: LoRABatch) -> list[torch.Tensor]:
        """The features of each module, (B, D_ℓ) each; ``__call__`` concatenates them."""
        raise NotImplementedError

    def forward(self, batch: LoRABatch) -> torch.Tensor:
        return torch.cat(self.per_module(batch), dim=1)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, invariant_to={self.invariant_to!r}"


class FlattenFactors(Featurizer):
    """Raw U and V of every module, flattened: Σ(n+m)·r features. Invariant to **nothing** (not even O(r)).

    Requires uniform rank: every module of every LoRA at the fitted rank (raises `SpecMismatchError` naming the
    ranks otherwise), since padding would silently change what each input coordinate means."""

    name = "flatten"

    def fit(self, batch):
        r = batch.uniform_rank
        if r is None:
            self._raise(batch)
        if self.rank is None:
            self.rank = r
        return self

    def _raise(self, batch):
        ranks = sorted(set(batch.ranks.flatten().tolist()))
        raise SpecMismatchError(f"flattened-factor features need every module at one rank"
                                f"{'' if self.rank is None else f' ({self.rank})'}; this batch has ranks {ranks}")

    def per_module(self, batch):
        if batch.uniform_rank != self._need_rank():
            self._raise(batch)
        return [torch.cat([U.flatten(1), V.flatten(1)], 1) for U, V in zip(batch.U, batch.V)]


class DenseDelta(Featurizer):
    """ΔW = U Vᵀ of every module, flattened: Σ n·m features (46,755,840 for SD-1.x q/v). The only featurizer that
    forms ΔW. Invariant to ∏ GL(r_ℓ) and complete (determines the LoRA's effect exactly); any rank, mixed ranks."""

    name = "dense"
    invariant_to = "GL(r)"
    forms_delta = True

    def dim(self):
        return self.spec.total_dense

    def per_module(self, batch):
        return [(U @ V.mT).flatten(1) for U, V in zip(batch.U, batch.V)]


class SingularValues(Featurizer):
    """The singular values of each ΔW_ℓ (descending, zero-padded to ``rank``): L·rank features, computed as
    ``svdvals(R₁R₂ᵀ)`` from QRs of U and V in O((n+m)r² + r³), never forming ΔW. Invariant to ∏ GL(r_ℓ) (and to
    left/right rotations of ΔW, hence not complete). Mixed ranks work; ranks above the fitted ``rank`` raise."""

    name = "svals"
    invariant_to = "GL(r)"

    def dim(self):
        return len(self.spec) * self._need_rank()

    def per_module(self, batch):
        r = self._need_rank()
        _check_max_rank(batch, r, "singular-value features")
        return [pad_rank(singular_values(U, V), r) for U, V in zip(batch.U, batch.V)]


class SVDCanonical(Featurizer):
    """SVD canonical factors (U', V') of every module (see `canonical_factors`), zero-padded to ``rank``, flattened:
    Σ(n+m)·rank features. Invariant to ∏ GL(r_ℓ) for generic inputs (distinct singular values); complete (U'V'ᵀ = ΔW).
    Mixed ranks work (a rank-k module has zero columns beyond k); ranks above the fitted ``rank`` raise."""

    name = "canon"
    invariant_to = "GL(r)"

    def factors(self, batch: LoRABatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        r = self._need_rank()
        _check_max_rank(batch, r, "canonical-form features")
        out = []
        for U, V in zip(batch.U, batch.V):
            Uc, Vc = canonical_factors(U, V)
            out.append((pad_rank(Uc, r), pad_rank(Vc, r)))
        return out

    def per_module(self, batch):
        return [torch.cat([Uc.flatten(1), Vc.flatten(1)], 1) for Uc, Vc in self.factors(batch)]


class OAlign(Featurizer):
    """Factors of each module rotated by orthogonal Procrustes onto a template LoRA from the training split, then
    flattened: Σ(n+m)·rank features. Per module, O = argmin_{O ∈ O(r)} ‖UO − U_t‖² + ‖VO − V_t‖² (SVD of
    UᵀU_t + VᵀV_t), features (UO, VO). Invariant to ∏ O(r_ℓ) **only**: a GL element that is not orthogonal (a scaling
    or shear) changes the features. The template (the first training LoRA with every module at the full rank) is
    stored in buffers ``template_U_ℓ``, ``template_V_ℓ``."""

    name = "oalign"
    invariant_to = "O(r)"

    def __init__(self, spec, rank=None):
        super().__init__(spec, rank)
        if rank is not None:
            self._make_buffers(rank)

    def _make_buffers(self, r):
        for ell, (o, i) in enumerate(self.spec.shapes):
            self.register_buffer(f"template_U_{ell}", torch.zeros(o, r))
            self.register_buffer(f"template_V_{ell}", torch.zeros(i, r))

    def fit(self, batch):
        if self.rank is None:
            self.rank = int(batch.ranks.max())
            self._make_buffers(self.rank)
        full = torch.nonzero((batch.ranks == self.rank).all(1)).flatten()
        if len(full) == 0:
            raise SpecMismatchError(f"O-Align needs a training LoRA with every module at rank {self.rank} as template")
        b = int(full[0])
        for ell, (U, V) in enumerate(zip(batch.U, batch.V)):
            getattr(self, f"template_U_{ell}").copy_(pad_rank(U[b], self.rank))
            getattr(self, f"template_V_{ell}").copy_(pad_rank(V[b], self.rank))
        return self

    def per_module(self, batch):
        r = self._need_rank()
        _check_max_rank(batch, r, "O-Align features")
        out = []
        for ell, (U, V) in enumerate(zip(batch.U, batch.V)):
            U, V = pad_rank(U, r), pad_rank(V, r)
            Ut = getattr(self, f"template_U_{ell}").to(U.dtype)
            Vt = getattr(self, f"template_V_{ell}").to(U.dtype)
            M = U.mT @ Ut + V.mT @ Vt
            A, _, Bh = torch.linalg.svd(M)
            O = A @ Bh
            out.append(torch.cat([(U @ O).flatten(1), (V @ O).flatten(1)], 1))
        return out


FEATURIZERS = {c.name: c for c in (FlattenFactors, DenseDelta, SingularValues, OAlign, SVDCanonical)}
