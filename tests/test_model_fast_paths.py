"""The fast inference paths of GL-net and colsketch (`lol.models.glnet`, `lol.models.colsketch`) against plain reference
loops written from the papers' formulas, the autograd (training) paths, and their FLOP counts against
`torch.utils.flop_counter.FlopCounterMode`. Speed itself is measured by ``python -m bench models``, never asserted."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers_models import random_batch
from lol.batch import LoRABatch, empty_factors, rank_major
from lol.features import column_basis, keep_components
from lol.models import MODELS, build_model
from lol.models.colsketch import cholesky_bases
from lol.synth import tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def make(kind, batch, **hp):
    torch.manual_seed(0)
    hp = {"width": 16, **({"channels": 5} if kind == "glnet" else {"channels": 6}), **hp}
    m = build_model(kind, batch.spec, 3, **hp).to(batch.dtype)
    with torch.no_grad():
        m.fit(batch)
        for p in m.parameters():          # non-trivial LayerNorm affines and biases
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


# -- GL-net -----------------------------------------------------------------------------------------------------

def glnet_reference(m, batch):
    """GL-net as a loop over modules on (h × r) factors, every formula spelled out (paper §2)."""
    inp = m.input
    phi = {ell: inp.phi[g][k] for g, (_, idx) in enumerate(inp.u_groups) for k, ell in enumerate(idx)}
    psi = {ell: inp.psi[g][k] for g, (_, idx) in enumerate(inp.v_groups) for k, ell in enumerate(idx)}

    def gate(z):
        if m.gate.gate == "hard":
            return (z > 0).to(z.dtype)
        return torch.sigmoid(z / torch.sqrt((z * z).mean(-1, keepdim=True) + 1e-30))

    feats, sizes = [], []
    for ell, (U, V) in enumerate(zip(batch.U, batch.V)):
        A, C = phi[ell] @ U, psi[ell] @ V                                   # (B, h, r)
        for layer in m.hidden:
            zu = (A @ C.sum(1, keepdim=True).mT)[..., 0]                    # U (Vᵀ 1): (B, h)
            zv = (C @ A.sum(1, keepdim=True).mT)[..., 0]
            A, C = gate(zu)[..., None] * A, gate(zv)[..., None] * C
            A, C = layer.wu[ell] @ A, layer.wv[ell] @ C
        if m.sketch is not None:
            A, C = m.sketch.wu[ell] @ A, m.sketch.wv[ell] @ C
        P = m.inv.scale[ell] * A @ C.mT                                      # (B, h, h')
        feats.append(P.flatten(1) if m.pool == "flat" else P.mean((1, 2))[:, None])
        # scale features: log-RMS of the unscaled P (floor ε = 10⁻⁶ × its training mean square), standardized
        ms = (A @ C.mT).square().mean((1, 2)) + 1e-6 / m.inv.scale[ell] ** 2
        sizes.append(0.5 * torch.log(ms))
    y = m.trunk(torch.cat(feats, 1))
    if m.scale_features is None:
        return m.head(y)
    d = torch.stack(sizes, 1) - m.inv.log_mean
    z = [d / m.inv.log_std] + ([d.exp()] if m.scale_features == "log+linear" else [])
    return m.head(m.mix(torch.cat([y, *z], 1)))


GLNET_CONFIGS = [{}, {"depth": 2}, {"depth": 2, "scale_features": None}, {"depth": 3, "gate": "sigmoid"},
                 {"pool": "mean"}, {"pool": "mean", "scale_features": "log", "depth": 2}, {"head_channels": 3},
                 {"head_channels": 4, "depth": 3, "gate": "sigmoid"}]


@pytest.mark.parametrize("hp", GLNET_CONFIGS)
@pytest.mark.parametrize("mixed", [False, True])
def test_glnet_fast_and_autograd_paths_equal_the_reference_loop(hp, mixed):
    b = random_batch(7, rank=3, seed=11, mixed=mixed)
    m = make("glnet", b, **hp)
    with torch.no_grad():
        want = glnet_reference(m, b)
        fast = m(b)                                      # no autograd: GEMMs into slots, in-place gate, P buffer
    torch.testing.assert_close(fast, want, atol=1e-12, rtol=1e-10)
    slow = m(b)                                          # autograd: grouped bmm, out-of-place gate and head
    torch.testing.assert_close(slow.detach(), want, atol=1e-12, rtol=1e-10)
    slow.square().sum().backward()
    assert all(p.grad is not None for p in m.input.phi)


def test_glnet_fast_path_in_float32_matches_float64():
    b = random_batch(64, rank=4, seed=12)
    m = make("glnet", b, channels=8, head_channels=None)
    m32 = make("glnet", b.to(dtype=torch.float32), channels=8)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    with torch.no_grad():
        want, got = m(b), m32(b.to(dtype=torch.float32))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


# -- colsketch --------------------------------------------------------------------------------------------------

def colsketch_reference(m, batch):
    """colsketch from `column_basis` (Householder QR + r×r SVD per LoRA), per module G = (ΦQ)(ΦQ)ᵀ/n, upper triangle,
    LayerNorm, MLP, head: the model as it was before the Cholesky route."""
    k, out = int(m.features.rank), []
    for (o, _), U, V, phi in zip(batch.spec.shapes, batch.U, batch.V, m.phi):
        Q = keep_components(column_basis(U, V), k)
        Y = phi @ Q
        out.append(((Y @ Y.mT) / o).flatten(1)[:, m.triu])
    return m.head(m.trunk(m.norm(torch.cat(out, 1))))


def degenerate_batch(dtype):
    """LoRAs the Cholesky route must hand to column_basis: a rank-deficient V (ΔW of rank 2 at r = 3), an
    ill-conditioned U (cond ~1e5), a module with a singular value below column_basis's cut; plus generic ones."""
    b = random_batch(6, rank=3, seed=13, dtype=dtype)
    U = [u.clone() for u in b.U]
    V = [v.clone() for v in b.V]
    V[0][1, :, 2] = V[0][1, :, 0]                                            # rank-deficient V
    U[1][2, :, 2] = U[1][2, :, 0] + 1e-5 * U[1][2, :, 2]                     # ill-conditioned U
    V[2][3, :, 2] *= 1e-6 if dtype == torch.float32 else 1e-12               # a cut singular value
    return b.with_factors(U, V)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_colsketch_paths_equal_the_column_basis_reference(dtype):
    train = random_batch(8, rank=3, seed=14, dtype=dtype)
    m = make("colsketch", train)
    tol = {"atol": 1e-10, "rtol": 1e-8} if dtype == torch.float64 else {"atol": 1e-4, "rtol": 1e-4}
    for b in (random_batch(9, rank=3, seed=15, dtype=dtype),
              random_batch(9, rank=3, seed=16, dtype=dtype, mixed=True),        # zero-padded ranks → column_basis
              random_batch(5, rank=5, seed=17, dtype=dtype),                    # r > k: top-k truncation
              random_batch(5, rank=2, seed=18, dtype=dtype),                    # r < k: zero rows
              degenerate_batch(dtype)):
        with torch.no_grad():
            want = colsketch_reference(m, b)
            fused = m(b)                                         # Cholesky route, streamed LayerNorm + Linear
            feats = m.forward_features(m.featurize(b))           # training features (Qᵀ), same streamed head
        torch.testing.assert_close(fused, want, **tol)
        torch.testing.assert_close(feats, want, **tol)
        plain = m.forward_features(m.featurize(b))               # autograd: materialized triangles, nn.LayerNorm
        torch.testing.assert_close(plain.detach(), want, **tol)


