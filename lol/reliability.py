"""How reliable is a label? Test–retest for measured labels, ambiguity for voted ones.

A regression label of the zoo is a *measurement* (a CLIP score over generated images, an accuracy over questions):
``y = t + e`` where ``t`` is what the LoRA's weights determine and ``e`` the measurement's noise (which seeds, which
questions). Measured twice, independently and with the same protocol (``y₁``, ``y₂``), the test–retest correlation
``r = corr(y₁, y₂) = var(t) / var(y)`` is the label's reliability, and it bounds what any model of the weights can
reach: the best predictor of ``y₁`` from the weights is ``t``, whose R² is ``var(t)/var(y) = r``. So ``r`` is the
*ceiling on test R²*. The per-measurement noise is ``std(y₁ − y₂)/√2``.

How far is a label from a goal reliability? Averaging ``k`` independent measurements divides the noise variance by
``k``, so the reliability becomes ``k r / (1 + (k − 1) r)`` (the Spearman–Brown formula, `spearman_brown`), and
``measurements_needed(r, goal)`` is the ``k`` that reaches the goal: how many times today's protocol (images, prompts,
questions) a label would have to be measured. ``r`` comes with a bootstrap 95 % interval over the LoRAs measured twice.

A binary label decided by a majority vote (a face attribute over the finetuning images) is ambiguous when the vote
is close: we report the share of LoRAs whose vote share lies within ``margin`` of one half.

Convention in a collection: the second measurement of label ``X`` is the table column named in the label's schema
entry ``"retest"`` (``X_retest`` by the zoo's recipes); the vote share of ``X`` is the column named by ``"vote"``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["RELIABILITY_GOAL", "MIN_RETEST", "retest_reliability", "repeated_reliability", "spearman_brown", "measurements_needed",
           "vote_ambiguity", "label_reliability", "task_ceilings"]

RELIABILITY_GOAL = 0.95   # Zoo v2's goal for every regression label of the default presets
MIN_RETEST = 100          # LoRAs measured again before a reliability is judged against the goal (Zoo v2: ≥ 100)


def retest_reliability(first, second, boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Test–retest figures of two independent measurements of one label over the same LoRAs.

    Returns ``n``, ``r`` (Pearson correlation = reliability = ceiling on R²), ``r_ci95`` (a percentile bootstrap
    interval for r over the pairs: ``boot`` resamples, seeded, so the same data give the same interval), ``spearman``,
    ``label_std`` (of the first measurement), ``noise_std`` (per measurement: std of the difference / √2) and
    ``r2_ceiling`` (= ``r``, clipped at 0). Pairs with a non-finite value are dropped; fewer than 3 pairs give NaNs.
    """
    from .metrics import spearman

    a, b = np.asarray(first, dtype=float).ravel(), np.asarray(second, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"retest_reliability: {a.size} first measurements but {b.size} second ones")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(a.size)
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"n": n, "r": math.nan, "r_ci95": (math.nan, math.nan), "spearman": math.nan,
                "label_std": float(a.std(ddof=1)) if n > 1 else math.nan,
                "noise_std": math.nan, "r2_ceiling": math.nan}
    r = float(np.corrcoef(a, b)[0, 1])
    return {"n": n, "r": r, "r_ci95": _percentiles(_bootstrap_pair_r(np.stack([a, b], 1), boot, seed)), "spearman": spearman(a, b),
            "label_std": float(a.std(ddof=1)),
            "noise_std": float((a - b).std(ddof=1) / math.sqrt(2)), "r2_ceiling": max(0.0, r)}


def spearman_brown(r: float, k: float) -> float:
    """Reliability of the mean of ``k`` independent measurements, each of reliability ``r``: ``k r / (1 + (k − 1) r)``
    (the noise variance shrinks by ``k``, the variance the weights determine does not)."""
    return k * r / (1 + (k - 1) * r)


def measurements_needed(r: float, goal: float) -> float:
    """The ``k`` (≥ 1) with ``spearman_brown(r, k) == goal``: how many independent measurements of today's size a label
    needs, averaged, to reach reliability ``goal``; 1 when ``r`` already reaches it, inf when ``r ≤ 0`` (no signal
    to average up), NaN when ``r`` is unknown."""
    if not 0 < goal < 1:
        raise ValueError(f"measurements_needed: goal must lie in (0, 1), got {goal}")
    if math.isnan(r):
        return math.nan
    if r <= 0:
        return math.inf
    return max(1.0, goal * (1 - r) / (r * (1 - goal)))


def _mean_pair_r(M: np.ndarray) -> np.ndarray:
    """Mean Pearson r over the column pairs of M (..., n, k), per leading index."""
    X = M - M.mean(-2, keepdims=True)
    norm = np.sqrt((X * X).sum(-2))                              # (..., k)
    C = np.einsum("...ni,...nj->...ij", X, X) / (norm[..., :, None] * norm[..., None, :])
    iu = np.triu_indices(M.shape[-1], 1)
    return C[..., iu[0], iu[1]].mean(-1)


