from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers_models import SPEC, random_batch, synth_grid
from lol import ensemble as E
from lol.errors import LoLError
from lol.models import build_model
from lol.symmetry import gl_act, one_sided_act, random_gl_like

pytestmark = pytest.mark.usefixtures("one_thread")


def tidy(preds: dict, y: np.ndarray, seeds=(0, 1), task=("c", "t"), label="y") -> pd.DataFrame:
    """Tidy predictions like `run_grid`'s: ``preds`` {model: (seed → array) or array}; splits cycle train/val/test."""
    n = len(y)
    split = np.array(["train", "val", "test"])[np.arange(n) % 3]
    rows = []
    for model, p in preds.items():
        for s in seeds:
            v = p(s) if callable(p) else p
            rows.append(pd.DataFrame({"collection": task[0], "task": task[1], "model": model, "seed": s,
                                      "id": [f"l{i}" for i in range(n)], "split": split, "label": label,
                                      "y": y, "pred": v}))
    return pd.concat(rows, ignore_index=True)


def test_average_is_the_members_mean_and_a_repeat_weighs_double():
    y = np.arange(9.0)
    p = tidy({"a": y + 1.0, "b": y - 2.0}, y)
    avg = E.average(p, ["a", "b"]).set_index(["seed", "id"])
    np.testing.assert_allclose(avg.loc[(0, "l4"), "pred"], 4 - 0.5)
    avg2 = E.average(p, ["a", "a", "b"]).set_index(["seed", "id"])
    np.testing.assert_allclose(avg2.loc[(1, "l4"), "pred"], (2 * 5 + 2) / 3)
    assert set(avg.reset_index().columns) >= {"seed", "split", "id", "label", "y", "pred"}


def test_average_refuses_what_cannot_be_averaged():
    y = np.arange(9.0)
    p = tidy({"a": y, "b": y}, y)
    with pytest.raises(LoLError, match=r"no predictions of model\(s\) \['zz'\]"):
        E.average(p, ["a", "zz"])
    with pytest.raises(LoLError, match="no members"):
        E.average(p, [])
    other = p[~((p.model == "b") & (p.id == "l3"))]          # b lacks one LoRA
    with pytest.raises(LoLError, match="different LoRAs"):
        E.average(other, ["a", "b"])
    two_tasks = pd.concat([p, p.assign(task="u")])
    with pytest.raises(LoLError, match="one task expected, got 2"):
        E.average(two_tasks, ["a"])


def test_selection_on_validation_keeps_complementary_models_and_leaves_out_a_useless_one():
    rng = np.random.default_rng(0)
    n = 600
    y = rng.normal(size=n)
    noise = {m: {s: rng.normal(size=n) for s in (0, 1)} for m in ("a", "b")}
    junk = {s: rng.normal(size=n) for s in (0, 1)}
    preds = {"a": lambda s: y + 0.6 * noise["a"][s], "b": lambda s: y + 0.7 * noise["b"][s],
             "junk": lambda s: junk[s]}
    p = tidy(preds, y)
    members = E.select_members(p, ["junk", "b", "a"])
    assert members[0] == "a" and "b" in members and "junk" not in members
    ens = E.task_score(E.average(p, members), "test").mean()
    one = E.task_score(E.average(p, ["a"]), "test").mean()
    assert ens > one + 0.05                                  # two independent errors halve the variance
    table, runs = E.ensemble_table(p, ["junk", "b", "a"])
    row = table.iloc[0]
    assert row.metric == "r2" and row.best_single == "a" and row.gain > 0.05 and row.seeds == 2
    r2 = runs[(runs.split == "test") & (runs.metric == "r2")].value.mean()
    assert r2 == pytest.approx(ens)
    assert set(runs.metric) >= {"r2", "kendall", "mse_norm"} and set(runs.model) == {"ensemble"}


