"""How reliable is a label? Test–retest for measured labels, ambiguity for voted ones.

A regression label of the zoo is a *measurement* (a CLIP score over generated images, an accuracy over questions):
``y = t + e`` where ``t`` is what the LoRA's weights determine and ``e`` the measurement's noise (which seeds, which
questions). Measured twice, independently and with the same protocol (``y₁``, ``y₂``), the test–retest correlation
``r = corr(y₁, y₂) = var(t) / var(y)`` is the label's reliability, and it bounds what any model of the weights can
reach: the best predictor of ``y₁`` from the weights is ``t``, whose R² is ``var(t)/var(y) = r``. So ``r`` is the
*ceiling on test R²*. The per-measurement noise is ``std(y₁ − y₂)/√2``.

A binary label decided by a majority vote (a face attribute over the finetuning images) is ambiguous when the vote
is close: we report the share of LoRAs whose vote share lies within ``margin`` of one half.

Convention in a collection: the second measurement of label ``X`` is the table column named in the label's schema
entry ``"retest"`` (``X_retest`` by the zoo's recipes); the vote share of ``X`` is the column named by ``"vote"``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["retest_reliability", "vote_ambiguity", "label_reliability", "task_ceilings"]


def retest_reliability(first, second) -> dict[str, float]:
    """Test–retest figures of two independent measurements of one label over the same LoRAs.

    Returns ``n``, ``r`` (Pearson correlation = reliability = ceiling on R²), ``spearman``, ``label_std`` (of the
    first measurement), ``noise_std`` (per measurement: std of the difference / √2) and ``r2_ceiling`` (= ``r``,
    clipped at 0). Pairs with a non-finite value are dropped; fewer than 3 pairs give NaNs.
    """
    from .metrics import spearman

    a, b = np.asarray(first, dtype=float).ravel(), np.asarray(second, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"retest_reliability: {a.size} first measurements but {b.size} second ones")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(a.size)
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return {"n": n, "r": math.nan, "spearman": math.nan, "label_std": float(a.std(ddof=1)) if n > 1 else math.nan,
                "noise_std": math.nan, "r2_ceiling": math.nan}
    r = float(np.corrcoef(a, b)[0, 1])
    return {"n": n, "r": r, "spearman": spearman(a, b), "label_std": float(a.std(ddof=1)),
            "noise_std": float((a - b).std(ddof=1) / math.sqrt(2)), "r2_ceiling": max(0.0, r)}


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

    ``table``: the collection's table (a pandas DataFrame); ``labels``: its label schema. A regression label with a
    ``"retest"`` column gets `retest_reliability` (over the LoRAs measured twice); a binary label with a ``"vote"``
    column gets `vote_ambiguity`; a label with neither is exact by construction when its schema says
    ``"exact": true`` (e.g. "was this source in the finetuning set"). Labels without evidence are left out.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, info in labels.items():
        kind = info.get("kind")
        retest, vote = info.get("retest"), info.get("vote")
        if kind == "regression" and retest and retest in table.columns and name in table.columns:
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
    twice (``collections``: name → `lol.collection.Collection`). ``r2_ceiling`` is what the results notebook draws
    each model's test R² against."""
    out = {}
    for name, coll in collections.items():
        rel = label_reliability(coll.table, coll.labels)
        for task, labels in coll.tasks.items():
            if len(labels) == 1 and labels[0] in rel and rel[labels[0]]["method"] == "retest":
                out[(name, task)] = rel[labels[0]]
    return out
