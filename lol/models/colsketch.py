"""Column-space sketch: a GL-invariant model that reads only the column space of each ΔW, at GL-net's cost.

Per module ℓ with an orthonormal basis Q_ℓ (n × k) of col(ΔW_ℓ) (`lol.features.column_basis`, O((n+m)r²)), a
learned Φ_ℓ (s × n) gives the s × s matrix ``G_ℓ = (Φ_ℓ Q_ℓ)(Φ_ℓ Q_ℓ)ᵀ = Φ_ℓ P_ℓ Φ_ℓᵀ``, P_ℓ the projector onto
col(ΔW_ℓ): learned quadratic forms of the projector, computed in O(n·k·s) without forming the n × n projector. Its
upper triangle (s(s+1)/2 values per module) goes through LayerNorm and the MLP. Since G depends on P only, the model is
invariant to GL(r), to rescaling ΔW and to its row space — like `colspace` (an MLP on the full projector, Σ n²
inputs), which it approximates with Σ s·n weights in its first layer.

Cost. `column_basis` (a Householder QR of U and of V and an r×r SVD per LoRA and module) is exact but slow on a CPU:
LAPACK runs once per small matrix. So the basis comes from a Cholesky QR in the common case instead: with
``UᵀU = L Lᵀ`` (float64 Gram matrix of the transposed factors, which the sketch's GEMM reads anyway),
``Q = U L⁻ᵀ`` is an orthonormal basis of col(U), which is col(ΔW) with every direction kept whenever V has full
column rank and every singular value of ΔW clears `column_basis`'s cut (``s_j > rtol·s_max``) — certified per LoRA
and module by two batched r×r Cholesky factorizations (of UᵀU, and of ``Lᵀ(VᵀV)L − t·I``, whose eigenvalues are
ΔW's squared singular values, with the cut's margin t). LoRAs outside that case (zero-padded ranks, rank-deficient or
ill-conditioned factors, a module whose rank exceeds the fitted k) take `column_basis`. The projector, hence G, is
the same either way (up to rounding). Inference (`forward`, `embed`) multiplies the transposed factors by Φ in one
GEMM per module and applies L⁻¹ to the small (r × s) result, never forming Q; the training features (`featurize`) are
the transposed bases Qᵀ (k × n per module), which `sketch` multiplies by Φ. Without autograd the LayerNorm and the
first Linear run module by module on the s(s+1)/2 triangle of each G (`_norm_linear`), and on a CPU with several
threads each thread takes a slice of the batch (`lol.models.parallel`). `ColumnSketch.flops_per_lora` counts the
whole pass (~52 MFLOP per LoRA on rank-major SD-1.x q/v batches at s = width = 64, rank 4, float32; GL-net: ~91 at
h = width = 64).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..features import ColumnBasis, column_basis, keep_components
from ..symmetry import GL
from .base import LoLModel, MLPTrunk, derived
from .parallel import row_parallel

__all__ = ["ColumnSketch", "cholesky_bases"]


def _gram64(Xt: torch.Tensor) -> torch.Tensor:
    """(B, r, r) float64 Gram matrix of transposed factors Xt (B, r, d)."""
    X = Xt.to(torch.float64)
    return torch.bmm(X, X.mT)


def _gram(V: torch.Tensor, c: int = 4) -> torch.Tensor:
    """(B, r, r) Gram matrix VᵀV of V (B, m, r) in V's dtype, read in place. Rank-major V (`lol.batch`: Vᵀ
    contiguous, what collections give) is one plain batched GEMM ``Vᵀ @ V``. A dim-major V (contiguous (B, m, r)) is
    seen as (B, m/c, c·r), which gives one (c·r)² Gram matrix per LoRA whose c diagonal r×r blocks sum to VᵀV — c×
    the FLOP but a better shape for the batched GEMM than the transposed ``V.mT @ V`` (M = N = r), about twice as fast
    on a CPU for r = 4, c = 4 (any m not divisible by c: ``V.mT @ V``). In the rank-major layout that reshaping loses:
    the plain GEMM is ~1.8× faster than it at c = 4 (SD-1.x dims, B = 128, one thread). `_gram_flops` counts both."""
    B, m, r = V.shape
    if not _blocked(V, c):
        return torch.bmm(V.mT, V)
    W = V.view(B, m // c, c * r)
    return torch.bmm(W.mT, W).view(B, c, r, c, r).diagonal(dim1=1, dim2=3).sum(-1)


def _blocked(V: torch.Tensor, c: int = 4) -> bool:
    """Whether `_gram` takes the blocked (c·r)² route for V: dim-major and m divisible by c."""
    return V.shape[1] % c == 0 and V.is_contiguous()


def _gram_flops(d: int, r: int, blocked: bool, c: int = 4) -> int:
    """FLOP of `_gram` on one (d, r) factor: 2·d·r², c× that on the blocked route."""
    return 2 * d * r * r * (c if blocked and d % c == 0 else 1)


def cholesky_bases(GUs: list[torch.Tensor], GVs: list[torch.Tensor], dims: list[tuple[int, int]], k: int,
                   dtype: torch.dtype, rtol: float | None = None, second=None):
    """Per module, ``(Linv, ok)``: Linv (B, r, r) float64 with ``Q = U Linvᵀ`` an orthonormal basis of col(ΔW)
    keeping every direction `column_basis` keeps (the same projector ``Q Qᵀ``), and ok (B,) bool where that is
    certified (elsewhere the caller uses `column_basis`; Linv is finite there but meaningless). Linv is None for a
    module with r > k (`column_basis` truncates to the top k) or r > min(n, m).

    GUs: UᵀU per module in float64 (B, r, r); GVs: VᵀV in the factors' dtype (only certifies, so its rounding is
    covered by the margin δ below); dims: (n, m) per module; dtype: the factors' dtype, whose ε sets
    `column_basis`'s cut (``rtol`` = √ε by default) and the conditioning guard.

    ``second``: Cholesky QR2, for GUs computed in the factors' own (float32) precision. A callable ``(ℓ, L₁⁻¹) →
    Q̃ᵀQ̃`` (float64, (B, r, r)) that forms ``Q̃ = U L₁⁻ᵀ`` from the first factorization ``UᵀU ≈ L₁ L₁ᵀ`` and returns its
    Gram matrix; a second Cholesky ``Q̃ᵀQ̃ = L₂ L₂ᵀ`` then gives ``Q = Q̃ L₂⁻ᵀ``, orthonormal to the factors' ε even
    though the first Gram matrix carries an error of up to n·ε·tr(UᵀU) (the second one is that of a nearly
    orthonormal matrix). Linv is then L₂⁻¹, to be applied to Q̃ (``Qᵀ = L₂⁻¹ Q̃ᵀ``), and the certificate uses
    ``L = L₁ L₂`` with the margin δ widened by that first-Gram error."""
    out: list = [None] * len(GUs)
    by_r: dict[int, list[int]] = {}
    for ell, (GU, (n, m)) in enumerate(zip(GUs, dims)):
        r = GU.shape[-1]
        if r <= k and r <= min(n, m):
            by_r.setdefault(r, []).append(ell)
        else:
            out[ell] = (None, torch.zeros(GU.shape[0], dtype=torch.bool, device=GU.device))
    eps = torch.finfo(dtype).eps
    cut = eps ** 0.5 if rtol is None else rtol
    for r, idx in by_r.items():
        GU = torch.stack([GUs[ell] for ell in idx])                                  # (Lr, B, r, r) float64
        GV = torch.stack([GVs[ell] for ell in idx]).to(torch.float64)
        m = torch.tensor([dims[ell][1] for ell in idx], dtype=torch.float64, device=GU.device)[:, None, None, None]
        eye = torch.eye(r, dtype=torch.float64, device=GU.device)
        tr = lambda X: X.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]  # noqa: E731
        L, info = torch.linalg.cholesky_ex(GU)
        # conditioning guard, λ_min(UᵀU) > 10⁻⁵ tr(UᵀU) (cond(U) ≲ 300√r): the Cholesky QR's own error, ~ε₆₄ cond(U)²
        # from the float64 Gram matrix, stays ≤ 1e-10, and the float32 basis differs from a Householder QR's by
        # ~ε₃₂ cond(U) ≤ 1e-4 (each is that accurate); worse-conditioned factors take column_basis itself. With a
        # float32 Gram matrix (``second``) its error, ≤ n ε tr(UᵀU), is at most 8× λ_min at n = 1280 under this guard:
        # Q̃ = U L₁⁻ᵀ then has cond(Q̃)² ≤ 9, and the second pass is accurate to ~ε₃₂
        _, info_c = torch.linalg.cholesky_ex(GU - 1e-5 * tr(GU) * eye)
        n_err = 0.0
        if second is not None:
            L1inv = torch.linalg.solve_triangular(torch.where((info == 0)[..., None, None], L, eye), eye, upper=False)
            G2 = torch.stack([second(ell, L1inv[j]) for j, ell in enumerate(idx)])
            L2, info2 = torch.linalg.cholesky_ex(G2)
            L2 = torch.where((info2 == 0)[..., None, None], L2, eye)
            info = info + info2
            L = L @ L2                            # U ≈ Q (L₁ L₂)ᵀ: UᵀU ≈ L Lᵀ to the second Gram's error
            n_err = torch.tensor([dims[ell][0] for ell in idx], dtype=torch.float64, device=GU.device)[:, None, None,
                                                                                                          None]
        A = L.mT @ GV @ L                         # eigenvalues: ΔW's squared singular values (V's Gram as given)
        # |error of A| ≤ ‖L‖² ‖VᵀV error‖ ≤ tr(UᵀU) tr(VᵀV) m ε (the classical bound of a length-m dot product), plus
        # with ``second`` ‖VᵀV‖ ‖L Lᵀ − UᵀU‖ ≤ tr(VᵀV) tr(UᵀU) n ε (Weyl)
        delta = tr(GU) * tr(GV) * (m + n_err) * eps
        # certify every s_j² > 4 cut² tr(A) ≥ (2 cut s_max)²: column_basis keeps them all, with a factor 2 to spare
        _, info_a = torch.linalg.cholesky_ex(A - (4 * cut * cut * (tr(A) + r * delta) + delta) * eye)
        ok = (info == 0) & (info_c == 0) & (info_a == 0)
        Lout = L2 if second is not None else L
        Linv = torch.linalg.solve_triangular(torch.where(ok[..., None, None], Lout, eye), eye, upper=False)
        for j, ell in enumerate(idx):
            out[ell] = (Linv[j], ok[j])
    return out


class ColumnSketch(LoLModel):
    """``column bases → per-module Φ P Φᵀ (s × s, upper triangle) → LayerNorm → MLP → head`` (module docstring).

    ``channels`` = s: 64 by default, chosen on validation AUC of fashion and lm membership (3 seeds; s = 8/16/32/64
    gave 0.52/0.61/0.64/0.64 on fashion and 0.64/0.75/0.83/0.86 on lm)."""

    kind = "colsketch"
    requires = "the fitted module spec (any ranks: the fitted rank's number of largest directions is kept)"
    invariant_to = GL
    rank_agnostic = True

    def __init__(self, spec, n_outputs, width: int = 64, depth: int = 2, channels: int = 64,
                 rank: int | None = None):
        super().__init__(spec, n_outputs, width)
        self.depth, self.channels = int(depth), int(channels)
        self.features = ColumnBasis(spec, rank)
        g = torch.Generator().manual_seed(0)
        self.phi = nn.ParameterList([nn.Parameter(torch.randn(self.channels, o, generator=g))
                                     for o, _ in spec.shapes])
        iu = torch.triu_indices(self.channels, self.channels)
        self.register_buffer("triu", iu[0] * self.channels + iu[1], persistent=False)
        d = len(spec) * len(iu[0])
        self.norm = nn.LayerNorm(d)
        self.trunk = MLPTrunk(d, self.width, self.depth)
        self.head = nn.Linear(self.width, self.n_outputs)

    def config(self):
        return {"width": self.width, "depth": self.depth, "channels": self.channels, "rank": self.features.rank}

    @torch.no_grad()
    def fit(self, batch):
        self.check(batch)
        self.features.fit(batch)
        self.fitted = True
        return self

    # -- bases -----------------------------------------------------------------------------------------------------
    def _reference(self, U, V, rows) -> torch.Tensor:
        """`column_basis` of the LoRAs ``rows`` of one module, top k kept, transposed: (b, k, n)."""
        return keep_components(column_basis(U[rows], V[rows]), int(self.features.rank)).mT

    def _factors(self, batch, sketch: bool):
        """Per module Y and ``(Linv, ok)`` (`cholesky_bases`) with ``Qᵀ = Linv Y`` where ok, and Y, transposed: the
        factor's basis (B, r, n), or with ``sketch`` only its product with Φᵀ (B, r, s).

        float64 factors: one pass, the Gram matrix UᵀU in float64, Y from U itself. Other dtypes: Cholesky QR2 in the
        factors' own precision (`cholesky_bases` with ``second``), ~4× faster on a CPU than converting every U to
        float64: UᵀU from one batched GEMM reading U in place, then per module ``Q̃ᵀ = L₁⁻¹ Uᵀ`` (a contiguous
        (B, r, n), so Y = Q̃ᵀ Φᵀ is one (B·r, n) @ (n, s) GEMM) and its Gram matrix."""
        if batch.dtype != torch.float64:
            return self._factors_qr2(batch, sketch)
        k = self.features._need_rank()
        outs, GUs, GVs = [], [], []
        if sketch:
            # U read in place as the transposed left operand of a batched GEMM against Φᵀ kept contiguous (n, s)
            # (`derived`: no transposed copy of the factors, ~1.7× faster on a CPU); its float64 copy (for UᵀU) is a
            # plain conversion into one reused buffer (fresh multi-MB temporaries page-fault)
            phis = derived(self, f"phi|{batch.dtype}", list(self.phi),
                           lambda: [phi.to(batch.dtype).mT.contiguous() for phi in self.phi])
            buf64 = batch.U[0].new_empty(max(U.numel() for U in batch.U), dtype=torch.float64)
        for ell, (U, V) in enumerate(zip(batch.U, batch.V)):
            B, n, r = U.shape
            if sketch:
                GUs.append(_gram(buf64[:U.numel()].view(B, n, r).copy_(U)))
                outs.append(torch.matmul(U.mT, phis[ell]))
            else:
                Ut = U.mT.contiguous()
                GUs.append(_gram64(Ut))
                outs.append(Ut)
            GVs.append(_gram(V))
        return outs, cholesky_bases(GUs, GVs, list(self.spec.shapes), k, batch.dtype)

    def _factors_qr2(self, batch, sketch: bool):
        k = self.features._need_rank()
        outs: list = [None] * len(batch.U)
        if sketch:
            phis = derived(self, f"phi|{batch.dtype}", list(self.phi),
                           lambda: [phi.to(batch.dtype).mT.contiguous() for phi in self.phi])

        def second(ell, L1inv):
            U = batch.U[ell]
            # L₁⁻¹ row-major (LAPACK returns it column-major: with Uᵀ also transposed, BLAS takes a slow path)
            Qt = torch.bmm(L1inv.to(U.dtype, memory_format=torch.contiguous_format), U.mT)  # Q̃ᵀ = L₁⁻¹ Uᵀ (B, r, n)
            outs[ell] = torch.matmul(Qt, phis[ell]) if sketch else Qt
            return torch.bmm(Qt, Qt.mT).double()

        GUs = [_gram(U).double() for U in batch.U]
        GVs = [_gram(V) for V in batch.V]
        return outs, cholesky_bases(GUs, GVs, list(self.spec.shapes), k, batch.dtype, second=second)

    def bases(self, batch) -> list[torch.Tensor]:
        """Per module the transposed orthonormal basis Qᵀ (B, k, n) of col(ΔW) (`column_basis`'s k largest
        directions, zero rows where there are fewer): Cholesky QR where certified, `column_basis` elsewhere."""
        k = self.features._need_rank()
        Uts, chol = self._factors(batch, sketch=False)
        out = []
        for ell, ((Linv, ok), Ut) in enumerate(zip(chol, Uts)):
            B, n, r = batch.U[ell].shape
            Qt = batch.U[ell].new_zeros(B, k, n)
            if Linv is not None:                                    # Qᵀ = L⁻¹ Uᵀ
                Qt[:, :r] = torch.bmm(Linv.to(Ut.dtype), Ut)
            if not bool(ok.all()):
                rows = (~ok).nonzero()[:, 0]
                Qt[rows] = self._reference(batch.U[ell], batch.V[ell], rows)
            out.append(Qt)
        return out

    def featurize(self, batch):
        """(B, Σ k·n): the transposed bases Qᵀ of every module (`bases`), flattened: parameter-free, so the trainer
        computes them once per LoRA."""
        self.check(batch)
        return torch.cat([Qt.flatten(1) for Qt in self.bases(batch)], 1)

    def sketch_factors(self, batch) -> list[torch.Tensor]:
        """Per module Z = (Φ Q)ᵀ / √n (B, ≥ r, s) without forming Q: ``Linv Y`` (`_factors`: L⁻¹ (ΦU)ᵀ, or
        L₂⁻¹ (ΦQ̃)ᵀ) where the Cholesky QR is certified, ``Qᵀ Φᵀ`` from `column_basis` elsewhere. ``ZᵀZ = Φ P Φᵀ / n``."""
        self.check(batch)
        Ys, chol = self._factors(batch, sketch=True)
        Zs = []
        for ell, ((Linv, ok), Y, phi) in enumerate(zip(chol, Ys, self.phi)):
            B, n, r = batch.U[ell].shape
            c = 1 / math.sqrt(n)
            Wt = phi.to(batch.dtype).mT
            if Linv is None:                                        # the whole module through column_basis
                Zs.append((self._reference(batch.U[ell], batch.V[ell], slice(None)) @ Wt).mul_(c))
                continue
            Z = torch.bmm(Linv.to(Y.dtype) * c, Y)                  # (Φ Q)ᵀ / √n, Q = U L⁻ᵀ
            if not bool(ok.all()):                                  # r ≤ k here: the reference's first r rows hold Q
                rows = (~ok).nonzero()[:, 0]
                Z = Z.index_copy(0, rows, (self._reference(batch.U[ell], batch.V[ell], rows)[:, :r] @ Wt).mul_(c))
            Zs.append(Z)
        return Zs

    def _factors_of_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per module Z = (Φ Q)ᵀ / √n (B, k, s) from the flattened transposed bases."""
        k, Zs, start = int(self.features.rank), [], 0
        B = x.shape[0]
        for (o, _), phi in zip(self.spec.shapes, self.phi):
            Qt = x[:, start:start + o * k].reshape(B * k, o)
            start += o * k
            Zs.append((Qt @ phi.to(x.dtype).mT).mul_(1 / math.sqrt(o)).view(B, k, -1))
        return Zs

    # -- sketch → LayerNorm → MLP ----------------------------------------------------------------------------------
    def _triangles(self, Zs: list[torch.Tensor]) -> torch.Tensor:
        """(B, L·s(s+1)/2): the upper triangles of ``G_ℓ = Z_ℓᵀ Z_ℓ = Φ_ℓ P_ℓ Φ_ℓᵀ / n_ℓ``."""
        B, s = Zs[0].shape[0], self.channels
        return torch.cat([torch.bmm(Z.mT, Z).view(B, s * s)[:, self.triu] for Z in Zs], 1)

    def sketch(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L·s(s+1)/2): the upper triangles of Φ_ℓ P_ℓ Φ_ℓᵀ / n_ℓ from the flattened transposed bases."""
        return self._triangles(self._factors_of_features(x))

    def _norm_linear(self, Zs: list[torch.Tensor]) -> torch.Tensor:
        """``trunk[0](norm(_triangles(Zs)))`` without the (B, L·s(s+1)/2) features (34 MB at B = 64 on SD-1.x q/v:
        past glibc's mmap threshold, so page faults on every call) nor their normalized copy. Per module, G goes into
        one reused buffer and its triangle into another, whose mean and centred sum of squares are kept (the
        LayerNorm's statistics, combined exactly across modules at the end); the triangle times γ_ℓ meets the
        Linear's weight columns W_ℓ in one GEMM accumulating ``Σ_ℓ W_ℓ (γ_ℓ ⊙ x_ℓ)``. Two extra buffer rows (γ_ℓ, and
        β_ℓ) give ``W γ`` and ``W β`` in the same GEMMs, and ``LN(x) = (x − μ)/σ ⊙ γ + β`` makes the Linear
        ``(W(γ⊙x) − μ Wγ)/σ + Wβ + b``."""
        lin, ln = self.trunk[0], self.norm
        B, s, L, T = Zs[0].shape[0], self.channels, len(Zs), len(self.triu)
        # the Linear's weight as contiguous (L, T, width) blocks (`derived`): each GEMM reads its right operand in its
        # natural layout, not transposed
        Wl = derived(self, f"linear|{Zs[0].dtype}", [lin.weight],
                     lambda: lin.weight.to(Zs[0].dtype).view(-1, L, T).permute(1, 2, 0).contiguous())
        gamma, beta = ln.weight.view(L, T), ln.bias.view(L, T)
        G = Zs[0].new_empty(B, s, s)
        buf, d = Zs[0].new_empty(B + 2, T), Zs[0].new_empty(B, T)   # reused: fresh 1 MB temporaries cost 4× more
        acc = Zs[0].new_zeros(B + 2, lin.weight.shape[0])
        mean, m2 = Zs[0].new_empty(L, B), Zs[0].new_empty(L, B)
        for ell, Z in enumerate(Zs):
            torch.bmm(Z.mT, Z, out=G)
            x = buf[:B]
            torch.index_select(G.view(B, s * s), 1, self.triu, out=x)
            torch.mean(x, 1, out=mean[ell])
            torch.sub(x, mean[ell][:, None], out=d)
            torch.linalg.vecdot(d, d, out=m2[ell])
            buf[B] = 1
            buf[:B + 1].mul_(gamma[ell])
            buf[B + 1] = beta[ell]
            acc = torch.addmm(acc, buf, Wl[ell])
        mean, m2 = mean.double(), m2.double()
        mu = mean.mean(0)
        var = (m2.sum(0) + T * (mean - mu).square().sum(0)) / (L * T)
        rstd = (var + ln.eps).rsqrt()[:, None]
        acc = acc.double()
        return ((acc[:B] - mu[:, None] * acc[B]) * rstd + acc[B + 1] + lin.bias.double()).to(Zs[0].dtype)

    def _embed(self, Zs: list[torch.Tensor]) -> torch.Tensor:
        if torch.is_grad_enabled():                                 # training: the plain, differentiable path
            return self.trunk(self.norm(self._triangles(Zs)))
        y = self._norm_linear(Zs)
        for layer in list(self.trunk)[1:]:
            y = layer(y)
        return y

    def embed_features(self, x):
        return self._embed(self._factors_of_features(x))

    def embed(self, batch):
        """The embedding from the Cholesky route (`sketch_factors`), never forming the bases; without autograd on a
        CPU with several intra-op threads, one slice of the batch per thread (`lol.models.parallel.row_parallel`)."""
        self.check_dtype(batch)
        return row_parallel(lambda b: self._embed(self.sketch_factors(b)), batch)

    def forward(self, batch):
        self.check_dtype(batch)
        return row_parallel(lambda b: self.head(self._embed(self.sketch_factors(b))), batch)

    def flops_per_lora(self, rank: int, batch: int = 64, dtype: torch.dtype = torch.float32,
                       rank_major: bool = True) -> dict[str, float]:
        """FLOP of the inference forward pass (`forward`: the Cholesky-QR route) for one LoRA of rank ``rank`` ≤ k in
        a batch of ``batch``, layer by layer, from the config: 2 per multiply-add of every matmul (what
        `torch.utils.flop_counter.FlopCounterMode` counts — ``matmul``; checked in the tests), plus approximate
        elementwise work (``elementwise``: r×r factorizations, LayerNorm statistics and scaling, ReLU). The streamed
        first Linear has two extra rows per batch (Wγ and Wβ), amortized over ``batch``. Factors of another dtype
        than float64 take Cholesky QR2 (`_factors`): ``second_pass`` counts its L₁⁻¹Uᵀ, Q̃ᵀQ̃ and L₁L₂. ``rank_major``:
        the factors' layout (`lol.batch`; collections give rank-major batches), which sets `_gram`'s route (float64
        factors: UᵀU always from a dim-major float64 copy)."""
        L, s, r, w = len(self.spec), self.channels, int(rank), self.width
        T = s * (s + 1) // 2
        sum_n = sum(o for o, _ in self.spec.shapes)
        blocked_u = dtype == torch.float64 or not rank_major                                  # `_factors`
        gram = sum(_gram_flops(n, r, blocked_u) + _gram_flops(m, r, not rank_major) for n, m in self.spec.shapes)
        mm = {"gram": gram,
              "sketch": 2 * s * sum_n * r,
              "check": L * 2 * 2 * r ** 3,                          # Lᵀ (VᵀV) L
              "second_pass": 0 if dtype == torch.float64 else 2 * 2 * r * r * sum_n + L * 2 * r ** 3,
              "basis": 2 * L * r * r * s,                           # L⁻¹ (ΦU)ᵀ
              "products": 2 * L * r * s * s,                        # ZᵀZ
              "trunk_linear": 2 * L * T * w * (batch + 2) / batch,
              "trunk_hidden": (self.depth - 1) * 2 * w * w,
              "head": 2 * w * self.n_outputs}
        ew = {"factorizations": L * 3 * r ** 3,
              "norm": 5 * L * T + 8 * w * self.depth}
        out = {**mm, **ew}
        out["matmul"], out["elementwise"] = sum(mm.values()), sum(ew.values())
        out["total"] = out["matmul"] + out["elementwise"]
        return out
