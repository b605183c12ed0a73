"""The experiment runner (`lol.experiments`) and figure functions (`lol.figures`) on tiny synthetic collections."""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lol import experiments as X
from lol import figures as F
from lol import metrics as M
from lol.collection import open_collection
from lol.errors import LoLError
from lol.models import build_model
from lol.symmetry import gl_act, random_gl_like
from lol.synth import random_lora, synth_collection, tiny_spec
from lol.batch import LoRABatch
from lol.train import TrainConfig

CFG = TrainConfig(epochs=3, patience=3, progress=False, width=16)


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    d = tmp_path_factory.mktemp("c") / "synth"
    synth_collection(tiny_spec(), 60, ranks=(4,), seed=0).write(d)
    return open_collection(d)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "mixed"
    synth_collection(tiny_spec(), 60, ranks=(2, 2, 4), seed=1).write(d)
    return open_collection(d)


@pytest.fixture(scope="module")
def grid(coll):
    refs = [X.TaskRef("synth", "spectrum"), X.TaskRef("synth", "direction")]
    return X.run_grid({"synth": coll}, refs, models=("mlp", "svals", "glnet"), seeds=(0, 1), config=CFG, log=None)


def test_grid_is_tidy_and_complete(grid):
    r = grid.runs
    assert set(r.model) == {"mlp", "svals", "glnet"} and set(r.seed) == {0, 1}
    assert set(r.split) == {"train", "val", "test"}
    # every run has every label × metric on every split, once
    counts = r.groupby(["task", "model", "seed", "split", "label", "metric"]).size()
    assert (counts == 1).all()
    assert set(r[r.label == "sv_energy"].metric) == {"r2", "spearman", "kendall", "mae", "mse_norm"}
    assert set(r[r.label == "sv_high"].metric) >= {"auc", "tpr_at_1pct_fpr", "balanced_accuracy"}
    assert r[r.model == "glnet"].gl_invariant.all() and not r[r.model == "mlp"].gl_invariant.any()


def test_metrics_match_the_stored_predictions(grid):
    """The tidy test metrics are the metrics of the tidy predictions (nothing lost or shuffled on the way)."""
    p, r = grid.predictions, grid.runs
    for model, seed in (("mlp", 0), ("glnet", 1)):
        q = p[(p.model == model) & (p.seed == seed) & (p.split == "test") & (p.label == "sv_energy")]
        want = r[(r.model == model) & (r.seed == seed) & (r.split == "test") & (r.label == "sv_energy")]
        assert M.r2(q.y, q.pred) == pytest.approx(float(want[want.metric == "r2"].value.iloc[0]), rel=1e-6)
        q = p[(p.model == model) & (p.seed == seed) & (p.split == "test") & (p.label == "probe_positive")]
        want = r[(r.model == model) & (r.seed == seed) & (r.split == "test") & (r.label == "probe_positive")]
        assert M.auc(q.y, q.pred) == pytest.approx(float(want[want.metric == "auc"].value.iloc[0]), rel=1e-6)


def _runs(values: dict, kind="regression", metric="r2") -> pd.DataFrame:
    """A hand-made tidy table: values[(model, seed, split)] = value of one label."""
    rows = []
    for (model, seed, split), v in values.items():
        rows.append({"collection": "c", "task": "t", "model": model, "gl_invariant": X.gl_invariant(model),
                     "seed": seed, "split": split, "label": "y", "label_kind": kind, "metric": metric, "value": v,
                     "val_loss": 1.0 - (v if split == "val" else 0)})
    return pd.DataFrame(rows)


def test_summary_and_baseline_verdict():
    vals = {}
    for s, (mlp, gl, dense) in enumerate([(0.50, 0.80, 0.70), (0.52, 0.84, 0.90), (0.48, 0.82, 0.95)]):
        for split in ("val", "test"):
            vals[("mlp", s, split)] = mlp
            vals[("glnet", s, split)] = gl
            vals[("dense", s, split)] = dense if split == "test" else dense - 0.3   # best on test, worst on val
    runs = _runs(vals)
    summ = X.summarize(runs, "test").set_index("model")
    assert summ.loc["glnet", "mean"] == pytest.approx(0.82)
    assert summ.loc["glnet", "std"] == pytest.approx(np.std([0.80, 0.84, 0.82], ddof=1))
    cmp = X.compare_to_baseline(runs).iloc[0]
    assert cmp.best_gl_invariant == "glnet"          # chosen on validation, not on test (dense wins on test)
    assert cmp.margin == pytest.approx(0.32) and cmp.spread == pytest.approx(0.02)
    assert bool(cmp.beats_by_more_than_spread)
    # a margin within the spread is not a win
    close = {(m, s, sp): v for m, vs in (("mlp", [0.50, 0.52, 0.48]), ("glnet", [0.40, 0.60, 0.58]))
             for s, v in enumerate(vs) for sp in ("val", "test")}
    assert not bool(X.compare_to_baseline(_runs(close)).iloc[0].beats_by_more_than_spread)
    best = X.select_best(runs).iloc[0]
    assert best.model == "glnet" and best.seed == 1 and "validation r2" in best.selected_by


def test_per_label_scores_set_each_label_beside_always_answering_its_commonest_value():
    """Accuracy and AUC per binary label (means over seeds) beside the majority accuracy of that seed's own split;
    regression labels and other splits are left out."""
    runs = pd.DataFrame([{"collection": "c", "task": "t", "model": "m", "seed": s, "split": sp, "label": lab,
                          "label_kind": kind, "metric": met, "value": v}
                         for s in (0, 1) for sp in ("test", "val")
                         for lab, kind, met, v in [("a", "binary", "accuracy", .8 + .1 * s), ("a", "binary", "auc", .9),
                                                   ("b", "binary", "accuracy", .7), ("b", "binary", "auc", .6),
                                                   ("r", "regression", "r2", .5)]])
    ys = {("a", 0): [1, 1, 1, 0], ("a", 1): [0, 0, 0, 0], ("b", 0): [1, 0, 0, 0], ("b", 1): [1, 1, 0, 0],
          ("r", 0): [2.0], ("r", 1): [3.0]}
    preds = pd.DataFrame([{"collection": "c", "task": "t", "model": "m", "seed": s, "split": sp, "label": lab, "y": y,
                           "pred": .5} for (lab, s), v in ys.items() for sp in ("test", "val") for y in v])
    out = X.per_label_scores(runs, preds).set_index("label")
    assert list(out.index) == ["a", "b"] and (out.seeds == 2).all()
    assert out.loc["a", "accuracy"] == pytest.approx(.85) and out.loc["a", "auc"] == pytest.approx(.9)
    assert out.loc["a", "majority"] == pytest.approx((.75 + 1.0) / 2)          # seed by seed, then the mean
    assert out.loc["b", "majority"] == pytest.approx((.75 + .5) / 2) and out.loc["b", "positive_share"] == .375
    assert out.gain.to_list() == pytest.approx([.85 - .875, .7 - .625])
    assert X.per_label_scores(runs[runs.label_kind == "regression"], preds).empty
    no_auc = runs.assign(value=runs.value.where(runs.metric != "auc"))    # AUC undefined everywhere (one class only)
    out = X.per_label_scores(no_auc, preds)
    assert out.auc.isna().all() and out.accuracy.to_list() == pytest.approx([.85, .7])


def test_label_tail_measures_how_much_of_the_variance_and_the_error_a_labels_top_holds():
    """Ten LoRAs per seed: nine at 0 or 1 and one at 10 (the top 10 %); binary labels are left out."""
    y = np.array([0, 1] * 4 + [0, 10.0])
    rows = [{"collection": "c", "task": "t", "model": "m", "seed": s, "split": "test", "label": "r", "y": v,
             "pred": v + (2.0 if v == 10 else 1.0)} for s in (0, 1) for v in y]
    rows += [{"collection": "c", "task": "t", "model": "m", "seed": 0, "split": "test", "label": "b", "y": float(v),
              "pred": .5} for v in (0, 1, 1, 0)]
    rows += [{"collection": "c", "task": "small", "model": "m", "seed": 0, "split": "test", "label": "r", "y": v,
              "pred": v + 1} for v in y[:9]]                   # 9 LoRAs: too few for a top 10 %
    out = X.label_tail(pd.DataFrame(rows)).set_index("label")
    assert list(out.index) == ["r"] and out.loc["r", "seeds"] == 2 and out.loc["r", "loras"] == 10
    d2 = (y - y.mean()) ** 2
    assert out.loc["r", "threshold"] == pytest.approx(np.quantile(y, 0.9))
    assert out.loc["r", "variance_share"] == pytest.approx(d2[-1] / d2.sum())
    assert out.loc["r", "error_share"] == pytest.approx(4 / (4 + 9))             # errors 2² for the top, 1² for nine


