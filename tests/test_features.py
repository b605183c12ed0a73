import pytest
import torch

from helpers_models import SPEC, random_batch
from lol.batch import LoRABatch
from lol.errors import SpecMismatchError
from lol.lora import ModuleSpec
from lol.features import (ColumnSpace, DenseDelta, FlattenFactors, OAlign, SingularValues, SVDCanonical,
                          canonical_factors, column_basis, column_space_projector, singular_values)
from lol.symmetry import assert_gl_invariant, gl_act, gl_invariance_error, one_sided_act, random_gl_like


@pytest.fixture
def batch():
    return random_batch(6, rank=3, mixed=True, seed=1)


@pytest.mark.parametrize("method", ["qr", "gram"])
def test_singular_values_match_dense_svd_without_forming_delta(batch, method):
    for U, V in zip(batch.U, batch.V):
        dense = torch.linalg.svdvals(U @ V.mT)[:, :3]
        assert torch.allclose(singular_values(U, V, method), dense, atol=1e-10)


@pytest.mark.parametrize("method", ["qr", "gram"])
def test_core_methods_are_gl_invariant_and_agree(batch, method):
    """Both routes to the r×r core (QR on CPUs, Gram roots on GPUs) give GL-invariant singular values and
    canonical factors, equal to each other; an unknown method is refused."""
    def feats(b):
        out = []
        for U, V in zip(b.U, b.V):
            Uc, Vc = canonical_factors(U, V, method)
            out += [singular_values(U, V, method), Uc.flatten(1), Vc.flatten(1)]
        return torch.cat(out, 1)
    assert assert_gl_invariant(feats, batch, atol=1e-9, rtol=1e-8) < 1e-8
    assert gl_invariance_error(feats, batch, act=one_sided_act) > 1e-2
    other = {"qr": "gram", "gram": "qr"}[method]
    for U, V in zip(batch.U, batch.V):
        for a, b in zip(canonical_factors(U, V, method), canonical_factors(U, V, other)):
            assert torch.allclose(a, b, atol=1e-9)
    with pytest.raises(ValueError, match="method must be 'qr' or 'gram'"):
        singular_values(batch.U[0], batch.V[0], "svd")


def test_gram_route_is_accurate_in_float32_for_ill_conditioned_factors():
    """float32 factors whose singular values span 1e-4..1: the float64 Gram route loses nothing against QR."""
    g = torch.Generator().manual_seed(0)
    Q1 = torch.linalg.qr(torch.randn(2, 320, 4, generator=g, dtype=torch.float64))[0]
    Q2 = torch.linalg.qr(torch.randn(2, 768, 4, generator=g, dtype=torch.float64))[0]
    s = torch.tensor([1.0, 1e-1, 1e-2, 1e-4], dtype=torch.float64)
    U, V = (Q1 * s).float(), (Q2 * torch.tensor([1.0, 0.5, 2.0, 0.3], dtype=torch.float64)).float()
    exact = torch.linalg.svdvals((U.double() @ V.double().mT))[:, :4]
    for method in ("qr", "gram"):
        got = singular_values(U, V, method).double()
        assert ((got - exact).abs() / exact).max() < 1e-4, method


@pytest.mark.parametrize("method", ["qr", "gram"])
def test_canonical_form_reconstructs_delta_and_is_balanced(batch, method):
    for U, V in zip(batch.U, batch.V):
        Uc, Vc = canonical_factors(U, V, method)
        assert torch.allclose(Uc @ Vc.mT, U @ V.mT, atol=1e-10)
        # balanced: U'ᵀU' = V'ᵀV' = S (diagonal, descending)
        G = Uc.mT @ Uc
        assert torch.allclose(G, Vc.mT @ Vc, atol=1e-10)
        assert torch.allclose(G, torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1)), atol=1e-10)
        # sign rule: the largest-magnitude entry of every nonzero U' column is positive
        big = torch.gather(Uc, 1, Uc.abs().argmax(1, keepdim=True))
        assert (big[Uc.abs().amax(1, keepdim=True) > 1e-9] > 0).all()


