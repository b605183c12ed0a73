"""Evaluation metrics, each under its true name (the reference code logs a Spearman ρ as "R^2"; we do not).

Regression: ``r2`` (coefficient of determination, 1 − SS_res/SS_tot), ``spearman`` (ρ), ``kendall`` (τ-b), ``mae``,
and where the training split's std of the label is known, ``mse_norm`` (the MSE of the label z-scored with the training
split's statistics: the paper's Table 2 "test MSE on the normalized target").
Binary labels (one score per LoRA, higher = positive): ``accuracy`` and ``balanced_accuracy`` at threshold 0.5 on a
probability, ``auc`` (ROC AUC), ``tpr_at_1pct_fpr`` and ``tpr_at_0.1pct_fpr`` (the largest TPR on the ROC curve at
FPR ≤ 1% / 0.1%, as in Carlini et al. 2112.03570; with fewer than 100 / 1000 negatives these are TPR at FPR = 0),
``bce`` (the binary cross-entropy of the probabilities, natural log: the paper's Figure 4 "BCE test loss"), and
`roc_curve` points. Categories: ``accuracy`` and ``balanced_accuracy``. Undefined values (one class only,
constant input) are NaN, never a made-up number.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["r2", "spearman", "kendall", "mae", "mse_norm", "accuracy", "balanced_accuracy", "auc", "bce", "roc_curve", "tpr_at_fpr",
           "regression_metrics", "binary_metrics", "category_metrics", "membership_rows", "membership_curves", "confusion",
           "METRIC_NAMES"]

# the keys of the ``*_metrics`` dicts (as checkpoints and result tables record them) -> their names on screen
METRIC_NAMES = {"r2": "R²", "spearman": "Spearman ρ", "kendall": "Kendall τ", "mae": "MAE", "auc": "AUC",
                "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "tpr_at_1pct_fpr": "TPR @ 1% FPR",
                "tpr_at_0.1pct_fpr": "TPR @ 0.1% FPR", "bce": "BCE loss", "mse_norm": "normalized MSE"}


def _pair(y, p):
    y, p = np.asarray(y, dtype=float).ravel(), np.asarray(p, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"metrics: {y.shape[0]} targets but {p.shape[0]} predictions")
    ok = np.isfinite(y) & np.isfinite(p)
    return y[ok], p[ok]


def r2(y, p) -> float:
    """Coefficient of determination 1 − Σ(y − p)² / Σ(y − ȳ)² (can be negative)."""
    y, p = _pair(y, p)
    ss = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    return 1.0 - float(((y - p) ** 2).sum()) / ss if ss > 0 else math.nan


def spearman(y, p) -> float:
    from scipy.stats import spearmanr
    y, p = _pair(y, p)
    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(p) == 0:
        return math.nan
    return float(spearmanr(y, p).statistic)


def kendall(y, p) -> float:
    from scipy.stats import kendalltau
    y, p = _pair(y, p)
    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(p) == 0:
        return math.nan
    return float(kendalltau(y, p).statistic)


def mae(y, p) -> float:
    y, p = _pair(y, p)
    return float(np.abs(y - p).mean()) if len(y) else math.nan


def mse_norm(y, p, scale: float) -> float:
    """Mean of ((y − p) / scale)²: the MSE of a label z-scored with the mean and std ``scale`` of the training split
    (the mean cancels); ``scale`` ≤ 0 counts as 1, as the trainer's standardization does for a constant label."""
    y, p = _pair(y, p)
    s = float(scale) if scale > 0 else 1.0
    return float((((y - p) / s) ** 2).mean()) if len(y) else math.nan


def accuracy(y, pred) -> float:
    y, pred = np.asarray(y).ravel(), np.asarray(pred).ravel()
    return float((y == pred).mean()) if len(y) else math.nan


def balanced_accuracy(y, pred) -> float:
    """Mean over the classes present in ``y`` of the recall of that class."""
    y, pred = np.asarray(y).ravel(), np.asarray(pred).ravel()
    classes = np.unique(y)
    if len(classes) == 0:
        return math.nan
    return float(np.mean([(pred[y == c] == c).mean() for c in classes]))


def roc_curve(y, score):
    """(fpr, tpr, thresholds) of the ROC curve of binary ``y`` (0/1) against ``score``."""
    from sklearn.metrics import roc_curve as _roc
    y, s = _pair(y, score)
    if len(np.unique(y)) < 2:
        raise ValueError("roc_curve: needs both positive and negative examples")
    return _roc(y.astype(int), s, drop_intermediate=False)


