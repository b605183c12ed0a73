import pytest
import torch

from helpers_models import random_batch, random_lora
from lol.features import DenseDelta
from lol.symmetry import (assert_gl_equivariant, assert_gl_invariant, gl_act, gl_invariance_error, one_sided_act,
                          random_gl, random_gl_like)


def test_random_gl_is_well_conditioned_and_not_orthogonal():
    g = torch.Generator().manual_seed(0)
    R = random_gl(5, g, cond=4.0, batch_shape=(20,))
    s = torch.linalg.svdvals(R)
    assert torch.allclose(s[:, 0], torch.full((20,), 2.0, dtype=torch.float64))
    assert torch.allclose(s[:, -1], torch.full((20,), 0.5, dtype=torch.float64))
    eye = torch.eye(5, dtype=torch.float64)
    assert (R.mT @ R - eye).abs().amax((1, 2)).min() > 0.5  # far from orthogonal: scalings and shears
    assert (torch.linalg.det(R) < 0).any() and (torch.linalg.det(R) > 0).any()
    Q = random_gl(4, g, cond=1.0)  # cond 1 gives the orthogonal group
    assert torch.allclose(Q.T @ Q, torch.eye(4, dtype=torch.float64))


def test_gl_act_keeps_every_delta_lora_and_batch():
    lora = random_lora(rank=3, seed=1)
    moved = gl_act(lora, random_gl_like(lora, seed=2))
    for m in lora:
        assert not torch.allclose(moved[m.name].U, m.U)
        assert torch.allclose(moved[m.name].delta(), m.delta(), atol=1e-12)
    batch = random_batch(4, rank=3, mixed=True)
    R = random_gl_like(batch, seed=3)
    gb = gl_act(batch, R)
    for ell in range(len(batch.spec)):
        assert torch.allclose(gb.U[ell] @ gb.V[ell].mT, batch.U[ell] @ batch.V[ell].mT, atol=1e-12)
        pad = torch.arange(3)[None, :] >= batch.ranks[:, ell][:, None]  # padding columns stay exactly zero
        assert (gb.U[ell].permute(0, 2, 1)[pad] == 0).all() and (gb.V[ell].permute(0, 2, 1)[pad] == 0).all()


def test_gl_act_restricts_a_full_R_to_the_true_rank():
    batch = random_batch(3, rank=3, mixed=True)
    g = torch.Generator().manual_seed(0)
    R = [random_gl(3, g, batch_shape=(3,)) for _ in batch.spec.names]  # full 3x3, also on padding
    gb = gl_act(batch, R)
    for ell in range(len(batch.spec)):
        assert torch.allclose(gb.U[ell] @ gb.V[ell].mT, batch.U[ell] @ batch.V[ell].mT, atol=1e-12)


def test_assert_gl_invariant_accepts_delta_and_rejects_raw_factors():
    batch = random_batch(4, rank=3, mixed=True)
    assert assert_gl_invariant(DenseDelta(batch.spec), batch) < 1e-12
    with pytest.raises(AssertionError, match="not GL-invariant"):
        assert_gl_invariant(lambda b: torch.cat([u.flatten(1) for u in b.U], 1), batch)
    # sensitivity: a one-sided change of the same size is visible to the invariant function
    err = gl_invariance_error(DenseDelta(batch.spec), batch, act=one_sided_act)
    assert err > 0.05


def test_assert_gl_equivariant():
    batch = random_batch(3, rank=2, mixed=True)
    g = torch.Generator().manual_seed(0)
    Phi = [torch.randn(5, o, generator=g, dtype=torch.float64) for o, _ in batch.spec.shapes]
    Psi = [torch.randn(5, i, generator=g, dtype=torch.float64) for _, i in batch.spec.shapes]

    def left(Us, Vs):  # (U, V) ↦ (Φ U, Ψ V): equivariant
        return [P @ U for P, U in zip(Phi, Us)], [P @ V for P, V in zip(Psi, Vs)]

    def squash(Us, Vs):  # entrywise tanh: not equivariant
        return [torch.tanh(U) for U in Us], [torch.tanh(V) for V in Vs]

    assert assert_gl_equivariant(left, batch) < 1e-12
    with pytest.raises(AssertionError, match="not GL-equivariant"):
        assert_gl_equivariant(squash, batch)
