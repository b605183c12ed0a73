"""LoL against the standard evaluation at the paper's scale (`lol.speed`, `lol.architectures`, ``bench speed``): the
architectures are the published ones (parameter counts, LoRA shapes = `lol.synth`'s specs), and the quick mode runs
the whole code path on tiny models and writes tables whose arithmetic adds up."""
import json

import pandas as pd
import pytest
import torch

from lol import architectures as A
from lol import speed
from lol.synth import spec_by_name, tiny_spec

# published parameter counts of the checkpoints the configs copy
PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480, "clip": 149_620_737,
          "lm": 1_543_714_304}


@pytest.mark.parametrize("component", sorted(PARAMS))
def test_full_configs_build_the_published_architectures(component):
    model = A.build(component, device="meta")   # structure only: no memory, no time
    assert sum(p.numel() for p in model.parameters()) == PARAMS[component]


def test_lora_shapes_of_the_real_models_are_the_synth_specs():
    unet, lm = A.build("unet", device="meta"), A.build("lm", device="meta")
    for name, model, targets, prefix in (("sd15", unet, ("to_q", "to_v"), "unet."),
                                         ("sd15_attn", unet, ("to_q", "to_k", "to_v", "to_out.0"), "unet."),
                                         ("qwen2_1_5b", lm, ("q_proj", "v_proj"), "")):
        spec = spec_by_name(name)
        assert A.linear_shapes(model, targets, prefix) == dict(zip(spec.names, spec.shapes)), name
    assert len(spec_by_name("sd15_attn")) == 128 and len(spec_by_name("qwen2_1_5b")) == 56
    assert speed.scale_specs()[speed.IMAGE][0][1] == spec_by_name("sd15")


def test_wide_models_are_timed_narrower_and_scaled_up():
    rows = speed.lol_at_scale(tiny_spec(), ["dense", "svals"], batch=4, memory_budget=2_000, repeat=1)
    dense, svals = rows
    assert dense["timed width"] < dense["width"] == 64 and dense["LoRAs per call"] >= 1
    assert dense["seconds per LoRA"] == pytest.approx(
        dense["seconds per LoRA, timed"] * dense["width"] / dense["timed width"])
    assert "upper bound" in dense["how"]
    assert svals["seconds per LoRA"] > 0


def test_quick_bench_writes_tables_that_add_up(tmp_path):
    from bench.bench_speed import main

    out = tmp_path / "results"
    out.mkdir()
    zoo = pd.DataFrame([{"task": "lm/challenge_accuracy", "standard_evaluation": "run the LM", "standard_seconds": 1.0,
                         "lol_seconds": 0.001, "recomputed_label": 0.3, "stored_label": 0.3, "lol_prediction": 0.31,
                         "ratio": 1000.0, "device": "cpu", "paper_claim": "> 50,000×"}])
    zoo.to_csv(out / "speed.csv", index=False)   # the tiny-zoo rows notebook 06 writes: kept in speed.md
    threads = torch.get_num_threads()
    try:
        main(["--quick", "--in-process", "--out", str(out), "--data", str(tmp_path / "no-data"), "--kinds",
              "svals,glnet", "--repeat", "1", "--unet-calls", "1", "--lm-calls", "1", "--threads", "1", "--clock", "cpu"])
    finally:
        torch.set_num_threads(threads)   # --threads is process-wide
    std = pd.read_csv(out / "speed_scale_standard.csv")
    cmp = pd.read_csv(out / "speed_scale.csv")
    meta = json.loads((out / "speed_scale.json").read_text())
    assert meta["quick"] is True and meta["notes"] and meta["clock"] == "cpu"

    parts = std[std.part != "total"]
    assert list(parts.side.unique()) == [speed.IMAGE, speed.LANGUAGE]
    assert {"denoising step, LoRA loaded", "VAE decode", "CLIP ViT-B/16 score", "load + unload the LoRA (diffusers)",
            "score answer options, LoRA loaded", "load + unload the LoRA (PEFT)"} <= set(parts.part)
    for clock in ("seconds", "CPU seconds"):
        assert (parts[f"{clock} per LoRA"] - parts[f"{clock} per call"] * parts["calls per LoRA"]).abs().max() < 1e-9
    assert (parts["CPU seconds per call"] > 0).all()
    step = parts[parts.part == "denoising step, LoRA loaded"].iloc[0]
    p = speed.QUICK_IMAGE
    assert step["calls per LoRA"] == p.steps * p.prompts   # one prompt per call on the CPU
    arc = parts[parts.part == "score answer options, LoRA loaded"].iloc[0]
    assert arc["calls per LoRA"] == speed.QUICK_ARC.questions * speed.QUICK_ARC.options / 4
    totals = std[std.part == "total"].set_index("side")["CPU seconds per LoRA"]
    assert totals.to_dict() == pytest.approx(parts.groupby("side")["CPU seconds per LoRA"].sum().to_dict())

    # every LoL kind on every spec of its side, the ratio = standard total / LoL
    assert len(cmp) == 2 * (len(speed.scale_specs(True)[speed.IMAGE]) + 1)
    assert set(cmp.kind) == {"svals", "glnet"} and (cmp["CPU seconds per LoRA"] > 0).all()
    assert (cmp["standard CPU seconds per LoRA"] == cmp.side.map(totals)).all() and set(cmp.clock) == {"cpu"}
    assert ((cmp.ratio - cmp["standard CPU seconds per LoRA"] / cmp["CPU seconds per LoRA"]).abs()
            < 1e-6 * cmp.ratio).all()
    assert set(cmp[f"≥ {speed.GOAL:,}×"]) <= {"yes", "no"}

    md = (out / "speed.md").read_text()
    assert "Quick mode" in md and "ratio" in md and "20 steps" not in md and "CPU s per LoRA" in md
    assert f"{p.steps} steps × {p.prompts} prompts ÷ 1 per call" in md     # the arithmetic is in the table
    assert "## Our zoo's tiny base models" in md and "lm/challenge_accuracy" in md   # notebook 06's rows kept


