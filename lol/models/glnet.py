"""GL-net (paper §2): a GL(r)-equivariant network on the factor pairs (U_ℓ, V_ℓ), with an invariant head.

Layers, all per module ℓ and never mixing U with V or one module with another:

1. `GLInput`: ``(U, V) ↦ (Φ_ℓ U, Ψ_ℓ V)`` with learned Φ_ℓ ∈ R^{h×n_ℓ}, Ψ_ℓ ∈ R^{h×m_ℓ}. Left multiplication commutes
   with the right action ``U ↦ U R``, ``V ↦ V R⁻ᵀ``, so the layer is equivariant; it does not depend on r, so one
   network accepts any rank. Modules with equal n (resp. m) are stacked into one batched matmul
   ``(G, h, n) @ (G, n, B·r)``.
2. `RowGate`: ``U ← diag(g(z_U)) U`` with ``z_U = U (Vᵀ 1)`` and ``V ← diag(g(z_V)) V`` with ``z_V = V (Uᵀ 1)``,
   computed in O((n + m) r) without forming U Vᵀ. z is invariant (``U R R⁻¹ Vᵀ 1 = U Vᵀ 1``), so scaling rows
   by a function of it is equivariant. ``gate="hard"``: ``g = 1[z > 0]`` (the paper's gate); like a ReLU, gradients
   flow through the kept rows of U (the indicator itself has zero gradient), which is what makes it train.
   ``gate="sigmoid"``: ``g = σ(z / rms_rows(z))``, a smooth, scale-free version (rms over the h rows is invariant).
3. `GLHidden`: per-module h×h maps ``(U, V) ↦ (W_ℓ U, W'_ℓ V)`` for deeper layers, one batched matmul over modules.
4. `InvariantHead`: ``P_ℓ = (Φ U)(Ψ V)ᵀ ∈ R^{h×h}`` per module — invariant since ``U R (V R⁻ᵀ)ᵀ = U Vᵀ`` — either
   flattened (``pool="flat"``) or averaged to one number per module (``pool="mean"``), scaled per module by a
   constant fitted on the training split, then an MLP (Linear, LayerNorm, ReLU, Linear). Optionally
   (``head_channels=s``) a last per-module h → s linear map on both sides first (an *invariant sketch*: P_ℓ becomes
   the s×s matrix ``A_ℓ P_ℓ B_ℓᵀ``), which makes the head L·s² wide instead of L·h².
5. Scale features (``scale_features``, default ``"log+linear"``): P is positively homogeneous in the LoRA's scale
   (``P(cU, V) = c P(U, V)`` for c > 0: Φ, Ψ and the hidden maps are linear, and both gates depend only on signs or
   on z/rms(z)), and the LayerNorm right after the trunk's first Linear divides that scale out again, so the paper's
   head is all but blind to how large a LoRA's update is (ΔW norms span a factor of ~2,000 in the shipped LM
   collection, and the labels follow them). `InvariantHead.scale_features` gives, per module, the RMS of P
   (``‖P_ℓ‖_F`` from r×r Gram matrices, never forming P) as its log standardized with training statistics and
   (``"log+linear"``) as the ratio to its training geometric mean; they join the trunk's output and pass one more
   (Linear, LayerNorm, ReLU) block (``mix``) before the output Linear, past the LayerNorm that would cancel them.
   ``scale_features=None`` is the paper's head.

Every layer output depends on (U, V) only through ΔW_ℓ = U_ℓ V_ℓᵀ (each gate and each P is a function of ΔW), so the
model is GL-invariant, rank-agnostic, and a LoRA given at a larger rank with the same ΔW gets the same prediction.
With ``depth=1`` (the default) the model is an MLP over the learned bilinear sketches ``Φ_ℓ ΔW_ℓ Ψ_ℓᵀ`` and their
scale features; ``depth=2`` adds the row gate and one h×h layer (the paper's deeper GL-net). On the shipped
collections (a few hundred LoRAs per task) depth 1 generalizes better: results/glnet_diagnosis.md.

Internal layout and cost: U-side activations are one contiguous tensor (L, B, r, h) holding each (Φ U)ᵀ (all modules
zero-padded to the batch's largest rank; zero columns stay zero through every layer and add nothing to P), and so
are the V-side ones. Transposed factors make every layer a large matmul on views: the first layer — the only
O((n+m)r) step, 2·h·Σ(n+m)·r FLOP per LoRA — multiplies each module's factors, read in place (batches are rank-major,
`lol.batch`: the transposed factors of the whole batch are one (B·r, n) matrix, so one GEMM per module), by a
contiguous copy of its weights, writing straight into the module's slot (for training, one batched matmul per group of equal-dimension modules); it reads every factor once
(Σ(n+m)·r·4 bytes per LoRA, 1.6 MB on SD-1.x q/v at rank 4), so on a CPU memory bandwidth bounds it as much as the
FLOP do (``python -m bench models`` states both ceilings); hidden layers are one (L, B·r, h) @ (L, h, h) product;
the gate is r multiply-add passes. The flat head never materializes the (B, L·h²) products: `InvariantHead.linear` applies the MLP's first Linear module by module
(2·L·h²·width FLOP per LoRA, 34 M at h = width = 64). `GLNet.flops_per_lora` counts the whole pass (~91 MFLOP per
LoRA on SD-1.x q/v at h = width = 64, rank 4); without autograd on a CPU with several threads each thread runs a
slice of the batch (`lol.models.parallel`). ``python -m bench models`` states the throughput against that count.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..lora import ModuleSpec
from ..symmetry import GL
from .base import LoLModel, MLPTrunk, derived
from .parallel import row_parallel

__all__ = ["GLInput", "GLHidden", "RowGate", "InvariantHead", "GLNet", "pack_factors", "unpack_factors",
           "SCALE_FEATURES"]

SCALE_FEATURES = (None, "log", "log+linear")   # GLNet / InvariantHead ``scale_features``


def _groups(dims: list[int]) -> list[tuple[int, list[int]]]:
    """Module indices grouped by equal dimension, in order of first appearance."""
    out: dict[int, list[int]] = {}
    for ell, d in enumerate(dims):
        out.setdefault(d, []).append(ell)
    return list(out.items())


def _pad(X: torch.Tensor, r: int) -> torch.Tensor:
    """X (…, d, r_ℓ) zero-padded to r columns."""
    return X if X.shape[-1] == r else torch.nn.functional.pad(X, (0, r - X.shape[-1]))


def pack_factors(Xs: list[torch.Tensor], groups, r: int) -> list[torch.Tensor]:
    """Per group, the modules' factors (B, d, r_ℓ) transposed and stacked as one (G, B·r, d) tensor (zero-padded to r):
    the left operand of a single batched matmul with the group's (G, d, h) weights."""
    out = []
    for d, idx in groups:
        B = Xs[idx[0]].shape[0]
        X = torch.stack([_pad(Xs[ell], r).mT for ell in idx])
        out.append(X.reshape(len(idx), B * r, d))
    return out


