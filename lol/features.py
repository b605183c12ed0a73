"""Featurizers: fixed (parameter-free) maps from a `LoRABatch` to a feature matrix (B, D), and canonical forms.

Each featurizer is a small ``nn.Module`` whose fitted state (if any) lives in buffers, so it is saved with a model's
weights. ``fit(train_batch)`` sets that state from the training split; ``__call__(batch)`` returns (B, D). Each
docstring says exactly what the features are invariant to:

============== ====================================================== =========================================
name            features                                               invariant to
============== ====================================================== =========================================
flatten         raw U, V of every module                               nothing
dense           ΔW = U Vᵀ of every module (the only one forming ΔW)    ∏ GL(r_ℓ), complete
colspace        projector onto each ΔW's column space (n×n)            ∏ GL(r_ℓ), scale and row space too
svals           singular values of every ΔW via the r×r core (no ΔW)  ∏ GL(r_ℓ), not complete
oalign          factors rotated onto a training template (Procrustes)  ∏ O(r_ℓ) only, not GL
canon           SVD canonical form U' = Q₁P√S, V' = Q₂Q√S, sign-fixed  ∏ GL(r_ℓ) for generic inputs
============== ====================================================== =========================================

All work on whole batches (one batched QR — on a GPU, Gram matrix — and r×r SVD per module, never a loop over
LoRAs).

Ranks. A batch may be zero-padded (mixed ranks; padding columns change no ΔW). `svals`, `oalign` and `canon` keep a
fixed number ``k = rank`` of components per module, so their width is fixed whatever ranks arrive later (validation
and test LoRAs, rank generalization): ``k`` is set at ``fit`` to the largest true rank in the training batch, or given
as ``rank=``. A module of rank r < k is padded with zero components; a module of rank r > k keeps its k **largest**
components (the top-k singular values; the canonical columns of the top-k singular values). That is still a function
of ΔW alone, hence still GL-invariant, and exact (identical to the rank-k form) whenever ΔW has rank ≤ k, e.g. a
rank-8 LoRA with redundant columns. `oalign` maps a rank-r module onto its k-column template with an r×k Procrustes
factor (see `OAlign`). `flatten` needs every module at exactly the fitted rank and refuses anything else, naming the
ranks it got. `dense` reads any rank.
"""
from __future__ import annotations

import torch
from torch import nn

from .batch import LoRABatch
from .errors import SpecMismatchError
from .lora import ModuleSpec
from .symmetry import GL, NOTHING, ORTHOGONAL

__all__ = ["Featurizer", "FlattenFactors", "DenseDelta", "ColumnSpace", "SingularValues", "OAlign", "SVDCanonical",
           "column_basis", "column_space_projector",
           "gram_root", "core", "singular_values", "canonical_factors", "keep_components", "FEATURIZERS"]


# ---------------------------------------------------------------------------------------------------------------
# batched linear algebra on one module: U (B, n, r), V (B, m, r)

