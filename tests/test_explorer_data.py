"""What the explorer shows, computed by the library without Streamlit (so a notebook gets the same numbers): the
checkpoints a data folder offers (`lol.catalog`), a checkpoint's predictions for a collection beside its truth and the
model's own split (`lol.predict.CollectionPredictions`), a collection's label schema (`lol.labels`), the GL(r) check
and persisted maps (`lol.precomputed`), nearest LoRAs (`lol.neighbours.nearest_table`), the Generate grid and its
comparisons (`lol.showcase`) and notebook outputs read back (`lol.outputs`)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import app_support
from lol.catalog import checkpoints, checkpoints_for, metrics_table
from lol.checkpoint import load_checkpoint
from lol.collection import open_collection
from lol.predict import CollectionPredictions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = app_support.data_root(tmp_path_factory.mktemp("explorer"))
    app_support.lm_like(root / "collections" / "lm")
    app_support.train_checkpoints(root, epochs=2)
    broken = root / "checkpoints" / "broken"  # a folder that looks like a checkpoint but is not one
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"")
    (broken / "config.json").write_text(json.dumps({"format": "something else"}))
    return root


def recorded(root, ckpt: str) -> dict:
    return json.loads((root / "checkpoints" / ckpt / "config.json").read_text())["metrics"]["test"]


# ------------------------------------------------------------------------------------------------------- catalog

def test_checkpoints_are_read_from_their_config_shipped_first(root):
    found = checkpoints(root)
    assert [c.name for c in found] == ["faces/glnet", "lm/svals", "broken", "faces/svals"]
    glnet, lm, broken, svals = found
    assert glnet.shipped_for == ("clip_score",) and lm.shipped_for == ("challenge_accuracy",)
    assert glnet.kind == "glnet" and glnet.labels == ("clip_score", "male", "young", "hair_colour")
    assert broken.error == f"{root / 'checkpoints' / 'broken' / 'config.json'}: not a LoL checkpoint config " \
                           f"(format 'something else')" and broken.spec is None
    faces, lm_coll = (open_collection(root / "collections" / n) for n in ("faces", "lm"))
    assert glnet.fits(faces.spec) and not glnet.fits(lm_coll.spec) and lm.fits(lm_coll.spec)
    assert not broken.fits(faces.spec)
    # a name on screen says collection/task, what it predicts and the model family
    assert glnet.title == "faces/glnet — clip_score, male, … (4 labels) · GL-net"
    assert broken.title == "broken — no labels · ?"
    from lol.catalog import bases

    faces_base = next(b for b in bases({"faces": root / "collections" / "faces"}))
    assert [c.name for c in checkpoints_for(faces_base, found)] == ["faces/glnet", "faces/svals"]


def test_metrics_table_shows_what_each_checkpoint_recorded(root):
    table = metrics_table(checkpoints(root))
    row = table[(table["checkpoint"] == "faces/glnet") & (table["label"] == "clip_score")].iloc[0]
    assert row["model"] == "glnet" and row["shipped"] == "yes" and row["invariant to"] == "GL(r)"
    assert row["test R²"] == recorded(root, "faces/glnet")["clip_score"]["r2"]
    assert table[(table["checkpoint"] == "faces/glnet") & (table["label"] == "male")]["shipped"].iloc[0] == ""
    assert "not a LoL checkpoint config" in table[table["checkpoint"] == "broken"]["problem"].iloc[0]
    assert metrics_table([]) is None
    from lol.catalog import model_name

    assert model_name({"kind": "ensemble", "members": [{"kind": "dense", "weight": 2}, {"kind": "glnet", "weight": 1}]}
                      ) == "ensemble of dense×2 + glnet" and model_name({"kind": "svals"}) == "svals"


# ---------------------------------------------------------------------------------------------------- predictions

def test_collection_predictions_score_the_model_on_its_own_test_split(root):
    coll = open_collection(root / "collections" / "faces")
    ck = load_checkpoint(root / "checkpoints" / "faces" / "svals")
    p = CollectionPredictions.of(ck, coll)
    assert p.ids == coll.table["id"].tolist() and len(p.values) == len(coll)
    assert p.labels() == ["clip_score", "male", "young", "hair_colour"] and p.labels("binary") == ["male", "young"]
    assert p.tested and list(p.split) == coll.table["split"].tolist()  # the split the checkpoint recorded
    rows, note = p.evaluated()
    assert rows.tolist() == (coll.table["split"] == "test").tolist() and "test split" in note
    rec = recorded(root, "faces/svals")
    got = {r["attribute"]: r for r in p.attribute_rows(["male", "young", "hair_colour"])}
    assert got["male"]["AUC"] == pytest.approx(rec["male"]["auc"], abs=1e-6)
    assert got["hair_colour"]["accuracy"] == pytest.approx(rec["hair_colour"]["accuracy"], abs=1e-6)
    assert got["male"]["LoRAs"] == int(rows.sum()) and np.isnan(got["hair_colour"]["AUC"])
    frame = p.frame()
    assert list(frame.columns) == ["id", "clip_score (predicted)", "male (predicted)", "young (predicted)",
                                   "hair_colour (predicted)", "split (model)", "clip_score error"]
    np.testing.assert_allclose(frame["clip_score error"], p.values["clip_score"] - coll.table["clip_score"])
    assert p.value("clip_score", "faces-003") == p.values["clip_score"].iloc[3] and p.value("male", "nope") is None
    # predicted vs measured on the evaluated rows, with their metrics
    m, scores = p.versus("clip_score")
    assert m["id"].tolist() == p.truth["id"][rows].tolist()
    np.testing.assert_array_equal(m["clip_score (predicted)"], p.values["clip_score"][rows])
    assert scores["r2"] == pytest.approx(rec["clip_score"]["r2"], abs=1e-6)
    truth, prob = p.binary(["male", "young", "not_predicted"])
    assert list(truth) == list(prob) == ["male", "young"] and len(truth["male"]) == int(rows.sum())
    np.testing.assert_array_equal(prob["young"], p.values["young"][rows].to_numpy(float))
    labels, probs, known = p.probabilities("faces-003", ["male", "nope"])
    assert labels == ["male"] and probs == [float(p.values["male"].iloc[3])]
    assert known == [bool(coll.table["male"].iloc[3])]
    # the stored values are used as given (e.g. the ones shipped with the collection)
    assert CollectionPredictions.of(ck, coll, p.frame().iloc[:, :5].rename(columns=lambda c: c.split(" (")[0])
                                    ).values.equals(p.values)


def test_a_model_of_another_collection_is_scored_on_every_lora(root, tmp_path):
    other = open_collection(app_support.faces_like(tmp_path / "other", n=12, seed=5))  # same modules, other LoRAs
    p = CollectionPredictions.of(load_checkpoint(root / "checkpoints" / "faces" / "glnet"), other)
    rows, note = p.evaluated()
    assert not p.tested and set(p.split) == {"unseen"} and rows.all()
    assert note == "Metrics on all LoRAs: this model was trained on another collection: every LoRA here is unseen " \
                   "by it."


def _copy_with_table(src, dest, change):
    """A copy of the collection folder ``src`` whose ``loras.parquet`` is ``change(table)``: the same factors file."""
    import shutil

    shutil.copytree(src, dest)
    table = pd.read_parquet(dest / "loras.parquet")
    change(table).to_parquet(dest / "loras.parquet", index=False)
    return open_collection(dest)


def test_re_measured_labels_keep_the_models_split(root, tmp_path):
    """Re-measuring a label (`lol zoo measure --apply`) rewrites the table, so the collection's fingerprint changes;
    the LoRAs are the same, so a model trained before keeps its split (its ids still name the LoRAs it trained on)
    and is scored on its test LoRAs with today's labels. Other ids over the same factors, or other factors, are
    another collection: every LoRA is unseen."""
    from lol.catalog import bases, home_collection

    src = root / "collections" / "faces"
    coll = open_collection(src)
    ck = load_checkpoint(root / "checkpoints" / "faces" / "svals")
    assert ck.split["loras"] == coll.loras_fingerprint and ck.split["fingerprint"] == coll.fingerprint

    def remeasure(t):
        return t.assign(clip_score=t["clip_score"] + np.linspace(-1, 1, len(t)))

    again = _copy_with_table(src, tmp_path / "again", remeasure)
    assert again.fingerprint != coll.fingerprint and again.loras_fingerprint == coll.loras_fingerprint
    p = CollectionPredictions.of(ck, again)
    assert p.tested and list(p.split) == coll.table["split"].tolist()
    assert p.split_note.endswith("(the same LoRAs; labels were re-measured since it was trained, metrics use "
                                 "today's)")
    m, _ = p.versus("clip_score")
    np.testing.assert_allclose(m["clip_score"], again.table["clip_score"][p.split == "test"])
    # the catalogue finds its home collection by the same rule
    faces_base = next(b for b in bases({"faces": again.path}))
    assert home_collection(ck.path, faces_base, {"faces": again.path}) == "faces"

    renamed = _copy_with_table(src, tmp_path / "renamed", lambda t: t.assign(id=[f"x-{i}" for i in t["id"]]))
    assert renamed.loras_fingerprint != coll.loras_fingerprint
    assert set(CollectionPredictions.of(ck, renamed).split) == {"unseen"}
    other = open_collection(app_support.faces_like(tmp_path / "other", n=12, seed=5))
    assert other.loras_fingerprint != coll.loras_fingerprint


# ---------------------------------------------------------------------------------------------------------- labels

def test_label_schema_helpers(root):
    from lol.labels import describe_label, label_columns, labels_of_kind, membership_tasks

    faces, lm = (open_collection(root / "collections" / n) for n in ("faces", "lm"))
    assert label_columns(faces, faces.table) == ["clip_score", "male", "young", "hair_colour", "lr", "steps"]
    assert labels_of_kind(faces, "binary") == ["male", "young"] and labels_of_kind(faces, "binary", "clip") == []
    assert describe_label(faces, "male") == "male (binary, task attributes): identity is male"
    assert describe_label(faces, "lr") == "lr: metadata column"
    assert membership_tasks(faces) == {}  # binary attributes, but not a membership task
    assert membership_tasks(lm) == {"membership": [f"source_{s}" for s in app_support.SOURCES]}


# ------------------------------------------------------------------------------------------ GL check, maps, neighbours

def test_gl_check_moves_raw_factors_not_invariant_features(root):
    from lol.precomputed import gl_check, map_disparity

    chk = gl_check(open_collection(root / "collections" / "faces"), limit=8, seed=1)
    assert chk.raw.shape[0] == chk.invariant.shape[0] == 8
    assert chk.raw_change > 0.1 and chk.invariant_change < 1e-10
    xy = np.random.default_rng(0).normal(size=(8, 2))
    assert map_disparity(xy, 3 * xy @ np.array([[0.0, 1.0], [-1.0, 0.0]]) + 2) == pytest.approx(0, abs=1e-12)
    assert map_disparity(xy, np.random.default_rng(1).normal(size=(8, 2))) > 0.1
    assert np.isnan(map_disparity(np.zeros((8, 2)), xy))


def test_cached_umap_is_written_once_and_read_back(tmp_path):
    from lol.precomputed import cached_umap

    x = np.random.default_rng(0).normal(size=(3, 5))
    xy = cached_umap(x, "fp:svals", tmp_path)
    (file,) = tmp_path.glob("*.npy")
    np.save(file, np.full((3, 2), 7.0))
    assert xy.shape == (3, 2) and (cached_umap(x, "fp:svals", tmp_path) == 7.0).all()
    assert (cached_umap(x, "fp:svals", tmp_path, n_neighbors=99) == 7.0).all()  # capped at n − 1: the same map
    cached_umap(x, "fp:canon", tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_nearest_table_finds_a_collection_lora_first(root):
    from lol.neighbours import embed_collection, nearest_table

    coll = open_collection(root / "collections" / "faces")
    ck = load_checkpoint(root / "checkpoints" / "faces" / "glnet")
    near = nearest_table(ck, [("a", coll.lora(4)), ("b", coll.lora(9))], embed_collection(ck, coll), coll.table, k=3)
    assert list(near.columns) == ["file", "#", "LoRA", "distance", "clip_score", "male", "young", "hair_colour"]
    assert near["file"].tolist() == ["a"] * 3 + ["b"] * 3 and near["#"].tolist() == [1, 2, 3] * 2
    assert near.groupby("file")["LoRA"].first().tolist() == ["faces-004", "faces-009"]
    assert near["distance"].iloc[0] < 1e-3 * near["distance"].iloc[1] and near.loc[0, "clip_score"] == coll.table["clip_score"].iloc[4]


# -------------------------------------------------------------------------------------------------------- showcase

def test_generation_grid_and_comparisons(tmp_path, root):
    from PIL import Image

    from lol import showcase

    img = [Image.new("RGB", (8, 8), c) for c in ("white", "black", "red", "blue")]
    g = showcase.Generation("faces-001", ["a face"], [1, 2], 2, 4.0, 1.0, base=img[:2], lora=img[2:])
    assert g.heads == ["base model", "with the LoRA", "difference ×4"]
    rows = g.grid()
    assert [[c for _, c in r] for r in rows] == [["base", "LoRA", "mean |Δ| 170.0/255"],
                                                 ["base", "LoRA", "mean |Δ| 85.0/255"]]
    g.clip_base, g.clip_lora, g.finetune = [20.123, 21.0], [25.5, 19.0], [(img[0], "a photo of x")]
    assert [c for _, c in g.grid()[1]] == ["trained on: a photo of x", "base · CLIP 21", "LoRA · CLIP 19",
                                           "mean |Δ| 85.0/255"]
    assert g.heads[0] == "finetuning image"
    assert showcase.clip_label(open_collection(root / "collections" / "faces")) == "clip_score"
    assert showcase.clip_label(open_collection(root / "collections" / "lm")) is None
    (tmp_path / "record.json").write_text(json.dumps({"challenge_accuracy": 0.4}))
    assert showcase.base_value(tmp_path, "challenge_accuracy") == 0.4 and showcase.base_value(tmp_path, "x") is None
    assert showcase.base_value(tmp_path / "none", "challenge_accuracy") is None
    a = showcase.Answer("s", "q?", ("a", "b", "c", "d"), 1, (0.1, 0.6, 0.2, 0.1), (0.7, 0.1, 0.1, 0.1), "", "", True)
    assert showcase.right_counts([a, a]) == (2, 0)


# --------------------------------------------------------------------------------------------------------- outputs

def test_leading_number_reads_notebook_cells():
    from lol.outputs import leading_number

    assert leading_number("0.468 ± 0.040") == 0.468 and leading_number(3) == 3.0 and leading_number(-1e-3) == -1e-3
    assert np.isnan(leading_number("n/a")) and np.isnan(leading_number(None))
    assert pd.isna(leading_number(float("nan")))


def test_folder_key_changes_with_the_files_in_the_folder(tmp_path):
    import os

    from lol.paths import folder_key

    (tmp_path / "a.safetensors").write_bytes(b"1")
    k = folder_key(tmp_path)
    assert folder_key(tmp_path) == k and len(k) == 16
    (tmp_path / "b.safetensors").write_bytes(b"2")
    assert folder_key(tmp_path) != k
    k = folder_key(tmp_path)
    os.utime(tmp_path / "a.safetensors", ns=(1, 1))
    assert folder_key(tmp_path) != k
    assert folder_key(tmp_path / "missing") == folder_key(tmp_path / "missing")


def test_one_line_is_what_a_person_is_shown():
    from lol.errors import CollectionError, one_line

    assert one_line(CollectionError("/data/x: not a collection\ndetails")) == "/data/x: not a collection"
    assert one_line(FileNotFoundError(2, "No such file or directory", "/data/x")) == "/data/x: No such file or directory"
    assert one_line(OSError("disk on fire")) == "disk on fire"
    assert one_line(KeyError("clip_score (predicted)")) == "KeyError: 'clip_score (predicted)'"
    assert one_line(ValueError()) == "ValueError"
