"""The pages that show trained LoL models (AppTest): Predict, Membership, Language models, Models, and the model
embedding on Embeddings. The models are real (`lol.train`, a few epochs on tiny collections); what the pages show
is checked against the library: metrics equal those recorded at training time on the same test split."""
from __future__ import annotations

import json

import pytest
import torch

import app_support
from test_app_pages import assert_clean, run_app, widget


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = app_support.data_root(tmp_path_factory.mktemp("appmodels"), retest=True)   # clip_score measured twice
    app_support.lm_like(root / "collections" / "lm")
    app_support.train_checkpoints(root, epochs=6)
    return root


@pytest.fixture
def env(model_root, monkeypatch):
    monkeypatch.setenv("LOL_DATA", str(model_root))
    monkeypatch.setenv("LOL_APP_CACHE", str(model_root.parent / "cache"))
    monkeypatch.setenv("LOL_APP_WARMUP", "0")
    return model_root


GLNET = "faces/glnet — clip_score, male, … (4 labels) · GL-net"
SVALS = "faces/svals — clip_score, male, … (4 labels) · singular-value MLP"


def recorded(root, ckpt: str, label: str) -> dict:
    cfg = json.loads((root / "checkpoints" / ckpt / "config.json").read_text())
    return cfg["metrics"]["test"][label]


def metrics_shown(at) -> list[tuple[str, str]]:
    return [(m.label, m.value) for m in at.metric]


def test_predict_page_metrics_match_training_record_and_compare(env):
    at = run_app()
    # the shipped one first, named by checkpoint (collection/…), what it predicts and its model family
    assert widget(at, "selectbox", "LoL model").value == GLNET
    at.switch_page("app_pages/predict.py")
    at.run()
    assert_clean(at)
    assert widget(at, "selectbox", "Label").value == "clip_score"
    shown = dict(metrics_shown(at))
    rec = recorded(env, "faces/glnet", "clip_score")
    assert float(shown["R²"]) == pytest.approx(rec["r2"], abs=1.5e-3)
    assert float(shown["Spearman ρ"]) == pytest.approx(rec["spearman"], abs=1.5e-3)
    assert float(shown["Kendall τ"]) == pytest.approx(rec["kendall"], abs=1.5e-3)
    assert shown["LoRAs"] == "8"  # the test split of the 40-LoRA collection
    # beside R², the ceiling the label's own measurement noise sets: its test–retest r over the LoRAs measured twice
    from lol.collection import open_collection
    from lol.reliability import retest_reliability

    table = open_collection(env / "collections" / "faces").table
    rel = retest_reliability(table["clip_score"], table["clip_score_retest"])
    ceiling = [c.value for c in at.caption if c.value.startswith("R² ceiling for `clip_score`")]
    assert len(ceiling) == 1 and f"**{rel['r']:.3f}** (95 % interval {rel['r_ci95'][0]:.3f}–" in ceiling[0]
    assert f"on {rel['n']} LoRAs" in ceiling[0] and rel["n"] == 40

    # change the model in the sidebar, then compare two models side by side
    widget(at, "selectbox", "LoL model").select(SVALS).run()
    assert_clean(at)
    rec = recorded(env, "faces/svals", "clip_score")
    assert float(dict(metrics_shown(at))["R²"]) == pytest.approx(rec["r2"], abs=1.5e-3)
    widget(at, "selectbox", "Compare with").select(GLNET).run()
    assert_clean(at)
    r2s = [float(v) for k, v in metrics_shown(at) if k == "R²"]
    assert len(r2s) == 2 and sum(c.value.startswith("R² ceiling") for c in at.caption) == 2   # one per model
    assert r2s == pytest.approx([recorded(env, "faces/svals", "clip_score")["r2"],
                                 recorded(env, "faces/glnet", "clip_score")["r2"]], abs=1.5e-3)
    # attribute predictions vs truth: one AUC row per model and attribute
    attr = next(d.value for d in at.dataframe if "AUC" in d.value.columns)
    assert sorted(attr["attribute"].unique()) == ["hair_colour", "male", "young"] and len(attr) == 6
    auc = attr[(attr["model"] == SVALS) & (attr["attribute"] == "male")]["AUC"].iloc[0]
    assert auc == pytest.approx(recorded(env, "faces/svals", "male")["auc"], abs=1e-6)
    acc = attr[(attr["model"] == SVALS) & (attr["attribute"] == "hair_colour")]["accuracy"].iloc[0]
    assert acc == pytest.approx(recorded(env, "faces/svals", "hair_colour")["accuracy"], abs=1e-6)


