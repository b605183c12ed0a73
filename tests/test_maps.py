"""Maps shipped with a collection (`lol.maps`): written by `lol zoo maps`, used only for the very collection,
weights and UMAP parameters they were computed for, and equal to what an explorer would compute itself."""
from __future__ import annotations

import json

import numpy as np
import pytest

import app_support
from lol.collection import open_collection
from lol.maps import MAPS_META, MAPS_NAME, collection_features, shipped_map, umap_2d, write_maps

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
    meta = json.loads(write_maps(faces, _ckpts(root)).read_text())
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


def test_a_map_is_used_only_when_everything_matches(root, tmp_path):
    import shutil

    faces = tmp_path / "faces"
    shutil.copytree(root / "collections" / "faces", faces)
    ck = tmp_path / "ck"
    shutil.copytree(root / "checkpoints" / "faces" / "glnet", ck)
    write_maps(faces, [ck])
    coll = open_collection(faces)
    assert shipped_map(coll, "svals") is not None and shipped_map(coll, "model", ck) is not None
    assert shipped_map(coll, "svals", n_neighbors=5) is None  # other UMAP parameters
    assert shipped_map(coll, "model", root / "checkpoints" / "faces" / "svals") is None  # a model never mapped
    # other weights under the same path: the map of the old weights is not used
    from safetensors.torch import load_file, save_file

    w = load_file(ck / "model.safetensors")
    save_file({k: v + 1 for k, v in w.items()}, str(ck / "model.safetensors"))
    assert shipped_map(coll, "model", ck) is None
    # a rebuilt collection (another table, hence another fingerprint): none of the old maps is used
    import pandas as pd

    t = pd.read_parquet(faces / "loras.parquet")
    t.loc[0, "clip_score"] += 1.0
    t.to_parquet(faces / "loras.parquet")
    assert shipped_map(open_collection(faces), "svals") is None
    # a damaged maps file counts as none
    (faces / MAPS_NAME).write_bytes(b"not a zip")
    assert shipped_map(coll, "svals") is None


def test_cli_writes_every_collection(root, capsys):
    from lol.cli import main

    assert main(["zoo", "maps", "--out", str(root), "--only", "lm"]) == 0
    out = capsys.readouterr().out
    assert "maps.npz (3 maps)" in out  # svals, canon and the one lm model
    meta = json.loads((root / "collections" / "lm" / MAPS_META).read_text())
    assert meta["n"] == len(open_collection(root / "collections" / "lm"))
    assert main(["zoo", "maps", "--out", str(root), "--only", "nope"]) == 2
    assert "no packed collection nope" in capsys.readouterr().err
