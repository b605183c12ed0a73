"""A count read off membership models (`lol.models.Count`, `lol.ensemble.count_checkpoint`): the dataset size as the
number of membership labels predicted present, shipped as a checkpoint of its own."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from helpers_models import synth_grid
from lol import ensemble as E
from lol.errors import LoLError
from lol.symmetry import gl_act, one_sided_act, random_gl_like

pytestmark = pytest.mark.usefixtures("one_thread")

FLAGS = ["sv_high", "probe_positive"]


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """A synthetic collection with a membership-like task (two yes/no labels) and ``n_flags``, how many of them are
    1 (an ordered category, as fashion's ``n_classes``); GL-invariant kinds and a flatten MLP trained on the flags by
    `run_grid`, seeds 0 and 1."""
    from lol.synth import synth_collection, tiny_spec

    d = tmp_path_factory.mktemp("count")
    s = synth_collection(tiny_spec(), 60, ranks=(4,), seed=5)
    s.table["n_flags"] = s.table[FLAGS].sum(axis=1).astype(int)
    s.labels["n_flags"] = {"kind": "category", "ordered": True, "task": "size",
                           "description": "how many of the flags are 1"}
    s.tasks = {"flags": FLAGS, "size": ["n_flags"], **s.tasks}
    coll, grid = synth_grid(d, s, "flags", kinds=("svals", "dense", "glnet", "mlp", "colspace"), epochs=6)
    return coll, grid, d


def _folders(grid, kinds, seed=0):
    return [grid.models[("synth", "flags", k, seed)] for k in kinds]


def _classes(coll):
    return sorted(coll.table["n_flags"].unique())


def test_counted_label_finds_the_label_that_is_the_number_of_labels_present(counted):
    coll, _, _ = counted
    assert E.counted_label(coll, FLAGS) == ["n_flags"]
    assert E.counted_label(coll, ["sv_high"]) == []          # n_flags is not the count of one flag alone


def test_a_count_checkpoint_predicts_how_many_labels_its_members_predict_present(counted, tmp_path):
    from lol.checkpoint import load_checkpoint
    from lol.predict import predict

    coll, grid, _ = counted
    for members in (["glnet"], ["svals", "glnet", "svals"]):
        ck = load_checkpoint(E.count_checkpoint(_folders(grid, members), tmp_path / "-".join(members), coll,
                                                half=False))
        assert ck.kind == "count" and ck.labels == ["n_flags"] and ck.targets.targets[0].ordered
        assert ck.config["task"] == "size" and ck.config["counted"]["task"] == "flags"
        assert ck.config["counted"]["kind"] == ("glnet" if members == ["glnet"] else "ensemble")
        # the count is `count_present` of the members' averaged grid predictions, read as the nearest class
        avg = E.average(grid.predictions[grid.predictions.seed == 0], members)
        per = E.count_present(avg).set_index("id")
        want = E.nearest_class(per["n_hat"].reindex(coll.table["id"].astype(str)), _classes(coll))
        got = predict(ck, [coll.lora(i) for i in range(len(coll))])["n_flags"].to_numpy(float)
        np.testing.assert_array_equal(got, want)
        # its normalization is fitted on the members' training split, as training would
        where = ck.split_of(coll.table["id"])
        train = coll.table["n_flags"][where == "train"]
        assert ck.targets.targets[0].mean == pytest.approx(train.mean())
        # the recorded metrics are the count's own: accuracy and balanced accuracy on test, as `count_scores`
        sc = E.count_scores(E.count_present(avg), _classes(coll)).set_index("split")
        rec = ck.config["metrics"]["test"]["n_flags"]
        assert rec["accuracy"] == pytest.approx(sc.loc["test", "accuracy"])
        assert rec["balanced_accuracy"] == pytest.approx(sc.loc["test", "balanced_accuracy"])
        b = coll.batch(np.arange(4))
        assert ck.model.embed(b).shape == ck.model.member.embed(b).shape


def test_a_stored_count_folds_its_colspace_member_and_counts_as_before(counted, tmp_path):
    """Shipped (``half``), a count of colspace + svals stores colspace's first layer folded over the projector's
    symmetry (`lol.checkpoint.store_half`): it names the member's weight, keeps n(n+1)/2 of its n² columns per
    module, and the loaded count's logits are the unfolded ones up to float16 rounding."""
    from safetensors import safe_open

    from lol.checkpoint import load_checkpoint, symmetric_inputs

    coll, grid, _ = counted
    folders = _folders(grid, ["colspace", "svals"])
    full = load_checkpoint(E.count_checkpoint(folders, tmp_path / "full", coll, half=False))
    stored = load_checkpoint(E.count_checkpoint(folders, tmp_path / "stored", coll))
    assert list(symmetric_inputs(full.model)) == ["member.members.0.trunk.0.weight"]
    assert stored.config["stored"]["folded"] == ["member.members.0.trunk.0.weight"]
    blocks = symmetric_inputs(full.model)["member.members.0.trunk.0.weight"]
    with safe_open(str(tmp_path / "stored" / "model.safetensors"), "pt") as f:
        assert f.get_slice("member.members.0.trunk.0.weight").get_shape()[1] == sum(n * (n + 1) // 2 for n in blocks)
    size = [(p / "model.safetensors").stat().st_size for p in (tmp_path / "full", tmp_path / "stored")]
    assert size[1] < size[0]
    b = coll.batch(np.arange(len(coll)))
    with torch.no_grad():
        torch.testing.assert_close(stored.model.member(b), full.model.member(b), rtol=5e-3, atol=5e-3)


def test_a_count_checkpoint_is_gl_invariant_and_sees_a_real_change(counted, tmp_path):
    from lol.checkpoint import load_checkpoint

    coll, grid, _ = counted
    ck = load_checkpoint(E.count_checkpoint(_folders(grid, ["dense", "glnet"]), tmp_path / "c", coll, half=False))
    model = ck.model.double()
    b = coll.batch(np.arange(len(coll)), dtype=torch.float64)
    g = random_gl_like(b, seed=3, cond=4.0)              # random non-orthogonal R per module and LoRA
    with torch.no_grad():
        base, moved, one_sided = model(b), model(gl_act(b, g)), model(one_sided_act(b, g))
        logits, logits_sided = model.member(b), model.member(one_sided_act(b, g))
    torch.testing.assert_close(moved, base, rtol=0, atol=0)            # a count: exactly the same
    assert (logits_sided - logits).abs().max() > 1e-3                  # U ↦ U R alone changes ΔW: the member sees it
    assert (one_sided != base).any()                                   # and some LoRA's count changes with it


def test_a_count_checkpoint_refuses_what_it_cannot_count(counted, tmp_path):
    from lol import experiments as X
    from lol.models import Count
    from lol.synth import tiny_spec
    from lol.train import TrainConfig

    coll, grid, d = counted
    with pytest.raises(LoLError, match=r"label 'sv_energy' is not, on every LoRA, the number of .*labels that are 1"):
        E.count_checkpoint(_folders(grid, ["glnet"]), tmp_path / "a", coll, label="sv_energy")
    with pytest.raises(LoLError, match=r"member kind 'mlp' is not GL\(r\)-invariant"):
        E.count_checkpoint(_folders(grid, ["mlp"]), tmp_path / "a", coll)
    spectrum = X.run_grid({"synth": coll}, [X.TaskRef("synth", "spectrum")], models=("svals",), seeds=(0,),
                          config=TrainConfig(epochs=2, patience=2, progress=False, width=16), runs_dir=d / "runs",
                          log=None)
    with pytest.raises(LoLError, match=r"predicts labels that are not yes/no \(\['sv_energy'\]\)"):
        E.count_checkpoint([spectrum.models[("synth", "spectrum", "svals", 0)]], tmp_path / "a", coll)
    moved = tmp_path / "svals_moved"                      # a member whose split differs by one LoRA
    shutil.copytree(_folders(grid, ["svals"])[0], moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["split"]["test"].append(cfg["split"]["train"].pop())
    (moved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoLError, match="svals_moved was trained on another split"):
        E.count_checkpoint(_folders(grid, ["glnet"]) + [moved], tmp_path / "a", coll)
    assert not (tmp_path / "a").exists()
    with pytest.raises(LoLError, match="threshold"):
        Count(tiny_spec(), 1, {"kind": "svals", "hparams": {}}, labels=2, mean=1.0, std=1.0, threshold=1.0)
    with pytest.raises(LoLError, match="not fitted"):
        Count(tiny_spec(), 1, {"kind": "svals", "hparams": {}}, labels=2, mean=1.0, std=1.0).fit(None)


def test_ship_count_chooses_members_on_validation_within_a_budget_and_only_beats_what_ships(counted, tmp_path):
    from lol.catalog import model_name
    from lol.checkpoint import load_checkpoint

    coll, grid, _ = counted
    p = grid.predictions
    kinds = ["svals", "dense", "glnet"]
    classes = _classes(coll)

    def score(members):
        return E.count_score(E.average(p, members), classes)

    rec = E.ship_count(p, kinds, grid.models, coll, tmp_path / "s", "n_flags")
    members = rec["members"].split(" + ")
    val = score(members)
    assert rec["val_mean"] == pytest.approx(val.mean()) and rec["seed"] == int(val.idxmax())
    assert rec["val_mean"] >= max(score([k]).mean() for k in kinds)     # greedy starts from the best single kind
    test = E.count_scores(E.count_present(E.average(p[p.split == "test"], members)), classes)   # the paper's metric
    assert rec["test_accuracy"] == pytest.approx(test.accuracy.mean())
    assert rec["test_accuracy_std"] == pytest.approx(test.accuracy.std())
    assert rec["test_within_one"] == pytest.approx(test.within_one.mean())
    assert rec["test_within_one"] >= rec["test_accuracy"]
    assert rec["shipped"] and rec["task"] == "size" and rec["beat"] is None
    ck = load_checkpoint(tmp_path / "s")
    assert ck.kind == "count" and ck.config["selection"]["members"] == rec["members"]
    assert {m["seed"] for m in ck.config["counted"]["members"]} == {rec["seed"]}
    assert model_name(ck.config).startswith("count of flags by ")
    # a budget that only the cheapest kind fits: that kind alone (a repeat costs nothing more, so it may recur)
    cost = {"svals": 1.0, "dense": 5.0, "glnet": 5.0}
    rec = E.ship_count(p, kinds, grid.models, coll, tmp_path / "b", "n_flags", cost=cost, budget=2.0)
    assert set(rec["members"].split(" + ")) == {"svals"} and rec["budget"] == 2.0
    rec = E.ship_count(p, kinds, grid.models, coll, tmp_path / "u", "n_flags", beat=1.01)
    assert not rec["shipped"] and rec["beat"] == 1.01 and rec["val_mean"] <= 1.01
    assert not (tmp_path / "u").exists()                  # not better on validation than what ships: nothing written
    with pytest.raises(LoLError, match=r"the cost of every candidate; none for \['glnet'\]"):
        E.select_members(p, kinds, score=lambda a: 0.0, cost={"svals": 1, "dense": 1}, budget=3)


def test_select_members_keeps_distinct_members_within_the_budget():
    rng = np.random.default_rng(2)
    n = 600
    y = rng.normal(size=n)
    noise = {m: rng.normal(size=n) for m in "abc"}
    split = np.array(["train", "val", "test"])[np.arange(n) % 3]
    p = pd.concat([pd.DataFrame({"collection": "c", "task": "t", "model": m, "seed": 0, "id": np.arange(n),
                                 "split": split, "label": "y", "y": y, "pred": y + s * noise[m]})
                   for m, s in (("a", 0.5), ("b", 0.6), ("c", 0.6))], ignore_index=True)
    free = E.select_members(p, ["a", "b", "c"])
    assert set(free) == {"a", "b", "c"}                   # independent errors: all three help
    tight = E.select_members(p, ["a", "b", "c"], cost={"a": 2, "b": 1, "c": 1}, budget=3)
    assert sum({"a": 2, "b": 1, "c": 1}[k] for k in set(tight)) <= 3 and len(set(tight)) == 2
    assert E.select_members(p, ["a", "b", "c"], cost={"a": 9, "b": 1, "c": 9}, budget=1) == ["b"]


def test_model_name_reads_a_count_checkpoint_config():
    from lol.catalog import model_name

    cfg = {"kind": "count", "counted": {"task": "membership", "kind": "ensemble",
                                        "members": [{"kind": "colspace", "weight": 2}, {"kind": "svals", "weight": 1}]}}
    assert model_name(cfg) == "count of membership by ensemble of colspace×2 + svals"
    assert model_name({"kind": "count", "counted": {"task": "membership", "kind": "colspace"}}) == \
        "count of membership by colspace"
    json.dumps(cfg)
