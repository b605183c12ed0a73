"""Every notebook runs in smoke mode with papermill on the zoo's CI preset (built once per session into a temp dir),
and writes what it promises: results tables, figures, loadable checkpoints and an index that `lol predict --task`
uses. Notebooks are committed with outputs stripped and with kernelspec / language_info metadata."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
NB_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("[0-9][0-9]_*.ipynb"))

pytest.importorskip("papermill")
from lol.notebooks import declared_parameters, run_notebooks  # noqa: E402


@pytest.fixture(scope="session")
def smoke_run(ci_zoo, tmp_path_factory):
    """Run every notebook in order (03/04/06 read what 02 wrote) into one output folder."""
    work = tmp_path_factory.mktemp("nb")
    res, ck, runs = work / "results", work / "checkpoints", work / "runs"
    params = {"smoke": True, "collections_dir": str(ci_zoo / "collections"), "out_dir": str(res),
              "checkpoints_dir": str(ck), "runs_dir": str(runs), "data_dir": str(ci_zoo),
              "zoo_dir": str(ci_zoo), "ship_ensembles": None}   # 01 re-runs the (resumable) build on the session's CI zoo: nothing left to do
    executed = run_notebooks(work, params)
    return {"results": res, "checkpoints": ck, "executed": executed, "zoo": ci_zoo}


def test_notebooks_are_committed_clean():
    assert len(NOTEBOOKS) >= 7
    for nb in NOTEBOOKS:
        d = json.loads(nb.read_text())
        assert d["metadata"]["kernelspec"]["language"] == "python" and d["metadata"]["language_info"]["name"] == "python"
        tagged = [c for c in d["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, nb.name
        assert "smoke" in declared_parameters(nb), nb.name
        for c in d["cells"]:
            if c["cell_type"] == "code":
                assert c["outputs"] == [] and c["execution_count"] is None, f"{nb.name}: outputs not stripped"
        # thin: notebooks call the library, they do not define models or training loops
        code = "\n".join("".join(c["source"]) for c in d["cells"] if c["cell_type"] == "code")
        assert "nn.Module" not in code and "optimizer" not in code.lower() and "class " not in code, nb.name


def test_every_notebook_runs_in_smoke_mode(smoke_run):
    assert set(smoke_run["executed"]) == {nb.name for nb in NOTEBOOKS}
    for name, path in smoke_run["executed"].items():
        d = json.loads(path.read_text())
        errors = [o for c in d["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        assert not errors, f"{name}: {errors[:1]}"


def test_training_notebook_writes_tables_and_checkpoints(smoke_run):
    res, ck = smoke_run["results"], smoke_run["checkpoints"]
    runs = pd.read_csv(res / "runs.csv")
    # every model kind on every default task of the CI collections
    from lol.experiments import DEFAULT_TASKS, MODEL_KINDS

    want = {(c, t) for c, ts in DEFAULT_TASKS.items() for t in ts}
    assert set(zip(runs.collection, runs.task)) == want
    assert set(runs.model) == set(MODEL_KINDS)
    table = pd.read_csv(res / "results.csv", index_col=0)
    assert list(table.index) == list(MODEL_KINDS)
    assert "faces/clip_score · r2" in table.columns and "lm/membership · auc" in table.columns
    assert (res / "results.md").read_text().startswith("# Test results")
    readme = (res / "README.md").read_text()
    assert "## Results table" in readme and "![results_bar](results_bar.png)" in readme and "## Speed" in readme
    cmp = pd.read_csv(res / "gl_vs_mlp.csv")
    from lol.experiments import gl_invariant

    gl_kinds = [k for k in MODEL_KINDS if gl_invariant(k)]   # the registry's own list (colsketch, colspace too)
    assert {"dense", "glnet", "colsketch"} <= set(gl_kinds) and "oalign" not in gl_kinds and "mlp" not in gl_kinds
    assert set(cmp.task) == {t for _, t in want} and cmp.best_gl_invariant.dropna().isin(gl_kinds).all()
    index = json.loads((ck / "index.json").read_text())
    assert index["clip_score"] == "faces/clip_score" and index["source_copy"] == "lm/membership"
    from lol.checkpoint import load_checkpoint

    for rel in set(index.values()):
        c = load_checkpoint(ck / rel)
        assert c.config["selection"]["selected_by"]
    for f in ("results_bar.png", "scatter_faces_clip_score.png", "roc_fashion_membership.png",
              "roc_lm_membership.png", "membership_metrics.csv", "rank_generalization.csv",
              "rank_generalization_clip_score.png", "speed.csv", "throughput.csv", "speed.png",
              "umap_faces_attributes.png", "embeddings_gl_change.csv", "base_transfer.csv",
              "base_transfer_membership.png", "learning_curves.csv", "learning_curves.png"):
        assert (res / f).is_file(), f
    search = pd.read_csv(res / "hparam_search.csv")     # notebook 09's search, trimmed to 2 settings in smoke mode
    assert set(zip(search.collection, search.task, search.model)) == {("lm", "eval_loss", "svals"),
                                                                      ("lm", "eval_loss", "glnet"),
                                                                      ("fashion", "membership", "glnet"),
                                                                      ("lm", "membership", "glnet"),
                                                                      ("faces", "clip_score", "glnet")}
    assert search.groupby(["collection", "task", "model"]).chosen.sum().eq(1).all()
    own = search.task == "membership"                     # lm and fashion: a space of their own, GL-net's capacity
    faces = (search.collection == "faces") & (search.task == "clip_score")   # its own: lr × weight decay
    assert search[~own & ~faces].setting.nunique() == 2
    assert list(search[own].setting) == ['{"model.channels": 32, "width": 64}'] * 2
    assert list(search[faces].setting) == ['{"lr": 0.0003, "weight_decay": 0.0001}']
    assert "## Hyperparameter search on validation" in (res / "README.md").read_text()
    # notebook 09's ensembles: every notebook-02 task with per-LoRA scores, members among the smoke kinds (GL-invariant)
    ens = pd.read_csv(res / "ensembles.csv")
    assert set(zip(ens.collection, ens.task)) == want - {("fashion", "dataset_size")}
    members = {m for s in ens.members for m in s.split(" + ")}
    assert members <= {"dense", "svals", "colspace"} and ens.best_single.isin(["dense", "svals", "colspace"]).all()
    binary = ens[ens.task.isin(["attributes", "membership"])]
    assert set(binary.metric) == {"auc", "accuracy"} and set(ens[~ens.index.isin(binary.index)].metric) == {"r2"}
    np.testing.assert_allclose(ens.ensemble - ens.single, ens.gain, atol=1e-9)
    # what ships after the search: per task of notebook 02, its choice or the searched setting that beats it on
    # validation over the same seeds
    tuned_ship = pd.read_csv(res / "shipped_tuned.csv")
    assert set(zip(tuned_ship.collection, tuned_ship.task)) == want
    assert (tuned_ship.setting[~tuned_ship.replaced] == "notebook 02").all()
    # an ensemble that selection grew beyond one model ships in that checkpoint's place (ship_ensembles None: every
    # task's) where it scores higher on validation, its members at the seed where it scores best on validation
    grown = ens[ens.members.str.contains(" + ", regex=False)].drop_duplicates(["collection", "task"])
    shipped = pd.read_csv(res / "shipped_ensembles.csv") if (res / "shipped_ensembles.csv").is_file() \
        else pd.DataFrame(columns=["collection", "task", "members", "seed", "val_mean", "beat"])
    assert set(zip(shipped.collection, shipped.task)) <= set(zip(grown.collection, grown.task))
    assert (shipped.val_mean > shipped.beat.fillna(-np.inf)).all()
    # (on the tiny CI zoo selection keeps one model everywhere, so nothing ships and notebook 02's checkpoints stay;
    # tests/test_ensemble.py and tests/test_experiments.py ship them from real grids)
    for rel in set(index.values()):
        assert (load_checkpoint(ck / rel).kind == "ensemble") == (tuple(rel.split("/")) in set(
            zip(shipped.collection, shipped.task)))
    for r in shipped.itertuples():
        c = load_checkpoint(smoke_run["checkpoints"] / r.collection / r.task)
        assert c.kind == "ensemble" and c.config["selection"]["seed"] == r.seed
        weighted = [m["kind"] for m in c.config["members"] for _ in range(m["weight"])]
        assert sorted(weighted) == sorted(r.members.split(" + ")) and c.config["metrics"]["test"]
        assert r.val_seed >= r.val_mean                          # the best validation seed is at least the mean
    # fashion's size counted from its membership models (the smoke kinds), shipped where it beats the head on validation
    counts = pd.read_csv(res / "shipped_counts.csv")
    assert list(zip(counts.collection, counts.task, counts.counted_from)) == [("fashion", "dataset_size", "membership")]
    r = counts.iloc[0]
    assert set(r.members.split(" + ")) <= {"dense", "svals", "colspace"} and r.shipped == (r.val_mean > r.beat)
    size_ck = load_checkpoint(ck / "fashion" / "dataset_size")
    assert (size_ck.kind == "count") == r.shipped
    if r.shipped:
        assert size_ck.config["selection"]["seed"] == r.seed and size_ck.labels == ["n_classes"]
        test = size_ck.config["metrics"]["test"]["n_classes"]["balanced_accuracy"]   # of the float16-stored weights
        assert test == pytest.approx(r.test_seed, abs=0.02)
    size = pd.read_csv(res / "ensemble_size.csv")               # fashion's size counted from its membership ensemble
    assert list(zip(size.collection, size.task)) == [("fashion", "dataset_size")]
    assert size.accuracy.between(0, 1).all() and (size.within_one >= size.accuracy).all()
    # GL-net's chosen setting on notebook 02's seeds (smoke: seed 0 only, the search's own rows, reused as they are)
    runs, tuned = pd.read_csv(res / "hparam_search_runs.csv"), pd.read_csv(res / "hparam_tuned_runs.csv")
    chosen = search[search.chosen & (search.model == "glnet")][["collection", "task", "model", "setting"]]
    assert set(tuned.model) == {"glnet"} and set(tuned.seed) == {0} and len(tuned.drop_duplicates(
        ["collection", "task"])) == len(chosen) == 4
    key = ["collection", "task", "model", "setting", "seed", "split", "label", "metric"]
    pd.testing.assert_frame_equal(tuned.sort_values(key).reset_index(drop=True),
                                  runs.merge(chosen).sort_values(key).reset_index(drop=True)[tuned.columns])
    assert (res / "hparam_tuned.md").is_file()
    per_label = pd.read_csv(res / "per_label.csv")           # every binary task of notebook 02, every model
    assert {("faces", "attributes"), ("fashion", "membership"), ("lm", "membership")} <= set(
        zip(per_label.collection, per_label.task)) and per_label.majority.between(0.5, 1).all()
    # every (task, model) with a regression label's test predictions on splits of ≥ 10 LoRAs (the CI zoo's are
    # smaller: then none, and the file still has its columns)
    tails = pd.read_csv(res / "label_tail.csv")
    preds = pd.read_parquet(res / "predictions_test.parquet")
    n = preds[~preds.y.isin([0.0, 1.0])].groupby(["collection", "task", "model", "seed"]).size()
    big = {k[:3] for k, v in n.items() if v >= 10}
    assert set(zip(tails.collection, tails.task, tails.model)) == big
    assert {"variance_share", "error_share", "threshold"} <= set(tails.columns)
    transfer = pd.read_csv(res / "base_transfer_runs.csv")  # both directions, both evaluations, on the ci siblings
    assert set(transfer.train_collection) == {"fashion", "fashion_v1", "lm", "lm_v2"}
    assert set(transfer["eval"]) == {"same base", "sibling base"}
    assert set(transfer[transfer.train_collection == "lm_v2"].task) == {"membership", "challenge_accuracy",
                                                                        "eval_loss"}
    assert (res / "base_transfer_challenge_accuracy.png").is_file()
    # the paper comparison, rewritten by notebook 09: our Figure 4 (notebook 05's BCE losses) beside the paper's
    fig4 = (res / "paper_comparison.md").read_text().split("## Figure 4")[1]
    assert "| rank | paper GL-net | paper Dense | ours glnet | ours dense |" in fig4
    assert re.search(r"\| 4 \| 0\.323 \| – \| \d\.\d{3} \| \d\.\d{3} \|", fig4), fig4


def test_training_notebook_reruns_some_tasks_and_keeps_the_others(smoke_run, tmp_path):
    """Notebook 02 with ``tasks``: only those tasks are trained (here all found finished in runs_dir, so nothing
    trains) and spliced into out_dir's tables; every other task's rows are kept as they were."""
    import shutil

    res, ck = tmp_path / "results", tmp_path / "checkpoints"
    shutil.copytree(smoke_run["results"], res)
    shutil.copytree(smoke_run["checkpoints"], ck)
    before = pd.read_csv(res / "runs.csv")
    redo = (before.collection == "lm") & (before.task == "eval_loss")
    before.loc[redo, "value"] = 99.0           # stale rows of the rerun task: replaced, not kept
    before.to_csv(res / "runs.csv", index=False)
    params = {"smoke": True, "collections_dir": str(smoke_run["zoo"] / "collections"), "out_dir": str(res),
              "checkpoints_dir": str(ck), "runs_dir": str(smoke_run["results"].parent / "runs"),
              "tasks": ["lm/eval_loss"]}
    run_notebooks(tmp_path / "nb", params, names=["02"])
    # the paper comparison: the other tasks keep the reasons notebook 09 measured; the rerun task's are cleared
    from lol.paper import read_paper_comparison

    pc0, pc1 = (read_paper_comparison(d / "paper_comparison.csv") for d in (smoke_run["results"], res))
    other = pc0.ours != "lm/eval_loss"
    assert (pc0.why[other] != "").any() and list(pc1.why[other]) == list(pc0.why[other])
    assert (pc1.why[~other] == "").all() and list(pc1.ours) == list(pc0.ours)
    after = pd.read_csv(res / "runs.csv")
    again = (after.collection == "lm") & (after.task == "eval_loss")
    pd.testing.assert_frame_equal(after[~again].reset_index(drop=True), before[~redo].reset_index(drop=True))
    fresh = pd.read_csv(smoke_run["results"] / "runs.csv")
    fresh = fresh[(fresh.collection == "lm") & (fresh.task == "eval_loss")]
    cols = ["model", "seed", "split", "label", "metric"]      # the rerun task's rows: the finished runs' own
    pd.testing.assert_series_equal(after[again].sort_values(cols).value.reset_index(drop=True),
                                   fresh.sort_values(cols).value.reset_index(drop=True))
    assert set(zip(after.collection, after.task)) == set(zip(before.collection, before.task))
    preds = pd.read_parquet(res / "predictions_test.parquet")      # (category tasks store no per-LoRA scores)
    earlier = pd.read_parquet(smoke_run["results"] / "predictions_test.parquet")
    assert set(zip(preds.collection, preds.task)) == set(zip(earlier.collection, earlier.task)) and set(preds.split) == {
        "test"} and len(preds) == len(earlier)
    # notebook 09 likewise: its learning curves and searches of the other tasks are kept as they were
    names = ("learning_curves_runs.csv", "hparam_search_runs.csv", "hparam_tuned_runs.csv")
    for name in names:
        t = pd.read_csv(res / name)
        pd.concat([t[t.task != "eval_loss"], t[t.task == "eval_loss"].assign(value=-1.0)]).to_csv(res / name, index=False)
    kept = {name: pd.read_csv(res / name) for name in names}
    shipped_before = pd.read_csv(res / "shipped_tuned.csv")
    run_notebooks(tmp_path / "nb", {**params, "tasks": ["fashion/membership"]}, names=["09"])
    shipped_after = pd.read_csv(res / "shipped_tuned.csv")         # what ships: the other tasks' rows kept
    mine = lambda t: (t.collection == "fashion") & (t.task == "membership")  # noqa: E731
    pd.testing.assert_frame_equal(shipped_after[~mine(shipped_after)].reset_index(drop=True),
                                  shipped_before[~mine(shipped_before)].reset_index(drop=True))
    assert mine(shipped_after).sum() == 1 and len(shipped_after) == len(shipped_before)
    for name, t0 in kept.items():
        t1 = pd.read_csv(res / name)
        other = lambda t: t[~((t.collection == "fashion") & (t.task == "membership"))].reset_index(drop=True)  # noqa: E731
        pd.testing.assert_frame_equal(other(t1), other(t0))
        assert ((t1.collection == "fashion") & (t1.task == "membership")).any(), name
    # run_curves False: the searches again, the learning curves read back untouched
    curves = (res / "learning_curves_runs.csv").read_bytes()
    (res / "hparam_search_runs.csv").write_text(pd.read_csv(res / "hparam_search_runs.csv").query(
        "task != 'membership'").to_csv(index=False))
    run_notebooks(tmp_path / "nb", {**params, "tasks": ["lm/membership"], "run_curves": False}, names=["09"])
    assert (res / "learning_curves_runs.csv").read_bytes() == curves
    search = pd.read_csv(res / "hparam_search_runs.csv")
    assert set(search[search.task == "membership"].collection) == {"lm"}        # lm's search ran; fashion's was cut


def test_shipped_index_serves_lol_predict(smoke_run, tmp_path):
    """The index written by the notebook is what `lol predict --task` reads (via default_checkpoint)."""
    from lol.checkpoint import default_checkpoint, load_checkpoint
    from lol.collection import open_collection
    from lol.predict import predict

    ck = smoke_run["checkpoints"]
    path = default_checkpoint("challenge_accuracy", index=ck / "index.json")
    lm = open_collection(smoke_run["zoo"] / "collections" / "lm")
    df = predict(load_checkpoint(path), [lm.lora(0), lm.lora(1)])
    assert list(df.columns) == ["source", "challenge_accuracy"] and df.challenge_accuracy.notna().all()


def test_embedding_notebook_shows_invariance(smoke_run):
    ch = pd.read_csv(smoke_run["results"] / "embeddings_gl_change.csv").set_index("representation")["relative change"]
    assert ch["GL-net embedding"] < 1e-8      # float64: the invariant embedding does not move
    assert ch["raw factors (U, V)"] > 0.1     # the raw factors do


def test_speed_notebook_recomputes_the_labels(smoke_run):
    s = pd.read_csv(smoke_run["results"] / "speed.csv").set_index("task")
    assert set(s.index) == {"faces/clip_score", "lm/challenge_accuracy"}
    # the standard evaluation timed is the zoo's own labelling: it reproduces the stored label
    assert abs(s.loc["lm/challenge_accuracy", "recomputed_label"] - s.loc["lm/challenge_accuracy", "stored_label"]) < 1e-6
    assert abs(s.loc["faces/clip_score", "recomputed_label"] - s.loc["faces/clip_score", "stored_label"]) < 1e-3
    assert (s.ratio > 0).all() and (s.standard_seconds > 0).all()


def test_base_transfer_notebook_reruns_one_pair_and_keeps_the_other(smoke_run, tmp_path):
    """Notebook 08 with ``pairs``: the rerun pair's rows replace theirs in base_transfer_runs.csv, the other pair's
    rows are kept as they were (a pair of bases can be rerun alone, e.g. after one collection is rebuilt)."""
    import shutil

    res = tmp_path / "results"
    shutil.copytree(smoke_run["results"], res)
    before = pd.read_csv(res / "base_transfer_runs.csv")
    assert {"fashion", "lm"} <= set(before.train_collection)
    before.loc[before.train_collection.isin(["lm", "lm_v2"]), "value"] = 99.0   # stale rows of the rerun pair
    before.to_csv(res / "base_transfer_runs.csv", index=False)
    params = {"smoke": True, "collections_dir": str(smoke_run["zoo"] / "collections"), "out_dir": str(res),
              "pairs": [["lm", "lm_v2"]]}
    run_notebooks(tmp_path / "nb", params, names=["08"])
    after = pd.read_csv(res / "base_transfer_runs.csv")
    lm = lambda t: t.train_collection.isin(["lm", "lm_v2"])        # noqa: E731
    pd.testing.assert_frame_equal(after[~lm(after)].reset_index(drop=True), before[~lm(before)].reset_index(drop=True))
    assert lm(after).any() and (after[lm(after)].value != 99.0).all()
    assert "fashion_v1" in (res / "base_transfer.md").read_text()      # the table still shows both pairs