def unpack_factors(H: torch.Tensor, ranks: list[int] | None = None) -> list[torch.Tensor]:
    """(L, B, r, h) → list over modules of (B, h, r_ℓ)."""
    return [H[ell].mT[..., : (ranks[ell] if ranks else H.shape[2])] for ell in range(H.shape[0])]


class GLInput(nn.Module):
    """``(U_ℓ, V_ℓ) ↦ (Φ_ℓ U_ℓ, Ψ_ℓ V_ℓ)``, grouped by equal dimension into batched matmuls. GL-equivariant."""

    def __init__(self, spec: ModuleSpec, channels: int):
        super().__init__()
        self.L, self.h = len(spec), int(channels)
        self.u_groups = _groups([o for o, _ in spec.shapes])
        self.v_groups = _groups([i for _, i in spec.shapes])
        # std 1/√d: Φ U has the column norms of U (in expectation), independent of d
        self.phi = nn.ParameterList([nn.Parameter(torch.randn(len(idx), channels, d) / math.sqrt(d))
                                     for d, idx in self.u_groups])
        self.psi = nn.ParameterList([nn.Parameter(torch.randn(len(idx), channels, d) / math.sqrt(d))
                                     for d, idx in self.v_groups])

    def _side(self, Xs, groups, weights, r, side: str):
        """(L, B, r, h), each module's slot the product (B·r, d) @ (d, h) of its transposed factors and weights.

        Without autograd (inference), one GEMM per module writes straight into its slot (``out=``), reading the
        module's factors in place against a contiguous (d, h) copy of its weights (`derived`): in the rank-major
        layout batches come in (`lol.batch`) the transposed factors are one (B·r, d) matrix, so this is a single
        (B·r, d) @ (d, h) GEMM; in the default layout, a batched GEMM over the LoRAs ((r, d) @ (d, h) each, ~1.3×
        slower on a CPU at r = 4, no copy either). With autograd (``out=`` is not differentiable), each group of
        equal-dimension modules is one batched matmul (G, B·r, d) @ (G, d, h). Same products."""
        B = Xs[0].shape[0]
        H = Xs[0].new_empty(self.L, B * r, self.h)
        if not (torch.is_grad_enabled() and any(W.requires_grad for W in weights)):
            # the weights as contiguous (G, d, h) copies, made once per weight version: BLAS then reads each module's
            # factors in place (one GEMM when rank-major; in the default layout a batched GEMM over the LoRAs, still
            # ~1.7× faster on a CPU than copying the factors to (B·r, d) first); both operands transposed is slower
            Wc = derived(self, f"{side}|{H.dtype}", weights, lambda: [W.to(H.dtype).mT.contiguous() for W in weights])
            for (_, idx), W in zip(groups, Wc):
                for k, ell in enumerate(idx):
                    torch.matmul(_pad(Xs[ell], r).mT, W[k], out=H[ell].view(B, r, self.h))
            return H.view(self.L, B, r, self.h)
        for (_, idx), W, X in zip(groups, weights, pack_factors(Xs, groups, r)):
            Y = torch.bmm(X, W.to(X.dtype).mT)
            if idx[-1] - idx[0] == len(idx) - 1:               # consecutive modules: a plain slice
                H[idx[0]: idx[-1] + 1] = Y
            else:
                H.index_copy_(0, torch.tensor(idx, device=H.device), Y)
        return H.view(self.L, B, r, self.h)

    def forward(self, Us: list[torch.Tensor], Vs: list[torch.Tensor]):
        r = max(u.shape[-1] for u in Us)
        return (self._side(Us, self.u_groups, self.phi, r, "U"), self._side(Vs, self.v_groups, self.psi, r, "V"))

    def flops_per_lora(self, spec: ModuleSpec, r: int) -> int:
        """Multiply-adds × 2 of this layer for one LoRA of rank r: 2·h·Σ(n + m)·r."""
        return 2 * self.h * spec.total_out_plus_in * r


