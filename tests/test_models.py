import math

import pytest
import torch

from helpers_models import SPEC, random_batch
from lol.batch import LoRABatch
from lol.errors import LoLError, SpecMismatchError
from lol.lora import ModuleSpec
from lol.models import MODELS, GLHidden, GLInput, InvariantHead, RowGate, build_model
from lol.models.glnet import unpack_factors
from lol.symmetry import (assert_gl_equivariant, assert_gl_invariant, gl_invariance_error, one_sided_act)

INVARIANT = ["dense", "svals", "canon_mlp", "canon_transformer", "glnet"]   # + colspace, colsketch: own test
SMALL = {"width": 16, "canon_transformer": {"d_model": 16, "heads": 2}, "glnet": {"channels": 6}}


def make(kind, batch, n_outputs=3, **kw):
    hp = {"width": SMALL["width"], **SMALL.get(kind, {}), **kw}
    torch.manual_seed(0)
    return build_model(kind, SPEC, n_outputs, **hp).fit(batch)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def uniform():
    return random_batch(8, rank=3, seed=3)


@pytest.fixture(scope="module")
def mixed():
    return random_batch(8, rank=3, seed=4, mixed=True)


def test_registry_has_every_kind_and_rejects_unknown():
    assert set(MODELS) == {"mlp", "mlp_aug", "dense", "colspace", "colsketch", "svals", "oalign", "canon_mlp",
                           "canon_transformer", "glnet"}
    with pytest.raises(LoLError, match="unknown model kind 'nope'.*glnet"):
        build_model("nope", SPEC, 1)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_outputs_and_embeddings_are_order_one_at_init(kind, uniform):
    m = make(kind, uniform.to(dtype=torch.float32)).eval()
    x = random_batch(16, rank=3, seed=5, dtype=torch.float32)
    with torch.no_grad():
        y, e = m(x), m.embed(x)
    assert y.shape == (16, 3) and e.shape[0] == 16 and e.ndim == 2
    assert torch.isfinite(y).all()
    assert 0.05 < float(e.std()) < 5, float(e.std())
    assert 0.02 < float(y.std()) < 5, float(y.std())
    assert m.requires and m.invariant_to


@pytest.mark.parametrize("kind", INVARIANT)
def test_invariant_models_are_gl_invariant_and_sensitive(kind, mixed):
    b = mixed if kind != "canon_transformer" else mixed.select(range(4))
    m = make(kind, b)
    assert assert_gl_invariant(m, b, atol=1e-10, rtol=1e-8) < 1e-8
    assert assert_gl_invariant(m.embed, b, atol=1e-10, rtol=1e-8) < 1e-8
    # sensitivity: the same-size change U ↦ U R without V ↦ V R⁻ᵀ moves the output
    assert gl_invariance_error(m, b, act=one_sided_act) > 1e-3


@pytest.mark.parametrize("kind", ["colspace", "colsketch"])
def test_column_space_models_are_gl_invariant_and_see_only_the_column_space(kind, mixed):
    """Invariant to GL(r), to rescaling ΔW and to V (row space) — a one-sided U ↦ UR keeps col(ΔW), so it too leaves
    the output unchanged; a perturbation of U that moves col(ΔW) changes it."""
    m = make(kind, mixed).double().eval()
    assert assert_gl_invariant(m, mixed, atol=1e-10, rtol=1e-8) < 1e-8
    assert assert_gl_invariant(m.embed, mixed, atol=1e-10, rtol=1e-8) < 1e-8
    with torch.no_grad():
        y = m(mixed)
        scaled = mixed.with_factors([3.0 * U for U in mixed.U], [V * 0.5 for V in mixed.V])
        torch.testing.assert_close(m(scaled), y, atol=1e-9, rtol=1e-7)
        assert gl_invariance_error(m, mixed, act=one_sided_act) < 1e-8
        g = torch.Generator().manual_seed(9)
        moved = mixed.with_factors([U + 0.3 * torch.randn(U.shape, generator=g, dtype=U.dtype) * (U != 0)
                                    for U in mixed.U], mixed.V)
        assert float((m(moved) - y).abs().max()) > 1e-3