def test_predict_upload_good_and_mismatched_files(env):
    at = run_app("app_pages/predict.py")
    up = next(u for u in at.file_uploader if u.key == "pred_upload")
    good = app_support.diffusers_bytes(seed=5, rank=3)
    other = app_support.diffusers_bytes(seed=6, modules=(("unet.down.attn1.to_q", 8, 8),))
    up.set_value([("mine.safetensors", good, "application/octet-stream"),
                  ("other_base.safetensors", other, "application/octet-stream"),
                  ("garbage.safetensors", b"12345678", "application/octet-stream")]).run()
    assert not at.exception
    errs = [e.value for e in at.error]
    assert any(e.startswith("other_base.safetensors: fits none of the shipped base models") for e in errs), errs
    assert any("garbage.safetensors" in e for e in errs), errs
    assert any("Predicted 1 LoRA" in s.value for s in at.success)
    table = next(d.value for d in at.dataframe if "file" in d.value.columns)
    assert table["file"].tolist() == ["mine.safetensors"]
    # the prediction is the library's: lol.predict on the same file and checkpoint
    import tempfile
    from pathlib import Path

    from lol.predict import predict

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "mine.safetensors"
        p.write_bytes(good)
        want = predict(env / "checkpoints" / "faces" / "glnet", [p])
    assert table["clip_score"].iloc[0] == pytest.approx(want["clip_score"].iloc[0], rel=1e-5)


def test_membership_page_roc_threshold_counts(env):
    at = run_app()
    widget(at, "selectbox", "Collection").select("lm (shipped)").run()
    at.switch_page("app_pages/membership.py")
    at.run()
    assert_clean(at)
    assert widget(at, "selectbox", "LoRA").value == "lm-000"
    m = dict(metrics_shown(at))
    table = next(d.value for d in at.dataframe if "AUC" in d.value.columns)
    # the threshold counts add up to (#test LoRAs) × (#sources), the pooled positives + negatives
    total = sum(int(m[k]) for k in ("true positives", "false positives", "true negatives", "false negatives"))
    pooled = table[table["label"] == "all labels pooled"].iloc[0]
    assert total == pooled["positives"] + pooled["negatives"] and total % len(app_support.SOURCES) == 0
    # the lm table has no split column: the AUCs equal the recorded ones only if the model's seeded, grouped
    # test split was reconstructed exactly
    assert any("seeded grouped split" in c.value for c in at.caption)
    per_label = table[table["label"] != "all labels pooled"].set_index("label")
    for s in app_support.SOURCES:
        rec = recorded(env, "lm/svals", f"source_{s}")
        assert per_label.loc[f"source_{s}", "AUC"] == pytest.approx(rec["auc"], abs=1e-6, nan_ok=True)
    # moving the threshold to 1.0 leaves no predicted positives
    at.slider[0].set_value(1.0).run()
    m = dict(metrics_shown(at))
    assert int(m["true positives"]) + int(m["false positives"]) == 0
    assert at.get("plotly_chart")


def test_language_models_page(env):
    at = run_app("app_pages/language_models.py")
    assert_clean(at)
    assert widget(at, "selectbox", "LoL model for the LM collection").value == \
        "lm/svals — challenge_accuracy, eval_loss, … (7 labels) · singular-value MLP"
    r2s = [float(v) for k, v in metrics_shown(at) if k == "R²"]
    assert r2s == pytest.approx([recorded(env, "lm/svals", "challenge_accuracy")["r2"],
                                 recorded(env, "lm/svals", "eval_loss")["r2"]], abs=1.5e-3)
    assert "Source membership" in [h.value for h in at.subheader]


def test_models_page_lists_checkpoints_with_recorded_metrics(env):
    at = run_app("app_pages/models.py")
    assert_clean(at)
    table = at.dataframe[-1].value
    row = table[(table["checkpoint"] == "faces/glnet") & (table["label"] == "clip_score")].iloc[0]
    assert row["model"] == "glnet" and row["shipped"] == "yes"
    assert row["test R²"] == pytest.approx(recorded(env, "faces/glnet", "clip_score")["r2"])