class GLHidden(nn.Module):
    """Per-module maps ``(U_ℓ, V_ℓ) ↦ (W_ℓ U_ℓ, W'_ℓ V_ℓ)`` (h → h' channels, h' = h by default) on (L, B, r, h)
    activations, one batched matmul over modules. GL-equivariant."""

    def __init__(self, n_modules: int, channels: int, out_channels: int | None = None, gain: float = 2.0):
        super().__init__()
        out = channels if out_channels is None else int(out_channels)
        std = math.sqrt(gain / channels)  # gain 2: the gate before it keeps about half of the rows
        self.wu = nn.Parameter(torch.randn(n_modules, out, channels) * std)
        self.wv = nn.Parameter(torch.randn(n_modules, out, channels) * std)

    def forward(self, HU, HV):
        L, B, r, h = HU.shape
        return (torch.bmm(HU.reshape(L, B * r, h), self.wu.to(HU.dtype).mT).reshape(L, B, r, -1),
                torch.bmm(HV.reshape(L, B * r, h), self.wv.to(HV.dtype).mT).reshape(L, B, r, -1))


class RowGate(nn.Module):
    """The equivariant row gate ``U ← diag(g(U Vᵀ 1)) U``, ``V ← diag(g(V Uᵀ 1)) V`` in O((n+m) r)."""

    def __init__(self, gate: str = "hard"):
        super().__init__()
        if gate not in ("hard", "sigmoid"):
            raise ValueError(f"RowGate: gate must be 'hard' or 'sigmoid', got {gate!r}")
        self.gate = gate

    def _g(self, z):
        if self.gate == "hard":
            return z > 0                                  # multiplying by a bool mask: one pass, no float copy
        rms = torch.sqrt((z * z).mean(-1, keepdim=True) + 1e-30)
        return torch.sigmoid(z / rms)

    def forward(self, HU, HV, inplace: bool = False):
        """On transposed factors (L, B, r, h): ``U (Vᵀ 1) = Σ_j (Vᵀ1)_j (ΦU)ᵀ_j``, a sum of r scaled rows per module and
        LoRA (r multiply-add passes over (L, B, h): far cheaper than L·B tiny (1 × r) @ (r × h) matmuls).
        ``inplace=True`` gates HU and HV in place when no gradient flows through them (GLNet's own intermediates)."""
        zu, zv = _row_sums(HU, HV.sum(-1)), _row_sums(HV, HU.sum(-1))   # U (Vᵀ 1), V (Uᵀ 1): (L, B, 1, h)
        gu, gv = self._g(zu), self._g(zv)
        if inplace and not (torch.is_grad_enabled() and (HU.requires_grad or HV.requires_grad)):
            return HU.mul_(gu), HV.mul_(gv)
        return HU * gu, HV * gv