def test_column_space_projector_is_the_projector_of_delta_and_gl_invariant(batch):
    f = ColumnSpace(SPEC).fit(batch)
    assert f.invariant_to == "GL(r)" and f(batch).shape == (6, f.dim())
    for U, V in zip(batch.U, batch.V):
        P = column_space_projector(U, V)
        Q = column_basis(U, V)                                                 # orthonormal columns, or zero
        G = Q.mT @ Q
        torch.testing.assert_close(G, torch.diag_embed((torch.diagonal(G, dim1=-2, dim2=-1) > 0.5).to(G.dtype)))
        torch.testing.assert_close(P @ P, P, atol=1e-9, rtol=1e-7)            # a projector ...
        D = U @ V.mT
        torch.testing.assert_close(P @ D, D, atol=1e-9, rtol=1e-7)            # ... onto col(ΔW) ...
        ranks = torch.linalg.matrix_rank(D)
        torch.testing.assert_close(torch.diagonal(P, dim1=-2, dim2=-1).sum(-1), ranks.to(P.dtype))  # ... of its rank
    assert assert_gl_invariant(f, batch, atol=1e-9, rtol=1e-8) < 1e-8
    g = torch.Generator().manual_seed(3)
    moved = batch.with_factors([U + 0.3 * torch.randn(U.shape, generator=g, dtype=U.dtype) * (U != 0)
                                for U in batch.U], batch.V)
    assert float((f(moved) - f(batch)).abs().max()) > 1e-2


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


WIDE = ModuleSpec(("a.to_q", "a.to_v", "b.to_q", "b.to_v"), ((24, 20), (24, 20), (32, 24), (32, 18)))


def redundant(b4: LoRABatch, seed: int = 0) -> LoRABatch:
    """The same ΔW at twice the rank: (U, V) → ([U, U], [V, V]/2), then a random GL(2r) element scrambles it."""
    b8 = LoRABatch(b4.spec, [torch.cat([u, u], -1) for u in b4.U], [torch.cat([v, v], -1) / 2 for v in b4.V],
                   b4.ranks * 2)
    b8 = gl_act(b8, random_gl_like(b8, seed, cond=4.0))
    for u, v, u4, v4 in zip(b8.U, b8.V, b4.U, b4.V):
        assert torch.allclose(u @ v.mT, u4 @ v4.mT, atol=1e-10)
    return b8


def test_fixed_component_count_pads_smaller_and_keeps_largest_of_larger_ranks():
    train = random_batch(6, spec=WIDE, rank=4, seed=11)
    for cls in (SingularValues, SVDCanonical, OAlign):
        f = cls(WIDE).fit(train)
        assert f.rank == 4
        for r in (2, 8, 16):
            b = random_batch(3, spec=WIDE, rank=r, seed=r)
            assert f(b).shape == (3, f.dim()), (cls.__name__, r)
    # svals: exactly the 4 largest singular values of ΔW (of a rank-16 LoRA), zero-padded for rank 2
    f = SingularValues(WIDE).fit(train)
    b16, b2 = random_batch(3, spec=WIDE, rank=16, seed=1), random_batch(3, spec=WIDE, rank=2, seed=2)
    dense16 = torch.linalg.svdvals(b16.U[0] @ b16.V[0].mT)
    assert torch.allclose(f(b16)[:, :4], dense16[:, :4], atol=1e-10)
    assert (f(b2).reshape(3, 4, 4)[:, :, 2:] == 0).all()
    # canon: the rank-4 truncation is the best rank-4 approximation of ΔW (Eckart–Young)
    g = SVDCanonical(WIDE).fit(train)
    Uc, Vc = g.factors(b16)[0]
    P, S, Qh = torch.linalg.svd(b16.U[0] @ b16.V[0].mT)
    best4 = P[..., :4] @ torch.diag_embed(S[..., :4]) @ Qh[..., :4, :]
    assert torch.allclose(Uc @ Vc.mT, best4, atol=1e-9)


