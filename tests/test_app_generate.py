"""The Generate page (AppTest) on a real, tiny `StableDiffusionPipeline` and `CLIPModel` saved with save_pretrained:
base and LoRA images side by side, progress, CLIP score of the new images next to the stored label; and the
generation helper itself (strength 0 is the base model, the LoRA changes the images)."""
from __future__ import annotations

import numpy as np
import pytest

import app_support
from test_app_pages import assert_clean, run_app, widget


@pytest.fixture(scope="module")
def gen_root(tmp_path_factory):
    return app_support.generation_root(tmp_path_factory.mktemp("appgen"), n=6)


@pytest.fixture
def env(gen_root, monkeypatch):
    monkeypatch.setenv("LOL_DATA", str(gen_root))
    monkeypatch.setenv("LOL_APP_CACHE", str(gen_root.parent / "cache"))
    monkeypatch.setenv("LOL_APP_WARMUP", "0")
    return gen_root


def test_generate_side_by_side_with_diffusers(gen_root):
    from lol.showcase import generate_side_by_side, parse_seeds
    from lol.collection import open_collection
    from lol.zoo.image_bases import load_sd_pipeline

    pipe = load_sd_pipeline(gen_root / "base" / "sd", "cpu")
    lora = open_collection(gen_root / "collections" / "faces").lora(0)
    steps = []
    res = generate_side_by_side(pipe, lora, "faces-000", ["a photo of a person"], parse_seeds("42, 7"), 2, 4.0, 1.0,
                                "cpu", progress=lambda f, t: steps.append(f))
    assert len(res.base) == len(res.lora) == 2 and res.captions == ["a photo of a person · seed 42",
                                                                    "a photo of a person · seed 7"]
    assert steps[-1] == 1.0 and len(steps) == 2 * 2 * 2  # (base, LoRA) × seeds × steps
    diff = [np.abs(np.asarray(b, float) - np.asarray(l, float)).mean() for b, l in zip(res.base, res.lora)]
    assert min(diff) > 0.5  # the LoRA changes the images
    zero = generate_side_by_side(pipe, lora, "faces-000", ["a photo of a person"], [42], 2, 4.0, 0.0, "cpu")
    assert np.array_equal(np.asarray(zero.base[0]), np.asarray(zero.lora[0]))  # strength 0 = base model
    assert np.array_equal(np.asarray(zero.base[0]), np.asarray(res.base[0]))  # same seed, same base image
    assert not pipe.get_list_adapters() or not any(pipe.get_list_adapters().values())  # adapter removed again


def test_parse_seeds_errors():
    from lol.showcase import parse_seeds

    assert parse_seeds("1 2,3") == [1, 2, 3]
    with pytest.raises(ValueError, match="'x'"):
        parse_seeds("1, x")
    with pytest.raises(ValueError, match="at least one"):
        parse_seeds("  ")


def test_generate_page(env):
    at = run_app()
    widget(at, "selectbox", "LoRA").select("faces-003").run()  # chosen on the Collection page …
    at.switch_page("app_pages/generate.py")
    at.run()
    assert_clean(at)
    assert widget(at, "selectbox", "LoRA").value == "faces-003"  # … is the one Generate opens with
    for label in ("Steps", "Guidance scale", "LoRA strength"):
        widget(at, "slider", label)
    widget(at, "slider", "Steps").set_value(2)
    widget(at, "text_input", "Seeds").input("1, x")
    at.button(key="gen_go").click().run()
    assert not at.exception
    assert any("seed 'x' is not an integer" in e.value for e in at.error)
    widget(at, "text_input", "Seeds").input("42")
    at.button(key="gen_go").click().run()
    assert_clean(at)
    # base | LoRA | difference (this collection records no finetuning images), each with its own CLIP score
    caps = [i.proto.imgs[0].caption for i in at.image]
    assert len(caps) == 3 and caps[0].startswith("base · CLIP ") and caps[1].startswith("LoRA · CLIP ")
    assert caps[2].startswith("mean |Δ|")
    m = {x.label: x.value for x in at.metric}
    assert m["Measured clip_score"] != "n/a" and m["Predicted clip_score"] == "n/a"  # no checkpoints in this root …
    assert next(x.help for x in at.metric if x.label == "Predicted clip_score") == (
        "No trained checkpoint that fits this collection predicts clip_score.")   # … and the page says so
    assert "vs base" in next(x.delta for x in at.metric if x.label == "CLIP score of these images")
    assert any("**The comparison:**" in c.value for c in at.caption)
    assert any("Done in" in p.proto.text for p in at.get("progress"))
    png = at.get("download_button")
    assert png, "no PNG download of the grid"


