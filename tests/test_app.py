"""The explorer's building blocks without a browser: upload staging and reading, packing loose files, figures,
notebook-output reading, UMAP persistence. Page behaviour is in test_app_pages.py, the real browser in
test_browser.py."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import app_support
from lol.app import plots, results, upload
from lol.app.sources import pack_loras
from lol.formats import save_diffusers, save_peft


class Uploaded:
    """Stands in for streamlit's UploadedFile (name + getvalue)."""

    def __init__(self, name, data: bytes):
        self.name, self._data, self.size, self.file_id = name, data, len(data), name

    def getvalue(self):
        return self._data


def _lora(seed=0, rank=2, modules=app_support.TINY_MODULES):
    return app_support.random_lora(torch.Generator().manual_seed(seed), rank, modules)


def _assert_same_deltas(got, orig):
    """Every module of ``orig`` has the same ΔW in ``got``."""
    by_name = {m.name: m for m in got}
    assert sorted(by_name) == sorted(m.name for m in orig)
    for m in orig:
        assert torch.allclose(by_name[m.name].delta(), m.delta(), atol=1e-5)


def _file_bytes(lora, tmp: Path, name="pytorch_lora_weights.safetensors") -> bytes:
    p = save_diffusers(lora, tmp / name)
    return p.read_bytes()


# ------------------------------------------------------------------------------------------------------ uploads

def test_upload_reads_diffusers_file_and_names_bad_ones(tmp_path):
    good = _lora(0)
    files = [Uploaded("good.safetensors", _file_bytes(good, tmp_path)),
             Uploaded("junk.safetensors", b"\x00\x01not a safetensors file"),
             Uploaded("evil.bin", b"PK\x03\x04pickle"),
             Uploaded("notes.txt", b"hello")]
    dest = upload.new_upload_dir()
    try:
        res = upload.read_uploads(files, dest)
        assert [u.name for u in res.loras] == ["good.safetensors"]
        _assert_same_deltas(res.loras[0].lora, good)  # the uploaded file round-trips (same ΔW per module)
        msgs = " | ".join(res.errors)
        assert len(res.errors) == 3
        assert "junk.safetensors" in msgs and "evil.bin" in msgs and "pickle" in msgs.lower()
        assert "notes.txt" in msgs and "unsupported file type" in msgs
        # refused files are not left in the staging folder; the temporary path never leaks into messages
        assert sorted(p.name for p in dest.iterdir()) == ["good.safetensors"]
        assert str(dest) not in msgs
    finally:
        upload.remove_upload_dir(dest)
    assert not dest.exists()


def test_upload_spec_mismatch_is_named(tmp_path):
    other = _lora(1, modules=(("unet.down.attn1.to_q", 16, 16), ("unet.down.attn1.to_k", 16, 16)))
    files = [Uploaded("other_base.safetensors", _file_bytes(other, tmp_path))]
    res = upload.read_uploads(files, upload.new_upload_dir(), spec=_lora(0).spec, what="the model X")
    assert not res.loras
    assert len(res.errors) == 1 and "other_base.safetensors" in res.errors[0]
    assert "does not match the base model of the model X" in res.errors[0]
    upload.remove_upload_dir(res.folder)


def test_upload_peft_pair_and_safe_names(tmp_path):
    lora = _lora(2)
    folder = save_peft(lora, tmp_path / "peft")
    files = [Uploaded(p.name, p.read_bytes()) for p in sorted(Path(folder).iterdir()) if p.is_file()]
    files.append(Uploaded("../../escape.safetensors", _file_bytes(lora, tmp_path, "x.safetensors")))
    dest = upload.new_upload_dir()
    res = upload.read_uploads(files, dest)
    assert not res.errors, res.errors
    assert len(res.loras) == 2
    # nothing is written outside the temporary folder, whatever the uploaded name says
    for u in res.loras:
        assert Path(u.path).resolve().is_relative_to(dest.resolve())
    assert not (dest.parent.parent / "escape.safetensors").exists()
    upload.remove_upload_dir(dest)


def test_remove_upload_dir_refuses_other_folders(tmp_path):
    keep = tmp_path / "lol-upload-x"
    keep.mkdir()
    upload.remove_upload_dir(keep)  # not directly under the system temp folder: left alone
    assert keep.exists()


# ------------------------------------------------------------------------------------------------------ packing

def test_pack_loras_keeps_matching_and_names_the_rest(tmp_path):
    src = tmp_path / "loras"
    src.mkdir()
    for i in range(3):
        save_diffusers(_lora(i, rank=2 + i % 2), src / f"lora{i}.safetensors")
    save_diffusers(_lora(9, modules=(("unet.down.attn1.to_q", 8, 8),)), src / "zz_other.safetensors")
    (src / "broken.safetensors").write_bytes(b"nope")
    dest, notes = pack_loras(src, tmp_path / "packed")
    from lol.collection import open_collection

    c = open_collection(dest)
    assert sorted(c.table["id"]) == ["lora0.safetensors", "lora1.safetensors", "lora2.safetensors"]
    assert c.ranks.max(1).values.tolist() == [2, 3, 2]
    assert len(notes) == 2
    assert any("broken.safetensors" in n for n in notes)
    assert any("zz_other.safetensors" in n and "does not match" in n for n in notes)
    # ΔW survives packing
    _assert_same_deltas(c.lora(1), _lora(1, rank=3))


