"""The same code on a CUDA GPU: invariance, CPU/GPU agreement, training, multi-LoRA training, the diffusers pipeline in
fp16 with a LoRA, the CLIP scorer, shipped checkpoints, and one zoo job. Every test skips where no GPU is visible.

Run on a GPU machine with ``pytest tests/test_cuda.py -ra``; the rest of the suite also runs there unchanged (models,
training and the zoo pick CUDA by default when present)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_models import SPEC, random_batch, synthetic_task
from lol.models import build_model
from lol.symmetry import assert_gl_invariant, gl_invariance_error, one_sided_act

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible here)")

DATA = Path(__file__).resolve().parents[1] / "data"
INVARIANT = ["dense", "svals", "canon_mlp", "canon_transformer", "glnet"]
SMALL = {"canon_transformer": {"d_model": 16, "heads": 2}, "glnet": {"channels": 6}}


def _model(kind, batch):
    torch.manual_seed(0)
    return build_model(kind, SPEC, 3, width=16, **SMALL.get(kind, {})).fit(batch)


def _on_cuda(kind):
    """A float64 model of ``kind`` and a mixed-rank batch on the GPU, the CPU output of the same weights, and the
    GL-invariance check there (random non-orthogonal R)."""
    b = random_batch(6, rank=3, seed=4, mixed=True)
    m = _model(kind, b).double().eval()
    with torch.no_grad():
        cpu = m(b)
    gm, gb = m.to("cuda"), b.to(device="cuda")
    assert assert_gl_invariant(gm, gb, atol=1e-10, rtol=1e-8) < 1e-8
    return gm, gb, cpu


@pytest.mark.parametrize("kind", INVARIANT)
def test_invariant_models_on_cuda_are_invariant_sensitive_and_match_cpu(kind):
    """float64 on the GPU: random non-orthogonal R leaves the output unchanged, a one-sided change does not, and
    the GPU output equals the CPU output of the same weights."""
    gm, gb, cpu = _on_cuda(kind)
    assert gl_invariance_error(gm, gb, act=one_sided_act) > 1e-3
    with torch.no_grad():
        gpu = gm(gb)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("kind", ["colspace", "colsketch"])
def test_column_space_models_on_cuda_are_invariant_and_match_cpu(kind):
    """The column-space models (Gram route on the GPU) equal their CPU output (QR route) and are GL-invariant there;
    moving col(ΔW) changes them (a one-sided U ↦ UR does not: it keeps the column space)."""
    gm, gb, cpu = _on_cuda(kind)
    with torch.no_grad():
        torch.testing.assert_close(gm(gb).cpu(), cpu, atol=1e-8, rtol=1e-6)
        moved = gb.with_factors([U + 0.3 * torch.randn_like(U) * (U != 0) for U in gb.U], gb.V)
        assert float((gm(moved) - gm(gb)).abs().max()) > 1e-3


def test_training_on_cuda_learns_the_invariant_task():
    """`lol.train.train` picks CUDA by default and learns the GL-scrambled synthetic task as on the CPU."""
    from lol.train import TrainConfig, train

    batch, labels = synthetic_task(600, rank=4, seed=0)
    res = train(batch, labels, "glnet", TrainConfig(epochs=60, width=64, progress=False, patience=20),
                model={"channels": 8, "depth": 1})
    assert res.device == "cuda" and next(res.model.parameters()).device.type == "cpu"  # trained there, returned here
    r2 = {k: v["r2"] for k, v in res.metrics["test"].items()}
    assert min(r2.values()) > 0.85, r2


def test_multilora_on_cuda_equals_training_alone():
    """K adapters trained together on the GPU equal each trained alone on the GPU (float64)."""
    from test_zoo_multilora import JOBS, assert_same_loras, lm_batch, lm_loss, tiny_qwen2, train

    def make():
        return tiny_qwen2().to("cuda")

    def batch(gen, bs):
        return lm_batch(gen, bs).to("cuda")

    together, _, _ = train(make, ["q_proj", "v_proj"], JOBS, batch, lm_loss)
    for k, job in enumerate(JOBS):
        alone, _, _ = train(make, ["q_proj", "v_proj"], [job], batch, lm_loss)
        assert_same_loras(together[k], alone[0], atol=1e-8)
        assert max(float(m.U.abs().max()) for m in alone[0]) > 1e-4


@pytest.fixture(scope="module")
def shipped_image_bases():
    if not (DATA / "base" / "sd" / "record.json").is_file():
        pytest.skip("the shipped image bases are not in data/base")
    return {"sd": DATA / "base" / "sd", "clip": DATA / "base" / "clip"}


def _shipped_lora(name):
    from lol.collection import open_collection

    path = DATA / "collections" / name
    if not (path / "collection.json").is_file():
        pytest.skip(f"the shipped {name} collection is not in data/collections")
    return open_collection(path)


def test_pipeline_fp16_on_cuda_with_a_lora(shipped_image_bases):
    """The app's path on a GPU: the pipeline in fp16 on CUDA, a shipped LoRA loaded with diffusers'
    `load_lora_weights`; images are finite, not blank, and the LoRA changes them."""
    from lol.showcase import generate_side_by_side
    from lol.zoo.image_bases import load_sd_pipeline

    pipe = load_sd_pipeline(shipped_image_bases["sd"], "cuda", dtype=torch.float16)
    assert pipe.unet.device.type == "cuda" and pipe.unet.dtype == torch.float16
    coll = _shipped_lora("fashion")
    gen = generate_side_by_side(pipe, coll.lora(0), "0", ["a photo of a dress", "a photo of a sneaker"], [0, 1],
                                steps=10, guidance=4.0, strength=1.0, device="cuda")
    base = np.stack([np.asarray(i, dtype=np.float32) for i in gen.base])
    lora = np.stack([np.asarray(i, dtype=np.float32) for i in gen.lora])
    assert base.shape == lora.shape == (4, 64, 64, 3)
    assert np.isfinite(base).all() and base.std() > 5 and lora.std() > 5     # not black / NaN-blank fp16 output
    assert np.abs(base - lora).mean() > 1.0                                   # the adapter acts


def test_clip_scorer_on_cuda_matches_cpu(shipped_image_bases):
    from lol.zoo.clipscore import CLIPScorer
    from lol.zoo.faces import Identity, render_face

    imgs = [render_face(Identity.from_seed(s), 0).image for s in range(4)]
    texts = ["a photo of a smiling man", "a photo of a woman with glasses", "a photo of a person", "a face"]
    cpu = CLIPScorer(shipped_image_bases["clip"], device="cpu").score(imgs, texts)
    gpu = CLIPScorer(shipped_image_bases["clip"], device="cuda").score(imgs, texts)
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), atol=1e-3, rtol=1e-4)


def test_shipped_checkpoints_predict_the_same_on_cuda():
    from lol.checkpoint import load_checkpoint

    index = DATA / "checkpoints" / "index.json"
    if not index.is_file():
        pytest.skip("no shipped checkpoints in data/checkpoints")
    import json

    for name in sorted(set(json.loads(index.read_text()).values())):
        cpu, gpu = load_checkpoint(DATA / "checkpoints" / name), load_checkpoint(DATA / "checkpoints" / name, "cuda")
        coll = _shipped_lora(name.split("/")[0])
        batch = coll.batch(list(range(min(64, len(coll)))), dtype=torch.float32)
        a, b = cpu.predict_batch(batch), gpu.predict_batch(batch)
        for label in cpu.labels:
            np.testing.assert_allclose(np.asarray(b[label]), np.asarray(a[label]), atol=1e-4, rtol=1e-4,
                                       err_msg=f"{name}: {label}")


def _cosine(a, b) -> float:
    x = torch.cat([m.delta().double().flatten() for m in a])
    y = torch.cat([m.delta().double().flatten() for m in b])
    return float(x @ y / (x.norm() * y.norm()))


def test_a_faces_zoo_job_on_cuda_matches_cpu(shipped_image_bases):
    """The zoo builder unchanged on the GPU: two ci-sized faces jobs on the shipped bases, on CUDA and on the CPU,
    give the same images and labels and nearly the same adapter. Not bit-equal: float32 (and cuDNN's TF32) rounding
    differs between devices and Adam's normalized steps amplify it in the weakest gradient directions (measured on an
    H200: 10 % relative ΔW difference in the worst module); the other job's adapter is far further away."""
    from lol.zoo.image_recipes import FacesRecipe

    r = FacesRecipe()
    jobs = [j for j in r.jobs("ci", 0) if j.params["rank"] == 4][:2]
    gpu, cpu = r.run_group(jobs, shipped_image_bases, "cuda"), r.run_group(jobs, shipped_image_bases, "cpu")
    for g, c in zip(gpu, cpu):
        assert g.extras["image_ids"] == c.extras["image_ids"]
        for k in ("male", "young", "wearing_lipstick", "big_lips", "no_beard", "rank", "lr", "steps"):
            assert g.row[k] == c.row[k]
        assert g.row["clip_score"] == pytest.approx(c.row["clip_score"], abs=1.0)
        assert _cosine(g.lora, c.lora) > 0.99
    other = _cosine(gpu[0].lora, cpu[1].lora)   # sensitivity: another job's adapter is not "nearly the same"
    assert other < 0.9, other


def test_measuring_a_label_again_on_cuda_reproduces_the_builds_retest(tmp_path):
    """`lol zoo measure` on the GPU: two shipped faces LoRAs measured with the build's retest seed get the build's
    (CPU) retest values, to the devices' float rounding (as the zoo job above)."""
    import pandas as pd
    from zoo_image_support import shipped_retested

    from lol.collection import open_collection
    from lol.zoo.measure import label_protocol, measure

    rows, bases = shipped_retested(tmp_path / "two")
    seed = label_protocol(open_collection(tmp_path / "two"))["retest_seed"]
    got = pd.read_parquet(measure(tmp_path / "two", seed, bases=bases, device="cuda"))["value"]
    np.testing.assert_allclose(got.to_numpy(), rows["clip_score_retest"].to_numpy(float), atol=1.0)
