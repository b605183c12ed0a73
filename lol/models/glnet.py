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
   constant fitted on the training split, then an MLP (Linear, LayerNorm, ReLU, Linear).

Every layer output depends on (U, V) only through ΔW_ℓ = U_ℓ V_ℓᵀ (each gate and each P is a function of ΔW), so the
model is GL-invariant, rank-agnostic, and a LoRA given at a larger rank with the same ΔW gets the same prediction.
With ``depth=1`` the model is an MLP over the learned bilinear sketches ``Φ_ℓ ΔW_ℓ Ψ_ℓᵀ``.

Internal layout: U-side activations are one tensor (L, B, r, h) holding each (Φ U)ᵀ (all modules zero-padded to the
batch's largest rank; zero columns stay zero through every layer and add nothing to P). Transposed factors make every
layer one large contiguous matmul: the first layer computes ``Uᵀ Φᵀ`` as a (B·r × n) @ (n × h) product per module
(after a cheap batched transpose), instead of the permuting copy that ``Φ U`` over a batch would need.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..lora import ModuleSpec
from .base import LoLModel, MLPTrunk

__all__ = ["GLInput", "GLHidden", "RowGate", "InvariantHead", "GLNet", "pack_factors", "unpack_factors"]


def _groups(dims: list[int]) -> list[tuple[int, list[int]]]:
    """Module indices grouped by equal dimension, in order of first appearance."""
    out: dict[int, list[int]] = {}
    for ell, d in enumerate(dims):
        out.setdefault(d, []).append(ell)
    return list(out.items())


def pack_factors(Xs: list[torch.Tensor], groups, r: int) -> list[torch.Tensor]:
    """Per group, the modules' factors (B, d, r_ℓ) transposed and stacked as one (G, B·r, d) tensor (zero-padded to r):
    the left operand of a single batched matmul with the group's (G, d, h) weights."""
    out = []
    for d, idx in groups:
        B = Xs[idx[0]].shape[0]
        X = torch.stack([(Xs[ell] if Xs[ell].shape[-1] == r else
                          torch.nn.functional.pad(Xs[ell], (0, r - Xs[ell].shape[-1]))).mT for ell in idx])
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
        for name, groups in (("u_order", self.u_groups), ("v_order", self.v_groups)):
            flat = [ell for _, idx in groups for ell in idx]
            self.register_buffer(name, torch.argsort(torch.tensor(flat)), persistent=False)

    def _side(self, Xs, groups, weights, order, r):
        B = Xs[0].shape[0]
        Y = torch.cat([torch.bmm(X, W.to(X.dtype).mT) for W, X in zip(weights, pack_factors(Xs, groups, r))])
        return Y.index_select(0, order.to(Y.device)).reshape(self.L, B, r, self.h)

    def forward(self, Us: list[torch.Tensor], Vs: list[torch.Tensor]):
        r = max(u.shape[-1] for u in Us)
        return (self._side(Us, self.u_groups, self.phi, self.u_order, r),
                self._side(Vs, self.v_groups, self.psi, self.v_order, r))

    def flops_per_lora(self, spec: ModuleSpec, r: int) -> int:
        """Multiply-adds × 2 of this layer for one LoRA of rank r: 2·h·Σ(n + m)·r."""
        return 2 * self.h * spec.total_out_plus_in * r


class GLHidden(nn.Module):
    """Per-module h×h maps ``(U_ℓ, V_ℓ) ↦ (W_ℓ U_ℓ, W'_ℓ V_ℓ)`` on (L, B, r, h) activations. GL-equivariant."""

    def __init__(self, n_modules: int, channels: int):
        super().__init__()
        std = math.sqrt(2.0 / channels)  # the gate keeps about half of the rows
        self.wu = nn.Parameter(torch.randn(n_modules, channels, channels) * std)
        self.wv = nn.Parameter(torch.randn(n_modules, channels, channels) * std)

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
            return (z > 0).to(z.dtype)
        rms = torch.sqrt((z * z).mean(-1, keepdim=True) + 1e-30)
        return torch.sigmoid(z / rms)

    def forward(self, HU, HV):
        zu = torch.einsum("lbri,lbr->lbi", HU, HV.sum(-1))   # U (Vᵀ 1): row sums of U Vᵀ, never formed
        zv = torch.einsum("lbri,lbr->lbi", HV, HU.sum(-1))   # V (Uᵀ 1)
        return HU * self._g(zu).unsqueeze(2), HV * self._g(zv).unsqueeze(2)


class InvariantHead(nn.Module):
    """``P_ℓ = (Φ U)(Ψ V)ᵀ`` per module and LoRA, scaled by fitted per-module constants: (B, L·h·h) for
    ``pool="flat"``, (B, L) for ``pool="mean"``. GL-invariant."""

    def __init__(self, n_modules: int, pool: str = "flat"):
        super().__init__()
        if pool not in ("flat", "mean"):
            raise ValueError(f"InvariantHead: pool must be 'flat' or 'mean', got {pool!r}")
        self.pool = pool
        self.register_buffer("scale", torch.ones(n_modules))

    def products(self, HU, HV):
        L, B, r, h = HU.shape
        P = torch.bmm(HU.reshape(L * B, r, h).mT, HV.reshape(L * B, r, h)).reshape(L, B, h, h).transpose(0, 1)
        return P if self.pool == "flat" else P.mean((-1, -2))        # (B, L)

    def forward(self, HU, HV):
        P = self.products(HU, HV)
        s = self.scale.to(P.dtype)
        if self.pool == "flat":
            return (P * s[None, :, None, None]).flatten(1)
        return P * s

    @torch.no_grad()
    def fit(self, Ps: list[torch.Tensor]):
        """Per-module 1/RMS of the unscaled products over the training split (a constant: keeps invariance)."""
        P = torch.cat(Ps).double()
        rms = torch.sqrt((P.reshape(P.shape[0], P.shape[1], -1) ** 2).mean((0, 2)))
        self.scale.copy_(torch.where(rms > 0, 1 / rms, torch.ones_like(rms)).to(self.scale.dtype))


class GLNet(LoLModel):
    """GL-net: ``GLInput → [RowGate → GLHidden] × (depth − 1) → InvariantHead → (Linear, LayerNorm, ReLU) → Linear``.

    Invariant to ∏ GL(r_ℓ) by construction; any rank (and mixed ranks) at inference, whatever rank it was trained at.
    Hyperparameters: ``channels`` h (equivariant width), ``depth`` (equivariant linear layers), ``gate``, ``pool``,
    ``width`` (MLP width)."""

    kind = "glnet"
    requires = "the fitted module spec (any ranks, mixed ranks allowed)"
    invariant_to = "GL(r)"
    precompute = False

    def __init__(self, spec, n_outputs, width: int = 64, channels: int = 32, depth: int = 2, gate: str = "hard",
                 pool: str = "flat"):
        super().__init__(spec, n_outputs, width)
        if depth < 1:
            raise ValueError(f"GLNet: depth must be ≥ 1, got {depth}")
        self.channels, self.depth, self.gate_kind, self.pool = int(channels), int(depth), gate, pool
        self.input = GLInput(spec, channels)
        self.gate = RowGate(gate)
        self.hidden = nn.ModuleList([GLHidden(len(spec), channels) for _ in range(depth - 1)])
        self.inv = InvariantHead(len(spec), pool)
        d = len(spec) * (channels * channels if pool == "flat" else 1)
        self.trunk = MLPTrunk(d, width, depth=1)
        self.head = nn.Linear(width, n_outputs)

    def config(self):
        return {"width": self.width, "channels": self.channels, "depth": self.depth, "gate": self.gate_kind,
                "pool": self.pool}

    def equivariant(self, Us, Vs):
        """The equivariant trunk: per-module lists → (L, B, r, h) activations (transposed factors) of both sides."""
        HU, HV = self.input(Us, Vs)
        for layer in self.hidden:
            HU, HV = layer(*self.gate(HU, HV))
        return HU, HV

    def invariant_features(self, batch):
        """The scaled invariant products P (before the MLP)."""
        self.check(batch)
        return self.inv(*self.equivariant(batch.U, batch.V))

    @torch.no_grad()
    def fit(self, batch, chunk: int = 256):
        self.check(batch)
        Ps = []
        for s in range(0, len(batch), chunk):
            b = batch.select(torch.arange(s, min(s + chunk, len(batch))))
            Ps.append(self.inv.products(*self.equivariant(b.U, b.V)))
        self.inv.fit(Ps)
        self.fitted = True
        return self

    def embed_features(self, batch):
        return self.trunk(self.invariant_features(batch))