def test_pack_loras_nothing_readable(tmp_path):
    from lol.errors import CollectionError

    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.safetensors").write_bytes(b"zz")
    with pytest.raises(CollectionError, match="none of the 1 file"):
        pack_loras(src, tmp_path / "out")


# ------------------------------------------------------------------------------------------------------ figures

def test_color_map_is_consistent_and_order_free():
    a = plots.color_map([True, False, True])
    b = plots.color_map([False, True])
    assert a == b and a[False] != a[True]
    assert plots.color_map(["b", "a", "c"])["a"] == plots.color_map(["a", "z"])["a"]
    assert plots.model_color("glnet") == plots.model_color("glnet")


def test_pred_vs_true_has_identity_line_ids_and_units():
    df = pd.DataFrame({"id": ["a", "b", "c"], "clip_score": [20.0, 22.0, 25.0], "p": [21.0, 22.5, 24.0]})
    fig = plots.pred_vs_true(df, "clip_score", "p", name="m")
    line, pts = fig.data
    assert list(line.x) == list(line.y)  # y = x
    assert line.x[0] <= 20.0 and line.x[-1] >= 25.0
    assert [c[0] for c in pts.customdata] == ["a", "b", "c"]
    assert "CLIP score" in fig.layout.xaxis.title.text and "predicted" in fig.layout.yaxis.title.text


def test_selected_ids_from_plotly_event():
    event = {"selection": {"points": [{"customdata": ["lora-7", 1.0]}, {"customdata": ["lora-7", 1.0]},
                                      {"customdata": ["lora-2"]}, {"x": 1}]}}
    assert plots.selected_ids(event) == ["lora-7", "lora-2"]
    assert plots.selected_ids(None) == [] and plots.selected_ids({"selection": {"points": []}}) == []


def test_roc_figure_is_log_scale():
    fig = plots.roc_curves([("m", np.array([0.0, 0.01, 1.0]), np.array([0.0, 0.5, 1.0]), 0.8)], min_fpr=1e-3)
    assert fig.layout.xaxis.type == "log"
    assert min(fig.data[1].x) >= 1e-3  # FPR = 0 is clipped onto the axis, not dropped


def test_embedding_scatter_categorical_and_continuous():
    df = pd.DataFrame({"id": list("abcd"), "male": [True, False, True, False], "lr": [1e-4, 3e-4, 1e-3, 3e-3]})
    xy = np.arange(8.0).reshape(4, 2)
    cat = plots.embedding_scatter(xy, df, "male")
    assert {tr.name for tr in cat.data} == {"male = True", "male = False"}
    cont = plots.embedding_scatter(xy, df, "lr")
    assert len(cont.data) == 1 and list(cont.data[0].marker.color) == df["lr"].tolist()


# ------------------------------------------------------------------------------------------------ notebook outputs

def test_results_reader_pivots_long_tables_and_finds_figures(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    pd.DataFrame({"model": ["glnet", "glnet", "mlp"], "task": ["clip", "clip", "clip"],
                  "metric": ["r2", "kendall", "r2"], "value": [0.8, 0.6, 0.3]}).to_csv(d / "results.csv", index=False)
    (d / "fig.json").write_text(json.dumps({"data": [{"type": "scatter", "x": [1], "y": [2]}], "layout": {}}))
    (d / "broken.json").write_text("{not json")
    out = results.find_outputs([d])
    assert [f.kind for f in out.figures] == ["plotly"]
    t = next(t for t in out.tables if t.name == "results")
    wide = results.model_by_task(t.frame)
    assert wide.loc["glnet", "clip · R²"] == 0.8 and wide.loc["mlp", "clip · R²"] == 0.3
    assert np.isnan(wide.loc["mlp", "clip · Kendall τ"])
    assert any(t.error and "broken.json" in t.error for t in out.tables)


# ------------------------------------------------------------------------------------------------------- UMAP

def test_umap_result_is_persisted_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("LOL_APP_CACHE", str(tmp_path / "cache"))
    from lol.app import cache

    x = np.random.default_rng(0).normal(size=(3, 5))  # below UMAP's minimum: laid out on a line, still persisted
    xy = cache.umap_xy(x, "fp:test")
    files = list((tmp_path / "cache" / "umap").glob("*.npy"))
    assert len(files) == 1 and xy.shape == (3, 2)
    planted = np.full((3, 2), 7.0)
    np.save(files[0], planted)  # a restart reads the file instead of recomputing
    assert np.array_equal(cache.umap_xy(x, "fp:test"), planted)
    assert cache.umap_xy(x, "fp:other").shape == (3, 2)  # another key is another file
    assert len(list((tmp_path / "cache" / "umap").glob("*.npy"))) == 2


def test_pretty_columns_use_true_metric_names():
    df = pd.DataFrame({"model": ["glnet"], "faces/clip_score · r2": ["0.8 ± 0.1"], "lm/membership · auc": ["0.9"],
                       "lm/membership · tpr_at_1pct_fpr": ["0.2"]})
    assert list(results.pretty_columns(df).columns) == ["model", "faces/clip_score · R²", "lm/membership · AUC",
                                                        "lm/membership · TPR @ 1% FPR"]