def keep_components(X: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` entries of the last dimension of X, zero-padded when there are fewer.

    For singular values (descending) and canonical factors (columns ordered by singular value) this keeps the k
    largest components; zero padding adds components that change no ΔW."""
    r = X.shape[-1]
    if r == k:
        return X
    if r > k:
        return X[..., :k]
    return torch.nn.functional.pad(X, (0, k - r))


def gram_root(U: torch.Tensor) -> torch.Tensor:
    """An r×r ``R`` with ``RᵀR = UᵀU`` (float64), ``R = diag(√λ) Eᵀ`` from ``eigh(UᵀU)``, so ``U = Q R`` for some Q with
    orthonormal columns — the R factor of U up to a rotation, which no quantity below depends on. Eigenvalues below
    ``r·ε·λ_max`` (zero-padding columns, rank-deficient factors) are set to zero.

    A Gram matrix and a batched r×r eigendecomposition instead of a QR of the tall U: one batched matmul, fast on
    GPUs (batched QR of tall matrices is not; on a CPU the QR is faster for small n). The Gram matrix is formed in
    float64, so singular values down to ~1e-7 of the largest are accurate to float32 precision."""
    return _gram(U)[0]


def _gram(U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, R⁺): `gram_root` and its pseudo-inverse ``E diag(1/√λ)`` (zero where λ was set to zero)."""
    U = U.to(torch.float64)
    lam, E = torch.linalg.eigh(U.mT @ U)
    tol = lam.amax(-1, keepdim=True).clamp(min=0) * (U.shape[-1] * torch.finfo(torch.float64).eps)
    keep = lam > tol
    root = torch.where(keep, lam, torch.zeros_like(lam)).sqrt()
    inv = torch.where(keep, 1.0 / torch.where(keep, root, torch.ones_like(root)), torch.zeros_like(root))
    return root.unsqueeze(-1) * E.mT, E * inv.unsqueeze(-2)


def _method(U: torch.Tensor, method: str | None) -> str:
    """``"qr"`` (Householder QR of U and V: the most accurate, fastest on a CPU) or ``"gram"`` (`gram_root`: one
    batched matmul, far faster on a GPU, where batched QR of tall matrices is slow); default by U's device."""
    method = method or ("qr" if U.device.type == "cpu" else "gram")
    if method not in ("qr", "gram"):
        raise ValueError(f"method must be 'qr' or 'gram', got {method!r}")
    return method


def core(U: torch.Tensor, V: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """The core ``C = R₁R₂ᵀ`` with U = Q₁R₁, V = Q₂R₂ (Q orthonormal): ΔW = Q₁ C Q₂ᵀ, so C has the singular values
    of ΔW. R from a reduced QR (``method="qr"``) or `gram_root` (``"gram"``, float64). O((n+m)r²), ΔW never formed."""
    if _method(U, method) == "qr":
        return torch.linalg.qr(U)[1] @ torch.linalg.qr(V)[1].mT
    return gram_root(U) @ gram_root(V).mT


def singular_values(U: torch.Tensor, V: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """The min(n, m, r) singular values of ΔW = U Vᵀ (descending, (B, ·)) as ``svdvals(R₁R₂ᵀ)`` (see `core`), in
    U's dtype; ΔW is never formed. GL(r)-invariant: (U R, V R⁻ᵀ) has the same ΔW, hence the same values."""
    k = min(U.shape[-2], V.shape[-2], U.shape[-1])
    return torch.linalg.svdvals(core(U, V, method))[..., :k].to(U.dtype)


def canonical_factors(U: torch.Tensor, V: torch.Tensor, method: str | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD canonical form: ``C = R₁R₂ᵀ = P S Qᵀ``, ``U' = Q₁P√S``, ``V' = Q₂Q√S`` with U'V'ᵀ = UVᵀ.

    ``method`` as in `core`: ``"qr"`` takes Q₁, Q₂ from the QRs; ``"gram"`` takes ``Q₁ = U R₁⁺`` (R₁⁺ the
    pseudo-inverse of `gram_root`, from the same eigendecomposition; likewise Q₂), exact on the directions with S > 0,
    the only ones that reach U'. There are min(n, m, r) columns, ordered by singular value (descending); each column
    pair's sign is fixed so that the largest-magnitude entry of the U' column is positive. The result depends on ΔW
    only — hence is invariant to (U, V) ↦ (UR, VR⁻ᵀ) for every R ∈ GL(r) — whenever the nonzero singular values are
    distinct and no U' column has two entries tied for largest magnitude (generic inputs). Zero singular values give
    zero columns.
    """
    k = min(U.shape[-2], V.shape[-2], U.shape[-1])
    if _method(U, method) == "qr":
        (Q1, R1), (Q2, R2) = torch.linalg.qr(U), torch.linalg.qr(V)
    else:
        (R1, R1p), (R2, R2p) = _gram(U), _gram(V)
        Q1, Q2 = U.to(torch.float64) @ R1p, V.to(torch.float64) @ R2p
    P, S, Qh = torch.linalg.svd(R1 @ R2.mT, full_matrices=False)  # min(n,r)×min(m,r): square unless r > n or m
    rs = torch.sqrt(S[..., :k]).unsqueeze(-2)
    Uc, Vc = (Q1 @ P[..., :k]) * rs, (Q2 @ Qh.mT[..., :k]) * rs
    idx = Uc.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(Uc, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (Uc * sign).to(U.dtype), (Vc * sign).to(V.dtype)


def column_basis(U: torch.Tensor, V: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """An orthonormal basis (B, n, min(n, m, r)) of the column space of ΔW = U Vᵀ: the canonical columns
    (`canonical_factors`, U'ᵀU' = S) divided by √s_j, ordered by singular value; columns with ``s_j ≤ rtol·s_max``
    (default: √ε of the dtype) are zero. The basis itself depends on the sign rule; ``basis·basisᵀ`` does not."""
    Uc, _ = canonical_factors(U, V)
    s = (Uc * Uc).sum(-2)                                    # = S, the singular values of ΔW
    rtol = torch.finfo(U.dtype).eps ** 0.5 if rtol is None else rtol
    keep = s > rtol * s.amax(-1, keepdim=True).clamp(min=torch.finfo(U.dtype).tiny)
    inv = torch.where(keep, torch.where(keep, s, torch.ones_like(s)).rsqrt(), torch.zeros_like(s))
    return Uc * inv.unsqueeze(-2)


def column_space_projector(U: torch.Tensor, V: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """The orthogonal projector (B, n, n) onto the column space of ΔW = U Vᵀ (`column_basis` times its transpose).

    A function of ΔW's column space alone — the output-side subspace the finetuning moved — so invariant to GL(r), to
    any rescaling of ΔW and to its row space (where a LoRA's random A init sits). Cost O(n²r) per module."""
    Q = column_basis(U, V, rtol)
    return Q @ Q.mT


# ---------------------------------------------------------------------------------------------------------------

class Featurizer(nn.Module):
    """Base class. ``invariant_to`` is one of ``"nothing"``, ``"O(r)"``, ``"GL(r)"``. ``rank`` is the number k of
    components kept per module (see the module docstring): the largest true rank of the training batch unless given."""

    name = "base"
    invariant_to = NOTHING
    forms_delta = False
    fixed_dim = False       # True: the width does not depend on a fitted rank

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

    def symmetric_blocks(self) -> list[int] | None:
        """When module ℓ's features are a flattened symmetric n_ℓ × n_ℓ matrix (row-major, modules in spec order), the
        n_ℓ: entries (i, j) and (j, i) are always equal, so a linear map reading them needs only their summed weight
        (`lol.checkpoint.store_half` stores it so). None for any other featurizer."""
        return None

    def forward(self, batch: LoRABatch) -> torch.Tensor:
        return torch.cat(self.per_module(batch), dim=1)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, invariant_to={self.invariant_to!r}"


class FlattenFactors(Featurizer):
    """Raw U and V of every module, flattened: Σ(n+m)·r features. Invariant to **nothing** (not even O(r)).

    Requires uniform rank: every module of every LoRA at the fitted rank. Anything else raises `SpecMismatchError`
    naming the ranks, since padding or truncating would silently change what each input coordinate means. A batch
    zero-padded to a wider tensor (e.g. selected from a mixed-rank collection) is read at its true rank."""

    name = "flatten"

    def fit(self, batch):
        r = self._true_rank(batch)
        if r is None or (self.rank is not None and r != self.rank):
            self._raise(batch)
        self.rank = r
        return self

    @staticmethod
    def _true_rank(batch) -> int | None:
        r = torch.unique(batch.ranks)
        return int(r[0]) if r.numel() == 1 else None

    def _raise(self, batch):
        ranks = sorted(set(batch.ranks.flatten().tolist()))
        raise SpecMismatchError(f"flattened-factor features need every module at one rank"
                                f"{'' if self.rank is None else f' ({self.rank})'}; this batch has ranks {ranks}")

    def per_module(self, batch):
        r = self._need_rank()
        if self._true_rank(batch) != r:
            self._raise(batch)
        # columns beyond the true rank are zero padding (LoRABatch contract): drop them
        return [torch.cat([U[..., :r].flatten(1), V[..., :r].flatten(1)], 1) for U, V in zip(batch.U, batch.V)]


class DenseDelta(Featurizer):
    """ΔW = U Vᵀ of every module, flattened: Σ n·m features (46,755,840 for SD-1.x q/v). The only featurizer that
    forms ΔW. Invariant to ∏ GL(r_ℓ) and complete (determines the LoRA's effect exactly); any rank, mixed ranks."""

    name = "dense"
    invariant_to = GL
    forms_delta = True
    fixed_dim = True

    def dim(self):
        return self.spec.total_dense

    def per_module(self, batch):
        return [(U @ V.mT).flatten(1) for U, V in zip(batch.U, batch.V)]


class ColumnSpace(Featurizer):
    """The projector onto each ΔW_ℓ's column space (`column_space_projector`), flattened: Σ n² features. Invariant to
    ∏ GL(r_ℓ), to rescaling each ΔW_ℓ and to its row space — it keeps only the output-side subspace a finetune moved,
    which is where data-dependent signal sits when the input side is dominated by LoRA's random A init. Any rank."""

    name = "colspace"
    invariant_to = GL
    fixed_dim = True

    def dim(self):
        return sum(o * o for o, _ in self.spec.shapes)

    def per_module(self, batch):
        return [column_space_projector(U, V).flatten(1) for U, V in zip(batch.U, batch.V)]

    def symmetric_blocks(self):
        return [o for o, _ in self.spec.shapes]      # each projector is symmetric


class ColumnBasis(Featurizer):
    """Orthonormal bases of each ΔW_ℓ's column space (`column_basis`), the k = ``rank`` directions of the largest
    singular values (zero columns when ΔW_ℓ has fewer), flattened: Σ n·k features. Not invariant as such (the basis
    carries the canonical sign rule); a model reading only ``Q Qᵀ`` through it is GL-invariant (see
    `lol.models.ColumnSketch`). Any rank."""

    name = "colbasis"
    invariant_to = GL  # up to the basis' sign rule (Q Qᵀ exactly)

    def dim(self):
        return sum(o for o, _ in self.spec.shapes) * self._need_rank()

    def per_module(self, batch):
        k = self._need_rank()
        return [keep_components(column_basis(U, V), k).flatten(1) for U, V in zip(batch.U, batch.V)]


class SingularValues(Featurizer):
    """The k = ``rank`` largest singular values of each ΔW_ℓ (descending, zero-padded when ΔW_ℓ has fewer): L·k
    features, computed as ``svdvals(R₁R₂ᵀ)`` (see `core`) in O((n+m)r² + r³), never forming ΔW. Invariant to
    ∏ GL(r_ℓ) (and to left/right rotations of ΔW, hence not complete). Any rank: a LoRA of rank > k keeps its top k."""

    name = "svals"
    invariant_to = GL

    def dim(self):
        return len(self.spec) * self._need_rank()

    def per_module(self, batch):
        k = self._need_rank()
        return [keep_components(singular_values(U, V), k) for U, V in zip(batch.U, batch.V)]


class SVDCanonical(Featurizer):
    """SVD canonical factors (U', V') of every module (see `canonical_factors`), the k = ``rank`` columns of the
    largest singular values (zero columns when ΔW_ℓ has fewer), flattened: Σ(n+m)·k features. Invariant to ∏ GL(r_ℓ)
    for generic inputs (distinct singular values); complete for ΔW of rank ≤ k (U'V'ᵀ = ΔW), else the best rank-k
    approximation of ΔW. Any rank."""

    name = "canon"
    invariant_to = GL

    def factors(self, batch: LoRABatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        k = self._need_rank()
        out = []
        for U, V in zip(batch.U, batch.V):
            Uc, Vc = canonical_factors(U, V)
            out.append((keep_components(Uc, k), keep_components(Vc, k)))
        return out

    def per_module(self, batch):
        return [torch.cat([Uc.flatten(1), Vc.flatten(1)], 1) for Uc, Vc in self.factors(batch)]


class OAlign(Featurizer):
    """Factors of each module aligned by orthogonal Procrustes onto a template LoRA from the training split, then
    flattened: Σ(n+m)·k features (k = ``rank``). Per module, O = argmax tr(Oᵀ M) with ``M = UᵀU_t + VᵀV_t`` (r × k)
    over the r×k matrices with orthonormal rows (r ≤ k) or columns (r > k), i.e. ``O = A Bᵀ`` from the reduced SVD
    ``M = A S Bᵀ``; features (UO, VO). For r ≤ k this is the square Procrustes rotation of U zero-padded to k (exact:
    UO (VO)ᵀ = ΔW); for r > k it keeps the k-dimensional part of (U, V) best aligned with the template.

    Invariant to ∏ O(r_ℓ) **only** (U ↦ UQ turns M into QᵀM and O into QᵀO): a GL element that is not orthogonal
    (a scaling or shear) changes the features. The template (the first training LoRA with every module at rank k)
    is stored in buffers ``template_U_ℓ``, ``template_V_ℓ``."""

    name = "oalign"
    invariant_to = ORTHOGONAL

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
            getattr(self, f"template_U_{ell}").copy_(U[b, :, : self.rank])
            getattr(self, f"template_V_{ell}").copy_(V[b, :, : self.rank])
        return self

    def per_module(self, batch):
        self._need_rank()
        out = []
        for ell, (U, V) in enumerate(zip(batch.U, batch.V)):
            Ut = getattr(self, f"template_U_{ell}").to(U.dtype)
            Vt = getattr(self, f"template_V_{ell}").to(U.dtype)
            A, _, Bh = torch.linalg.svd(U.mT @ Ut + V.mT @ Vt, full_matrices=False)
            O = A @ Bh                                                     # (B, r, k)
            out.append(torch.cat([(U @ O).flatten(1), (V @ O).flatten(1)], 1))
        return out


FEATURIZERS = {c.name: c for c in (FlattenFactors, DenseDelta, ColumnSpace, SingularValues, OAlign, SVDCanonical)}