def test_selection_stops_when_nothing_helps_and_scores_binary_tasks_by_auc():
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.5).astype(float)
    good = np.clip(0.5 + 0.4 * (2 * y - 1) + 0.05 * rng.normal(size=300), 0, 1)
    p = tidy({"good": good, "flat": np.full(300, 0.5)}, y)
    assert E.select_members(p, ["flat", "good"]) == ["good"]
    table, _ = E.ensemble_table(p, ["flat", "good"])
    assert list(table.metric) == ["auc", "accuracy"] and table.gain.abs().max() == 0


def test_count_present_counts_labels_at_or_above_the_threshold():
    ids = ["x"] * 3 + ["z"] * 3
    avg = pd.DataFrame({"seed": 0, "split": "test", "id": ids, "label": list("abcabc"),
                        "y": [1, 1, 0, 0, 0, 1.0], "pred": [0.9, 0.5, 0.2, 0.7, 0.1, 0.6]})
    per = E.count_present(avg).set_index("id")
    assert per.loc["x", "n"] == 2 and per.loc["x", "n_hat"] == 2
    assert per.loc["z", "n"] == 1 and per.loc["z", "n_hat"] == 2
    with pytest.raises(LoLError, match="labels"):
        E.count_present(avg.iloc[:-1])


def _model_preds(models: dict, batch) -> pd.DataFrame:
    rows = []
    for name, m in models.items():
        with torch.no_grad():
            out = m(batch)[:, 0].numpy()
        rows.append(pd.DataFrame({"collection": "c", "task": "t", "model": name, "seed": 0,
                                  "id": np.arange(len(out)), "split": "test", "label": "y", "y": 0.0, "pred": out}))
    return pd.concat(rows, ignore_index=True)


def test_an_ensemble_of_gl_invariant_models_is_gl_invariant_and_one_flatten_member_breaks_it():
    x = random_batch(6, rank=3, seed=11)                          # float64
    models = {}
    for kind in ("dense", "colspace", "glnet", "mlp"):
        torch.manual_seed(0)
        models[kind] = build_model(kind, SPEC, 1, width=16).fit(x).double().eval()
    R = random_gl_like(x, seed=5, cond=4.0)                        # random non-orthogonal, well-conditioned
    gx, moved = gl_act(x, R), one_sided_act(x, R)
    inv = ["dense", "colspace", "glnet"]

    def ens(batch, members):
        return E.average(_model_preds({k: models[k] for k in set(members)}, batch), members).pred.to_numpy()

    base = ens(x, inv)
    np.testing.assert_allclose(ens(gx, inv), base, rtol=1e-8, atol=1e-10)
    assert np.abs(ens(moved, inv) - base).max() > 1e-3             # a change of ΔW is seen
    with_mlp = inv + ["mlp"]
    assert np.abs(ens(gx, with_mlp) - ens(x, with_mlp)).max() > 1e-3
    p = _model_preds(models, x).assign(y=lambda d: d.id % 2 * 1.0, split=lambda d: np.where(d.id < 3, "val", "test"))
    runs = E.ensemble_runs(p, inv)
    assert runs.gl_invariant.all() and not E.ensemble_runs(p, with_mlp).gl_invariant.any()


def test_a_regression_label_that_happens_to_be_0_or_1_is_scored_as_regression_when_kinds_say_so():
    rng = np.random.default_rng(2)
    y = (rng.random(90) < 0.5).astype(float)
    p = tidy({"a": y * 0.8 + 0.1, "b": y * 0.6 + 0.2}, y)
    guessed, _ = E.ensemble_table(p, ["a", "b"])
    told, runs = E.ensemble_table(p, ["a", "b"], kinds={"y": "regression"})
    assert list(guessed.metric) == ["auc", "accuracy"] and list(told.metric) == ["r2"]
    assert set(runs.label_kind) == {"regression"} and "r2" in set(runs.metric)


