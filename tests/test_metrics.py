import math

import numpy as np
import pytest

from lol import metrics as M
from lol.errors import CollectionError
from lol.splits import check_grouped, make_splits, split_indices


def test_regression_metrics_by_hand():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    p = np.array([1.5, 2.0, 2.5, 5.0])
    assert M.r2(y, p) == pytest.approx(1 - (0.25 + 0 + 0.25 + 1) / 5.0)
    assert M.mae(y, p) == pytest.approx(0.5)
    assert M.spearman(y, p) == pytest.approx(1.0)
    assert M.kendall(y, [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Spearman is not R²: a monotone but nonlinear prediction has ρ = 1 and R² < 1
    assert M.spearman(y, y ** 3) == pytest.approx(1.0) and M.r2(y, y ** 3) < 0
    assert math.isnan(M.r2([1, 1], [1, 2])) and math.isnan(M.spearman([1, 2], [3, 3]))
    # the paper's Table 2 metric: the MSE of the target z-scored with the training split's std (here 2)
    assert M.mse_norm(y, p, 2.0) == pytest.approx((0.25 + 0 + 0.25 + 1) / 4 / 4)
    assert M.mse_norm(y, p, 0.0) == pytest.approx(M.mse_norm(y, p, 1.0))   # a constant label's std counts as 1
    assert "mse_norm" not in M.regression_metrics(y, p)                      # unknown without the training std
    assert M.regression_metrics(y, p, scale=2.0)["mse_norm"] == pytest.approx(M.mse_norm(y, p, 2.0))


def test_binary_metrics_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    m = M.binary_metrics(y, s)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    assert m["auc"] == pytest.approx(15 / 16)  # one (neg, pos) pair out of 16 is misordered
    assert m["tpr_at_1pct_fpr"] == pytest.approx(0.75)  # at FPR 0 the three top positives are found
    fpr, tpr, _ = M.roc_curve(y, s)
    assert fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1 and (np.diff(fpr) >= 0).all()
    assert M.balanced_accuracy([0, 0, 0, 1], [0, 0, 0, 0]) == pytest.approx(0.5)
    assert math.isnan(M.auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_confusion_and_membership_curves():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    k = M.confusion(y, s, 0.5)
    assert (k["tp"], k["fp"], k["tn"], k["fn"]) == (3, 1, 3, 1) and k["tpr"] == 0.75 and k["fpr"] == 0.25
    assert M.confusion([0, 0], [0.1, 0.9])["tpr"] == 0  # no positives: a rate of 0, not a division by zero
    truth = {"a": y.astype(float), "b": np.ones(8), "c": np.array([0, 1, 0, 1, 0, 1, 0, np.nan])}
    prob = {"a": s, "b": s, "c": s}
    curves, min_fpr = M.membership_curves(truth, prob)
    assert list(curves) == ["all labels pooled", "a", "c"]  # b has one class only: no curve
    fpr, tpr, auc = curves["a"]
    assert auc == pytest.approx(15 / 16) and fpr[-1] == 1 and tpr[-1] == 1
    assert curves["all labels pooled"][2] == pytest.approx(M.membership_rows(truth, prob)[0]["AUC"])
    assert min_fpr == pytest.approx(0.5 / 8)  # 4 + 4 negatives (the NaN is neither)
    with pytest.raises(ValueError, match="both positive and negative"):
        M.membership_curves({"b": np.ones(3)}, {"b": np.ones(3)})


def test_category_metrics():
    m = M.category_metrics(["a", "a", "b", "c"], ["a", "b", "b", "c"])
    assert m == {"accuracy": pytest.approx(0.75), "balanced_accuracy": pytest.approx((0.5 + 1 + 1) / 3)}


def test_splits_are_seeded_grouped_and_sized():
    groups = np.repeat(np.arange(40), 5)  # 40 identities × 5 LoRAs
    a = make_splits(200, (0.7, 0.15, 0.15), seed=3, groups=groups)
    assert (a == make_splits(200, (0.7, 0.15, 0.15), seed=3, groups=groups)).all()
    assert (a != make_splits(200, (0.7, 0.15, 0.15), seed=4, groups=groups)).any()
    check_grouped(a, groups)
    idx = split_indices(a)
    assert abs(len(idx["train"]) - 140) <= 5 and abs(len(idx["test"]) - 30) <= 5
    bad = a.copy()
    bad[0] = "test" if a[0] != "test" else "train"
    with pytest.raises(CollectionError, match="group '0' appears in both"):
        check_grouped(bad, groups)
    tiny = make_splits(3, seed=0)
    assert sorted(tiny) == ["test", "train", "val"]
    with pytest.raises(CollectionError, match="unknown value"):
        split_indices(["train", "dev"])


def test_bce_is_the_binary_cross_entropy_of_the_probabilities():
    import torch

    y, p = np.array([1.0, 0.0, 1.0, 0.0, np.nan]), np.array([0.9, 0.2, 0.4, 0.5, 0.3])
    want = float(torch.nn.functional.binary_cross_entropy(torch.tensor(p[:4]), torch.tensor(y[:4])))
    assert M.bce(y, p) == pytest.approx(want)                          # the NaN label is left out
    assert M.bce([1, 0], [0.5, 0.5]) == pytest.approx(math.log(2))     # a coin flip
    assert M.bce([1, 0], [1.0, 0.0]) < 1e-6 and math.isfinite(M.bce([1], [0.0]))   # clipped, not infinite
    assert M.binary_metrics(y, p)["bce"] == pytest.approx(want)