def test_embeddings_of_the_model_and_prediction_colouring(env):
    at = run_app("app_pages/embeddings.py")
    assert_clean(at)
    assert widget(at, "selectbox", "Embed").value.startswith("LoL model embedding")
    colour = widget(at, "selectbox", "Colour by (label, attribute, hyperparameter, prediction or error)")
    assert "clip_score (predicted)" in colour.options and "clip_score error" in colour.options
    colour.select("clip_score error").run()
    assert_clean(at)


def test_upload_of_a_known_lora_finds_itself_as_nearest_even_after_a_gl_transform(env, tmp_path):
    """A collection LoRA, refactored by a random R ∈ GL(r) per module and uploaded, gets the model's predictions
    and its own id as the nearest LoRA (the GL-net embedding depends on ΔW only)."""
    from lol.collection import open_collection
    from lol.formats import save_diffusers
    from lol.lora import LoRA, LoRAModule

    lora = open_collection(env / "collections" / "faces").lora(7)
    g = torch.Generator().manual_seed(3)
    mods = []
    for m in lora:
        r = torch.randn(m.rank, m.rank, generator=g, dtype=torch.float64) + 3 * torch.eye(m.rank, dtype=torch.float64)
        mods.append(LoRAModule(m.name, (m.U.double() @ r).float(), (m.V.double() @ torch.linalg.inv(r).T).float(),
                               alpha=m.alpha, scale=m.scale))
    data = save_diffusers(LoRA.from_modules(mods, format="synthetic"), tmp_path / "moved.safetensors").read_bytes()
    at = run_app("app_pages/predict.py")
    next(u for u in at.file_uploader if u.key == "pred_upload").set_value(
        [("moved.safetensors", data, "application/octet-stream")]).run()
    assert_clean(at)
    near = next(d.value for d in at.dataframe if "distance" in d.value.columns)
    assert near["LoRA"].iloc[0] == "faces-007" and near["distance"].iloc[0] < 1e-3 * near["distance"].iloc[1]
    assert len(near) == 5


def test_uploaded_collection_without_labels_gets_predictions(env):
    at = run_app()
    widget(at, "selectbox", "Collection").select("Uploaded LoRA files…").run()
    good = app_support.diffusers_bytes(seed=5, rank=3)
    lm = app_support.diffusers_bytes(seed=6, modules=app_support.LM_MODULES)
    at.sidebar.file_uploader[0].set_value([("mine.safetensors", good, "application/octet-stream"),
                                           ("lm.safetensors", lm, "application/octet-stream")]).run()
    errs = [e.value for e in at.sidebar.error]
    assert len(errs) == 1 and errs[0].startswith("lm.safetensors: a LoRA for the") and "of lm, not for" in errs[0]
    at.switch_page("app_pages/predict.py")
    at.run()
    assert not at.exception
    table = next(d.value for d in at.dataframe if "file" in d.value.columns)
    assert table["file"].tolist() == ["mine.safetensors"] and "clip_score" in table.columns


def test_warm_up_fills_what_the_pages_read(env, tmp_path, monkeypatch, caplog):
    """After the warm-up, the Embeddings page's default map (and the invariant ones) come from its cache: the page
    computes no new UMAP, because the warm-up used the page's own keys."""
    import logging

    from lol.app import warmup

    monkeypatch.setenv("LOL_APP_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger="lol.app"):
        warmup._warm()
    assert not [r for r in caplog.records if "failed" in r.getMessage()], caplog.text
    steps = warmup.timings()
    assert {"faces: svals map", "faces: canon map", "lm: svals map"} <= set(steps), steps
    maps = tmp_path / "cache" / "umap"
    before = sorted(p.name for p in maps.iterdir())
    at = run_app("app_pages/embeddings.py")
    assert_clean(at)
    for choice in widget(at, "selectbox", "Embed").options:  # model embedding, singular values, SVD canonical
        widget(at, "selectbox", "Embed").select(choice).run()
        assert_clean(at)
    assert sorted(p.name for p in maps.iterdir()) == before