def auc(y, score) -> float:
    from sklearn.metrics import roc_auc_score
    y, s = _pair(y, score)
    return float(roc_auc_score(y.astype(int), s)) if len(np.unique(y)) == 2 else math.nan


def tpr_at_fpr(y, score, max_fpr: float) -> float:
    """The largest true-positive rate on the ROC curve at false-positive rate ≤ ``max_fpr``."""
    y_, _ = _pair(y, score)
    if len(np.unique(y_)) < 2:
        return math.nan
    fpr, tpr, _ = roc_curve(y, score)
    return float(tpr[fpr <= max_fpr].max())


def regression_metrics(y, p, scale: float | None = None) -> dict[str, float]:
    """R², Spearman ρ, Kendall τ, MAE; with ``scale`` (the training split's std of the label) also ``mse_norm``."""
    out = {"r2": r2(y, p), "spearman": spearman(y, p), "kendall": kendall(y, p), "mae": mae(y, p)}
    if scale is not None:
        out["mse_norm"] = mse_norm(y, p, scale)
    return out


def bce(y, prob, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy −[y log p + (1 − y) log(1 − p)] of 0/1 labels ``y`` and probabilities ``prob``
    (clipped to [eps, 1 − eps], so one confident mistake costs about 16, not infinity)."""
    y, p = _pair(y, prob)
    if not len(y):
        return math.nan
    p = np.clip(p, eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


def binary_metrics(y, prob) -> dict[str, float]:
    """``prob``: predicted probability of the positive class."""
    y_, p_ = _pair(y, prob)
    pred = (p_ >= 0.5).astype(float)
    return {"accuracy": accuracy(y_, pred), "balanced_accuracy": balanced_accuracy(y_, pred), "auc": auc(y_, p_),
            "tpr_at_1pct_fpr": tpr_at_fpr(y_, p_, 0.01), "tpr_at_0.1pct_fpr": tpr_at_fpr(y_, p_, 0.001),
            "bce": bce(y_, p_)}


def category_metrics(y, pred) -> dict[str, float]:
    return {"accuracy": accuracy(y, pred), "balanced_accuracy": balanced_accuracy(y, pred)}


def membership_rows(truth: dict, prob: dict) -> list[dict]:
    """Per membership label (``{label: 0/1 truth}``, ``{label: probability}``) and for all labels pooled: AUC, TPR at
    1% and 0.1% FPR, positives and negatives; the pooled row first."""
    def row(name, y, p):
        y, p = np.asarray(y, float), np.asarray(p, float)
        return {"label": name, "AUC": auc(y, p), "TPR @ 1% FPR": tpr_at_fpr(y, p, 0.01),
                "TPR @ 0.1% FPR": tpr_at_fpr(y, p, 0.001), "positives": int(np.nansum(y)),
                "negatives": int(np.sum(y == 0))}

    pooled = row("all labels pooled", np.concatenate([truth[k] for k in truth]),
                 np.concatenate([prob[k] for k in truth]))
    return [pooled] + [row(k, truth[k], prob[k]) for k in truth]


def confusion(y, prob, threshold: float = 0.5) -> dict[str, float]:
    """True/false positives/negatives of ``prob >= threshold`` against the 0/1 truth ``y`` (counts), and the
    resulting true- and false-positive rates ``tpr`` and ``fpr`` (0 without positives / negatives)."""
    y, pred = np.asarray(y, float), np.asarray(prob, float) >= threshold
    k = {"tp": int(np.sum(pred & (y == 1))), "fp": int(np.sum(pred & (y == 0))),
         "tn": int(np.sum(~pred & (y == 0))), "fn": int(np.sum(~pred & (y == 1)))}
    return {**k, "tpr": k["tp"] / max(k["tp"] + k["fn"], 1), "fpr": k["fp"] / max(k["fp"] + k["tn"], 1)}


def membership_curves(truth: dict, prob: dict) -> tuple[dict[str, tuple], float]:
    """ROC curves ``{name: (fpr, tpr, auc)}`` of membership labels (as `membership_rows` takes them): all labels
    pooled first (ValueError when the pooled truth has one class only), then every label with both classes; and
    the smallest false-positive rate worth showing on a log axis (half of one negative, at least 1e-4)."""
    y, s = np.concatenate([truth[k] for k in truth]), np.concatenate([prob[k] for k in truth])
    curves = {"all labels pooled": (*roc_curve(y, s)[:2], auc(y, s))}
    for k in truth:
        if len(np.unique(_pair(truth[k], prob[k])[0])) == 2:
            curves[k] = (*roc_curve(truth[k], prob[k])[:2], auc(truth[k], prob[k]))
    return curves, max(1e-4, 0.5 / max(int(np.sum(y == 0)), 1))