def _row_sums(H: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Σ_j w[..., j] H[..., j, :]`` for H (L, B, r, h) and weights w (L, B, r): (L, B, 1, h)."""
    z = H[:, :, 0] * w[:, :, 0, None]
    for j in range(1, H.shape[2]):
        z.addcmul_(H[:, :, j], w[:, :, j, None])
    return z.unsqueeze(2)


class InvariantHead(nn.Module):
    """``P_ℓ = (Φ U)(Ψ V)ᵀ`` per module and LoRA, scaled by fitted per-module constants: (B, L·h·h) for
    ``pool="flat"``, (B, L) for ``pool="mean"``. GL-invariant. With ``scale_features`` (``"log"`` or
    ``"log+linear"``) also `scale_features`, per module the size of P: the GL-invariant information the scaled products
    lose to the trunk's LayerNorm.

    The flat products come out of one batched matmul already in (B, L, h, h) order (so the trunk reads them without a
    copy), with the constant folded into the U side first; the mean is computed without forming P:
    ``mean(P) = Σ_j (1ᵀ(ΦU)_j)(1ᵀ(ΨV)_j) / (h h')``."""

    def __init__(self, n_modules: int, pool: str = "flat", scale_features: str | None = None):
        super().__init__()
        if pool not in ("flat", "mean"):
            raise ValueError(f"InvariantHead: pool must be 'flat' or 'mean', got {pool!r}")
        if scale_features not in SCALE_FEATURES:
            raise ValueError(f"InvariantHead: scale_features must be one of {SCALE_FEATURES}, got {scale_features!r}")
        self.pool, self.scale_kind = pool, scale_features
        self.register_buffer("scale", torch.ones(n_modules))
        if scale_features is not None:   # training statistics of each module's log-RMS of P
            self.register_buffer("log_mean", torch.zeros(n_modules))
            self.register_buffer("log_std", torch.ones(n_modules))

    @property
    def n_scale_features(self) -> int:
        """Width of `scale_features`: 0, L (``"log"``) or 2·L (``"log+linear"``)."""
        return {None: 0, "log": 1, "log+linear": 2}[self.scale_kind] * len(self.scale)

    def block_ms(self, HU, HV) -> torch.Tensor:
        """Per LoRA and module, the mean of the unscaled P² over its whole h×h' block (B, L), from r×r Gram matrices:
        ``‖(ΦU)(ΨV)ᵀ‖²_F = ⟨UᵀΦᵀΦU, VᵀΨᵀΨV⟩`` (P is never formed). Invariant."""
        return ((HU @ HU.mT) * (HV @ HV.mT)).sum((-1, -2)).T / (HU.shape[-1] * HV.shape[-1])

    def _log_rms(self, block_ms: torch.Tensor) -> torch.Tensor:
        """½ log(block mean square + ε_ℓ), ε_ℓ = 10⁻⁶ × the module's training mean square: a floor, so a module with
        ΔW_ℓ = 0 gets a finite value (a constant: invariance is kept)."""
        return 0.5 * torch.log(block_ms + 1e-6 / self.scale.to(block_ms.dtype) ** 2)

    def scale_features(self, HU, HV) -> torch.Tensor:
        """(B, `n_scale_features`): per module, the log-RMS of P standardized with training statistics
        (``(log rms − μ_ℓ)/σ_ℓ``) and, for ``"log+linear"``, the RMS over its training geometric mean
        (``exp(log rms − μ_ℓ)``, linear in the LoRA's scale: a far larger update than any seen in training stays far
        larger). Functions of P, so GL-invariant; they scale the way ΔW does, which P after the trunk's LayerNorm
        does not."""
        d = self._log_rms(self.block_ms(HU, HV)) - self.log_mean.to(HU.dtype)
        z = d / self.log_std.to(HU.dtype)
        return torch.cat([z, d.exp()], 1) if self.scale_kind == "log+linear" else z

    def products(self, HU, HV):
        """The unscaled P: (B, L, h, h') for ``pool="flat"``, its mean over (h, h') (B, L) for ``"mean"``."""
        L, B, r, h = HU.shape
        if self.pool == "mean":
            return (HU.sum(-1) * HV.sum(-1)).sum(-1).T / (h * HV.shape[-1])
        hu = HU.transpose(0, 1).reshape(B * L, r, h)     # (B, L, r, h): a small copy of the factors, not of P
        hv = HV.transpose(0, 1).reshape(B * L, r, -1)
        return torch.bmm(hu.mT, hv).view(B, L, h, -1)

    def forward(self, HU, HV):
        P = self.products(HU * self.scale.to(HU.dtype)[:, None, None, None], HV)
        return P.flatten(1) if self.pool == "flat" else P

    def linear(self, HU, HV, lin: nn.Linear, budget: int | None = None) -> torch.Tensor:
        """``lin(self(HU, HV))`` without holding the (B, L·h·h') products at once: ``b + Σ_ℓ s_ℓ W_ℓ vec(P_ℓ)`` over
        chunks of modules, each chunk's P (about ``budget`` numbers, at least one module's; default 2¹⁶ on CPU —
        256 KiB in float32, well inside a core's L2 cache — and 2²⁴ elsewhere, where fewer, larger kernels win)
        computed by one batched matmul on views of the activations and consumed by one batched matmul against views of
        the weight while still in cache. Same value, same invariance; it spares allocating, writing and re-reading the
        largest tensor of the model (1 MiB per LoRA at h = 64 on SD-1.x q/v). With one module per chunk (on CPU
        whenever B·h·h' ≥ 2¹⁶, e.g. B ≥ 16 at h = 64) each P_ℓ goes into one reused buffer (no autograd) and straight
        into ``y += s_ℓ P_ℓ W_ℓᵀ`` (one GEMM, the constant as its ``alpha``)."""
        if self.pool == "mean":
            return lin(self(HU, HV))
        L, B, r, h = HU.shape
        h2 = HV.shape[-1]
        W = lin.weight.view(lin.out_features, L, h * h2)
        if budget is None:
            budget = 1 << 16 if HU.device.type == "cpu" else 1 << 24
        step = max(1, budget // (B * h * h2))
        if step == 1:
            grad = torch.is_grad_enabled() and any(t.requires_grad for t in (HU, HV, lin.weight, lin.bias))
            scale = self.scale.tolist()
            y = lin.bias
            P = None if grad else HU.new_empty(B, h, h2)
            # without autograd, the weight as a contiguous (L, h·h', out) copy per weight version (`derived`): the
            # GEMM's right operand read in its natural layout, not transposed (~13 % faster)
            Wl = (W.permute(1, 2, 0) if grad else
                  derived(self, f"linear|{HU.dtype}", [lin.weight],
                          lambda: W.to(HU.dtype).permute(1, 2, 0).contiguous()))
            for ell in range(L):
                P = torch.bmm(HU[ell].mT, HV[ell]) if grad else torch.bmm(HU[ell].mT, HV[ell], out=P)
                y = torch.addmm(y, P.view(B, -1), Wl[ell], alpha=scale[ell])
            return y
        s = self.scale.to(HU.dtype)
        y = lin.bias
        for l0 in range(0, L, step):
            l1 = min(L, l0 + step)
            hu = HU[l0:l1] * s[l0:l1, None, None, None]                                          # the chunk only
            P = torch.bmm(hu.reshape(-1, r, h).mT, HV[l0:l1].reshape(-1, r, h2))                  # (Lc·B, h, h')
            y = y + torch.bmm(P.view(l1 - l0, B, -1), W[:, l0:l1].permute(1, 2, 0)).sum(0)
        return y

    def mean_square(self, HU, HV) -> torch.Tensor:
        """Per LoRA and module, the mean of the unscaled P² (B, L). For ``pool="flat"`` it comes from r×r Gram
        matrices, ``‖(ΦU)(ΨV)ᵀ‖²_F = ⟨UᵀΦᵀΦU, VᵀΨᵀΨV⟩``, never forming P."""
        if self.pool == "mean":
            return self.products(HU, HV) ** 2
        return self.block_ms(HU, HV)

    @torch.no_grad()
    def fit(self, mean_squares: list[torch.Tensor], block_ms: list[torch.Tensor] | None = None):
        """Per-module 1/RMS of the unscaled products over the training split (a constant: keeps invariance), from
        `mean_square` of each training chunk; with scale features also the mean and std over the training LoRAs of
        each module's log-RMS (from `block_ms` of each chunk)."""
        rms = torch.sqrt(torch.cat(mean_squares).double().mean(0))
        self.scale.copy_(torch.where(rms > 0, 1 / rms, torch.ones_like(rms)).to(self.scale.dtype))
        if self.scale_kind is not None and block_ms is not None:
            x = self._log_rms(torch.cat(block_ms).double())
            std = x.std(0, unbiased=False) if len(x) > 1 else torch.ones_like(rms)
            self.log_mean.copy_(x.mean(0).to(self.log_mean.dtype))
            self.log_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).to(self.log_std.dtype))


class GLNet(LoLModel):
    """GL-net: ``GLInput → [RowGate → GLHidden] × (depth − 1) → InvariantHead → (Linear, LayerNorm, ReLU)
    → [⊕ scale features → (Linear, LayerNorm, ReLU)] → Linear``.

    Invariant to ∏ GL(r_ℓ) by construction; any rank (and mixed ranks) at inference, whatever rank it was trained at.
    Hyperparameters: ``channels`` h (equivariant width), ``depth`` (equivariant linear layers), ``gate``, ``pool``,
    ``head_channels`` s (None: the paper's h×h products; s < h: the invariant sketch, L·s² head inputs — far cheaper
    when h is large: at h = 64 the flat head's first Linear alone costs 2·L·h²·width FLOP per LoRA, about 65 % of the
    first equivariant layer on SD-1.x q/v), ``width`` (MLP width), ``scale_features`` (None: the paper's head; ``"log"``
    or ``"log+linear"``: the per-module size of P joins after the trunk, see the module docstring).

    Defaults (``depth=1``, ``scale_features="log+linear"``) since the diagnosis in results/glnet_diagnosis.md; a
    checkpoint written before ``scale_features`` existed (its config has no such key) loads with `legacy_hparams`
    (None: the head it was trained with)."""

    legacy_hparams = {"scale_features": None}

    kind = "glnet"
    requires = "the fitted module spec (any ranks, mixed ranks allowed)"
    invariant_to = GL
    rank_agnostic = True
    precompute = False

    def __init__(self, spec, n_outputs, width: int = 64, channels: int = 32, depth: int = 1, gate: str = "hard",
                 pool: str = "flat", head_channels: int | None = None, scale_features: str | None = "log+linear"):
        super().__init__(spec, n_outputs, width)
        if depth < 1:
            raise ValueError(f"GLNet: depth must be ≥ 1, got {depth}")
        self.channels, self.depth, self.gate_kind, self.pool = int(channels), int(depth), gate, pool
        self.head_channels = None if head_channels is None else int(head_channels)
        self.input = GLInput(spec, channels)
        self.gate = RowGate(gate)
        self.hidden = nn.ModuleList([GLHidden(len(spec), channels) for _ in range(depth - 1)])
        # optional invariant sketch: a linear h → s map on both sides, so P_ℓ is s×s (= A_ℓ P_ℓ B_ℓᵀ), not h×h
        self.sketch = None if head_channels is None else GLHidden(len(spec), channels, self.head_channels, gain=1.0)
        self.inv = InvariantHead(len(spec), pool, scale_features)
        self.scale_features = scale_features
        s = self.head_channels or channels
        self.trunk = MLPTrunk(len(spec) * (s * s if pool == "flat" else 1), width, depth=1)
        # the scale features join the trunk's output (after its LayerNorm, which would divide them out) for one more
        # (Linear, LayerNorm, ReLU) block
        k = self.inv.n_scale_features
        self.mix = MLPTrunk(width + k, width, depth=1) if k else None
        self.head = nn.Linear(width, n_outputs)

    def config(self):
        return {"width": self.width, "channels": self.channels, "depth": self.depth, "gate": self.gate_kind,
                "pool": self.pool, "head_channels": self.head_channels, "scale_features": self.scale_features}

    def equivariant(self, Us, Vs):
        """The equivariant trunk: per-module lists → (L, B, r, h) activations (transposed factors) of both sides
        (h = ``head_channels`` when the sketch is on)."""
        HU, HV = self.input(Us, Vs)
        for layer in self.hidden:
            HU, HV = layer(*self.gate(HU, HV, inplace=True))
        if self.sketch is not None:
            HU, HV = self.sketch(HU, HV)
        return HU, HV

    def forward(self, batch):
        """``head(embed(batch))``; without autograd on a CPU with several intra-op threads, one slice of the batch per
        thread (`lol.models.parallel.row_parallel`)."""
        return row_parallel(super().forward, batch)

    def embed(self, batch):
        return row_parallel(super().embed, batch)

    def invariant_features(self, batch):
        """The scaled invariant products P (before the MLP); the scale features are `scale_features_of`."""
        self.check(batch)
        return self.inv(*self.equivariant(batch.U, batch.V))

    def scale_features_of(self, batch):
        """(B, k) the per-module scale features (`InvariantHead.scale_features`; k = 0 without)."""
        self.check(batch)
        HU, HV = self.equivariant(batch.U, batch.V)
        if self.mix is None:
            return HU.new_zeros(HU.shape[1], 0)
        return self.inv.scale_features(HU, HV)

    @torch.no_grad()
    def fit(self, batch, chunk: int = 256):
        self.check(batch)
        ms, bms = [], []
        for s in range(0, len(batch), chunk):
            b = batch.select(torch.arange(s, min(s + chunk, len(batch))))
            HU, HV = self.equivariant(b.U, b.V)
            ms.append(self.inv.mean_square(HU, HV))
            if self.mix is not None:
                bms.append(ms[-1] if self.pool == "flat" else self.inv.block_ms(HU, HV))
        self.inv.fit(ms, bms if self.mix is not None else None)
        self.fitted = True
        return self

    def embed_features(self, batch):
        """``trunk(invariant_features(batch))``, with the trunk's first Linear applied inside the invariant head
        (`InvariantHead.linear`); then, with scale features, ``mix([that, scale_features_of(batch)])``."""
        self.check(batch)
        HU, HV = self.equivariant(batch.U, batch.V)
        first, *rest = self.trunk
        y = self.inv.linear(HU, HV, first)
        for layer in rest:
            y = layer(y)
        if self.mix is not None:
            y = self.mix(torch.cat([y, self.inv.scale_features(HU, HV)], 1))
        return y

    def flops_per_lora(self, rank: int) -> dict[str, int]:
        """FLOP of the forward pass for one LoRA of rank ``rank`` (every module at that rank), layer by layer, from the
        config: 2 per multiply-add of every matmul (what `torch.utils.flop_counter.FlopCounterMode` counts — the
        ``matmul`` entry — checked in the tests), plus the elementwise work (gates, mean pooling, LayerNorm, ReLU) at
        one per operation and element (``elementwise``, approximate and under 1 % here). ``total`` is the sum."""
        L, h, r, w = len(self.spec), self.channels, int(rank), self.width
        s = self.head_channels or h
        mm = {"input": 2 * h * self.spec.total_out_plus_in * r,
              "hidden": (self.depth - 1) * 2 * 2 * L * r * h * h,
              "sketch": 0 if self.sketch is None else 2 * 2 * L * r * h * s}
        ew = {"gate": (self.depth - 1) * 2 * 4 * L * r * h,                # row sums, z, mask, gating: both sides
              "trunk_norm_relu": 8 * w}
        if self.mix is not None:
            k = self.inv.n_scale_features
            mm["scale_grams"] = 2 * 2 * L * r * r * s                       # HU HUᵀ and HV HVᵀ: r×r per module
            mm["mix"] = 2 * (w + k) * w
            ew["scale_features"] = L * (2 * r * r + 8) + 8 * w              # ⟨G_U, G_V⟩, log, standardize, exp; LN
        if self.pool == "flat":
            mm["head_products"] = 2 * L * r * s * s
            mm["trunk_linear"] = 2 * L * s * s * w
        else:
            ew["head_products"] = L * (2 * r * s + 2 * r)
            mm["trunk_linear"] = 2 * L * w
        mm["head"] = 2 * w * self.n_outputs
        out = {**mm, **ew}
        out["matmul"], out["elementwise"] = sum(mm.values()), sum(ew.values())
        out["total"] = out["matmul"] + out["elementwise"]
        return out