def _bootstrap_pair_r(M: np.ndarray, boot: int, seed: int) -> np.ndarray:
    """`_mean_pair_r` of ``boot`` resamples of the rows (LoRAs) of M (n, k), seeded; a resample in which a column is
    constant (r undefined) is dropped. Resamples are drawn a chunk at a time (a few MB)."""
    n, k = M.shape
    rng, rs = np.random.default_rng(seed), []
    step = max(1, 2_000_000 // (n * k))
    for s in range(0, boot, step):
        with np.errstate(invalid="ignore", divide="ignore"):
            R = _mean_pair_r(M[rng.integers(0, n, (min(step, boot - s), n))])
        rs.append(R[np.isfinite(R)])
    return np.concatenate(rs)


def _percentiles(rs: np.ndarray) -> tuple[float, float]:
    """Percentile 95 % interval of bootstrap values (NaNs when none)."""
    if rs.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(rs, [2.5, 97.5])
    return (float(lo), float(hi))


def repeated_reliability(values, boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Reliability of a label measured ``k`` ≥ 2 times, independently and with one protocol, and stored as the mean of
    the ``k``: ``values`` (n LoRAs, k measurements); rows with a non-finite value are dropped.

    Returns ``n``, ``k``, ``r_single`` (the reliability of one measurement: the mean Pearson r over the k(k−1)/2
    pairs of measurements), ``r_mean`` (of their average: `spearman_brown` of ``r_single`` and k — the ceiling on
    test R² of the averaged label), ``r_mean_ci95`` (percentile bootstrap over the LoRAs, seeded), ``label_std`` (of
    the averaged label) and ``noise_std`` (per measurement: the residual std of a two-way layout, LoRA × measurement,
    so a measurement's constant offset — with common noises one seed can shift every LoRA alike — is not counted as
    noise, as it changes no correlation). With k = 2, ``r_single`` and ``noise_std`` are `retest_reliability`'s r
    and noise std."""
    M = np.asarray(values, dtype=float)
    if M.ndim != 2 or M.shape[1] < 2:
        raise ValueError(f"repeated_reliability: expected (LoRAs, ≥ 2 measurements), got shape {M.shape}")
    M = M[np.isfinite(M).all(1)]
    n, k = M.shape
    if n < 3 or (np.ptp(M, 0) == 0).any():
        return {"n": n, "k": k, "r_single": math.nan, "r_mean": math.nan, "r_mean_ci95": (math.nan, math.nan),
                "label_std": math.nan, "noise_std": math.nan}
    r1 = float(_mean_pair_r(M))
    lo, hi = _percentiles(spearman_brown(_bootstrap_pair_r(M, boot, seed), k))
    return {"n": n, "k": k, "r_single": r1, "r_mean": spearman_brown(r1, k), "r_mean_ci95": (float(lo), float(hi)),
            "label_std": float(M.mean(1).std(ddof=1)), "noise_std": _residual_std(M)}


def _residual_std(M: np.ndarray) -> float:
    """Residual std of an (n, k) two-way layout without interaction: ``M_ij − row_i − col_j + grand`` over
    (n − 1)(k − 1) degrees of freedom."""
    R = M - M.mean(1, keepdims=True) - M.mean(0, keepdims=True) + M.mean()
    n, k = M.shape
    return float(np.sqrt((R * R).sum() / ((n - 1) * (k - 1))))


def vote_ambiguity(shares, margin: float = 0.1) -> dict[str, float]:
    """Share of votes within ``margin`` of one half (``ambiguous``) and exactly tied (``ties``)."""
    s = np.asarray(shares, dtype=float).ravel()
    s = s[np.isfinite(s)]
    if s.size == 0:
        return {"n": 0, "ambiguous": math.nan, "ties": math.nan, "margin": margin}
    return {"n": int(s.size), "ambiguous": float(np.mean(np.abs(s - 0.5) <= margin + 1e-12)),
            "ties": float(np.mean(np.isclose(s, 0.5))), "margin": margin}


def label_reliability(table, labels: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Reliability of every label of a collection that carries the evidence for it.

    ``table``: the collection's table (a pandas DataFrame); ``labels``: its label schema. A regression label stored as
    the mean of several measurements (``"measurements"``: their columns, `lol.zoo.measure.apply_measurements`) gets
    `repeated_reliability`, with ``r`` the reliability of the mean; one with a ``"retest"`` column gets
    `retest_reliability` (over the LoRAs measured twice); a binary label with a ``"vote"``
    column gets `vote_ambiguity`; a label with neither is exact by construction when its schema says
    ``"exact": true`` (e.g. "was this source in the finetuning set"). Labels without evidence are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, info in labels.items():
        kind = info.get("kind")
        retest, vote, repeats = info.get("retest"), info.get("vote"), info.get("measurements")
        if kind == "regression" and repeats and all(c in table.columns for c in repeats) and len(repeats) >= 2:
            rel = repeated_reliability(table[list(repeats)].astype(float).to_numpy())
            out[name] = {"kind": kind, "method": "repeated", "measurements": list(repeats), **rel,
                         "r": rel["r_mean"], "r_ci95": rel["r_mean_ci95"],
                         "r2_ceiling": max(0.0, rel["r_mean"]) if math.isfinite(rel["r_mean"]) else math.nan}
        elif kind == "regression" and retest and retest in table.columns and name in table.columns:
            rows = table[[name, retest]].astype(float).dropna()
            out[name] = {"kind": kind, "method": "retest", "retest": retest,
                         **retest_reliability(rows[name], rows[retest])}
        elif kind == "binary" and vote and vote in table.columns:
            out[name] = {"kind": kind, "method": "vote", "vote": vote, **vote_ambiguity(table[vote])}
        elif info.get("exact"):
            out[name] = {"kind": kind, "method": "exact", "n": int(len(table)), "ambiguous": 0.0}
    return out


def task_ceilings(collections: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, float]]:
    """``{(collection, task): reliability figures}`` for every single-label regression task whose label was measured
    twice or more (``collections``: name → `lol.collection.Collection`). ``r2_ceiling`` is what the results notebook draws
    each model's test R² against."""
    out = {}
    for name, coll in collections.items():
        rel = label_reliability(coll.table, coll.labels)
        for task, labels in coll.tasks.items():
            if len(labels) == 1 and labels[0] in rel and rel[labels[0]]["method"] in ("retest", "repeated"):
                out[(name, task)] = rel[labels[0]]
    return out