def test_flatten_mlp_is_not_invariant_and_oalign_only_orthogonal(uniform):
    for kind in ("mlp", "mlp_aug"):
        m = make(kind, uniform)
        assert gl_invariance_error(m, uniform) > 1e-2
        assert gl_invariance_error(m, uniform, cond=1.0) > 1e-2  # not even O(r)
    m = make("oalign", uniform)
    x = uniform.select(range(1, 8))
    assert gl_invariance_error(m, x, cond=1.0) < 1e-9
    assert gl_invariance_error(m, x) > 1e-3


def _lists(layer_fn, ranks):
    """Wrap a packed (L, B, r, h) layer as the list → list map `assert_gl_equivariant` expects."""
    def f(Us, Vs):
        r = max(u.shape[-1] for u in Us)
        HU, HV = layer_fn(Us, Vs, r)
        return unpack_factors(HU, ranks), unpack_factors(HV, ranks)
    return f


def _packed_input(Us, Vs):  # identity packing: (B, n, r) lists → (L, B, r, n) when all modules share n, m
    r = max(u.shape[-1] for u in Us)
    pad = lambda X: torch.nn.functional.pad(X, (0, r - X.shape[-1])).mT
    return torch.stack([pad(u) for u in Us]), torch.stack([pad(v) for v in Vs])


def test_glnet_layers_are_equivariant(mixed):
    ranks = [u.shape[-1] for u in mixed.U]
    torch.manual_seed(0)
    inp = GLInput(SPEC, 5).double()
    assert assert_gl_equivariant(_lists(lambda U, V, r: inp(U, V), ranks), mixed) < 1e-12
    # hidden layers and gates act on h×r factors: build a batch over an h×h "spec"
    hspec = ModuleSpec(tuple(SPEC.names), tuple((5, 5) for _ in SPEC.names))
    hb = LoRABatch(hspec, *[list(t) for t in zip(*[(p.mT, q.mT) for p, q in zip(*inp(mixed.U, mixed.V))])],
                   mixed.ranks)
    hidden = GLHidden(len(SPEC), 5).double()
    assert assert_gl_equivariant(_lists(lambda U, V, r: hidden(*_packed_input(U, V)), ranks), hb) < 1e-12
    for gate in ("hard", "sigmoid"):
        g = RowGate(gate)
        assert assert_gl_equivariant(_lists(lambda U, V, r, g=g: g(*_packed_input(U, V)), ranks), hb) < 1e-12
    # the gate is not the identity and the entrywise ReLU is not equivariant (sensitivity)
    HU, HV = _packed_input(hb.U, hb.V)
    assert (RowGate("hard")(HU, HV)[0] == 0).any()
    relu = _lists(lambda U, V, r: tuple(torch.relu(t) for t in _packed_input(U, V)), ranks)
    with pytest.raises(AssertionError, match="not GL-equivariant"):
        assert_gl_equivariant(relu, hb)
    head = InvariantHead(len(SPEC))
    assert assert_gl_invariant(lambda b: head(*_packed_input(b.U, b.V)), hb) < 1e-12


def test_glnet_any_depth_and_gate_and_pool_is_invariant(mixed):
    for depth, gate, pool in [(1, "hard", "flat"), (2, "hard", "flat"), (3, "sigmoid", "mean"), (4, "hard", "mean")]:
        for scale_features in ("log+linear", "log", None):
            m = make("glnet", mixed, depth=depth, gate=gate, pool=pool, scale_features=scale_features)
            assert assert_gl_invariant(m, mixed, atol=1e-10, rtol=1e-8) < 1e-8
            assert gl_invariance_error(m, mixed, act=one_sided_act) > 1e-3