def test_models_page_shows_the_speed_report(tmp_path, monkeypatch):
    """The Models page shows ``speed.md`` (written by `write_speed_md` from the bench's tables) of the results
    folders, the GPU one too."""
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    import app_support
    from lol.outputs import speed_reports

    root = app_support.data_root(tmp_path / "data")
    res = root / "results"
    (res / "gpu").mkdir(parents=True)
    pd.DataFrame([{"side": speed.IMAGE, "part": "denoising step", "one call": "UNet", "timed calls": 2,
                   "seconds per call": 20.0, "CPU seconds per call": 19.0, "calls per LoRA": 660.0,
                   "arithmetic": "20 steps × 33 prompts ÷ 1 per call", "seconds per LoRA": 13200.0,
                   "CPU seconds per LoRA": 12540.0}]).to_csv(res / "speed_scale_standard.csv", index=False)
    std, cmp = speed.scale_tables(pd.read_csv(res / "speed_scale_standard.csv").to_dict("records"),
                                  [{"side": speed.IMAGE, "LoRA": "SD-1.5 UNet to_q/to_v (64 modules)", "kind": "glnet",
                                    "LoRAs per call": 64, "width": 64, "timed width": 64,
                                    "seconds per LoRA, timed": 0.01, "seconds per LoRA": 0.01,
                                    "CPU seconds per LoRA": 0.0095, "how": "timed"}])
    std.to_csv(res / "speed_scale_standard.csv", index=False)
    cmp.to_csv(res / "speed_scale.csv", index=False)
    assert cmp.ratio.iloc[0] == pytest.approx(1_320_000) and cmp.iloc[0]["shipped for"] == "not shipped"
    speed.write_speed_md(res)
    (res / "gpu" / "speed.md").write_text("# Speed on a GPU\n\nratio on the H200\n")
    assert speed_reports([res]) == [res / "speed.md", res / "gpu" / "speed.md"]
    text = (res / "speed.md").read_text()
    assert "1,320,000×" in text and "20 steps × 33 prompts ÷ 1 per call" in text and "| total |" in text

    monkeypatch.setenv("LOL_DATA", str(root))
    monkeypatch.setenv("LOL_APP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOL_APP_WARMUP", "0")
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app.py"), default_timeout=120)
    at.run()
    at.switch_page("app_pages/models.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Speed: LoL against the standard evaluation" in [h.value for h in at.subheader]
    shown = "\n".join(m.value for m in at.markdown)
    assert "1,320,000×" in shown and "ratio on the H200" in shown