def test_cholesky_route_is_taken_on_generic_loras_and_refused_on_degenerate_ones():
    def oks(b):
        Uts = [u.mT.contiguous() for u in b.U]
        GU = [(u.double() @ u.double().mT) for u in Uts]
        GV = [v.mT @ v for v in b.V]
        return [ok for _, ok in cholesky_bases(GU, GV, list(b.spec.shapes), 3, b.dtype)]

    for dtype in (torch.float64, torch.float32):
        assert all(bool(ok.all()) for ok in oks(random_batch(8, rank=3, seed=19, dtype=dtype)))
        ok = oks(degenerate_batch(dtype))
        assert not ok[0][1] and not ok[1][2] and not ok[2][3]
        assert ok[3].all() and ok[0][0] and ok[1][0] and ok[2][0]


def test_float32_factors_take_cholesky_qr2_orthonormal_to_float32_precision():
    """float32 factors: Gram matrices in float32, then a second pass (Cholesky QR2). The route is taken on generic
    LoRAs and refused on the degenerate ones, and its bases are orthonormal to ~ε₃₂ and span col(ΔW) — where a single
    Cholesky QR from the same float32 Gram matrix loses orthogonality on factors of moderate condition number."""
    train = random_batch(8, rank=3, seed=14, dtype=torch.float32)
    m = make("colsketch", train)
    b = random_batch(8, rank=3, seed=19, dtype=torch.float32)
    _, chol = m._factors(b, sketch=False)
    assert all(bool(ok.all()) for _, ok in chol)
    _, chol = m._factors(degenerate_batch(torch.float32), sketch=False)
    ok = [o for _, o in chol]
    assert not ok[0][1] and not ok[1][2] and not ok[2][3] and ok[3].all()
    # moderately ill-conditioned U (cond ~300, inside the guard): QR2 stays orthonormal, one float32 pass does not
    U = [u.clone() for u in b.U]
    U[0][:, :, 2] = U[0][:, :, 0] + 3e-3 * U[0][:, :, 2]
    b = b.with_factors(U, b.V)
    with torch.no_grad():
        Qts = m.bases(b)
    eye = torch.eye(3)
    for Qt, u, v in zip(Qts, b.U, b.V):
        torch.testing.assert_close(Qt @ Qt.mT, eye.expand(len(b), 3, 3), atol=2e-5, rtol=0)
        P = Qt.mT @ Qt
        Q_ref = keep_components(column_basis(u.double(), v.double()), 3)
        torch.testing.assert_close(P.double(), Q_ref @ Q_ref.mT, atol=1e-4, rtol=0)
    G = (U[0].mT @ U[0]).double()
    Q1 = U[0].double() @ torch.linalg.inv(torch.linalg.cholesky(G)).mT.float().double()
    assert float((Q1.mT @ Q1 - eye.double()).abs().max()) > 1e-4      # the single pass is not that accurate


