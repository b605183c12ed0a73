"""The GL(r) symmetry of LoRA weights, and reusable assertions that a function respects it.

For every module ℓ and every invertible R ∈ GL(r_ℓ), the action ``(U, V) ↦ (U R, V R⁻ᵀ)`` leaves ΔW = U Vᵀ unchanged
(paper §1). A LoRA over L modules carries the product group ∏_ℓ GL(r_ℓ): one independent R per module, and in a batch
one per LoRA as well.

GL(r) is non-compact: it contains scalings ``(cU, V/c)`` and shears, not only rotations. Random elements are sampled
as ``R = Q₁ diag(s) Q₂`` with Haar-random orthogonal Q₁, Q₂ and s spanning ``[1/√cond, √cond]``, so R is
non-orthogonal (for r ≥ 2) yet well-conditioned, which keeps float64 checks meaningful.

In the spirit of e3nn's ``assert_equivariant``, `assert_gl_invariant` and `assert_gl_equivariant` turn "this model
is GL-invariant" into a test anyone can run on their own model; `gl_invariance_error` returns the measured error so
a test can also show that a function is *not* invariant. `one_sided_act` (U ↦ U R, V unchanged) is the standard
non-symmetric perturbation of similar size, used in sensitivity tests.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Mapping, Sequence

import torch

from .batch import LoRABatch
from .lora import LoRA

__all__ = ["INVARIANCES", "GL", "ORTHOGONAL", "NOTHING",
           "random_gl", "random_gl_like", "gl_act", "one_sided_act", "gl_invariance_error",
           "gl_equivariance_error", "assert_gl_invariant", "assert_gl_equivariant"]

# the fixed vocabulary of `invariant_to` (models and featurizers): what a model's output is exactly invariant to
NOTHING, ORTHOGONAL, GL = "nothing", "O(r)", "GL(r)"
INVARIANCES = (NOTHING, ORTHOGONAL, GL)


def random_gl(r: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
              cond: float = 4.0, batch_shape: Sequence[int] = ()) -> torch.Tensor:
    """A random well-conditioned, non-orthogonal R ∈ GL(r): ``R = Q₁ diag(s) Q₂``, shape ``(*batch_shape, r, r)``.

    Q₁, Q₂ are Haar-random orthogonal (either determinant). For r ≥ 2 the extreme singular values are exactly
    ``√cond`` and ``1/√cond`` (so cond(R) = cond: a scaling plus shear, never a rotation); the others are log-uniform
    in between. For r = 1, R is a random scalar of magnitude in ``[1/√cond, √cond]``.
    """
    if r < 1:
        raise ValueError(f"random_gl: rank must be ≥ 1, got {r}")
    if cond < 1:
        raise ValueError(f"random_gl: cond must be ≥ 1, got {cond}")
    shape = tuple(batch_shape)

    def haar():
        Z = torch.randn(*shape, r, r, generator=generator, dtype=torch.float64)
        Q, Rr = torch.linalg.qr(Z)
        return Q * torch.sign(torch.diagonal(Rr, dim1=-2, dim2=-1)).unsqueeze(-2)

    half = 0.5 * math.log(cond)
    logs = (torch.rand(*shape, r, generator=generator, dtype=torch.float64) * 2 - 1) * half
    if r >= 2:
        logs[..., 0] = half
        logs[..., 1] = -half
    R = haar() @ torch.diag_embed(torch.exp(logs)) @ haar()
    return R.to(dtype)


def _rank_mask(ranks: torch.Tensor, r: int) -> torch.Tensor:
    """(B, r) boolean: column j is a true (not padding) column of LoRA b."""
    return torch.arange(r, device=ranks.device).unsqueeze(0) < ranks.unsqueeze(1)


def _restrict(R: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """blockdiag(R[:k, :k], I) per batch element, k = ranks[b]: the action on the true columns only."""
    B, r = ranks.shape[0], R.shape[-1]
    R = R.expand(B, r, r)
    m = _rank_mask(ranks.to(R.device), r)
    keep = m.unsqueeze(2) & m.unsqueeze(1)
    eye = torch.diag_embed((~m).to(R.dtype))
    return torch.where(keep, R, torch.zeros((), dtype=R.dtype, device=R.device)) + eye


def _act(U: torch.Tensor, V: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U R, V R⁻ᵀ) for U (..., n, r), V (..., m, r), R (..., r, r); R⁻ᵀ via a solve, never an explicit inverse."""
    R = R.to(U.dtype)
    return U @ R, torch.linalg.solve(R, V.mT).mT


