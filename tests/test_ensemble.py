import numpy as np
import pandas as pd
import pytest
import torch

from helpers_models import SPEC, random_batch
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