def test_a_redundant_higher_rank_form_gives_the_same_features():
    """A rank-8 LoRA whose ΔW has rank 4 gets the rank-4 form's features (svals, canon: functions of ΔW alone); a
    rank-4 LoRA inside a batch zero-padded to width 8 (as a mixed-rank collection is stored) gets its own features
    from every featurizer, O-Align included."""
    b4 = random_batch(4, spec=WIDE, rank=4, seed=12)
    b8 = redundant(b4)
    for cls in (SingularValues, SVDCanonical, DenseDelta):
        f = cls(WIDE).fit(b4)
        assert torch.allclose(f(b8), f(b4), atol=1e-9), cls.__name__
    wide = LoRABatch(WIDE, [torch.nn.functional.pad(u, (0, 4)) for u in b4.U],
                     [torch.nn.functional.pad(v, (0, 4)) for v in b4.V], b4.ranks)
    for cls in (SingularValues, SVDCanonical, OAlign, FlattenFactors, DenseDelta):
        f = cls(WIDE).fit(wide)                    # fitting on the padded batch finds the true rank, 4
        assert f.rank == 4 and torch.allclose(f(wide), f(b4), atol=1e-10), cls.__name__
    # sensitivity: a different rank-4 LoRA at rank 8 does not collide with b4
    other = redundant(random_batch(4, spec=WIDE, rank=4, seed=13))
    assert not torch.allclose(SingularValues(WIDE).fit(b4)(other), SingularValues(WIDE).fit(b4)(b4), atol=1e-3)


@pytest.mark.parametrize("cls", [SingularValues, SVDCanonical])
def test_invariance_holds_above_and_below_the_fitted_rank(cls):
    f = cls(WIDE).fit(random_batch(6, spec=WIDE, rank=4, seed=14))
    for r in (2, 8, 16):
        b = random_batch(4, spec=WIDE, rank=r, seed=20 + r, mixed=(r == 8))
        assert assert_gl_invariant(f, b, atol=1e-9, rtol=1e-8) < 1e-8
        assert gl_invariance_error(f, b, act=one_sided_act) > 1e-2
    # O-Align keeps O(r)-invariance at other ranks too, and not GL
    o = OAlign(WIDE).fit(random_batch(6, spec=WIDE, rank=4, seed=14))
    for r in (2, 8):
        b = random_batch(4, spec=WIDE, rank=r, seed=30 + r)
        assert gl_invariance_error(o, b, cond=1.0) < 1e-9
        assert gl_invariance_error(o, b, cond=4.0) > 1e-2


def test_flatten_refuses_other_ranks_naming_them():
    f = FlattenFactors(WIDE).fit(random_batch(3, spec=WIDE, rank=4))
    with pytest.raises(SpecMismatchError, match=r"one rank \(4\); this batch has ranks \[8\]"):
        f(random_batch(2, spec=WIDE, rank=8))
    with pytest.raises(SpecMismatchError, match=r"this batch has ranks \[1, 2, 3, 4\]"):
        FlattenFactors(WIDE).fit(random_batch(6, spec=WIDE, rank=4, mixed=True))


def test_featurizers_have_no_per_lora_loop_dependence():
    """Features of a batch equal the features of each LoRA alone (batched code does not mix LoRAs)."""
    b = random_batch(4, rank=3, mixed=True, seed=2)
    for cls in (SingularValues, SVDCanonical, OAlign, DenseDelta):
        f = cls(SPEC).fit(b)
        full = f(b)
        for i in range(4):
            one = LoRABatch.from_loras([b.lora(i)], SPEC, dtype=torch.float64)
            assert torch.allclose(f(one), full[i:i + 1], atol=1e-10), cls.__name__
