import numpy as np
import pandas as pd
import pytest
import torch

from helpers_models import synthetic_task
from lol.checkpoint import load_checkpoint
from lol.train import TrainConfig, train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return synthetic_task(600, rank=4, seed=0)


def test_invariant_models_learn_what_the_flatten_mlp_cannot(task):
    """Real learning on a synthetic GL-invariant task (labels depend on ΔW only, factors GL-scrambled)."""
    batch, labels = task
    cfg = TrainConfig(epochs=60, width=64, progress=False, patience=20)
    r2 = {}
    for kind, model in [("glnet", {"channels": 8, "depth": 1}), ("canon_mlp", {}),
                        ("canon_transformer", {"d_model": 16, "heads": 2, "depth": 1}), ("mlp", {})]:
        res = train(batch, labels, kind, cfg, model=model)
        r2[kind] = {k: v["r2"] for k, v in res.metrics["test"].items()}
    print(r2)
    for kind, thr in [("glnet", 0.85), ("canon_mlp", 0.7), ("canon_transformer", 0.7)]:
        assert min(r2[kind].values()) > thr, (kind, r2[kind])
    assert max(r2["mlp"].values()) < 0.3, r2["mlp"]
    assert min(r2["glnet"].values()) - max(r2["mlp"].values()) > 0.5


def test_training_is_deterministic_and_normalizes_with_train_statistics(task):
    batch, labels = task
    sub = batch.select(range(120))
    lab = {k: v[:120] for k, v in labels.items()}
    a = train(sub, lab, "glnet", epochs=4, progress=False, model={"channels": 4})
    b = train(sub, lab, "glnet", epochs=4, progress=False, model={"channels": 4})
    assert a.history == b.history
    pd.testing.assert_frame_equal(a.predictions, b.predictions)
    tr = a.split == "train"
    t = a.targets.targets[0]
    assert t.mean == pytest.approx(float(lab["energy"][tr].mean()), rel=1e-5)
    assert t.mean != pytest.approx(float(lab["energy"].mean()), rel=1e-6)
    assert set(a.metrics) == {"train", "val", "test"} and set(a.metrics["test"]["probe"]) == {
        "r2", "spearman", "kendall", "mae", "mse_norm"}
    # mse_norm is the test MSE of the label z-scored with the training split's statistics: the same number that
    # lol.paper computes from the predictions (one definition of the paper's Table 2 metric)
    from lol.paper import mse_norm_rows
    preds = a.predictions.melt(id_vars=["split"], value_vars=["probe"], var_name="label", value_name="pred")
    preds = preds.assign(y=lab["probe"], collection="c", task="t", model="glnet", seed=0)
    runs = pd.DataFrame([{"collection": "c", "task": "t", "label": "probe", "label_kind": "regression"}])
    rows = mse_norm_rows(preds, runs).set_index("split")["value"]
    for split in ("train", "val", "test"):
        assert a.metrics[split]["probe"]["mse_norm"] == pytest.approx(rows[split], rel=1e-5)


def test_early_stopping_keeps_the_best_epoch(task):
    batch, labels = task
    res = train(batch.select(range(150)), {k: v[:150] for k, v in labels.items()}, "mlp", epochs=200,
                patience=5, progress=False, lr=3e-3)
    assert len(res.history) < 200
    assert len(res.history) == res.best_epoch + 5
    best = min(h["val_loss"] for h in res.history)
    assert res.history[res.best_epoch - 1]["val_loss"] == best


def test_binary_and_category_labels_with_groups(task, tmp_path):
    batch, labels = task
    n = 300
    table = pd.DataFrame({"id": [f"l{i}" for i in range(n)], "group": np.arange(n) // 3,
                          "probe_positive": (labels["probe"][:n] > np.median(labels["probe"][:n])).astype(int),
                          "energy_bin": pd.qcut(labels["energy"][:n], 3, labels=["low", "mid", "high"]).astype(str)})
    res = train(batch.select(range(n)), table[["probe_positive", "energy_bin"]], "svals", table=table, epochs=40,
                progress=False, kinds={"energy_bin": "category"})
    kinds = [t.kind for t in res.targets.targets]
    assert kinds == ["binary", "category"] and res.model.n_outputs == 1 + 3
    m = res.metrics["test"]
    assert set(m["probe_positive"]) == {"accuracy", "balanced_accuracy", "auc", "tpr_at_1pct_fpr",
                                        "tpr_at_0.1pct_fpr", "bce"}
    assert m["probe_positive"]["auc"] > 0.8, m
    assert m["energy_bin"]["accuracy"] > 0.6, m
    # grouped split: each group of three LoRAs sits in one split
    assert (pd.Series(res.split).groupby(table["group"]).nunique() == 1).all()
    assert set(res.predictions["energy_bin"]) <= {"low", "mid", "high"}
    # checkpoint round trip: same predictions on the device that made them, no pickle, featurizer state restored
    ck = load_checkpoint(res.save(tmp_path / "ck"), device=res.device)
    again = ck.predict_batch(batch.select(range(n)))
    assert np.allclose(again["probe_positive"], res.predictions["probe_positive"], atol=1e-6)
    assert (again["energy_bin"] == res.predictions["energy_bin"].to_numpy()).all()