# ------------------------------------------------------------------------------------------- ensemble checkpoints

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three GL-invariant kinds and a flatten MLP trained by `run_grid` on a small synthetic collection (a regression
    and a binary label), seeds 0 and 1, their checkpoints stored as folders."""
    from lol.synth import synth_collection, tiny_spec

    d = tmp_path_factory.mktemp("ens")
    coll, grid = synth_grid(d, synth_collection(tiny_spec(), 48, ranks=(4,), seed=3), "spectrum")
    return coll, grid, d


def _folders(grid, kinds, seed=0):
    return [grid.models[("synth", "spectrum", k, seed)] for k in kinds]


def test_an_ensemble_checkpoint_predicts_the_weighted_mean_its_members_were_selected_on(trained, tmp_path):
    from lol.checkpoint import load_checkpoint
    from lol.predict import predict

    coll, grid, _ = trained
    members = ["svals", "glnet", "svals"]
    out = E.ensemble_checkpoint(_folders(grid, members), tmp_path / "ens", coll=coll, half=False)
    ck = load_checkpoint(out)
    assert ck.kind == "ensemble" and ck.labels == ["sv_energy", "sv_high"]
    assert [(m["kind"], m["weight"]) for m in ck.config["members"]] == [("svals", 2), ("glnet", 1)]
    one = load_checkpoint(_folders(grid, ["svals"])[0])
    assert ck.split["test"] == one.split["test"] and ck.split_of(coll.table["id"]).tolist() \
        == one.split_of(coll.table["id"]).tolist()
    assert ck.split["loras"] == coll.loras_fingerprint and ck.config["fingerprint"] == coll.fingerprint
    # the ensemble's output is what `average` computed from the members' stored predictions, label by label
    got = predict(ck, [coll.lora(i) for i in range(len(coll))])
    avg = E.average(grid.predictions[grid.predictions.seed == 0], members)
    for label in ("sv_energy", "sv_high"):
        want = avg[avg.label == label].set_index("id")["pred"].reindex(coll.table["id"].astype(str))
        np.testing.assert_allclose(got[label].to_numpy(float), want.to_numpy(float), rtol=1e-4, atol=1e-5)
    # its recorded metrics are its own, by split: the test R² of the averaged predictions
    t = avg[(avg.label == "sv_energy") & (avg.split == "test")]
    r2 = 1 - ((t.y - t.pred) ** 2).sum() / ((t.y - t.y.mean()) ** 2).sum()
    assert ck.config["metrics"]["test"]["sv_energy"]["r2"] == pytest.approx(r2, abs=1e-4)
    # embeddings side by side; stored in float16 by default, and that checkpoint still loads and predicts close
    b = coll.batch(np.arange(4))
    assert ck.model.embed(b).shape[1] == sum(m.embed(b).shape[1] for m in ck.model.members)
    half = load_checkpoint(E.ensemble_checkpoint(_folders(grid, members), tmp_path / "half", coll=coll))
    assert half.config["stored"]["min_numel"] > 0     # `store_half` ran (these tiny layers stay float32)
    np.testing.assert_allclose(half.predict_batch(b)["sv_energy"], ck.predict_batch(b)["sv_energy"], atol=0.05)


def test_an_ensemble_checkpoint_names_its_members_relative_to_the_repository(trained, tmp_path, monkeypatch):
    """A shipped config must not name the machine it was built on: members inside the repository are recorded by
    their path relative to it; members elsewhere by their absolute path."""
    import lol.paths
    from lol.checkpoint import load_checkpoint

    coll, grid, d = trained
    folders = _folders(grid, ["svals", "glnet"])
    ck = load_checkpoint(E.ensemble_checkpoint(folders, tmp_path / "abs", half=False))
    assert [m["from"] for m in ck.config["members"]] == [str(Path(f).absolute()) for f in folders]
    monkeypatch.setattr(lol.paths, "REPO", Path(d).absolute())
    ck = load_checkpoint(E.ensemble_checkpoint(folders, tmp_path / "rel", half=False))
    assert [m["from"] for m in ck.config["members"]] == [str(Path(f).absolute().relative_to(Path(d).absolute()))
                                                         for f in folders]
    assert not any(m["from"].startswith("/") for m in ck.config["members"])


def test_an_ensemble_checkpoint_is_gl_invariant_and_sees_a_real_change(trained, tmp_path):
    from lol.checkpoint import load_checkpoint

    coll, grid, _ = trained
    ck = load_checkpoint(E.ensemble_checkpoint(_folders(grid, ["dense", "glnet", "svals"]), tmp_path / "e", half=False))
    model = ck.model.double()
    b = coll.batch(np.arange(8), dtype=torch.float64)
    g = random_gl_like(b, seed=7, cond=4.0)           # random non-orthogonal R per module and LoRA
    with torch.no_grad():
        base, moved = model(b), model(gl_act(b, g))
        one_sided = model(one_sided_act(b, g))
    torch.testing.assert_close(moved, base, rtol=1e-7, atol=1e-8)
    assert (one_sided - base).abs().max() > 1e-3      # U ↦ U R alone changes ΔW: the ensemble sees it


def test_an_ensemble_checkpoint_refuses_members_that_do_not_belong_together(trained, tmp_path):
    import json
    import shutil

    from lol.collection import open_collection
    from lol.synth import synth_collection, tiny_spec

    coll, grid, _ = trained
    svals, glnet = _folders(grid, ["svals", "glnet"])

    def edited(src, name, change):                    # a copy of a member checkpoint with its record changed
        dest = tmp_path / name
        shutil.copytree(src, dest)
        cfg = json.loads((dest / "config.json").read_text())
        change(cfg)
        (dest / "config.json").write_text(json.dumps(cfg))
        return dest

    def move_one(cfg):                                # one LoRA from train to test: another split
        cfg["split"]["test"].append(cfg["split"]["train"].pop())

    def renormalize(cfg):
        cfg["labels"][0]["std"] *= 2

    with pytest.raises(LoLError, match=r"glnet_moved was trained on another split .*one seed's split"):
        E.ensemble_checkpoint([svals, edited(glnet, "glnet_moved", move_one)], tmp_path / "a")
    with pytest.raises(LoLError, match=r"glnet_norm predicts other labels \(or normalizes them otherwise\)"):
        E.ensemble_checkpoint([svals, edited(glnet, "glnet_norm", renormalize)], tmp_path / "a")
    with pytest.raises(LoLError, match=r"member kind\(s\) \['mlp'\] are not GL\(r\)-invariant"):
        E.ensemble_checkpoint(_folders(grid, ["svals", "mlp"]), tmp_path / "b")
    synth_collection(tiny_spec(), 12, ranks=(4,), seed=9).write(tmp_path / "other")
    other = open_collection(tmp_path / "other")
    with pytest.raises(LoLError, match=r"was not trained on .*other \(another collection\)"):
        E.ensemble_checkpoint([svals, glnet], tmp_path / "a", coll=other)
    with pytest.raises(LoLError, match="no member checkpoints"):
        E.ensemble_checkpoint([], tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ship_ensemble_writes_the_members_of_the_best_validation_seed(trained, tmp_path):
    from lol.checkpoint import load_checkpoint

    coll, grid, _ = trained
    members = ["svals", "glnet"]
    rec = E.ship_ensemble(grid.predictions, members, grid.models, coll, tmp_path / "s",
                          candidates=["svals", "glnet", "dense"])       # R² and AUC: each label's primary metric
    val = E.task_score(E.average(grid.predictions, members), "val")
    assert rec["seed"] == int(val.idxmax()) and rec["val_seed"] == pytest.approx(val.max())
    assert rec["val_mean"] == pytest.approx(val.mean()) and rec["members"] == "svals + glnet"
    ck = load_checkpoint(tmp_path / "s")
    assert ck.kind == "ensemble" and ck.config["selection"]["seed"] == rec["seed"]
    assert ck.config["selection"]["candidates"] == "svals, glnet, dense"
    assert {m["seed"] for m in ck.config["members"]} == {rec["seed"]}
    assert E.ship_ensemble(grid.predictions, members, grid.models, coll, tmp_path / "u", beat=val.mean()) is None
    assert not (tmp_path / "u").exists()                 # not better on validation than what ships: nothing written
    with pytest.raises(LoLError, match=r"no trained \['colspace'\] of synth/spectrum at seed"):
        E.ship_ensemble(grid.predictions.assign(model=grid.predictions.model.replace("dense", "colspace")),
                        ["svals", "colspace"], grid.models, coll, tmp_path / "t")