def test_colsketch_training_gradients_flow_through_the_plain_path():
    b = random_batch(6, rank=3, seed=20)
    m = make("colsketch", b).train()
    x = m.featurize(b)
    m.forward_features(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.phi)
    assert m.norm.weight.grad.abs().sum() > 0


# -- FLOP counts ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,hp", [("glnet", {}), ("glnet", {"head_channels": 3}), ("glnet", {"depth": 2}),
                                     ("glnet", {"depth": 2, "scale_features": None}),
                                     ("glnet", {"depth": 3, "pool": "mean"}), ("colsketch", {})])
@pytest.mark.parametrize("layout", ["dim_major", "rank_major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flops_per_lora_counts_every_matmul_of_the_forward_pass(kind, hp, layout, dtype):
    spec = tiny_spec()
    g = torch.Generator().manual_seed(21)
    B, r = 5, 4
    lay = rank_major if layout == "rank_major" else (lambda X: X.contiguous())

    def batch():
        return LoRABatch(spec, [lay(torch.randn(B, o, r, generator=g, dtype=dtype)) for o, _ in spec.shapes],
                         [lay(torch.randn(B, i, r, generator=g, dtype=dtype)) for _, i in spec.shapes],
                         torch.full((B, len(spec)), r))

    m = make(kind, batch(), **hp).to(dtype)
    x = batch()
    assert all(U.mT.is_contiguous() == (layout == "rank_major") for U in x.U + x.V)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x)
    f = (m.flops_per_lora(r, batch=B, dtype=dtype, rank_major=layout == "rank_major") if kind == "colsketch"
         else m.flops_per_lora(r))
    assert math.isclose(fc.get_total_flops() / B, f["matmul"], rel_tol=1e-9), (fc.get_total_flops() / B, f)
    assert f["total"] == f["matmul"] + f["elementwise"]
    if kind == "glnet":
        assert f["input"] == m.input.flops_per_lora(spec, r)


def test_glnet_whole_pass_flops_at_sd15_shapes():
    """The bench's GL-net (h = width = 64, depth 2, flat head) on SD-1.x q/v: ~91 MFLOP per LoRA, of which 51 in
    the first layer and 34 in the head's first Linear."""
    from lol.synth import sd15_unet_qv_spec
    spec = sd15_unet_qv_spec()
    m = build_model("glnet", spec, 1, width=64, channels=64, depth=2)
    f = m.flops_per_lora(4)
    assert f["input"] == 2 * 64 * 99648 * 4 and f["trunk_linear"] == 2 * 64 * 64 * 64 * 64
    assert 90e6 < f["total"] < 92e6 and f["elementwise"] < 0.01 * f["total"]
    # the scale features (r×r Grams per module and side, the mix block) add under 0.5 %
    assert 0 < f["scale_grams"] + f["mix"] + f["scale_features"] < 0.005 * f["total"]


# -- row-parallel inference -------------------------------------------------------------------------------------

@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_row_parallel_splits_rows_restores_threads_and_keeps_outputs(two_threads):
    from lol.models.parallel import row_parallel
    seen = []

    def fn(x):
        seen.append((len(x), torch.get_num_threads(), torch.is_grad_enabled()))
        return x * 2
    x = torch.randn(40, 3)
    with torch.no_grad():
        torch.testing.assert_close(row_parallel(fn, x, min_rows=8), x * 2, rtol=0, atol=0)
    # both slices run without autograd: grad mode is per thread, and a pool thread starts with it on
    assert sorted(seen) == [(20, 1, False), (20, 1, False)] and torch.get_num_threads() == 2
    seen.clear()
    with torch.no_grad():
        row_parallel(fn, x[:15], min_rows=8)          # too few rows for two slices
    assert seen == [(15, 2, False)]
    seen.clear()
    row_parallel(fn, x, min_rows=8)                   # autograd on: never split
    assert seen == [(40, 2, True)]
    with torch.no_grad(), pytest.raises(ZeroDivisionError):
        row_parallel(lambda t: 1 / 0, x, min_rows=8)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("kind,mixed", [(k, False) for k in sorted(MODELS)] +   # mixed ranks: the kinds that take them
                         [(k, True) for k in sorted(MODELS) if MODELS[k].rank_agnostic])
def test_every_model_gives_the_same_output_in_either_factor_layout(kind, mixed):
    """Batches come rank-major (`lol.batch`); a batch built by hand in torch's default layout must give the same
    predictions and embeddings (the layout is a speed choice only), in either training or inference mode."""
    b = random_batch(6, rank=3, seed=23, mixed=mixed)
    assert all(u.mT.is_contiguous() and not u.is_contiguous() for u in b.U)
    plain = b.with_factors([u.contiguous() for u in b.U], [v.contiguous() for v in b.V])
    assert all(u.is_contiguous() for u in plain.U + plain.V)
    m = make(kind, b) if kind in ("glnet", "colsketch") else _fitted(kind, b)
    with torch.no_grad():
        torch.testing.assert_close(m(plain), m(b), atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(m.embed(plain), m.embed(b), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(m(plain), m(b), atol=1e-12, rtol=1e-10)          # autograd paths


def _fitted(kind, batch):
    torch.manual_seed(0)
    m = build_model(kind, batch.spec, 3, width=16)
    with torch.no_grad():
        m.fit(batch)
    return m.to(batch.dtype).eval()


def test_factor_layout_helpers():
    x = torch.arange(24.0).view(2, 3, 4)                # (B, d, r) in the default layout
    y = rank_major(x)
    assert torch.equal(y, x) and y.mT.is_contiguous() and not y.is_contiguous()
    assert rank_major(y) is y                           # already rank-major: no copy
    e = empty_factors(5, 7, 2, zero=True)
    assert e.shape == (5, 7, 2) and e.mT.is_contiguous() and float(e.abs().sum()) == 0.0


@pytest.mark.parametrize("kind", ["glnet", "colsketch"])
def test_models_give_the_same_rows_split_across_threads(kind, two_threads, monkeypatch):
    import lol.models.parallel as par
    b = random_batch(40, rank=3, seed=22, mixed=True)
    m = make(kind, b)
    monkeypatch.setattr(par, "MIN_ROWS", 8)
    with torch.no_grad():
        split, emb = m(b), m.embed(b)
        monkeypatch.setattr(par, "MIN_ROWS", 10**9)
        whole, emb_whole = m(b), m.embed(b)
    torch.testing.assert_close(split, whole, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(emb, emb_whole, atol=1e-12, rtol=1e-10)


def test_bench_models_writes_whole_pass_ceilings(tmp_path):
    """`python -m bench models` end to end on the tiny spec: one row per model and thread count, whole-pass FLOP and
    % of ceiling for the models that count them, the goals section."""
    import csv
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "bench", "models", "--", "--spec", "tiny", "--kinds", "glnet,colsketch,svals",
                        "--seconds", "0.05", "--threads", "1", "--batch", "32", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {x["kind"]: x for x in csv.DictReader(open(tmp_path / "bench_models.csv"))}
    assert set(rows) == {"glnet", "colsketch", "svals"} and all(x["threads"] == "1" for x in rows.values())
    for kind in ("glnet", "colsketch"):
        x = rows[kind]
        assert float(x["flop_per_lora"]) > 0 and float(x["ceiling"]) > 0 and float(x["pct_of_ceiling"]) > 0
    assert rows["svals"]["flop_per_lora"] == ""
    md = (tmp_path / "bench_models.md").read_text()
    assert "whole-pass MFLOP/LoRA" in md and "colsketch / glnet, 1 thread" in md


@pytest.mark.parametrize("kind", ["glnet", "colsketch"])
def test_inference_weight_layouts_follow_every_weight_update(kind):
    """The inference paths read weights through cached contiguous copies (`lol.models.base.derived`); an in-place
    update (an optimizer step), ``load_state_dict`` and a swapped parameter must each reach the next prediction, which
    stays equal to the plain autograd path's."""
    spec = tiny_spec()
    g = torch.Generator().manual_seed(5)
    B, r = 6, 3
    x = LoRABatch(spec, [torch.randn(B, o, r, generator=g) for o, _ in spec.shapes],
                  [torch.randn(B, i, r, generator=g) for _, i in spec.shapes], torch.full((B, len(spec)), r))
    m = make(kind, x)

    def both():
        with torch.no_grad():
            fast = m(x)
        return fast, m(x).detach()   # grad enabled: the differentiable path, no cached layouts

    before, _ = both()
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(x).square().sum().backward()
    opt.step()                                                   # every weight updated in place
    fast, plain = both()
    assert (fast - before).abs().max() > 1e-4
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in m.state_dict().items()}
    m.load_state_dict(state)
    fast, plain = both()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    phis = m.input.phi if kind == "glnet" else m.phi
    phis[0] = torch.nn.Parameter(torch.randn(phis[0].shape, generator=g))   # a new tensor object
    fast, plain = both()
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    m.double()                             # the same parameter objects, their data swapped for float64 copies
    x = x.to(dtype=torch.float64)
    fast, plain = both()
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, plain, rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        phis[0].data.mul_(3)               # through .data: not tracked (autograd does not see it either) ...
    from lol.models.base import clear_derived
    clear_derived(m)                       # ... until the cache is dropped
    fast, plain = both()
    torch.testing.assert_close(fast, plain, rtol=1e-9, atol=1e-10)