def test_count_labels_get_an_ordinal_head(task, tmp_path):
    """A category label of integers (a count, e.g. how many classes a LoRA saw) is learned as one standardized value
    and decoded to the nearest of its classes; ``ordered=False`` gives the softmax head back; the checkpoint decodes
    the same."""
    batch, labels = task
    n = 300
    level = pd.qcut(labels["energy"][:n], 5, labels=False).astype(int) + 1          # 1..5, ordered by energy
    table = pd.DataFrame({"id": [f"l{i}" for i in range(n)], "group": np.arange(n) // 3, "level": level})
    res = train(batch.select(range(n)), table[["level"]], "svals", table=table, epochs=60, progress=False,
                kinds={"level": "category"})
    t = res.targets.targets[0]
    assert t.ordered and t.classes == [1, 2, 3, 4, 5] and res.model.n_outputs == 1
    assert t.mean == pytest.approx(float(level[res.split == "train"].mean()))         # training split only
    m = res.metrics["test"]["level"]
    assert set(m) == {"accuracy", "balanced_accuracy", "mae"}
    assert m["mae"] < 0.8 and m["accuracy"] > 0.4, m            # chance: accuracy 0.2, MAE 1.6
    assert set(res.predictions["level"]) <= {1, 2, 3, 4, 5}
    ck = load_checkpoint(res.save(tmp_path / "ck"), device=res.device)
    assert ck.targets.targets[0].ordered
    assert (ck.predict_batch(batch.select(range(n)))["level"] == res.predictions["level"].to_numpy()).all()
    soft = train(batch.select(range(n)), table[["level"]], "svals", table=table, epochs=2, progress=False,
                 kinds={"level": "category"}, ordered={"level": False})
    assert not soft.targets.targets[0].ordered and soft.model.n_outputs == 5


def test_ordinal_targets_encode_decode_and_refuse_unordered_classes():
    import torch

    from lol.errors import LoLError
    from lol.targets import TargetSet

    ts = TargetSet.fit({"n": [4, 1, 2, 2]}, {"n": "category"})
    t = ts.targets[0]
    assert t.ordered and t.classes == [1, 2, 4] and ts.n_outputs == 1
    assert (t.mean, t.std) == pytest.approx((2.25, float(np.std([4, 1, 2, 2]))))
    y = ts.encode({"n": [1, 2, 4]})
    torch.testing.assert_close(y[:, 0], (torch.tensor([1.0, 2.0, 4.0]) - t.mean) / t.std)
    assert float(ts.loss(y, y)) == 0.0 and float(ts.loss(y + 1, y)) == pytest.approx(1.0)
    # decoded to the nearest class, in the label's units (3.2 is nearer 4 than 2; far values clip to the ends)
    values = torch.tensor([[0.0], [1.4], [1.6], [3.2], [9.0]])
    assert list(ts.decode((values - t.mean) / t.std)["n"]) == [1, 1, 2, 4, 4]
    # a checkpoint written before ordered heads existed decodes as the softmax it was trained as
    old = [{k: v for k, v in d.items() if k != "ordered"} for d in ts.to_json()]
    assert not TargetSet.from_json(old).targets[0].ordered and TargetSet.from_json(old).n_outputs == 3
    assert TargetSet.from_json(ts.to_json()).targets[0].ordered
    # strings are not ordered by default; declaring them ordered names the label
    assert not TargetSet.fit({"c": ["a", "b"]}, {"c": "category"}).targets[0].ordered
    with pytest.raises(LoLError, match="'c' is declared ordered"):
        TargetSet.fit({"c": ["a", "b"]}, {"c": "category"}, ordered={"c": True})


def test_gl_augmentation_helps_the_flatten_mlp(task):
    """Random GL(r) augmentation teaches the raw-factor MLP some of the symmetry: better test R² than without."""
    batch, labels = task
    sub, lab = batch.select(range(300)), {k: v[:300] for k, v in labels.items()}
    r2 = {}
    for kind in ("mlp", "mlp_aug"):
        res = train(sub, lab, kind, epochs=80, patience=80, progress=False)
        r2[kind] = {k: v["r2"] for k, v in res.metrics["test"].items()}
    assert all(r2["mlp_aug"][k] > r2["mlp"][k] + 0.2 for k in lab), r2


def test_bad_inputs_fail_clearly(task):
    batch, labels = task
    with pytest.raises(Exception, match="label lengths"):
        train(batch, {"energy": labels["energy"][:10]}, "glnet", progress=False)
    with pytest.raises(TypeError, match="unknown option 'epoch'"):
        train(batch, labels, "glnet", epoch=3)
    with pytest.raises(Exception, match="unknown model kind"):
        train(batch.select(range(20)), {k: v[:20] for k, v in labels.items()}, "resnet", progress=False)


def _mixed_rank_collection(n_per_rank=8):
    """LoRAs of ranks 4, 8, 16 in one padded batch, with a table: rank 4 in train, 8 in val, 16 in test."""
    from helpers_models import SPEC, random_lora
    from lol.batch import LoRABatch

    ranks = [r for r in (4, 8, 16) for _ in range(n_per_rank)]
    loras = [random_lora(SPEC, r, seed=i, dtype=torch.float32) for i, r in enumerate(ranks)]
    batch = LoRABatch.from_loras(loras, SPEC)
    y = np.array([float(sum(torch.linalg.matrix_norm(m.U @ m.V.T) for m in lo)) for lo in loras])
    table = pd.DataFrame({"id": [f"r{r}-{i}" for i, r in enumerate(ranks)], "y": y,
                          "split": [{4: "train", 8: "val", 16: "test"}[r] for r in ranks]})
    return batch, table


@pytest.mark.parametrize("kind", ["svals", "canon_mlp", "canon_transformer", "oalign", "glnet", "dense", "mlp"])
def test_training_on_rank_4_evaluates_on_ranks_8_and_16(kind):
    """The zoo's mixed-rank case: fitted on the rank-4 LoRAs, every model but the flatten MLP reads the rank-8 (val)
    and rank-16 (test) LoRAs; the flatten MLP refuses with the ranks named."""
    batch, table = _mixed_rank_collection()
    hp = {"canon_transformer": {"d_model": 16, "heads": 2, "depth": 1}, "glnet": {"channels": 4}}.get(kind, {})
    run = lambda: train(batch, ["y"], kind, table=table, epochs=2, width=8, progress=False, model=hp)  # noqa: E731
    if kind == "mlp":
        with pytest.raises(Exception, match=r"one rank \(4\); this batch has ranks \[4, 8, 16\]"):
            run()
        return
    res = run()
    if hasattr(res.model, "features") and kind != "dense":
        assert res.model.features.rank == 4          # k fixed from the training LoRAs
    assert np.isfinite(res.predictions["y"]).all()
    assert set(res.metrics) == {"train", "val", "test"} and np.isfinite(res.metrics["test"]["y"]["mae"])


def test_checkpoint_records_the_exact_split_by_id(task, tmp_path):
    batch, labels = task
    n = 60
    table = pd.DataFrame({"id": [f"l{i}" for i in range(n)], "group": np.arange(n) // 4,
                          "energy": labels["energy"][:n]})
    res = train(batch.select(range(n)), ["energy"], "svals", table=table, epochs=2, progress=False, seed=3)
    res.fingerprint = "abc123"
    ck = load_checkpoint(res.save(tmp_path / "ck"))
    rec = ck.split
    assert rec["by"] == "id" and rec["fingerprint"] == "abc123"
    assert rec["how"] == "seeded grouped split with seed 3 and fractions 0.7/0.15/0.15"
    assert sorted(rec["train"] + rec["val"] + rec["test"]) == sorted(table["id"])
    # consumers read it back without re-deriving it, ids in any order; an id the model never saw gets ""
    ids = ["nope", *table["id"][::-1]]
    assert list(ck.split_of(ids)) == ["", *res.split[::-1]]
    # without ids (a bare LoRABatch) rows are recorded by position, and split_of declines
    res2 = train(batch.select(range(n)), {"energy": labels["energy"][:n]}, "svals", epochs=1, progress=False)
    ck2 = load_checkpoint(res2.save(tmp_path / "ck2"))
    assert ck2.split["by"] == "position" and ck2.split["how"].startswith("seeded split with seed 0")
    assert sorted(ck2.split["train"] + ck2.split["val"] + ck2.split["test"]) == list(range(n))
    assert ck2.split_of(["l0"]) is None


def test_a_collections_schema_says_which_categories_are_ordered(tmp_path):
    """A collection's label schema carries ``"ordered"``: the trainer reads it beside the kind (a count declared
    unordered gets the softmax head), and the ``ordered=`` argument still overrides the schema."""
    from helpers_models import SPEC, random_lora
    from lol.collection import open_collection, write_collection

    n = 24
    loras = [random_lora(SPEC, 4, seed=i, dtype=torch.float32) for i in range(n)]
    table = pd.DataFrame({"id": [f"l{i}" for i in range(n)], "group": np.arange(n) // 2,
                          "level": np.arange(n) % 3 + 1})
    schema = {"level": {"kind": "category", "ordered": False}}
    col = open_collection(write_collection(tmp_path / "c", loras, table, labels=schema).path)
    assert col.labels["level"]["ordered"] is False
    soft = train(col, ["level"], "svals", epochs=1, width=8, progress=False)
    assert not soft.targets.targets[0].ordered and soft.model.n_outputs == 3
    reg = train(col, ["level"], "svals", epochs=1, width=8, progress=False, ordered={"level": True})
    assert reg.targets.targets[0].ordered and reg.model.n_outputs == 1
    # without the flag, the integer category is ordered by default
    plain = open_collection(write_collection(tmp_path / "d", loras, table,
                                             labels={"level": {"kind": "category"}}).path)
    assert train(plain, ["level"], "svals", epochs=1, width=8, progress=False).targets.targets[0].ordered