def test_glnet_head_computes_the_trunk_on_products_it_never_holds_whole(mixed):
    """embed = trunk(invariant_features): the chunked head (Σ_ℓ W_ℓ vec(P_ℓ)) equals the Linear on the flat products,
    for every pool, with and without the invariant sketch, for any chunk size."""
    for hp in ({}, {"pool": "mean"}, {"head_channels": 3}, {"head_channels": 4, "depth": 2},
               {"scale_features": None, "depth": 2}):
        m = make("glnet", mixed, **hp).double().eval()
        with torch.no_grad():
            want = m.trunk(m.invariant_features(mixed))
            if hp.get("scale_features", "log+linear") is None:
                assert m.mix is None and m.scale_features_of(mixed).shape == (len(mixed), 0)
            else:   # the scale features join after the trunk: embed = mix([trunk(P), scale features])
                want = m.mix(torch.cat([want, m.scale_features_of(mixed)], 1))
            assert torch.allclose(m.embed(mixed), want, atol=1e-12, rtol=1e-10), hp
            HU, HV = m.equivariant(mixed.U, mixed.V)
            # the fitted per-module scale is 1/RMS of the unscaled products over the training batch
            P = m.inv.products(HU, HV).reshape(len(mixed), len(SPEC), -1)
            assert torch.allclose(m.inv.scale, P.square().mean((0, 2)).rsqrt(), rtol=1e-5)  # fitted in float32
            for budget in (1, 50, 10**9):
                y = m.inv.linear(HU, HV, m.trunk[0], budget=budget)
                assert torch.allclose(y, m.trunk[0](m.invariant_features(mixed)), atol=1e-12, rtol=1e-10)
    m = make("glnet", mixed, head_channels=3)
    assert m.invariant_features(mixed).shape == (len(mixed), len(SPEC) * 9)
    assert assert_gl_invariant(m, mixed, atol=1e-10, rtol=1e-8) < 1e-8
    assert gl_invariance_error(m, mixed, act=one_sided_act) > 1e-3
    fresh = build_model("glnet", SPEC, 3, **m.config())
    fresh.load_state_dict(m.state_dict())
    # a checkpoint written before head_channels existed (no such hparam) builds the paper's flat head
    old = {k: v for k, v in make("glnet", mixed).config().items() if k != "head_channels"}
    assert build_model("glnet", SPEC, 3, **old).sketch is None


def test_glnet_scale_features_are_the_invariant_size_of_each_product(mixed):
    """Per module: (log RMS(P) − μ)/σ and RMS(P)/exp(μ), with P = (ΦU)(ΨV)ᵀ formed explicitly, μ and σ the mean and
    std of the log-RMS over the training LoRAs; GL-invariant, and a rescaled module ΔW_ℓ ↦ c ΔW_ℓ moves only its own
    two features, by log(c)/σ_ℓ and by the factor c."""
    L = len(SPEC)
    m = make("glnet", mixed).double().eval()
    with torch.no_grad():
        HU, HV = m.equivariant(mixed.U, mixed.V)
        P = HU.transpose(0, 1).mT @ HV.transpose(0, 1)                       # (B, L, h, h), unscaled
        ms = P.square().mean((-1, -2)) + 1e-6 / m.inv.scale.square()
        logs = 0.5 * ms.log()
        # fitted on this very batch (in float32): the log part is standardized over it
        mu, sd = m.inv.log_mean, m.inv.log_std
        torch.testing.assert_close(mu, logs.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sd, logs.std(0, unbiased=False), rtol=1e-6, atol=1e-6)
        f = m.scale_features_of(mixed)
        assert f.shape == (len(mixed), 2 * L)
        torch.testing.assert_close(f[:, :L], (logs - mu) / sd, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f[:, L:], (logs - mu).exp(), rtol=1e-10, atol=1e-12)
        assert assert_gl_invariant(m.scale_features_of, mixed, atol=1e-10, rtol=1e-8) < 1e-8
        c, ell = 7.0, 2
        moved = m.scale_features_of(mixed.with_factors([U * c if k == ell else U for k, U in enumerate(mixed.U)],
                                                       mixed.V))
        # the ε floor makes the shift exact only up to ε/ms ≈ 1e-6 relative
        torch.testing.assert_close(moved[:, ell], f[:, ell] + math.log(c) / m.inv.log_std[ell], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moved[:, L + ell], f[:, L + ell] * c, rtol=1e-5, atol=1e-8)
        keep = [k for k in range(2 * L) if k not in (ell, L + ell)]
        torch.testing.assert_close(moved[:, keep], f[:, keep], rtol=0, atol=0)
    log_only = make("glnet", mixed, scale_features="log").double().eval()
    assert log_only.scale_features_of(mixed).shape == (len(mixed), L)
    with pytest.raises(ValueError, match="scale_features"):
        make("glnet", mixed, scale_features="linear")