def test_selection_falls_back_to_validation_loss():
    runs = _runs({("mlp", 0, "val"): math.nan, ("glnet", 0, "val"): math.nan, ("mlp", 0, "test"): math.nan,
                  ("glnet", 0, "test"): math.nan}, kind="binary", metric="auc")
    runs.loc[runs.model == "glnet", "val_loss"] = 0.1
    runs.loc[runs.model == "mlp", "val_loss"] = 0.5
    best = X.select_best(runs).iloc[0]
    assert best.model == "glnet" and "loss" in best.selected_by and best.val_mean == pytest.approx(0.1)


def test_selection_is_among_gl_invariant_kinds_only():
    """The shipped default is chosen on validation among GL(r)-invariant kinds: mlp, mlp_aug and oalign (best on
    validation here) are never chosen; with none of those kinds run, selection is refused, not silently made."""
    order = {"mlp": 0.95, "mlp_aug": 0.93, "oalign": 0.90, "svals": 0.85, "glnet": 0.80, "dense": 0.70}
    vals = {(m, s, sp): v + 0.01 * s for m, v in order.items() for s in (0, 1) for sp in ("val", "test")}
    vals[("dense", 0, "test")] = 0.99   # best on test: test never chooses
    runs = _runs(vals)
    best = X.select_best(runs).iloc[0]
    assert best.model == "svals" and best.seed == 1 and X.gl_invariant(best.model)
    assert "GL(r)-invariant" in best.selected_by and set(best.candidates.split(", ")) == {"svals", "glnet", "dense"}
    assert best.val_mean == pytest.approx(0.855)
    assert X.select_best(runs, gl_only=False).iloc[0].model == "mlp"
    with pytest.raises(LoLError, match=r"c/t has no run of a GL\(r\)-invariant model kind \(kinds run: mlp, "
                                      r"mlp_aug, oalign\)"):
        X.select_best(_runs({k: v for k, v in vals.items() if k[0] in ("mlp", "mlp_aug", "oalign")}))
    # the validation-loss fallback also only looks at GL-invariant kinds (mlp has the lowest loss here)
    nan = _runs({(m, 0, sp): math.nan for m in ("mlp", "oalign", "glnet", "svals") for sp in ("val", "test")},
                kind="binary", metric="auc")
    nan["val_loss"] = nan.model.map({"mlp": 0.05, "oalign": 0.06, "glnet": 0.1, "svals": 0.3})
    best = X.select_best(nan).iloc[0]
    assert best.model == "glnet" and "loss" in best.selected_by and best.val_mean == pytest.approx(0.1)


def test_results_table_and_markdown(grid, tmp_path):
    t = X.results_table(X.summarize(grid.runs))
    assert list(t.index) == ["mlp", "svals", "glnet"]
    assert "synth/spectrum · r2" in t.columns and "synth/direction · auc" in t.columns
    assert all(("±" in c) or c == "n/a" for c in t.to_numpy().ravel())
    csv, md = X.write_table(t, tmp_path, "results", title="T")
    assert pd.read_csv(csv, index_col=0).shape == t.shape
    text = md.read_text()
    assert text.startswith("# T") and "| glnet |" in text


