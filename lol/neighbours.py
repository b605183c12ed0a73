"""Nearest LoRAs in a trained model's embedding: embed loose LoRAs and a collection with the model's own ``embed``
(its penultimate representation; GL(r)-invariant for the invariant model kinds) and rank the collection by distance.

Distances are Euclidean after standardising every embedding dimension by the collection's mean and spread, so no
single wide dimension decides the ranking."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["embed_loras", "embed_collection", "nearest", "nearest_table"]


def _dtype(ckpt):
    return next(ckpt.model.parameters()).dtype


@torch.no_grad()
def embed_loras(ckpt, loras: Sequence, chunk: int = 64) -> np.ndarray:
    """``ckpt.model.embed`` of each LoRA (matched to the checkpoint's spec by module name), one row per LoRA."""
    from .batch import LoRABatch

    device = next(ckpt.model.parameters()).device
    out = []
    for s in range(0, len(loras), chunk):
        part = list(loras[s: s + chunk])
        for x in part:
            ckpt.spec.check(x, what=f"checkpoint {ckpt.path}")
        b = LoRABatch.from_loras(part, ckpt.spec, dtype=_dtype(ckpt), device=device)
        out.append(ckpt.model.embed(b).double().cpu().numpy())
    return np.concatenate(out, 0) if out else np.zeros((0, 0))


@torch.no_grad()
def embed_collection(ckpt, coll, chunk: int = 128) -> np.ndarray:
    """``ckpt.model.embed`` of every LoRA of a packed collection, in table order."""
    device = next(ckpt.model.parameters()).device
    out = []
    for s in range(0, len(coll), chunk):
        b = coll.batch(list(range(s, min(s + chunk, len(coll)))), dtype=_dtype(ckpt), device=device)
        out.append(ckpt.model.embed(b).double().cpu().numpy())
    return np.concatenate(out, 0) if out else np.zeros((0, 0))


def nearest(query: np.ndarray, bank: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``(index, distance)``, each (len(query), k): the ``k`` rows of ``bank`` closest to each query row, nearest
    first, after standardising both by the bank's per-dimension mean and standard deviation."""
    query, bank = np.atleast_2d(np.asarray(query, float)), np.asarray(bank, float)
    mu, sd = bank.mean(0), bank.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    q, b = (query - mu) / sd, (bank - mu) / sd
    d = np.sqrt(np.maximum(((q[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))
    k = min(k, len(bank))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d, idx, axis=1)


def nearest_table(ckpt, named: Sequence[tuple[str, object]], bank: np.ndarray, table, k: int = 5,
                  max_labels: int = 6):
    """For each ``(name, LoRA)`` of ``named``, its ``k`` nearest LoRAs of a collection in the checkpoint's embedding
    (``bank``: `embed_collection` of that collection; ``table``: its table, same order), with their measured values of
    the checkpoint's labels (the first ``max_labels`` the table has). One row per (name, rank): ``file``, ``#``,
    ``LoRA`` (id), ``distance`` (`nearest`), then the labels."""
    import pandas as pd

    table = table.reset_index(drop=True)
    labels = [c for c in ckpt.labels if c in table.columns][:max_labels]
    idx, dist = nearest(embed_loras(ckpt, [lo for _, lo in named]), bank, k=k)
    return pd.DataFrame([{"file": name, "#": rank, "LoRA": str(table.loc[j, "id"]), "distance": float(d),
                          **{lab: table.loc[j, lab] for lab in labels}}
                         for i, (name, _) in enumerate(named) for rank, (j, d) in enumerate(zip(idx[i], dist[i]), 1)])
