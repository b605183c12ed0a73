"""The explorer's building blocks without a browser: upload staging and reading, packing loose files, figures,
notebook-output reading, UMAP persistence. Page behaviour is in test_app_pages.py, the real browser in
test_browser.py."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import app_support
from lol import outputs
from lol import uploads as upload
from lol.app import fmt, plots
from lol.app.sidebar import max_upload_mb
from lol.uploads import pack_folder
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

class Streamed(Uploaded):
    """An upload that can only be read as a stream (like streamlit's UploadedFile, a BytesIO): getvalue would copy."""

    def __init__(self, name, data: bytes):
        import io

        super().__init__(name, data)
        self._io = io.BytesIO(data)

    def getvalue(self):
        raise AssertionError("the upload was copied into memory a second time (getvalue)")

    def seek(self, *a):
        return self._io.seek(*a)

    def read(self, *a):
        return self._io.read(*a)


def _staging_dirs() -> set:
    return set(Path(tempfile.gettempdir()).glob(f"{upload.PREFIX}*"))


def test_upload_reads_diffusers_file_and_names_bad_ones(tmp_path):
    good = _lora(0)
    before = _staging_dirs()
    files = [Streamed("good.safetensors", _file_bytes(good, tmp_path)),
             Uploaded("junk.safetensors", b"\x00\x01not a safetensors file"),
             Uploaded("evil.bin", b"PK\x03\x04pickle"),
             Uploaded("notes.txt", b"hello")]
    res = upload.read_uploads(files)
    assert [u.name for u in res.loras] == ["good.safetensors"]
    _assert_same_deltas(res.loras[0].lora, good)  # round-trips (same ΔW per module), after the file is deleted
    msgs = " | ".join(res.errors)
    assert len(res.errors) == 3
    assert "junk.safetensors" in msgs and "notes.txt" in msgs and "unsupported file type" in msgs
    assert "evil.bin: a pickled checkpoint (.bin) is not read, because unpickling an uploaded file can run code" in msgs
    assert upload.PREFIX not in msgs and tempfile.gettempdir() not in msgs  # no temporary path on screen
    assert _staging_dirs() == before  # the staging folder is gone


def test_upload_over_the_size_limit_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("LOL_UPLOAD_MAX_MB", "1")
    big = Uploaded("big.safetensors", b"")
    big.size = 3 << 20
    res = upload.read_uploads([big])
    assert res.errors == ["big.safetensors: 3 MB is over this server's limit of 1 MB per file"]
    assert "1 MB per file" in upload.limits_text(max_upload_mb())


def test_upload_limit_of_the_server_is_at_least_1_gb():
    import tomllib

    cfg = tomllib.loads((Path(__file__).resolve().parents[1] / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["maxUploadSize"] >= 1024


def _bases(tmp_path):
    from lol.catalog import bases

    faces = app_support.faces_like(tmp_path / "c" / "faces", n=8)
    lm = app_support.lm_like(tmp_path / "c" / "lm", n=8)
    return bases({"faces": faces, "lm": lm})


def test_mixed_uploads_are_judged_per_file(tmp_path):
    known = _bases(tmp_path)
    lm_lora = app_support.random_lora(torch.Generator().manual_seed(1), 2, app_support.LM_MODULES)
    other = _lora(1, modules=(("unet.down.attn1.to_q", 16, 16), ("unet.down.attn1.to_k", 16, 16)))
    files = [Uploaded("z_faces.safetensors", _file_bytes(_lora(0), tmp_path, "a.safetensors")),
             Uploaded("a_lm.safetensors", _file_bytes(lm_lora, tmp_path, "b.safetensors")),
             Uploaded("other_base.safetensors", _file_bytes(other, tmp_path, "c.safetensors"))]
    res = upload.read_uploads(files, known)
    fits = {u.name: u.base.collections for u in res.loras}
    assert fits == {"z_faces.safetensors": ["faces"], "a_lm.safetensors": ["lm"]}  # the first file decides nothing
    assert len(res.errors) == 1 and res.errors[0].startswith("other_base.safetensors: fits none of the shipped")
    # on a page for the faces base, the lm file is caught in one line naming the base it fits
    res = upload.read_uploads(files[:2], known, want=known[0])
    assert [u.name for u in res.loras] == ["z_faces.safetensors"]
    assert res.errors == ["a_lm.safetensors: a LoRA for the 4-module base of lm, not for the 4-module base of faces"]


def test_pack_uploads_packs_the_largest_group_and_records_its_base(tmp_path):
    from lol.uploads import pack_uploads
    from lol.collection import open_collection

    known = _bases(tmp_path)
    known[0].models["sd"] = tmp_path / "base" / "sd"
    lm_lora = app_support.random_lora(torch.Generator().manual_seed(1), 2, app_support.LM_MODULES)
    files = [Uploaded(f"f{i}.safetensors", _file_bytes(_lora(i), tmp_path, f"{i}.safetensors")) for i in range(2)]
    files.append(Uploaded("lm.safetensors", _file_bytes(lm_lora, tmp_path, "lm.safetensors")))
    res = upload.read_uploads(files, known, require_base=False)
    dest, errors, notes = pack_uploads(res.loras, tmp_path / "packed")
    c = open_collection(dest)
    assert c.table["id"].tolist() == ["f0.safetensors", "f1.safetensors"] and not notes
    assert errors == ["lm.safetensors: a LoRA for the 4-module base of lm, not for the Stable Diffusion base of faces like "
                      "the other uploads; upload it on its own"]
    assert json.loads(c.base_model) == {"sd": str(tmp_path / "base" / "sd")}
    assert [(b.collections, [n for n, _ in named]) for b, named in res.by_base()] == [
        (["faces"], ["f0.safetensors", "f1.safetensors"]), (["lm"], ["lm.safetensors"])]
    # a server keeps only the newest packed uploads beside the new one
    for i in range(3):
        pack_uploads(res.loras, tmp_path / "uploads" / f"u{i}")
        os.utime(tmp_path / "uploads" / f"u{i}", (1e9 + i, 1e9 + i))  # older sessions' uploads, oldest first
    pack_uploads(res.loras, tmp_path / "uploads" / "new", keep=2)
    assert sorted(p.name for p in (tmp_path / "uploads").iterdir() if p.is_dir()) == ["new", "u2"]


def test_upload_peft_pair_and_safe_names(tmp_path):
    lora = _lora(2)
    folder = save_peft(lora, tmp_path / "peft")
    files = [Uploaded(p.name, p.read_bytes()) for p in sorted(Path(folder).iterdir()) if p.is_file()]
    files.append(Uploaded("../../escape.safetensors", _file_bytes(lora, tmp_path, "x.safetensors")))
    res = upload.read_uploads(files)
    assert not res.errors, res.errors
    assert len(res.loras) == 2
    # nothing is written outside the temporary folder, whatever the uploaded name says
    assert not (Path(tempfile.gettempdir()).parent / "escape.safetensors").exists()
    assert not (Path(tempfile.gettempdir()) / "escape.safetensors").exists()


# ------------------------------------------------------------------------------------------------------ packing

def test_pack_folder_keeps_matching_and_names_the_rest(tmp_path):
    src = tmp_path / "loras"
    src.mkdir()
    for i in range(3):
        save_diffusers(_lora(i, rank=2 + i % 2), src / f"lora{i}.safetensors")
    save_diffusers(_lora(9, modules=(("unet.down.attn1.to_q", 8, 8),)), src / "zz_other.safetensors")
    (src / "broken.safetensors").write_bytes(b"nope")
    dest, notes = pack_folder(src, tmp_path / "packed")
    from lol.collection import open_collection

    c = open_collection(dest)
    assert sorted(c.table["id"]) == ["lora0.safetensors", "lora1.safetensors", "lora2.safetensors"]
    assert c.ranks.max(1).values.tolist() == [2, 3, 2]
    assert len(notes) == 2
    assert any("broken.safetensors" in n for n in notes)
    assert any("zz_other.safetensors" in n and "does not match" in n for n in notes)
    # ΔW survives packing
    _assert_same_deltas(c.lora(1), _lora(1, rank=3))


def test_folders_are_packed_by_the_rule_of_lol_import(tmp_path, capsys):
    """The app's folder source and `lol import` are one function (`lol.packing.pack`): the majority's modules win
    even when the first file (in sorted order) is the odd one out, and both keep the same LoRAs."""
    from lol.cli import main
    from lol.collection import open_collection

    src = tmp_path / "loras"
    src.mkdir()
    save_diffusers(_lora(9, modules=(("unet.down.attn1.to_q", 8, 8),)), src / "a_other.safetensors")
    for i in range(2):
        save_diffusers(_lora(i), src / f"lora{i}.safetensors")
    dest, notes = pack_folder(src, tmp_path / "packed")
    assert open_collection(dest).ids == ["lora0.safetensors", "lora1.safetensors"]
    assert len(notes) == 1 and notes[0].startswith("a_other.safetensors: ") and str(src) not in notes[0]
    assert main(["import", str(src), str(tmp_path / "imported")]) == 0
    assert open_collection(tmp_path / "imported").ids == open_collection(dest).ids
    assert "a_other.safetensors" in capsys.readouterr().err


def test_pack_folder_nothing_readable(tmp_path):
    from lol.errors import CollectionError

    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.safetensors").write_bytes(b"zz")
    with pytest.raises(CollectionError, match="none of the 1 file"):
        pack_folder(src, tmp_path / "out")


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
    out = outputs.find_outputs([d])
    assert [f.kind for f in out.figures] == ["plotly"]
    t = next(t for t in out.tables if t.name == "results")
    wide = outputs.model_by_task(t.frame)
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
    assert list(outputs.pretty_columns(df).columns) == ["model", "faces/clip_score · R²", "lm/membership · AUC",
                                                        "lm/membership · TPR @ 1% FPR"]


def test_error_boundary_shows_lol_errors_plainly_and_lets_bugs_through():
    from streamlit.testing.v1 import AppTest

    def script():
        import streamlit as st

        from lol.app.errors import guard
        from lol.errors import CollectionError

        def bad_file():
            raise CollectionError("/data/x: not a collection")

        def bug():
            raise KeyError("clip_score (predicted)")

        guard(bad_file, what="the Collection page")
        st.write("after")
        guard(bug, what="the Predict page")
        st.write("never")

    at = AppTest.from_function(script, default_timeout=30).run()
    assert [e.value for e in at.error] == ["The Collection page could not be drawn: /data/x: not a collection"]
    assert "after" in [m.value for m in at.markdown] and "never" not in [m.value for m in at.markdown]
    assert at.exception and "clip_score (predicted)" in at.exception[0].value


def test_every_command_the_app_mentions_exists():
    """Messages on screen that tell users to run `lol …` or `make …` name commands that exist."""
    import argparse
    import re

    from lol.cli import build_parser

    repo = Path(__file__).resolve().parents[1]
    text = "\n".join(p.read_text() for p in [*(repo / "lol" / "app").glob("*.py"), *(repo / "app_pages").glob("*.py")])
    parser = build_parser()

    def subparsers(p):
        return next((a.choices for a in p._actions if isinstance(a, argparse._SubParsersAction)), {})

    lol_cmds = set(re.findall(r"`lol ([a-z]+(?: [a-z]+)?)", text))
    assert lol_cmds, "no `lol …` command found in the app's messages (the pattern is broken)"
    for cmd in lol_cmds:
        first, _, second = cmd.partition(" ")
        assert first in subparsers(parser), f"the app mentions `lol {cmd}`: no such command"
        sub = subparsers(subparsers(parser)[first])
        if sub and second:
            assert second in sub, f"the app mentions `lol {cmd}`: no such command"
    targets = set(re.findall(r"^([a-z]+):", (repo / "Makefile").read_text(), flags=re.M))
    for target in re.findall(r"`make ([a-z]+)", text):
        assert target in targets, f"the app mentions `make {target}`: no such Makefile target"


def test_best_result_is_marked_in_numeric_and_mean_pm_spread_columns():
    from lol.metrics import METRIC_NAMES

    df = pd.DataFrame({"model": ["a", "b", "c"], "faces · R²": [0.2, 0.8, 0.5], "lm · MAE": [0.3, 0.1, 0.2],
                       "fashion · AUC": ["0.468 ± 0.040", "0.655 ± 0.095", "n/a"],
                       f"faces · {METRIC_NAMES['mse_norm']}": [0.4, 0.2, 0.9]})
    styles = fmt.mark_best(df)._compute().ctx  # {(row, col): [(prop, value)]}
    bold = sorted((r, c) for (r, c), props in styles.items() if ("font-weight", "bold") in props)
    assert bold == [(1, 1), (1, 2), (1, 3), (1, 4)]  # highest R², lowest MAE, highest AUC mean, lowest normalized MSE


def test_a_table_too_large_to_style_is_shown_plain():
    """The Models page lists per-LoRA tables too (predictions_test: ~1M cells), which pandas refuses to style."""
    n = pd.get_option("styler.render.max_elements") // 4 + 1
    big = pd.DataFrame({"a": np.arange(n, dtype=float), "b": 1.0, "c": 2.0, "d": 3.0})
    out = fmt.mark_best(big)
    assert isinstance(out, pd.DataFrame) and out is big
    assert not isinstance(fmt.mark_best(big.head(10)), pd.DataFrame)  # small tables are still marked