def gl_act(x: LoRA | LoRABatch, R) -> LoRA | LoRABatch:
    """Apply the GL action ``(U, V) ↦ (U R, V R⁻ᵀ)`` with one R per module (and per batch element).

    * ``x`` a `LoRA`: ``R`` maps module name → (r_ℓ, r_ℓ), or is a sequence in module order.
    * ``x`` a `LoRABatch`: ``R`` is a sequence over modules of (B, r_ℓ, r_ℓ) or (r_ℓ, r_ℓ) tensors, r_ℓ the padded
      rank. For a LoRA of true rank k < r_ℓ only the leading k×k block of its R acts (on its first k columns); the
      zero padding columns stay zero. ΔW of every module is unchanged.
    """
    if isinstance(x, LoRA):
        Rs = R if isinstance(R, Mapping) else dict(zip(x.names, R))
        missing = [n for n in x.names if n not in Rs]
        if missing:
            raise KeyError(f"gl_act: no group element for module(s) {missing[:3]}")

        def one(m):
            if Rs[m.name].shape != (m.rank, m.rank):
                raise ValueError(f"gl_act: module {m.name!r} has rank {m.rank} but R is {tuple(Rs[m.name].shape)}")
            return m.with_factors(*_act(m.U, m.V, Rs[m.name]))
        return x.map(one)
    if not isinstance(x, LoRABatch):
        raise TypeError(f"gl_act: expected a LoRA or LoRABatch, got {type(x).__name__}")
    if len(R) != len(x.spec):
        raise ValueError(f"gl_act: {len(R)} group elements for {len(x.spec)} modules")
    Us, Vs = [], []
    for ell, (U, V, Rl) in enumerate(zip(x.U, x.V, R)):
        r = U.shape[-1]
        if Rl.shape[-2:] != (r, r):
            raise ValueError(f"gl_act: module {x.spec.names[ell]!r} has padded rank {r} but R is "
                             f"{tuple(Rl.shape)}")
        Re = _restrict(Rl.to(device=U.device, dtype=U.dtype), x.ranks[:, ell])
        u, v = _act(U, V, Re)
        Us.append(u)
        Vs.append(v)
    return x.with_factors(Us, Vs)


def one_sided_act(x: LoRABatch, R) -> LoRABatch:
    """``(U, V) ↦ (U R, V)``: a change of the same size as a GL action that is *not* a symmetry (ΔW changes).

    Sensitivity tests use it to show an invariance check would catch a real change."""
    Us = [U @ _restrict(Rl.to(device=U.device, dtype=U.dtype), x.ranks[:, ell])
          for ell, (U, Rl) in enumerate(zip(x.U, R))]
    return x.with_factors(Us, x.V)


def random_gl_like(x: LoRA | LoRABatch, seed: int = 0, cond: float = 4.0, dtype: torch.dtype | None = None):
    """Independent random group elements for every module (and batch element) of ``x``.

    For a `LoRA`: {module name: (r, r)}. For a `LoRABatch`: a list over modules of (B, r_ℓ, r_ℓ) tensors equal to
    ``blockdiag(R_b, I)`` with R_b ∈ GL(ranks[b, ℓ]) (padding columns untouched).
    """
    g = torch.Generator().manual_seed(int(seed))
    if isinstance(x, LoRA):
        return {m.name: random_gl(m.rank, g, dtype or m.U.dtype, cond) for m in x}
    dtype = dtype or x.dtype
    out = []
    for ell, U in enumerate(x.U):
        B, r = len(x), U.shape[-1]
        Rl = torch.eye(r, dtype=torch.float64).repeat(B, 1, 1)
        ranks = x.ranks[:, ell].cpu()
        for k in torch.unique(ranks).tolist():
            if k == 0:
                continue
            idx = torch.nonzero(ranks == k).flatten()
            Rl[idx, :k, :k] = random_gl(k, g, torch.float64, cond, batch_shape=(len(idx),))
        out.append(Rl.to(device=x.device, dtype=dtype))
    return out


# ---------------------------------------------------------------------------------------------------------------
# assertions

def _in_dtype(fn, dtype):
    """``fn`` evaluated in ``dtype``: nn.Modules (and bound methods of them) are copied and cast, never mutated."""
    module = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
    if isinstance(module, torch.nn.Module):
        clone = copy.deepcopy(module).to(dtype).eval()
        return clone if fn is module else getattr(clone, fn.__name__)
    return fn


def _flat(y) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y.reshape(-1)
    if isinstance(y, (list, tuple)):
        return torch.cat([_flat(t) for t in y])
    raise TypeError(f"expected a tensor (or a list/tuple of tensors) as output, got {type(y).__name__}")