def test_checkpoints_index_and_resume(coll, tmp_path, monkeypatch):
    refs = [X.TaskRef("synth", "spectrum")]
    runs_dir = tmp_path / "runs"
    g1 = X.run_grid({"synth": coll}, refs, models=("svals", "glnet"), seeds=(0,), config=CFG, runs_dir=runs_dir, log=None)
    # a second call finds every run finished and trains nothing
    import lol.train

    monkeypatch.setattr(lol.train, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    g2 = X.run_grid({"synth": coll}, refs, models=("svals", "glnet"), seeds=(0,), config=CFG, runs_dir=runs_dir, log=None)
    pd.testing.assert_frame_equal(g1.runs.reset_index(drop=True), g2.runs.reset_index(drop=True), check_dtype=False)
    assert len(X.load_grid(runs_dir).runs) == len(g1.runs)
    # another training in the same runs_dir (learning rate, model hyperparameters) is trained, never a stored run reused
    with pytest.raises(AssertionError, match="retrained"):
        X.run_grid({"synth": coll}, refs, models=("svals",), seeds=(0,), config=replace(CFG, lr=CFG.lr * 3),
                   runs_dir=runs_dir, log=None)
    with pytest.raises(AssertionError, match="retrained"):
        X.run_grid({"synth": coll}, refs, models=("svals",), seeds=(0,), config=CFG, hparams={"svals": {"depth": 1}},
                   runs_dir=runs_dir, log=None)
    # a cached run of another version of the collection (rebuilt data) is never reused: it is trained again
    done = next(runs_dir.glob("synth/spectrum/svals/seed0/done.json"))
    done.write_text(json.dumps({**json.loads(done.read_text()), "fingerprint": "an-older-build",
                                "loras": "its-older-loras"}))
    with pytest.raises(AssertionError, match="retrained"):
        X.run_grid({"synth": coll}, refs, models=("svals",), seeds=(0,), config=CFG, runs_dir=runs_dir, log=None)

    root = tmp_path / "ck"
    root.mkdir()
    (root / "index.json").write_text(json.dumps({"other_label": "x/y"}))
    best = X.select_best(g2.runs)
    entries = X.write_checkpoints(g2, best, root, refs)
    assert entries == {"sv_energy": "synth/spectrum", "sv_high": "synth/spectrum"}
    index = json.loads((root / "index.json").read_text())
    assert index["other_label"] == "x/y" and index["sv_energy"] == "synth/spectrum"
    from lol.checkpoint import default_checkpoint, load_checkpoint

    ck = load_checkpoint(default_checkpoint("sv_energy", index=root / "index.json"))
    assert ck.kind == best.model.iloc[0] and ck.config["selection"]["metric"] == "auc"   # a task mixing kinds is scored by its binary labels
    # the shipped model predicts what it predicted during the grid
    p = g2.predictions
    p = p[(p.model == ck.kind) & (p.label == "sv_energy")].sort_values("id")
    pred = ck.predict_batch(coll.batch())["sv_energy"]
    np.testing.assert_allclose(pred, p.pred.to_numpy(), rtol=1e-4, atol=1e-5)


def test_default_tasks_a_collection_lacks_are_left_out(mixed, monkeypatch):
    first = list(mixed.tasks)[0]
    monkeypatch.setitem(X.DEFAULT_TASKS, "mixed", (first, "dataset_size"))
    assert [r.task for r in X.task_refs({"mixed": mixed})] == [first]
    monkeypatch.setitem(X.DEFAULT_TASKS, "mixed", ("dataset_size",))   # none present: every task of the collection
    assert [r.task for r in X.task_refs({"mixed": mixed})] == list(mixed.tasks)


def test_task_selection_and_errors(coll, mixed):
    assert X.main_rows(coll) == {} and X.main_rows(mixed) == {"rank": 2}
    refs = X.task_refs({"mixed": mixed})
    assert [r.task for r in refs] == list(mixed.tasks) and refs[0].filter == {"rank": 2}
    b, cols, kinds, table = X.task_data(mixed, "spectrum", {"rank": 2})
    assert b.uniform_rank == 2 and len(table) == len(cols["sv_energy"]) == int((mixed.table["rank"] == 2).sum())
    with pytest.raises(LoLError, match="no task"):
        X.task_refs({"mixed": mixed}, {"mixed": ["nope"]})
    with pytest.raises(LoLError, match="unknown model kind"):
        X.run_grid({"mixed": mixed}, refs, models=("mlpx",), config=CFG, log=None)
    # the flatten MLP cannot read mixed ranks: recorded, not hidden, with errors="record"
    g = X.run_grid({"mixed": mixed}, [X.TaskRef("mixed", "spectrum")], models=("mlp",), seeds=(0,), config=CFG,
                   errors="record", log=None)
    assert g.failures and "rank" in g.failures[0][-1]


def test_rank_generalization(mixed):
    rows = X.rank_generalization(mixed, "spectrum", ["glnet", "svals"], seeds=(0,), config=CFG, train_rank=2,
                                 eval_ranks=(4,), log=None)
    assert set(rows.eval_rank) == {2, 4} and set(rows.model) == {"glnet", "svals"}
    n4 = rows[rows.eval_rank == 4].n.iloc[0]
    assert n4 == int((mixed.table["rank"] == 4).sum())     # no groups in this collection: all rank-4 LoRAs
    assert np.isfinite(rows[(rows.metric == "r2")].value).all()
    with pytest.raises(LoLError, match="rank-agnostic"):
        X.rank_generalization(mixed, "spectrum", ["mlp"], config=CFG, train_rank=2, eval_ranks=(4,), log=None)


def test_learning_curve_keeps_val_and_test_and_nests_training(coll):
    rows = X.learning_curve(coll, "spectrum", ["glnet", "svals"], fractions=(0.25, 0.5, 1.0), seeds=(0, 1),
                            config=CFG, log=None)
    assert set(rows.fraction) == {0.25, 0.5, 1.0} and set(rows.model) == {"glnet", "svals"}
    n = rows.groupby(["seed", "fraction"]).n_train.first().unstack()
    assert (n[0.25] < n[0.5]).all() and (n[0.5] < n[1.0]).all()
    full = X.task_data(coll, "spectrum")[3]
    from lol.splits import make_splits

    for seed in (0, 1):  # at 100 % it is run_grid's split: every training LoRA of that seed
        assert n.loc[seed, 1.0] == int((make_splits(len(full), CFG.fractions, seed) == "train").sum())
    assert np.isfinite(rows[rows.metric == "r2"].value).all()
    with pytest.raises(LoLError, match="fractions"):
        X.learning_curve(coll, "spectrum", ["svals"], fractions=(0.0,), seeds=(0,), config=CFG, log=None)


def test_hparam_search_runs_the_grid_split_and_chooses_on_validation(coll, grid):
    rows = X.hparam_search(coll, "spectrum", "svals", {"lr": [CFG.lr, 3e-2], "model.depth": [1, 2]}, seeds=(0, 1),
                           config=CFG, log=None)
    assert rows.setting.nunique() == 4 and set(rows.split) == {"val", "test"} and set(rows.seed) == {0, 1}
    # the setting that is run_grid's own config (svals' default depth is 2) gives run_grid's numbers: same split
    same = rows[rows.setting == json.dumps({"lr": CFG.lr, "model.depth": 2}, sort_keys=True)]
    ref = grid.runs[(grid.runs.task == "spectrum") & (grid.runs.model == "svals")]
    key = ["seed", "split", "label", "metric"]
    merged = same.merge(ref[ref.split.isin(["val", "test"])], on=key, suffixes=("", "_grid"))
    assert len(merged) == len(same) > 0
    assert np.allclose(merged.value, merged.value_grid, equal_nan=True)
    best = X.best_setting(rows)
    assert len(best) == 4 and best.chosen.sum() == 1
    assert set(best.metric) == {X.primary_metric(rows.label_kind.unique())}     # the task's score, as run_grid's
    # the tiny validation splits hold one class of the binary label: AUC is undefined, validation loss chooses
    assert best.val_mean.isna().all() and "validation loss" in best.selected_by.iloc[0]
    assert best[best.chosen].val_loss.iloc[0] == best.val_loss.min()
    reg = rows[rows.label_kind == "regression"]                           # a regression task: R² on validation chooses
    rbest = X.best_setting(reg)
    assert set(rbest.metric) == {"r2"} and rbest.val_mean.notna().all()
    assert rbest[rbest.chosen].val_mean.iloc[0] == rbest.val_mean.max() and rbest.selected_by.iloc[0] == "validation r2"
    flipped = reg.copy()                                                  # test never chooses
    flipped.loc[flipped.split == "test", "value"] *= -1
    assert X.best_setting(flipped).setting.iloc[0] == rbest.setting.iloc[0]
    with pytest.raises(LoLError, match="not TrainConfig fields"):
        X.hparam_search(coll, "spectrum", "svals", {"depth": [1]}, seeds=(0,), config=CFG, log=None)
    with pytest.raises(LoLError, match="non-empty list"):
        X.hparam_search(coll, "spectrum", "svals", {"lr": []}, seeds=(0,), config=CFG, log=None)


def test_a_finished_run_survives_relabelling_of_another_task_only(coll, tmp_path, monkeypatch):
    """`lol zoo measure --apply` rewrites the table: the collection's fingerprint changes but its LoRAs do not. A stored
    run is reused when its own task's rows, labels and split columns are unchanged (another task's label was
    re-measured), and trained again when they changed or when the record predates that (fingerprint only)."""
    import shutil

    import lol.train

    refs = [X.TaskRef("synth", "spectrum")]
    runs_dir = tmp_path / "runs"
    first = X.run_grid({"synth": coll}, refs, models=("svals",), seeds=(0,), config=CFG, runs_dir=runs_dir, log=None)

    def relabelled(name, change):
        d = tmp_path / name
        shutil.copytree(coll.path, d)
        t = pd.read_parquet(d / "loras.parquet")
        change(t).to_parquet(d / "loras.parquet", index=False)
        return open_collection(d)

    other = relabelled("other_task", lambda t: t.assign(probe=t["probe"] * 2))        # task "direction"'s label
    own = relabelled("own_task", lambda t: t.assign(sv_energy=t["sv_energy"] + 1.0))  # task "spectrum"'s label
    assert other.fingerprint != coll.fingerprint and other.loras_fingerprint == coll.loras_fingerprint
    assert X.task_digest(other, refs[0]) == X.task_digest(coll, refs[0]) != X.task_digest(own, refs[0])
    real = lol.train.train
    trained = []
    monkeypatch.setattr(lol.train, "train", lambda *a, **k: trained.append(1) or real(*a, **k))
    again = X.run_grid({"synth": other}, refs, models=("svals",), seeds=(0,), config=CFG, runs_dir=runs_dir, log=None)
    assert trained == []                                                  # reused
    pd.testing.assert_frame_equal(again.runs, first.runs, check_dtype=False)
    X.run_grid({"synth": own}, refs, models=("svals",), seeds=(0,), config=CFG, runs_dir=runs_dir, log=None)
    assert trained == [1]                                                 # its own label changed: trained again
    done = runs_dir / "synth" / "spectrum" / "svals" / "seed0" / "done.json"
    rec = json.loads(done.read_text())
    assert rec["fingerprint"] == own.fingerprint and rec["task_data"] == X.task_digest(own, refs[0])
    done.write_text(json.dumps({"seconds": 1.0, "fingerprint": own.fingerprint}))   # a record from before
    X.run_grid({"synth": own}, refs, models=("svals",), seeds=(0,), config=CFG, runs_dir=runs_dir, log=None)
    assert trained == [1]                                                 # same fingerprint: reused
    later = relabelled("own_later", lambda t: t.assign(probe=t["probe"] - 1))      # another task relabelled again
    X.run_grid({"synth": later}, refs, models=("svals",), seeds=(0,), config=CFG, runs_dir=runs_dir, log=None)
    assert trained == [1, 1]                # the old record cannot tell which data it saw: trained again


def test_runs_of_an_earlier_version_are_adopted_only_where_their_task_data_is_unchanged(coll, tmp_path, monkeypatch):
    import shutil

    import lol.train
    from lol.checkpoint import load_checkpoint
    from lol.predict import trained_on

    refs = [X.TaskRef("synth", "spectrum"), X.TaskRef("synth", "direction")]
    runs_dir = tmp_path / "runs"
    X.run_grid({"synth": coll}, refs, models=("svals",), seeds=(0,), config=CFG, runs_dir=runs_dir, log=None)
    for done in runs_dir.glob("synth/*/svals/seed0/done.json"):      # records from before task_data was stored
        done.write_text(json.dumps({"seconds": 1.0, "fingerprint": coll.fingerprint}))
    d = tmp_path / "now"
    shutil.copytree(coll.path, d)
    t = pd.read_parquet(d / "loras.parquet")
    t.assign(probe=t["probe"] + 0.5).to_parquet(d / "loras.parquet", index=False)   # "direction"'s label re-measured
    now = open_collection(d)
    assert X.adopt_runs(runs_dir, now, coll, name="synth", log=None) == 1            # spectrum's run only
    ck = load_checkpoint(runs_dir / "synth" / "spectrum" / "svals" / "seed0" / "checkpoint")
    assert trained_on(ck.config, now) == (True, True)
    trained = []
    real = lol.train.train
    monkeypatch.setattr(lol.train, "train", lambda *a, **k: trained.append(a[1]) or real(*a, **k))
    X.run_grid({"synth": now}, refs, models=("svals",), seeds=(0,), config=CFG, runs_dir=runs_dir, log=None)
    assert [sorted(c) for c in trained] == [["probe", "probe_positive"]]            # direction trains again
    synth_collection(tiny_spec(), 10, ranks=(4,), seed=4).write(tmp_path / "other")
    other = open_collection(tmp_path / "other")
    with pytest.raises(LoLError, match="hold other LoRAs"):
        X.adopt_runs(runs_dir, now, other, name="synth", log=None)


def test_ship_tuned_replaces_a_checkpoint_only_when_the_searched_setting_wins_on_validation(tmp_path):
    from lol.checkpoint import load_checkpoint

    synth_collection(tiny_spec(), 200, ranks=(4,), seed=2).write(tmp_path / "synth")   # validation AUC defined
    coll = open_collection(tmp_path / "synth")
    refs = [X.TaskRef("synth", "spectrum")]
    g = X.run_grid({"synth": coll}, refs, models=("svals",), seeds=(0, 1), config=CFG, log=None)
    selected = X.select_best(g.runs)
    root = tmp_path / "ck"
    X.write_checkpoints(g, selected, root, refs)
    metric = selected.metric.iloc[0]
    single = X.task_scores(g.runs).query("split == 'val' and metric == @metric").value.mean()
    tuned = X.hparam_search(coll, "spectrum", "svals", {"lr": [1e-2]}, (0, 1), CFG, log=None)
    per_seed = tuned[(tuned.split == "val") & (tuned.metric == metric)].groupby("seed").value.mean()
    weights = root / "synth" / "spectrum" / "model.safetensors"
    before = weights.read_bytes()
    # the searched setting is worse on validation: what notebook 02 chose stays, and its score is what ships now
    worse = tuned.assign(value=np.where(tuned.metric == metric, -1e9, tuned.value))
    kept = X.ship_tuned({"synth": coll}, worse, g.runs, root, (0, 1), CFG, log=None)
    assert list(kept.setting) == ["notebook 02"] and not kept.replaced.any() and weights.read_bytes() == before
    assert kept.val_mean.iloc[0] == pytest.approx(single) and list(kept.seeds) == [2]
    # better on validation: trained at its best validation seed, written in the checkpoint's place
    better = tuned.assign(value=np.where((tuned.metric == metric) & (tuned.split == "val"), tuned.value + 10,
                                         tuned.value))
    rows = X.ship_tuned({"synth": coll}, better, g.runs, root, (0, 1), CFG, log=None)
    assert rows.replaced.all() and list(rows.seed) == [int(per_seed.idxmax())]
    assert rows.val_mean.iloc[0] == pytest.approx(per_seed.mean() + 10)
    ck = load_checkpoint(root / "synth" / "spectrum")
    assert ck.config["train"]["lr"] == 1e-2 and ck.config["train"]["seed"] == int(per_seed.idxmax())
    assert "the setting notebook 09's search chose for svals" in ck.config["selection"]["selected_by"]
    assert ck.config["selection"]["val_seed"] == pytest.approx(per_seed.max())          # retrained: the same run
    assert X.ship_tuned({"synth": coll}, better, g.runs, root, (0, 1), CFG, tasks=["synth/other"], log=None).empty


def test_a_search_stores_its_runs_and_resumes_where_it_stopped(coll, tmp_path, monkeypatch):
    """With ``runs_dir`` every finished (setting, seed) run is stored and reused: a grid grown by one value trains only
    the new setting, the rows are those of a search without the store, and a run of another training (other epochs,
    another version of the collection) or an unfinished one (no record) is trained again, never reused."""
    import lol.train as T

    trained = []
    real = T.train
    monkeypatch.setattr(T, "train", lambda *a, **k: trained.append(a[3].lr) or real(*a, **k))
    store = tmp_path / "runs"
    first = X.hparam_search(coll, "spectrum", "svals", {"lr": [CFG.lr]}, (0,), CFG, log=None, runs_dir=store)
    assert trained == [CFG.lr]
    grown = X.hparam_search(coll, "spectrum", "svals", {"lr": [CFG.lr, 3e-2]}, (0,), CFG, log=None, runs_dir=store)
    assert trained == [CFG.lr, 3e-2]                                # only the new value was trained
    plain = X.hparam_search(coll, "spectrum", "svals", {"lr": [CFG.lr, 3e-2]}, (0,), CFG, log=None)
    pd.testing.assert_frame_equal(grown, plain)                     # same rows, same order, same dtypes
    pd.testing.assert_frame_equal(grown[grown.setting == first.setting.iloc[0]].reset_index(drop=True), first)
    files = sorted((store / "synth" / "spectrum" / "svals" / "search").glob("*.json"))
    assert len(files) == 2 and {json.loads(f.read_text())["train"]["lr"] for f in files} == {CFG.lr, 3e-2}
    n = len(trained)
    X.hparam_search(coll, "spectrum", "svals", {"lr": [CFG.lr]}, (0,), replace(CFG, epochs=CFG.epochs + 1),
                    log=None, runs_dir=store)
    assert len(trained) == n + 1                                    # another training: trained, not reused
    record = next(f for f in files if json.loads(f.read_text())["train"]["lr"] == CFG.lr)
    record.write_text(record.read_text().replace(coll.loras_fingerprint, "other LoRAs"))
    X.hparam_search(coll, "spectrum", "svals", {"lr": [CFG.lr]}, (0,), CFG, log=None, runs_dir=store)
    assert len(trained) == n + 2                                    # another version of the collection: trained again
    record.unlink()                                                 # rows without their record: an unfinished run
    X.hparam_search(coll, "spectrum", "svals", {"lr": [CFG.lr]}, (0,), CFG, log=None, runs_dir=store)
    assert len(trained) == n + 3 and record.is_file()


def test_a_staged_search_builds_each_stage_on_the_setting_chosen_so_far(coll, monkeypatch):
    """A list of grids is searched stage by stage: stage 2 tries its values on top of stage 1's choice (on
    validation), a value that is the same training as a run already made (svals' own depth, 2) is not run again, and
    the rows of both stages are those a one-grid search of the same settings gives."""
    import lol.train as T

    trained = []
    real = T.train
    monkeypatch.setattr(T, "train", lambda *a, **k: trained.append(a[3]) or real(*a, **k))
    stages = [{"lr": [CFG.lr, 3e-2]}, {"model.depth": [1, 2]}]
    rows = X.hparam_search(coll, "spectrum", "svals", stages, (0,), CFG, log=None)
    first = X.best_setting(rows[rows.setting.isin([json.dumps({"lr": v}) for v in (CFG.lr, 3e-2)])])
    lr = json.loads(first.query("chosen").setting.iloc[0])["lr"]
    stage2 = json.dumps({"lr": lr, "model.depth": 1}, sort_keys=True)
    assert list(rows.setting.unique()) == [json.dumps({"lr": CFG.lr}), json.dumps({"lr": 3e-2}), stage2]
    assert [(c.lr, c.model.get("depth")) for c in trained] == [(CFG.lr, None), (3e-2, None), (lr, 1)]
    flat = X.hparam_search(coll, "spectrum", "svals", {"lr": [lr], "model.depth": [1]}, (0,), CFG, log=None)
    pd.testing.assert_frame_equal(rows[rows.setting == stage2].reset_index(drop=True), flat)
    assert X.best_setting(rows).chosen.sum() == 1                   # one choice among every stage's settings
    for bad in ([], ["lr"], "lr"):
        with pytest.raises(LoLError, match="list of grids"):
            X.hparam_search(coll, "spectrum", "svals", bad, (0,), CFG, log=None)


def test_a_stored_run_asked_for_under_another_name_takes_that_name(coll, tmp_path, monkeypatch):
    """A grid grown by an axis whose one value is the config's own asks for the very training already stored: it is
    reused, not trained again, and its rows carry the new setting's name (what `best_setting` and `chosen_on_seeds`
    look it up by)."""
    import lol.train as T

    trained = []
    real = T.train
    monkeypatch.setattr(T, "train", lambda *a, **k: trained.append(a[3].lr) or real(*a, **k))
    store = tmp_path / "runs"
    first = X.hparam_search(coll, "spectrum", "svals", {"lr": [CFG.lr]}, (0,), CFG, log=None, runs_dir=store)
    again = X.hparam_search(coll, "spectrum", "svals", {"lr": [CFG.lr], "width": [CFG.width]}, (0,), CFG, log=None,
                            runs_dir=store)
    assert trained == [CFG.lr]                                      # reused
    assert set(again.setting) == {json.dumps({"lr": CFG.lr, "width": CFG.width}, sort_keys=True)}
    pd.testing.assert_frame_equal(again.drop(columns="setting"), first.drop(columns="setting"))


def test_a_stored_search_run_survives_relabelling_of_another_task_only(coll, tmp_path, monkeypatch):
    """A search run is stored under its LoRAs and its task's own data, as a grid run is (`_cached`): re-measuring
    another task's label (`lol zoo measure --apply`) keeps it, re-measuring its own retrains it. A run stored before
    (keyed by the collection's whole fingerprint) is reused on that very version only."""
    import shutil

    import lol.train as T

    def relabelled(name, change, source=coll):   # the same folder name: a search names the collection by it
        d = tmp_path / name / Path(source.path).name
        shutil.copytree(source.path, d)
        t = pd.read_parquet(d / "loras.parquet")
        change(t).to_parquet(d / "loras.parquet", index=False)
        return open_collection(d)

    trained = []
    real = T.train
    monkeypatch.setattr(T, "train", lambda *a, **k: trained.append(1) or real(*a, **k))
    store = tmp_path / "runs"
    space = {"lr": [CFG.lr]}
    first = X.hparam_search(coll, "spectrum", "svals", space, (0,), CFG, log=None, runs_dir=store)
    other = relabelled("other_task", lambda t: t.assign(probe=t["probe"] * 2))        # task "direction"'s label
    again = X.hparam_search(other, "spectrum", "svals", space, (0,), CFG, log=None, runs_dir=store)
    assert trained == [1] and other.fingerprint != coll.fingerprint                   # reused
    pd.testing.assert_frame_equal(again, first)
    own = relabelled("own_task", lambda t: t.assign(sv_energy=t["sv_energy"] + 1.0))  # task "spectrum"'s label
    X.hparam_search(own, "spectrum", "svals", space, (0,), CFG, log=None, runs_dir=store)
    assert trained == [1, 1]                                                          # its own label: trained again
    # a run stored with the record of before (the whole fingerprint), moved to where that record puts it
    rec = X._search_record(own, "spectrum", "svals", X._apply(CFG, {"lr": CFG.lr}, 0))
    new, old = X._search_file(store, rec), X._search_file(store, X._legacy_search_record(own, rec))
    new.rename(old)
    new.with_suffix(".json").unlink()
    old.with_suffix(".json").write_text(json.dumps(X._legacy_search_record(own, rec), sort_keys=True))
    X.hparam_search(own, "spectrum", "svals", space, (0,), CFG, log=None, runs_dir=store)
    assert trained == [1, 1]                                                          # same version: reused
    later = relabelled("own_later", lambda t: t.assign(probe=t["probe"] - 1), own)   # own, another task relabelled
    X.hparam_search(later, "spectrum", "svals", space, (0,), CFG, log=None, runs_dir=store)
    assert trained == [1, 1, 1]              # an old record cannot tell which data it saw: another version retrains


def test_the_chosen_setting_is_trained_on_every_seed_reusing_what_the_search_ran(coll, monkeypatch):
    """`chosen_on_seeds`: the setting chosen on validation (seed 0's search) on seeds 0 and 1 — seed 0's rows are the
    search's own (not retrained), seed 1 is trained by `hparam_search` with that one setting."""
    reg_task = "spectrum"
    rows = X.hparam_search(coll, reg_task, "svals", {"lr": [CFG.lr, 3e-2]}, seeds=(0,), config=CFG, log=None)
    rows = rows[rows.label_kind == "regression"]             # R² chooses (the binary label's AUC is undefined here)
    chosen = X.best_setting(rows).query("chosen").setting.iloc[0]
    calls = []
    real = X.hparam_search
    monkeypatch.setattr(X, "hparam_search", lambda *a, **k: calls.append((a[3], list(a[4]))) or real(*a, **k))
    out = X.chosen_on_seeds({"synth": coll}, rows, (0, 1), CFG, models=("svals",), log=None)
    assert calls == [({k: [v] for k, v in json.loads(chosen).items()}, [1])]        # seed 0 reused, seed 1 trained
    assert set(out.setting) == {chosen} and set(out.seed) == {0, 1} and set(out.model) == {"svals"}
    seed0 = out[out.seed == 0].merge(rows[rows.setting == chosen], on=["seed", "split", "label", "metric"])
    assert len(seed0) == len(out[out.seed == 0]) > 0 and np.allclose(seed0.value_x, seed0.value_y, equal_nan=True)
    assert set(out[out.seed == 1].split) == {"val", "test"}   # (hparam_search = run_grid's split: tested above)
    # models not asked for, collections not given, or no search: nothing trained, nothing returned
    assert X.chosen_on_seeds({"synth": coll}, rows, (0, 1), CFG, models=("glnet",), log=None).empty
    assert X.chosen_on_seeds({"other": coll}, rows, (0, 1), CFG, models=("svals",), log=None).empty
    assert X.chosen_on_seeds({"synth": coll}, rows.iloc[:0], (0, 1), CFG, log=None).empty
    assert len(calls) == 1

def test_workers_never_run_the_callers_main_script(tmp_path, monkeypatch):
    """Streamlit (and any script host) installs its script as ``__main__``; spawned workers must not re-run it (here
    it would kill each worker at import: a broken pool)."""
    import types

    script = tmp_path / "page.py"
    script.write_text("import os\nos._exit(3)\n")
    fake = types.ModuleType("__main__")
    fake.__file__, fake.__spec__ = str(script), None
    monkeypatch.setitem(__import__("sys").modules, "__main__", fake)
    assert X.in_workers(math.pow, [(2, 3), (3, 2), (2, 0.5)], workers=2) == [8.0, 9.0, math.pow(2, 0.5)]
    assert __import__("sys").modules["__main__"] is fake          # the caller's __main__ is back


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_workers_end_when_their_parent_is_killed(tmp_path):
    """A parent killed by a signal runs no clean-up (``pkill`` on ``lol zoo measure`` or the notebook runner): its
    spawned workers must not live on computing, or a rerun's workers write the same files beside them. Here a parent
    with two sleeping workers is killed with SIGKILL; both workers must be gone within seconds."""
    import signal
    import subprocess

    script = tmp_path / "parent.py"
    script.write_text("import time\nfrom lol.experiments import in_workers\n"
                      "in_workers(time.sleep, [(120,), (120,)], workers=2)\n")
    parent = subprocess.Popen([sys.executable, str(script)])

    def workers() -> list[int]:
        found = []
        for d in Path("/proc").iterdir():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent.pid and b"spawn_main" in cmd:
                found.append(int(d.name))
        return found

    found: list[int] = []
    try:
        deadline = time.time() + 120
        while len(found := workers()) < 2 and time.time() < deadline and parent.poll() is None:
            time.sleep(0.2)
        assert len(found) == 2, f"the parent started {len(found)} workers, not 2"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 20
        alive = found
        while alive and time.time() < deadline:
            time.sleep(0.2)
            alive = [p for p in found if Path(f"/proc/{p}").exists() and
                     Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        assert not alive, f"workers {alive} outlived their killed parent"
    finally:
        parent.kill()
        for p in found:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)


def test_worker_processes_give_the_same_results(coll, mixed, tmp_path):
    """run_grid, learning_curve, rank_generalization and hparam_search with two spawned worker processes (one torch thread each) give
    the rows of the sequential run (here with one thread too): the same numbers, the same order."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = [X.TaskRef("synth", "spectrum")]
        seq = X.run_grid({"synth": coll}, refs, models=("svals", "glnet"), seeds=(0, 1), config=CFG,
                         runs_dir=tmp_path / "a", log=None)
        par = X.run_grid({"synth": coll}, refs, models=("svals", "glnet"), seeds=(0, 1), config=CFG,
                         runs_dir=tmp_path / "b", log=None, workers=2)
        key = ["model", "seed", "split", "label", "metric"]
        a, b = (g.runs.sort_values(key).reset_index(drop=True) for g in (seq, par))
        assert len(a) == len(b) > 0 and (a[key] == b[key]).all().all()
        assert np.allclose(a.value, b.value, equal_nan=True, rtol=0, atol=0)
        assert all((tmp_path / "b" / "synth" / "spectrum" / k / f"seed{s}" / "done.json").is_file()
                   for k in ("svals", "glnet") for s in (0, 1))
        with pytest.raises(LoLError, match="runs_dir"):
            X.run_grid({"synth": coll}, refs, models=("svals",), seeds=(0, 1), config=CFG, log=None, workers=2)
        c1 = X.learning_curve(coll, "spectrum", ["svals", "glnet"], (0.5, 1.0), (0, 1), CFG, log=None)
        c2 = X.learning_curve(coll, "spectrum", ["svals", "glnet"], (0.5, 1.0), (0, 1), CFG, log=None, workers=2)
        pd.testing.assert_frame_equal(c1, c2)
        r1 = X.rank_generalization(mixed, "spectrum", ["svals", "glnet"], (0,), CFG, train_rank=2, eval_ranks=(4,),
                                   log=None)
        r2 = X.rank_generalization(mixed, "spectrum", ["svals", "glnet"], (0,), CFG, train_rank=2, eval_ranks=(4,),
                                   log=None, workers=2)
        pd.testing.assert_frame_equal(r1, r2)
        space = {"lr": [1e-3, 1e-2]}
        s1 = X.hparam_search(coll, "spectrum", "svals", space, (0, 1), CFG, log=None)
        s2 = X.hparam_search(coll, "spectrum", "svals", space, (0, 1), CFG, log=None, workers=2)
        pd.testing.assert_frame_equal(s1, s2)
        s3 = X.hparam_search(coll, "spectrum", "svals", space, (0, 1), CFG, log=None, workers=2,
                             runs_dir=tmp_path / "search")           # the workers store their runs ...
        pd.testing.assert_frame_equal(s1, s3)
        assert len(list((tmp_path / "search").rglob("*.json"))) == 4
        s4 = X.hparam_search(coll, "spectrum", "svals", space, (0, 1), CFG, log=None, workers=2,
                             runs_dir=tmp_path / "search")           # ... and a rerun reads them back
        pd.testing.assert_frame_equal(s1, s4)
    finally:
        torch.set_num_threads(n)


def test_base_transfer(coll, tmp_path):
    """Trained on one collection, scored on its own test split and on every LoRA of a sibling with the same modules;
    a collection with other modules is refused."""
    d = tmp_path / "sibling"
    synth_collection(tiny_spec(), 40, ranks=(4,), seed=7).write(d)
    sib = open_collection(d)
    rows = X.base_transfer(coll, sib, "spectrum", ["glnet", "svals"], seeds=(0, 1), config=CFG, log=None)
    assert set(rows["eval"]) == {"same base", "sibling base"} and set(rows.model) == {"glnet", "svals"}
    assert set(rows.seed) == {0, 1} and set(rows.train_collection) == {"synth"}
    assert (rows[rows["eval"] == "sibling base"].n == len(sib)).all()
    assert (rows[rows["eval"] == "same base"].n < len(coll)).all()  # the train collection's test split only
    assert np.isfinite(rows[rows.metric == "r2"].value).all()
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # the workers' one thread: the same sums, so the same numbers
    try:
        seq = X.base_transfer(coll, sib, "spectrum", ["glnet", "svals"], seeds=(0, 1), config=CFG, log=None)
        par = X.base_transfer(coll, sib, "spectrum", ["glnet", "svals"], seeds=(0, 1), config=CFG, log=None,
                              workers=2)
    finally:
        torch.set_num_threads(n)
    pd.testing.assert_frame_equal(seq, par)
    from lol.lora import ModuleSpec

    other = tmp_path / "other"
    synth_collection(ModuleSpec(("unet.x.to_q",), ((8, 8),)), 20, ranks=(4,), seed=3).write(other)
    with pytest.raises(LoLError, match="same modules"):
        X.base_transfer(coll, open_collection(other), "spectrum", ["glnet"], config=CFG, log=None)


def test_gl_invariant_flag_matches_the_models():
    """`gl_invariant(kind)` is what the comparison trusts: flagged models give the same output for a LoRA moved by a
    random non-orthogonal R ∈ GL(r) (float64); the others change (sensitivity)."""
    spec = tiny_spec()
    batch = LoRABatch.from_loras([random_lora(spec, 3, None, s) for s in range(12)], spec, dtype=torch.float64)
    moved = gl_act(batch, random_gl_like(batch, seed=3, cond=4.0))
    for kind in X.MODEL_KINDS:
        torch.manual_seed(0)
        m = build_model(kind, spec, 2, width=8).fit(batch).double().eval()
        with torch.no_grad():
            a, b = m(batch), m(moved)
        err = float((a - b).abs().max() / a.abs().max())
        if X.gl_invariant(kind):
            assert err < 1e-8, kind
        else:
            assert err > 1e-3, kind


def test_figures(grid, tmp_path):
    p = grid.predictions
    fig = F.scatter_pred_actual(p[p.task == "spectrum"], "sv_energy", ["mlp", "glnet"], seeds={"glnet": 1})
    assert F.save(fig, tmp_path, "scatter")[0].stat().st_size > 1000
    fig = F.scatter_pred_actual_plotly(p[p.task == "spectrum"], "sv_energy", ["mlp", "glnet"])
    js = F.save(fig, tmp_path, "scatter", html=True)
    assert json.loads(js[0].read_text())["data"] and js[1].suffix == ".html"
    q = p[(p.task == "direction") & (p.label == "probe_positive")]
    t = F.membership_table(q, ["mlp", "glnet"]).set_index("model")
    r = q[(q.model == "glnet") & (q.seed == 0) & (q.split == "test")]
    assert t.loc["glnet", "auc"] == pytest.approx(M.auc(r.y, r.pred))
    assert t.loc["glnet", "negatives"] == int((r.y == 0).sum())
    # the size read off membership predictions: exact predictions count exactly, one flipped label is off by one
    ids = [f"l{i}" for i in range(4)]
    y = np.array([[1, 0, 1], [1, 1, 1], [0, 0, 1], [0, 1, 1]])
    rows = lambda pred: pd.DataFrame([{"model": "m", "seed": 3, "split": "test", "id": i, "label": f"c{k}",  # noqa: E731
                                       "y": y[a, k], "pred": pred[a, k]} for a, i in enumerate(ids) for k in range(3)])
    exact = F.size_from_membership(rows(y * 0.9 + 0.05), ["m"]).iloc[0]
    assert (exact.accuracy, exact.within_one, exact.loras, exact.seed) == (1.0, 1.0, 4, 3)
    assert exact.majority_baseline == 0.5                                  # sizes 2, 3, 1, 2
    flipped = y.copy()
    flipped[0, 1] = 1
    off = F.size_from_membership(rows(flipped.astype(float)), ["m"]).iloc[0]
    assert (off.accuracy, off.within_one) == (0.75, 1.0)
    with pytest.raises(LoLError, match="every label of every LoRA"):
        F.size_from_membership(rows(y.astype(float)).iloc[1:], ["m"])
    assert F.save(F.roc_curves(q, ["mlp", "glnet"]), tmp_path, "roc")[0].is_file()
    assert F.save(F.results_bar(X.summarize(grid.runs)), tmp_path, "bar")[0].is_file()
    rk = pd.DataFrame([{"task": "t", "model": m, "seed": s, "train_rank": 4, "eval_rank": r, "metric": "r2",
                        "value": 0.1 * r + s} for m in ("glnet", "dense") for s in (0, 1) for r in (4, 8, 16)])
    assert F.save(F.rank_generalization_plot(rk, "r2"), tmp_path, "rank")[0].is_file()
    tp = pd.DataFrame([{"model": m, "n_loras": n, "loras_per_second": n * k} for m, k in (("glnet", 10), ("dense", 1))
                       for n in (1, 8, 64)])
    ratios = pd.DataFrame([{"task": "x", "standard_seconds": 1.0, "lol_seconds": 1e-3, "ratio": 1e3}])
    assert F.save(F.speed_plot(tp, ratios), tmp_path, "speed")[0].is_file()
    xy = np.random.default_rng(0).normal(size=(10, 2))
    assert F.save(F.umap_panel({"a": xy, "b": xy}, np.arange(10), "c"), tmp_path, "umap")[0].is_file()


def test_compare_summaries_sets_best_and_glnet_side_by_side():
    import pandas as pd

    from lol.experiments import compare_summaries

    def summ(vals):
        return pd.DataFrame([{"split": "test", "collection": "lm", "task": "acc", "model": m, "gl_invariant": m != "mlp",
                              "metric": met, "label_kind": "regression", "task_kind": "regression", "value": v,
                              "std": 0.01, "n_seeds": 3}
                             for (m, met), v in vals.items()])

    old = summ({("mlp", "r2"): 0.10, ("glnet", "r2"): 0.20, ("glnet", "kendall"): 0.9})
    new = summ({("mlp", "r2"): 0.30, ("glnet", "r2"): 0.85, ("svals", "r2"): 0.90})
    t = compare_summaries(old, new)
    assert len(t) == 1
    r = t.iloc[0]
    assert r["metric"] == "r2" and r["best v1"] == "0.200 (glnet)" and r["best v2"] == "0.900 (svals)"
    assert r["glnet v1"] == "0.200" and r["glnet v2"] == "0.850" and r["gain (best)"] == "+0.700"
    assert compare_summaries(old, summ({("mlp", "r2"): 0.3}).assign(task="other")).empty  # no common task


def test_retrain_checkpoints_on_a_grown_collection(coll, tmp_path):
    """A checkpoint trained before its collection grew sees another fingerprint and calls every LoRA unseen, its own
    training LoRAs included; `retrain_checkpoints` retrains the recorded kind and seed on the collection as it is
    now, so its test split is again its own, and keeps the rest of the index."""
    from lol.checkpoint import load_checkpoint
    from lol.predict import CollectionPredictions

    small_dir = tmp_path / "small"
    synth_collection(tiny_spec(), 40, ranks=(4,), seed=0).write(small_dir)
    small = open_collection(small_dir)
    refs = [X.TaskRef("synth", "spectrum")]
    g = X.run_grid({"synth": small}, refs, models=("svals",), seeds=(1,), config=CFG, hparams={"svals": {"depth": 1}},
                   log=None)
    root = tmp_path / "ck"
    root.mkdir()
    (root / "index.json").write_text(json.dumps({"other_label": "x/y"}))
    X.write_checkpoints(g, X.select_best(g.runs), root, refs)
    before = load_checkpoint(root / "synth" / "spectrum")
    assert set(CollectionPredictions.of(before, coll).split) == {"unseen"}        # the grown collection: all "unseen"

    rows = X.retrain_checkpoints({"synth": coll, "other": small}, root, log=None)
    assert list(rows.model) == ["svals"] and list(rows.seed) == [1]
    after = load_checkpoint(root / "synth" / "spectrum")
    assert after.config["fingerprint"] == coll.fingerprint != before.config["fingerprint"]
    assert after.split["loras"] == coll.loras_fingerprint != before.split["loras"] == small.loras_fingerprint
    assert after.config["train"]["seed"] == 1 and after.config["train"]["model"] == {"depth": 1}
    assert after.config["train"]["epochs"] == CFG.epochs and after.model.depth == 1
    assert "retrained on 60 LoRAs" in after.config["selection"]["selected_by"]
    split = CollectionPredictions.of(after, coll).split
    assert set(split) == {"train", "val", "test"} and len(split) == 60
    assert json.loads((root / "index.json").read_text())["other_label"] == "x/y"
    # names= limits the retraining; a collection not given is left alone
    assert X.retrain_checkpoints({"synth": coll}, root, names=["synth/other_task"], log=None).empty
    assert X.retrain_checkpoints({"elsewhere": coll}, root, log=None).empty


def test_a_partial_rerun_replaces_only_its_own_tasks():
    """`splice_runs`: the rerun tasks' rows replace theirs, every other task's rows are kept verbatim."""
    def rows(task, value, n=2):
        return pd.DataFrame({"collection": "c", "task": task, "model": "svals", "seed": range(n), "split": "test",
                             "label": task, "label_kind": "regression", "metric": "r2", "value": value})

    def preds(task, pred):
        return pd.DataFrame({"collection": "c", "task": task, "model": "svals", "seed": 0, "id": ["a", "b"],
                             "split": "test", "label": task, "y": 1.0, "pred": pred})

    old_runs = pd.concat([rows("kept", 0.1), rows("redone", 0.2, n=3)], ignore_index=True)
    old_preds = pd.concat([preds("kept", 0.5), preds("redone", 0.6)], ignore_index=True)
    runs, p = X.splice_runs(old_runs, old_preds, rows("redone", 0.9), preds("redone", 0.7))
    pd.testing.assert_frame_equal(runs[runs.task == "kept"].reset_index(drop=True), rows("kept", 0.1))
    assert list(runs[runs.task == "redone"].value) == [0.9, 0.9]       # the old three seeds are gone, not mixed in
    assert list(p[p.task == "kept"].pred) == [0.5, 0.5] and list(p[p.task == "redone"].pred) == [0.7, 0.7]
    nothing_new, p2 = X.splice_runs(old_runs, None, None)                  # a rerun that ran nothing keeps all
    pd.testing.assert_frame_equal(nothing_new, old_runs)
    assert len(p2) == 0
    with pytest.raises(LoLError, match="lacks column"):
        X.splice_runs(old_runs.drop(columns="metric"), old_preds, rows("redone", 0.9))
    # other part names (notebook 08's rows are named by the collection they trained on)
    named = lambda df: df.rename(columns={"collection": "train_collection"})          # noqa: E731
    both = pd.concat([old_runs, rows("kept", 0.3).assign(collection="d")], ignore_index=True)
    redo = named(rows("kept", 0.8).assign(collection="d"))
    spliced, _ = X.splice_runs(named(both), None, redo, keys=("train_collection", "task"))
    assert list(spliced[spliced.train_collection == "d"].value) == [0.8, 0.8]
    pd.testing.assert_frame_equal(spliced[spliced.train_collection == "c"].reset_index(drop=True), named(old_runs))


def test_learning_curves_and_rank_generalization_reuse_what_run_grid_trained(mixed, tmp_path, monkeypatch):
    """At 100 % of the training groups a learning curve is run_grid's own training, and rank generalization on the
    main rank trains run_grid's models: with run_grid's runs_dir they read those runs (same numbers) and train only
    the rest. A run of other settings (here another lr), of other rows, or on another split is not taken for them."""
    import lol.train

    synth = synth_collection(tiny_spec(), 60, ranks=(2, 2, 4), seed=1)
    split_column = synth.table["split"]
    synth.table = synth.table.drop(columns="split")     # as the zoo's collections: split by seed, as the curves do
    synth.write(tmp_path / "c" / "mixed")
    mixed_by_column, mixed = mixed, open_collection(tmp_path / "c" / "mixed")
    assert (mixed_by_column.table["split"] == split_column).all()
    tmp_path = tmp_path / "runs"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = X.TaskRef("mixed", "spectrum", (("rank", 2),))          # the folder is "mixed"; rank 2 is the main rank
        assert X.main_rows(mixed) == {"rank": 2}
        X.run_grid({"mixed": mixed}, [ref], models=("svals", "glnet"), seeds=(0,), config=CFG, runs_dir=tmp_path,
                   log=None)
        fresh_curve = X.learning_curve(mixed, "spectrum", ["glnet"], (0.5, 1.0), (0,), CFG, log=None)
        fresh_rank = X.rank_generalization(mixed, "spectrum", ["glnet", "svals"], (0,), CFG, train_rank=2,
                                           eval_ranks=(4,), log=None)
        trained, real = [], lol.train.train
        monkeypatch.setattr(lol.train, "train", lambda *a, **k: trained.append(a[2]) or real(*a, **k))
        curve = X.learning_curve(mixed, "spectrum", ["glnet"], (0.5, 1.0), (0,), CFG, log=None, runs_dir=tmp_path)
        assert trained == ["glnet"]                                   # the 50 % one only
        pd.testing.assert_frame_equal(curve, fresh_curve, check_exact=False, rtol=1e-9)
        trained.clear()
        rank = X.rank_generalization(mixed, "spectrum", ["glnet", "svals"], (0,), CFG, train_rank=2, eval_ranks=(4,),
                                     log=None, runs_dir=tmp_path)
        assert trained == ["svals"]          # svals is built for rank 4 (the largest evaluated): another model
        pd.testing.assert_frame_equal(rank, fresh_rank, check_exact=False, rtol=1e-6)
        trained.clear()
        other = TrainConfig(**{**CFG.__dict__, "lr": CFG.lr * 3})
        X.rank_generalization(mixed, "spectrum", ["glnet"], (0,), other, train_rank=2, eval_ranks=(4,), log=None,
                              runs_dir=tmp_path)
        X.learning_curve(mixed, "spectrum", ["glnet"], (1.0,), (0,), other, log=None, runs_dir=tmp_path)
        assert trained == ["glnet", "glnet"]
        # run_grid on a collection with a split column trains on that split; a learning curve splits by seed
        X.run_grid({"mixed": mixed_by_column}, [ref], models=("glnet",), seeds=(0,), config=CFG,
                   runs_dir=tmp_path / "by_column", log=None)
        trained.clear()
        X.learning_curve(mixed_by_column, "spectrum", ["glnet"], (1.0,), (0,), CFG, log=None,
                         runs_dir=tmp_path / "by_column")
        assert trained == ["glnet"]
        run = X.finished_run(tmp_path, mixed, "spectrum", {"rank": 2}, "glnet", CFG)
        assert run is not None and run.split is None and run.record["rows"] == {"rank": 2}
        ids = mixed.table.loc[mixed.table["rank"] == 2, "id"].astype(str).to_numpy()
        run = X.finished_run(tmp_path, mixed, "spectrum", {"rank": 2}, "glnet", CFG, ids=ids)
        assert run is not None and set(run.split) == {"train", "val", "test"} and len(run.split) == len(ids)
        assert X.finished_run(tmp_path, mixed, "spectrum", {"rank": 2}, "glnet", CFG, ids=ids,
                              split=run.split) is not None
        flipped = np.where(run.split == "train", "val", run.split)                         # another split
        assert X.finished_run(tmp_path, mixed, "spectrum", {"rank": 2}, "glnet", CFG, ids=ids, split=flipped) is None
        assert X.finished_run(tmp_path, mixed, "spectrum", {"rank": 2}, "glnet", CFG,
                              ids=np.append(ids, "not-an-id")) is None                # an id it never split
        assert X.finished_run(tmp_path, mixed, "spectrum", {"rank": 4}, "glnet", CFG) is None    # other rows
        assert X.finished_run(tmp_path, mixed, "spectrum", {"rank": 2}, "glnet", other) is None
    finally:
        torch.set_num_threads(n)


def test_label_averaging_trains_on_one_measurement_and_on_their_mean(tmp_path):
    """On the LoRAs every measurement covers: the model trained on the mean of k measurements beats the one trained
    on one noisy measurement when both are scored against the mean, seed offsets are removed first (a seed that
    shifts every LoRA alike costs the single-trained model nothing), and averaging_gain summarizes the pairs."""
    from lol.collection import write_collection
    from lol.zoo.measure import _write, label_protocol, measurement_path

    spec, n = tiny_spec(), 150
    rng = np.random.default_rng(0)
    truth = rng.uniform(-1.5, 1.5, n)                   # each LoRA's log-magnitude: what svals reads off the weights
    loras = [random_lora(spec, 4, seed=i, log_scale=t, decay=0.0) for i, t in enumerate(truth)]
    table = pd.DataFrame({"id": [f"l{i}" for i in range(n)], "group": [f"g{i // 3}" for i in range(n)],
                          "rank": 4, "clip_score": truth + rng.normal(size=n) * truth.std()})   # a noisy build
    d = tmp_path / "faces"
    write_collection(d, loras, table, labels={"clip_score": {"kind": "regression", "task": "clip_score"}},
                     tasks={"clip_score": ["clip_score"]},
                     provenance={"zoo": {"recipe": "lol.zoo.image_recipes:FacesRecipe", "preset": "ci", "seed": 0}})
    coll = open_collection(d)
    with pytest.raises(LoLError, match="no measurement of 'clip_score' beyond the build's"):
        X.label_averaging(coll, "clip_score", "svals", seeds=(0,), config=CFG, log=None)
    meta = {"label": "clip_score", "protocol": {k: v for k, v in label_protocol(coll).items()
                                                if k not in ("seed", "retest_seed")}, "factors": list(coll.factors_hash)}
    noise = {s: rng.normal(size=n) * 0.05 * truth.std() for s in (7, 9)}

    def measured(offsets):                  # two more seeds, far less noisy, each with its own offset
        for s, offset in zip((7, 9), offsets):
            keep = slice(None) if s == 7 else slice(1, None)                 # seed 9 left the first LoRA out
            _write(measurement_path(d, "clip_score", s), pd.DataFrame(
                {"id": table.id[keep], "value": (truth + offset + noise[s])[keep], "seconds": 1.0}), {**meta, "seed": s})
        return open_collection(d)

    cfg = TrainConfig(epochs=100, patience=100, progress=False, width=32, lr=3e-3)
    rows = X.label_averaging(measured((3.0, -2.0)), "clip_score", "svals", seeds=(0, 1), config=cfg, log=None)
    assert len(rows) == 8 and set(rows.n_loras) == {n - 1} and set(rows.k) == {3}
    r = rows.pivot_table(index=["seed", "trained_on"], columns="scored_against", values="value")
    gain = r.xs("mean", level="trained_on")["mean"] - r.xs("single", level="trained_on")["mean"]
    assert (gain > 0).all() and gain.mean() > 0.08, r
    # a seed's offset shifts every LoRA alike: removed before training and scoring, it changes nothing
    same = X.label_averaging(measured((0.0, 0.0)), "clip_score", "svals", seeds=(0,), config=cfg, log=None)
    np.testing.assert_allclose(same.value, rows[rows.seed == 0].value, atol=1e-6)
    # in two worker processes: the same rows (the LoRAs measured every time are fixed before the workers start)
    pd.testing.assert_frame_equal(X.label_averaging(open_collection(d), "clip_score", "svals", seeds=(0, 1), config=cfg,
                                                    log=None, workers=2), rows)
    some = X.label_averaging(open_collection(d), "clip_score", "svals", seeds=(0,), config=CFG, log=None,
                             ids=table.id[1:100])
    assert set(some.n_loras) == {99}
    with pytest.raises(LoLError, match="of the 2 LoRAs asked for, 1 are in"):      # l0: not measured with seed 9
        X.label_averaging(open_collection(d), "clip_score", "svals", config=cfg, log=None, ids=["l0", "l1"])
    g = X.averaging_gain(rows)
    assert len(g) == 1 and g.k[0] == 3 and g.seeds[0] == 2 and g.n_loras[0] == n - 1
    assert g.gain[0] == pytest.approx(gain.mean()) and g.gain_std[0] == pytest.approx(gain.std())
    bad = tmp_path / "bin"
    synth_collection(tiny_spec(), 12, seed=3).write(bad)
    with pytest.raises(LoLError, match="must have one regression label"):
        X.label_averaging(open_collection(bad), "spectrum", "svals", config=CFG, log=None)