def test_glnet_sees_the_size_of_a_lora_only_through_its_scale_features(mixed):
    """The products P are positively homogeneous in ΔW and the trunk's LayerNorm divides their size out: without
    scale features a depth-1 GL-net whose first Linear has a zero bias gives every multiple c·ΔW (c > 0) the same output
    (up to LayerNorm's ε); with them (the default) it tells them apart."""
    x = mixed.select(range(1, 8))
    bigger = x.with_factors([3.0 * U for U in x.U], x.V)
    for scale_features in (None, "log+linear"):
        m = make("glnet", mixed, scale_features=scale_features).double().eval()
        with torch.no_grad():
            m.trunk[0].bias.zero_()
            d = float((m(bigger) - m(x)).abs().max())
        if scale_features is None:
            assert d < 1e-4, d
        else:
            assert d > 1e-2, d


def test_glnet_checkpoint_from_before_scale_features_loads_as_written(mixed, tmp_path):
    """A checkpoint whose config predates ``scale_features`` (no such key) rebuilds the model it holds (the paper's
    head: `GLNet.legacy_hparams`), with the same outputs; a current one records the key."""
    import json

    from lol.checkpoint import load_checkpoint, save_checkpoint
    from lol.targets import TargetSet
    targets = TargetSet.fit({"a": [0.0, 1.0, 2.0], "b": [1.0, 0.0, 1.0], "c": [2.0, 2.0, 0.0]})
    for hp in ({"scale_features": None, "depth": 2}, {}):
        m = make("glnet", mixed.to(dtype=torch.float32), **hp).eval()
        path = save_checkpoint(tmp_path / str(len(hp)), m, targets)
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["hparams"]["scale_features"] == m.scale_features
        if m.scale_features is None:
            del cfg["hparams"]["scale_features"]
            (path / "config.json").write_text(json.dumps(cfg))
        back = load_checkpoint(path).model
        assert back.config() == m.config()
        x = mixed.to(dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(back(x), m(x), rtol=0, atol=0)


def test_glnet_is_rank_agnostic():
    train = random_batch(8, rank=4, seed=6)
    m = make("glnet", train).double().eval()
    for r in (8, 16):
        b = random_batch(3, rank=r, seed=r)
        with torch.no_grad():
            assert m(b).shape == (3, 3)
        assert_gl_invariant(m, b, atol=1e-10, rtol=1e-8)
    # the same ΔW given at rank 8 (redundant columns) gets the same prediction as at rank 4
    b4 = random_batch(3, rank=4, seed=7)
    b8 = b4.with_factors([torch.cat([u, u], -1) for u in b4.U], [torch.cat([v, v], -1) / 2 for v in b4.V])
    b8.ranks = b4.ranks * 2
    with torch.no_grad():
        assert torch.allclose(m(b4), m(b8), atol=1e-10)


def test_hard_gate_passes_gradients_to_the_equivariant_weights(uniform):
    m = make("glnet", uniform.to(dtype=torch.float32), depth=2)
    x = uniform.to(dtype=torch.float32)
    m(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.input.phi)
    assert m.hidden[0].wu.grad.abs().sum() > 0


def test_models_state_their_requirements_and_fail_clearly(uniform, mixed):
    m = make("mlp", uniform).double()   # the batches are float64: the rank is the one problem here
    with pytest.raises(SpecMismatchError, match="one rank"):
        m(mixed)
    other = ModuleSpec(SPEC.names[:3] + ("mid.attn2.to_k",), SPEC.shapes)
    bad = LoRABatch(other, uniform.U, uniform.V, uniform.ranks)
    for kind in ("glnet", "dense"):
        with pytest.raises(SpecMismatchError, match="mid.attn2.to_v"):
            make(kind, uniform)(bad)
    wrong = ModuleSpec(SPEC.names, SPEC.shapes[:3] + ((16, 8),))
    with pytest.raises(SpecMismatchError, match="16×9.*16×8"):
        make("glnet", uniform)(LoRABatch(wrong, uniform.U[:3] + [uniform.U[3]], uniform.V[:3] + [uniform.V[3][:, :8]],
                                         uniform.ranks))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_batch_in_another_float_dtype_than_the_model_is_named_not_a_torch_error(kind, uniform):
    """A float32 model given float64 factors (or the reverse) says so for forward and embed, naming both dtypes; fit
    computes statistics in the batch's dtype, and the same batch converted predicts."""
    b = uniform if kind != "canon_transformer" else uniform.select(range(4))
    m = make(kind, b).eval()
    assert m.float_dtype == torch.float32 and b.dtype == torch.float64
    for call in (m, m.embed):
        with pytest.raises(TypeError, match=f"model '{kind}' computes in float32, the batch's factors are float64"):
            call(b)
    with torch.no_grad():
        y = m(b.to(dtype=torch.float32))
        assert y.dtype == torch.float32 and torch.isfinite(y).all()
        torch.testing.assert_close(m.double()(b), y.double(), atol=1e-4, rtol=1e-4)
    with pytest.raises(TypeError, match="computes in float64, the batch's factors are float32"):
        m(b.to(dtype=torch.float32))


def mixed_collection(n_per_rank=3, ranks=(4, 8, 16)):
    """One batch holding LoRAs of several ranks (zero-padded to the largest), as a mixed-rank collection loads."""
    from helpers_models import random_lora
    loras = [random_lora(SPEC, r, seed=100 * r + i) for r in ranks for i in range(n_per_rank)]
    return LoRABatch.from_loras(loras, SPEC, dtype=torch.float64)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fitted_on_rank_4_every_model_reads_ranks_8_and_16_or_names_the_ranks(kind):
    """Train on the rank-4 LoRAs of a mixed-rank collection (a selection, still padded to width 16), then predict on
    all of it: every kind fits; all but the flatten MLPs read ranks 8 and 16, invariant ones stay GL-invariant there;
    the flatten MLPs refuse, naming the ranks."""
    coll = mixed_collection()
    train = coll.select(range(3))
    assert train.U[0].shape[-1] == 16 and int(train.ranks.max()) == 4
    b = coll if kind != "canon_transformer" else coll.select([0, 3, 6])
    m = make(kind, train).double().eval()
    if kind in ("mlp", "mlp_aug"):
        assert m(train).shape == (3, 3)
        with pytest.raises(SpecMismatchError, match=r"one rank \(4\); this batch has ranks \[4, 8, 16\]"):
            m(coll)
        return
    with torch.no_grad():
        y = m(b)
    assert y.shape == (len(b), 3) and torch.isfinite(y).all()
    if kind in INVARIANT:
        assert assert_gl_invariant(m, b.select(range(1, len(b))), atol=1e-10, rtol=1e-8) < 1e-8


@pytest.mark.parametrize("kind", ["svals", "canon_mlp", "canon_transformer", "glnet", "dense"])
def test_a_redundant_rank_8_form_gets_the_rank_4_prediction(kind):
    b4 = random_batch(3, rank=4, seed=7)
    b8 = LoRABatch(SPEC, [torch.cat([u, u], -1) for u in b4.U], [torch.cat([v, v], -1) / 2 for v in b4.V],
                   b4.ranks * 2)
    m = make(kind, random_batch(6, rank=4, seed=6)).double().eval()
    with torch.no_grad():
        assert torch.allclose(m(b4), m(b8), atol=1e-9)
        assert not torch.allclose(m(b4), m(random_batch(3, rank=8, seed=9)), atol=1e-3)


def test_built_from_config_matches_fitted_shapes(uniform):
    for kind in MODELS:
        m = make(kind, uniform)
        fresh = build_model(kind, SPEC, 3, **m.config())
        fresh.load_state_dict(m.state_dict())  # strict: same parameters and buffers, no fit needed


def test_store_half_folds_symmetric_inputs_and_loads_the_same_function(tmp_path):
    """A colspace model's first layer reads each module's column-space projector, a symmetric matrix: `store_half`
    keeps one column per entry i ≤ j (the (i, j) and (j, i) columns summed), about half the bytes, and the loaded
    model computes the same function (float rounding only when nothing is halved) and stays GL-invariant. The
    fold relies on the symmetry: on an asymmetric input it is not the same map."""
    import json

    from safetensors import safe_open

    from lol.checkpoint import (fold_symmetric, half_bytes, load_checkpoint, save_checkpoint, store_half,
                                symmetric_inputs, unfold_symmetric)
    from lol.targets import TargetSet

    batch = random_batch(24, rank=4, seed=3, dtype=torch.float32)
    targets = TargetSet.fit({"a": [0.0, 1.0, 2.0], "b": [1.0, 0.0, 1.0], "c": [2.0, 2.0, 0.0]})
    m = make("colspace", batch, width=16).eval()
    blocks = [o for o, _ in SPEC.shapes]
    assert symmetric_inputs(m) == {"trunk.0.weight": blocks}
    assert symmetric_inputs(make("dense", batch)) == {}           # ΔW is not symmetric: nothing folds
    full, tri = sum(n * n for n in blocks), sum(n * (n + 1) // 2 for n in blocks)
    path = save_checkpoint(tmp_path / "cs", m, targets)
    cost = half_bytes(path, min_numel=10**9)                      # fold only, nothing halved
    rec = store_half(path, min_numel=10**9)
    assert rec["folded"] == ["trunk.0.weight"] and rec["float16"] == []
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_slice("trunk.0.weight").get_shape() == [16, tri]
        assert cost == sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert json.loads((path / "config.json").read_text())["version"] == 2
    back = load_checkpoint(path)
    assert back.model.trunk[0].weight.shape == (16, full)
    with torch.no_grad():
        torch.testing.assert_close(back.model(batch), m(batch), rtol=1e-5, atol=1e-5)
    assert store_half(path, min_numel=10**9) == {**rec, "bytes_after": rec["bytes_after"]}   # idempotent
    assert_gl_invariant(back.model.double(), random_batch(4, rank=4, seed=8), atol=1e-10, rtol=1e-8)
    # halved as well: the rounding of the summed columns only
    path2 = save_checkpoint(tmp_path / "cs2", m, targets)
    rec2 = store_half(path2, min_numel=256)
    assert rec2["folded"] == ["trunk.0.weight"] and "trunk.0.weight" in rec2["float16"]
    assert rec2["bytes_after"] < 0.6 * rec2["bytes_before"]
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(path2).model(batch), m(batch), rtol=2e-3, atol=2e-3)
    # the fold is exact on symmetric inputs and only there
    W, g = m.trunk[0].weight.detach().double(), torch.Generator().manual_seed(0)
    x = torch.cat([(lambda a: (a + a.T).flatten())(torch.randn(n, n, generator=g, dtype=torch.float64))
                   for n in blocks])
    upper = torch.cat([(lambda ij, s: s + ij[0] * n + ij[1])(torch.triu_indices(n, n), sum(k * k for k in blocks[:i]))
                       for i, n in enumerate(blocks)])
    torch.testing.assert_close(fold_symmetric(W, blocks) @ x[upper], W @ x)
    torch.testing.assert_close(unfold_symmetric(fold_symmetric(W, blocks), blocks) @ x, W @ x)
    y = torch.randn(full, generator=g, dtype=torch.float64)       # not symmetric
    assert not torch.allclose(fold_symmetric(W, blocks) @ y[upper], W @ y, atol=1e-3)


def test_a_folded_checkpoint_with_a_wrong_weight_is_refused_by_name(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from lol.checkpoint import load_checkpoint, save_checkpoint, store_half
    from lol.targets import TargetSet

    batch = random_batch(12, rank=4, seed=3, dtype=torch.float32)
    targets = TargetSet.fit({"a": [0.0, 1.0], "b": [1.0, 0.0], "c": [2.0, 0.0]})
    path = save_checkpoint(tmp_path / "cs", make("colspace", batch, width=8), targets)
    store_half(path, min_numel=10**9)
    w = path / "model.safetensors"
    state = load_file(str(w))
    state["trunk.0.weight"] = state["trunk.0.weight"][:, :-1].contiguous()
    save_file(state, str(w))
    with pytest.raises(LoLError, match=r"model.safetensors: folded weight 'trunk.0.weight' has shape \(8, \d+\)"):
        load_checkpoint(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["stored"]["folded"] = ["head.weight"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoLError, match="'head.weight' is recorded as folded"):
        load_checkpoint(path)
    cfg["version"] = 3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoLError, match="version 3 is newer"):
        load_checkpoint(path)


def test_store_half_keeps_buffers_and_predictions(tmp_path):
    """`store_half` stores the wide parameters in float16 (about half the bytes) and nothing else: buffers and small
    parameters stay float32, the model loads as float32, and its predictions move only by the rounding of those
    weights. Running it twice changes nothing more. `half_bytes` predicts the tensors' bytes it leaves."""
    import json

    from safetensors import safe_open

    from lol.checkpoint import half_bytes, load_checkpoint, save_checkpoint, store_half
    from lol.targets import TargetSet

    batch = random_batch(24, rank=4, seed=3, dtype=torch.float32)
    targets = TargetSet.fit({"a": [0.0, 1.0, 2.0], "b": [1.0, 0.0, 1.0], "c": [2.0, 2.0, 0.0]})
    for kind in ("dense", "glnet", "oalign"):
        m = make(kind, batch, width=64).eval()
        path = save_checkpoint(tmp_path / kind, m, targets)
        cost = half_bytes(path, min_numel=256)                         # what store_half will leave, predicted
        rec = store_half(path, min_numel=256)
        with safe_open(str(path / "model.safetensors"), "pt") as f:   # the tensors' bytes, header left out
            stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
        assert cost == stored and half_bytes(path, min_numel=256) == stored
        params = dict(m.named_parameters())
        assert rec["float16"] and set(rec["float16"]) <= set(params)
        assert all(params[k].numel() >= 256 for k in rec["float16"])
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            for k in f.keys():
                want = torch.float16 if k in rec["float16"] else m.state_dict()[k].dtype
                assert f.get_slice(k).get_dtype() == {torch.float16: "F16", torch.float32: "F32",
                                                      torch.int64: "I64", torch.bool: "BOOL"}.get(want, "?"), k
        back = load_checkpoint(path)
        assert all(p.dtype == torch.float32 for p in back.model.parameters())
        assert json.loads((path / "config.json").read_text())["stored"]["float16"] == rec["float16"]
        with torch.no_grad():
            a, b = m(batch), back.model(batch)
        assert not torch.equal(a, b)                                   # the weights were rounded ...
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)         # ... and only that
        if kind == "dense":
            assert rec["bytes_after"] < 0.6 * rec["bytes_before"]
        assert store_half(path, min_numel=256)["float16"] == rec["float16"]   # idempotent
