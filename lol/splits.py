"""Seeded train/val/test splits, grouped: all LoRAs of one group (e.g. one identity) land in the same split, so
nothing about a group leaks from training to test (the CelebA-LoRA flaw, paper §3)."""
from __future__ import annotations

import numpy as np

from .errors import CollectionError

__all__ = ["SPLITS", "make_splits", "split_indices", "check_grouped"]

SPLITS = ("train", "val", "test")


def make_splits(n: int, fractions=(0.7, 0.15, 0.15), seed: int = 0, groups=None) -> np.ndarray:
    """An array of ``"train"``/``"val"``/``"test"`` of length n. Without ``groups`` each LoRA is its own group.

    Groups are shuffled with ``seed`` and each is assigned, in turn, to the split furthest below its target size, so
    split sizes track ``fractions`` as closely as group sizes allow; every split with a positive fraction gets at
    least one group when there are enough groups."""
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"make_splits: fractions must be three non-negative numbers, got {fractions}")
    f = f / f.sum()
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"make_splits: {len(groups)} group values for {n} LoRAs")
    uniq, inverse, counts = np.unique(groups.astype(str), return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    assign = np.empty(len(uniq), dtype=int)
    size = np.zeros(3)
    need = [k for k in (1, 2, 0) if f[k] > 0]   # first give val and test one group each, then fill by deficit
    for j, g in enumerate(order):
        if j < len(need) and len(uniq) >= len(need):
            k = need[j]
        else:
            k = int(np.argmax(f * n - size))
        assign[g] = k
        size[k] += counts[g]
    return np.asarray(SPLITS, dtype=object)[assign[inverse]]


def split_indices(split) -> dict[str, np.ndarray]:
    split = np.asarray(split, dtype=object)
    bad = sorted({str(s) for s in split} - set(SPLITS))
    if bad:
        raise CollectionError(f"split column has unknown value(s) {bad}; expected {list(SPLITS)}")
    return {s: np.nonzero(split == s)[0] for s in SPLITS}


def check_grouped(split, groups) -> None:
    """Raise `CollectionError` naming a group that appears in two splits."""
    seen: dict[str, str] = {}
    for s, g in zip(np.asarray(split), np.asarray(groups)):
        g = str(g)
        if seen.setdefault(g, s) != s:
            raise CollectionError(f"group {g!r} appears in both the {seen[g]!r} and {s!r} splits")
