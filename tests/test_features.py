import pytest
import torch

from helpers_models import SPEC, random_batch
from lol.batch import LoRABatch
from lol.errors import SpecMismatchError
from lol.features import (DenseDelta, FlattenFactors, OAlign, SingularValues, SVDCanonical, canonical_factors,
                          singular_values)
from lol.symmetry import assert_gl_invariant, gl_invariance_error, one_sided_act


@pytest.fixture
def batch():
    return random_batch(6, rank=3, mixed=True, seed=1)


def test_singular_values_match_dense_svd_without_forming_delta(batch):
    for U, V in zip(batch.U, batch.V):
        dense = torch.linalg.svdvals(U @ V.mT)[:, :3]
        assert torch.allclose(singular_values(U, V), dense, atol=1e-10)


def test_canonical_form_reconstructs_delta_and_is_balanced(batch):
    for U, V in zip(batch.U, batch.V):
        Uc, Vc = canonical_factors(U, V)
        assert torch.allclose(Uc @ Vc.mT, U @ V.mT, atol=1e-10)
        # balanced: U'ᵀU' = V'ᵀV' = S (diagonal, descending)
        G = Uc.mT @ Uc
        assert torch.allclose(G, Vc.mT @ Vc, atol=1e-10)
        assert torch.allclose(G, torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1)), atol=1e-10)
        # sign rule: the largest-magnitude entry of every nonzero U' column is positive
        big = torch.gather(Uc, 1, Uc.abs().argmax(1, keepdim=True))
        assert (big[Uc.abs().amax(1, keepdim=True) > 1e-9] > 0).all()


@pytest.mark.parametrize("cls", [DenseDelta, SingularValues, SVDCanonical])
def test_invariant_featurizers_are_gl_invariant_and_sensitive(cls, batch):
    f = cls(SPEC).fit(batch)
    assert f.invariant_to == "GL(r)"
    y = f(batch)
    assert y.shape == (6, f.dim())
    assert assert_gl_invariant(f, batch, atol=1e-9, rtol=1e-8) < 1e-8
    assert gl_invariance_error(f, batch, act=one_sided_act) > 1e-2


def test_flatten_is_not_invariant_and_needs_uniform_rank():
    b = random_batch(4, rank=3)
    f = FlattenFactors(SPEC).fit(b)
    assert f(b).shape == (4, SPEC.total_out_plus_in * 3)
    assert gl_invariance_error(f, b) > 0.1
    assert gl_invariance_error(f, b, act=lambda x, R: x) == 0.0
    with pytest.raises(SpecMismatchError, match=r"one rank \(3\); this batch has ranks \[1, 2, 3\]"):
        f(random_batch(4, rank=3, mixed=True))


def test_oalign_is_orthogonal_invariant_but_not_gl_invariant(batch):
    f = OAlign(SPEC).fit(batch)
    assert f.invariant_to == "O(r)"
    x = batch.select([1, 2, 3, 4, 5])
    # cond=1 samples orthogonal R: O-Align is invariant to those
    assert gl_invariance_error(f, x, cond=1.0) < 1e-9
    # a non-orthogonal R ∈ GL(r) (scalings/shears) changes the features
    assert gl_invariance_error(f, x, cond=4.0) > 1e-2
    with pytest.raises(AssertionError, match="not GL-invariant"):
        assert_gl_invariant(f, x)


def test_fitted_rank_bounds_are_enforced(batch):
    f = SingularValues(SPEC, rank=2)
    with pytest.raises(SpecMismatchError, match=r"ranks ≤ 2.*rank 3 at module"):
        f(batch)
    # smaller ranks are zero-padded: a rank-3 model accepts a rank-2 LoRA
    g = SVDCanonical(SPEC).fit(batch)
    small = random_batch(2, rank=2)
    assert g(small).shape == (2, g.dim())


def test_featurizers_have_no_per_lora_loop_dependence():
    """Features of a batch equal the features of each LoRA alone (batched code does not mix LoRAs)."""
    b = random_batch(4, rank=3, mixed=True, seed=2)
    for cls in (SingularValues, SVDCanonical, OAlign, DenseDelta):
        f = cls(SPEC).fit(b)
        full = f(b)
        for i in range(4):
            one = LoRABatch.from_loras([b.lora(i)], SPEC, dtype=torch.float64)
            assert torch.allclose(f(one), full[i:i + 1], atol=1e-10), cls.__name__