def test_images_are_enlarged_sharp_and_the_grid_is_one_png():
    import io

    from PIL import Image

    from lol.showcase import difference, grid_png, sharp

    rng = np.random.default_rng(0)
    a = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    big = sharp(a)
    assert big.size == (192, 192)
    arr = np.asarray(big)
    assert (arr[::3, ::3] == np.asarray(a)).all() and (arr[1::3, 2::3] == np.asarray(a)).all()  # whole-pixel blocks
    assert sharp(Image.new("RGB", (512, 512))).size == (512, 512)  # large images are never shrunk
    same, mad = difference(a, a)
    assert mad == 0 and not np.asarray(same).any()
    png = grid_png([[(a, "base"), (a, "LoRA"), (same, "difference")]] * 2, title="t")
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.width >= 3 * 192 and im.height >= 2 * 192


def test_a_lora_measured_again_shows_every_measurement_and_their_spread():
    import pandas as pd

    from lol.app.generation import measurements_caption

    m = pd.DataFrame({"source": ["build", "seed 2042", "seed 3042"], "value": [50.0, 45.0, 48.0],
                      "centred": [50.0, 51.0, 52.0]})
    text = measurements_caption(m, "clip_score", False)
    assert text.startswith("**Measured 3 times**") and "50 (build), 51 (seed 2042), 52 (seed 3042)" in text
    assert "std 1 between them" in text and "the clip_score label is the build's measurement" in text
    assert "the clip_score label is their mean" in measurements_caption(m, "clip_score", True)


def test_a_view_of_one_label_uses_the_sidebars_model_or_else_the_shipped_one_for_that_label():
    from types import SimpleNamespace

    import pandas as pd

    from lol.app.generation import prediction_help
    from lol.app.sidebar import AppContext
    from lol.catalog import CheckpointInfo
    from lol.lora import ModuleSpec

    spec = ModuleSpec(("m.q",), ((8, 8),))
    other = ModuleSpec(("m.k",), ((8, 8),))
    attrs = CheckpointInfo("/c/attrs", "faces/attributes", "dense", ("male", "young"), spec, shipped_for=("male",))
    clip = CheckpointInfo("/c/clip", "faces/clip_score", "glnet", ("clip_score",), spec, shipped_for=("clip_score",))
    svals = CheckpointInfo("/c/svals", "faces/svals", "svals", ("clip_score", "male"), spec)
    elsewhere = CheckpointInfo("/c/x", "other/clip", "glnet", ("clip_score",), other, shipped_for=("clip_score",))
    coll = SimpleNamespace(table=pd.DataFrame(columns=["id", "clip_score", "male", "young"]), spec=spec)
    ctx = AppContext(collection=coll, model=attrs, models=[elsewhere, svals, attrs, clip])
    assert ctx.model_for("male") is attrs                   # the sidebar's model predicts it
    assert ctx.model_for("clip_score") is clip              # it does not: the fitting one shipped for clip_score
    assert "shipped model for clip_score" in prediction_help(ctx, clip, "clip_score", ", without generating anything")
    assert prediction_help(ctx, attrs, "male", "").startswith("By the sidebar's LoL model, faces/attributes")
    ctx = AppContext(collection=coll, model=attrs, models=[elsewhere, svals, attrs])
    assert ctx.model_for("clip_score") is svals             # none shipped for it here: the first fitting one
    ctx = AppContext(collection=coll, model=attrs, models=[elsewhere, attrs])
    assert ctx.model_for("clip_score") is None              # only a model of other modules predicts it
    assert prediction_help(ctx, None, "clip_score", "") == ("No trained checkpoint that fits this collection "
                                                           "predicts clip_score.")
