"""Maps and predictions shipped with a collection (`lol.precomputed`): written by `lol zoo precompute`, used only for
the very collection, weights and UMAP parameters they were computed for, and equal to what an explorer would compute
itself."""
from __future__ import annotations

import json

import numpy as np
import pytest

import app_support
from lol.collection import open_collection
from lol.precomputed import (DATA_NAME, META_NAME, collection_features, predict_collection, shipped_map,
                             shipped_predictions, umap_2d, write_precomputed)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = app_support.data_root(tmp_path_factory.mktemp("maps"))
    app_support.lm_like(root / "collections" / "lm")
    app_support.train_checkpoints(root, epochs=2)
    return root


def _ckpts(root):
    return sorted(p.parent for p in (root / "checkpoints").rglob("model.safetensors"))


def test_written_maps_are_the_computed_ones(root):
    faces = root / "collections" / "faces"
    meta = json.loads(write_precomputed(faces, _ckpts(root)).read_text())
    coll = open_collection(faces)
    assert meta["fingerprint"] == coll.fingerprint
    kinds = sorted(e["kind"] for e in meta["maps"].values())
    assert kinds == ["canon", "model", "model", "svals"]  # both faces models; the lm model has other modules
    assert not any("lm" in e.get("checkpoint", "") for e in meta["maps"].values())
    for kind in ("svals", "canon"):
        xy = shipped_map(coll, kind)
        assert xy is not None and xy.shape == (len(coll), 2)
        np.testing.assert_allclose(xy, umap_2d(collection_features(coll, kind)), rtol=1e-6, atol=1e-6)
    from lol.checkpoint import load_checkpoint
    from lol.neighbours import embed_collection

    ck = root / "checkpoints" / "faces" / "svals"
    np.testing.assert_allclose(shipped_map(coll, "model", ck),
                               umap_2d(embed_collection(load_checkpoint(ck), coll)), rtol=1e-6, atol=1e-6)
    stored, fresh = shipped_predictions(coll, ck), predict_collection(load_checkpoint(ck), coll)
    assert list(stored.columns) == list(fresh.columns) == ["id", "clip_score", "male", "young", "hair_colour"]
    assert stored["id"].tolist() == coll.table["id"].tolist()
    for c in ("clip_score", "male", "young"):
        np.testing.assert_allclose(stored[c].to_numpy(float), fresh[c].to_numpy(float), rtol=1e-6)
    assert stored["hair_colour"].tolist() == fresh["hair_colour"].astype(str).tolist()


def test_a_map_is_used_only_when_everything_matches(root, tmp_path):
    import shutil

    faces = tmp_path / "faces"
    shutil.copytree(root / "collections" / "faces", faces)
    ck = tmp_path / "ck"
    shutil.copytree(root / "checkpoints" / "faces" / "glnet", ck)
    write_precomputed(faces, [ck])
    coll = open_collection(faces)
    assert shipped_map(coll, "svals") is not None and shipped_map(coll, "model", ck) is not None
    assert shipped_predictions(coll, ck) is not None
    assert shipped_map(coll, "svals", n_neighbors=5) is None  # other UMAP parameters
    assert shipped_map(coll, "model", root / "checkpoints" / "faces" / "svals") is None  # a model never mapped
    # other weights under the same path: the map of the old weights is not used
    from safetensors.torch import load_file, save_file

    w = load_file(ck / "model.safetensors")
    save_file({k: v + 1 for k, v in w.items()}, str(ck / "model.safetensors"))
    assert shipped_map(coll, "model", ck) is None and shipped_predictions(coll, ck) is None
    # a rebuilt collection (another table, hence another fingerprint): none of the old maps is used
    import pandas as pd

    t = pd.read_parquet(faces / "loras.parquet")
    t.loc[0, "clip_score"] += 1.0
    t.to_parquet(faces / "loras.parquet")
    assert shipped_map(open_collection(faces), "svals") is None
    assert shipped_predictions(open_collection(faces), ck) is None
    # a damaged maps file counts as none
    (faces / DATA_NAME).write_bytes(b"not a zip")
    assert shipped_map(coll, "svals") is None


def test_cli_writes_every_collection(root, capsys):
    from lol.cli import main

    assert main(["zoo", "precompute", "--out", str(root), "--only", "lm"]) == 0
    out = capsys.readouterr().out
    assert "precomputed.npz (3 maps, predictions of 1 models)" in out  # svals, canon and the one lm model
    meta = json.loads((root / "collections" / "lm" / META_NAME).read_text())
    assert meta["n"] == len(open_collection(root / "collections" / "lm"))
    assert main(["zoo", "precompute", "--out", str(root), "--only", "nope"]) == 2
    assert "no packed collection nope" in capsys.readouterr().err


def test_pages_use_what_is_shipped(root, tmp_path, monkeypatch):
    """With the precomputed file written, the Embeddings page draws every default map and colours by predictions
    without computing a feature, an embedding, a prediction or a UMAP; other UMAP settings are computed."""
    from test_app_pages import assert_clean, run_app, widget

    import lol.neighbours
    import lol.precomputed as pc

    write_precomputed(root / "collections" / "faces", _ckpts(root))
    monkeypatch.setenv("LOL_DATA", str(root))
    monkeypatch.setenv("LOL_APP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOL_APP_WARMUP", "0")
    computed = []

    def refuse(name):
        def f(*a, **k):
            computed.append(name)
            raise AssertionError(f"{name} computed although it was shipped")
        return f

    real_umap = pc.umap_2d
    for name in ("umap_2d", "collection_features", "predict_collection"):
        monkeypatch.setattr(pc, name, refuse(name))
    monkeypatch.setattr(lol.neighbours, "embed_collection", refuse("embed_collection"))
    at = run_app("app_pages/embeddings.py")
    assert_clean(at)
    embed = widget(at, "selectbox", "Embed")
    assert len(embed.options) == 3  # the sidebar's model, singular values, SVD canonical form
    for choice in embed.options:
        widget(at, "selectbox", "Embed").select(choice).run()
        assert_clean(at)
        assert at.get("plotly_chart")
    assert "clip_score (predicted)" in widget(at, "selectbox", "Colour by (label, attribute, hyperparameter, "
                                                               "prediction or error)").options
    assert computed == []
    monkeypatch.setattr(pc, "umap_2d", lambda *a, **k: computed.append("umap_2d") or real_umap(*a, **k))
    monkeypatch.setattr(pc, "collection_features", collection_features)
    at.select_slider(key="emb_nn").set_value(5).run()
    assert_clean(at)
    assert computed == ["umap_2d"]