def gl_invariance_error(fn: Callable, batch: LoRABatch, n_trials: int = 3, seed: int = 0, cond: float = 4.0,
                        dtype: torch.dtype = torch.float64, act=gl_act) -> float:
    """max over trials of ``max|f(g·x) − f(x)| / max|f(x)|``: 0 for an exactly GL-invariant ``fn``.

    ``act`` may be replaced (e.g. by `one_sided_act`, or by an orthogonal-only action) to measure sensitivity."""
    fn = _in_dtype(fn, dtype)
    x = batch.to(dtype=dtype)
    with torch.no_grad():
        y0 = _flat(fn(x))
        scale = float(y0.abs().max()) or 1.0
        worst = 0.0
        for t in range(n_trials):
            y1 = _flat(fn(act(x, random_gl_like(x, seed + t, cond))))
            worst = max(worst, float((y1 - y0).abs().max()) / scale)
    return worst


def assert_gl_invariant(fn: Callable, batch: LoRABatch, atol: float = 1e-9, rtol: float = 1e-7, n_trials: int = 3,
                        seed: int = 0, cond: float = 4.0, dtype: torch.dtype = torch.float64) -> float:
    """Assert ``fn(g·x) == fn(x)`` for random non-orthogonal g ∈ ∏_ℓ GL(r_ℓ), one per module and batch element.

    ``fn`` maps a `LoRABatch` to a tensor; an nn.Module (or its bound method, e.g. ``model.embed``) is copied and cast
    to ``dtype`` (float64 by default). Passes when ``max|f(g·x) − f(x)| ≤ atol + rtol · max|f(x)|`` on every trial.
    Returns the largest relative error seen.
    """
    fn = _in_dtype(fn, dtype)
    x = batch.to(dtype=dtype)
    worst = 0.0
    with torch.no_grad():
        y0 = _flat(fn(x))
        scale = float(y0.abs().max())
        tol = atol + rtol * scale
        for t in range(n_trials):
            y1 = _flat(fn(gl_act(x, random_gl_like(x, seed + t, cond))))
            err = float((y1 - y0).abs().max())
            if not err <= tol:
                raise AssertionError(f"not GL-invariant: max|f(g·x) − f(x)| = {err:.3g} > tol {tol:.3g} "
                                     f"(atol {atol:g}, rtol {rtol:g}, max|f(x)| = {scale:.3g}, trial {t})")
            worst = max(worst, err / (scale or 1.0))
    return worst


def gl_equivariance_error(layer: Callable, batch: LoRABatch, n_trials: int = 3, seed: int = 0, cond: float = 4.0,
                          dtype: torch.dtype = torch.float64) -> float:
    """max over trials of ``max|layer(g·x) − g·layer(x)| / max|layer(x)|`` (see `assert_gl_equivariant`)."""
    return _equivariance(layer, batch, n_trials, seed, cond, dtype, tol=None)


def assert_gl_equivariant(layer: Callable, batch: LoRABatch, atol: float = 1e-9, rtol: float = 1e-7,
                          n_trials: int = 3, seed: int = 0, cond: float = 4.0,
                          dtype: torch.dtype = torch.float64) -> float:
    """Assert ``layer(g·x) == g·layer(x)`` where ``layer(Us, Vs) -> (Us', Vs')`` maps per-module lists of U (B, n, r)
    and V (B, m, r) to per-module lists of (B, n', r) and (B, m', r), and g acts on both sides as U ↦ U R,
    V ↦ V R⁻ᵀ with the same R. Passes when the error is ≤ atol + rtol · max|layer(x)|. Returns the relative error."""
    return _equivariance(layer, batch, n_trials, seed, cond, dtype, tol=(atol, rtol))


def _equivariance(layer, batch, n_trials, seed, cond, dtype, tol):
    layer = _in_dtype(layer, dtype)
    x = batch.to(dtype=dtype)
    worst = 0.0
    with torch.no_grad():
        U0, V0 = layer(x.U, x.V)
        y0 = _flat([*U0, *V0])
        scale = float(y0.abs().max())
        for t in range(n_trials):
            R = random_gl_like(x, seed + t, cond)
            gx = gl_act(x, R)
            U1, V1 = layer(gx.U, gx.V)
            gU, gV = zip(*(_act(u, v, _restrict(Rl, x.ranks[:, ell]))
                           for ell, (u, v, Rl) in enumerate(zip(U0, V0, R))))
            err = float((_flat([*U1, *V1]) - _flat([*gU, *gV])).abs().max())
            if tol is not None and not err <= tol[0] + tol[1] * scale:
                raise AssertionError(f"not GL-equivariant: max|layer(g·x) − g·layer(x)| = {err:.3g} > tol "
                                     f"{tol[0] + tol[1] * scale:.3g} (atol {tol[0]:g}, rtol {tol[1]:g}, "
                                     f"max|layer(x)| = {scale:.3g}, trial {t})")
            worst = max(worst, err / (scale or 1.0))
    return worst
