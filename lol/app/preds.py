"""LoL predictions and embeddings for the explorer, in one layout the pages share: ``id`` plus one
``<label> (predicted)`` column per predicted label (value in the label's units, or probability for a binary label),
and ``<label> error`` (predicted − actual) for regression labels present in the table.

Predictions come from `lol.predict.predict(checkpoint, collection)`, embeddings from the checkpoint's model
``embed``; nothing is re-implemented. Which models fit a collection is decided by the checkpoint's own spec check.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from . import cache
from ..errors import LoLError
from .errors import plain

__all__ = ["PRED", "ERR", "SPLIT", "model_split", "compatible_models", "prediction_frame", "predictions_or_none",
           "predicted_labels", "common_labels", "all_predicted", "membership_tasks", "embeddings", "checkpoint_info",
           "predict_loras"]

PRED = " (predicted)"
ERR = " error"
SPLIT = "split (model)"  # the split each LoRA was in when *this* model was trained ("" = not used by it)


# ------------------------------------------------------------------------------------------------ checkpoints

@st.cache_data(show_spinner=False, max_entries=64)
def checkpoint_info(path: str) -> dict:
    """``{"spec": ModuleSpec JSON, "labels": [...], "kind": model kind, "invariant_to": ..., "metrics": {...},
    "error": None}`` of a checkpoint folder (`lol.checkpoint`), or ``{"error": message}`` when it cannot be loaded."""
    try:
        ck = cache.checkpoint(path, "cpu")
    except (LoLError, OSError, ValueError, KeyError) as e:  # an unreadable checkpoint is listed with its problem
        return {"spec": None, "labels": [], "kind": None, "invariant_to": None, "metrics": {}, "error": plain(e)}
    return {"spec": ck.spec.to_json(), "labels": list(ck.labels), "kind": ck.kind,
            "invariant_to": ck.config.get("invariant_to"), "metrics": ck.config.get("metrics") or {},
            "fingerprint": ck.config.get("fingerprint"), "error": None}


def compatible_models(ctx, coll) -> list:
    """The checkpoints (sidebar list) whose module spec equals the collection's and whose labels it has."""
    from ..lora import ModuleSpec

    out = []
    cols = set(getattr(coll, "table", pd.DataFrame()).columns)
    for m in ctx.models:
        info = checkpoint_info(m.path)
        if info["error"] or info["spec"] is None:
            continue
        if ModuleSpec.from_json(info["spec"]).keys != coll.spec.keys:
            continue
        if info["labels"] and not set(info["labels"]) & cols and not _is_upload(ctx):
            continue
        out.append(m)
    return out


def _is_upload(ctx) -> bool:
    return getattr(ctx, "kind", "") in ("upload", "server")


# ------------------------------------------------------------------------------------------------ predictions

def model_split(ckpt_path: str, coll) -> tuple[np.ndarray | None, str]:
    """The split (train/val/test, "" for rows the model did not use) of every LoRA of ``coll`` when the checkpoint
    was trained, and a note: the LoRA ids recorded in the checkpoint (`lol.checkpoint.Checkpoint.split_of`), never
    re-derived. None when the model was trained on another collection (its fingerprint differs): then every LoRA here
    is unseen by it. All "" (no test split known) for a checkpoint that records no split by id."""
    ck = cache.checkpoint(ckpt_path, "cpu")
    rec = ck.split or {}
    fp = rec.get("fingerprint") or ck.config.get("fingerprint")
    if fp and fp != getattr(coll, "fingerprint", None):
        return None, "this model was trained on another collection: every LoRA here is unseen by it"
    split = ck.split_of(coll.table["id"].astype(str))
    if split is None:
        return np.full(len(coll.table), "", dtype=object), "the checkpoint does not record which LoRAs it used"
    return split, f"the split recorded with the model: {rec.get('how') or 'its train/val/test LoRA ids'}"


def prediction_frame(ctx, model, coll) -> pd.DataFrame:
    """Predictions of ``model`` for every LoRA of ``coll`` (cached), with ``<label> error`` columns and the model's
    own split (`SPLIT`) added. A library error (a model for other modules) goes to the page's error boundary."""
    raw = cache.predictions(model.path, ctx.device, ctx.path, ctx.key)
    df = raw.rename(columns={c: f"{c}{PRED}" for c in raw.columns if c != "id"})
    split, note = model_split(model.path, coll)
    df[SPLIT] = split if split is not None else "unseen"
    df.attrs["split_note"] = note
    truth = coll.table.assign(id=coll.table["id"].astype(str)).set_index("id")
    for c in [c for c in df.columns if c.endswith(PRED)]:
        lab = c[: -len(PRED)]
        if lab in truth.columns and pd.api.types.is_numeric_dtype(truth[lab]) and \
                (getattr(coll, "labels", {}).get(lab, {}).get("kind") == "regression"):
            df[f"{lab}{ERR}"] = df[c].to_numpy(float) - truth.loc[df["id"], lab].to_numpy(float)
    return df


def eval_split(frame: pd.DataFrame) -> tuple[str | None, str]:
    """Which rows to score a model on: its ``test`` split when it has one, else the LoRAs it never saw (a model
    from another collection), else all; with a sentence saying so."""
    s = frame[SPLIT] if SPLIT in frame else pd.Series(dtype=object)
    if (s == "test").any():
        return "test", f"Metrics on the model's test split ({frame.attrs.get('split_note', '')}); only test LoRAs " \
                       f"are drawn."
    if (s == "unseen").any():
        return "unseen", f"Metrics on all LoRAs: {frame.attrs.get('split_note', '')}."
    return None, "Metrics on the whole collection (the model records no test split: includes its training LoRAs)."


def predictions_or_none(ctx) -> pd.DataFrame | None:
    """`prediction_frame` for the sidebar's model, or None without a fitting model (no message)."""
    if ctx.model is None or ctx.collection is None:
        return None
    if ctx.model not in compatible_models(ctx, ctx.collection):
        return None
    return prediction_frame(ctx, ctx.model, ctx.collection)


def predicted_labels(frame: pd.DataFrame, coll, kind: str) -> list[str]:
    """Labels with a prediction column in ``frame`` that the collection declares as ``kind`` and has truth for."""
    labels = getattr(coll, "labels", {}) or {}
    cols = set(coll.table.columns)
    return [c[: -len(PRED)] for c in frame.columns if c.endswith(PRED)
            and labels.get(c[: -len(PRED)], {}).get("kind") == kind and c[: -len(PRED)] in cols]


def common_labels(frames, coll, kind: str) -> list[str]:
    """Labels of ``kind`` that every frame in ``frames`` predicts (and the collection has truth for), sorted: what a
    side-by-side comparison of several models can show."""
    sets = [set(predicted_labels(f, coll, kind)) for f in frames]
    return sorted(set.intersection(*sets)) if sets else []


def all_predicted(frame: pd.DataFrame, coll) -> list[str]:
    """Every label ``frame`` predicts that the collection has truth for, in the frame's order."""
    return [lab for kind in ("regression", "binary", "category") for lab in predicted_labels(frame, coll, kind)]


def predict_loras(model, loras, device: str) -> pd.DataFrame:
    """Predictions for loose LoRAs (e.g. uploads) with `lol.predict.predict`; raises the library's errors."""
    from ..predict import predict

    return predict(cache.checkpoint(model.path, device), loras)


# -------------------------------------------------------------------------------------------------- membership

def membership_tasks(coll) -> dict[str, list[str]]:
    """Tasks whose labels are all binary and say which classes / sources were in the finetuning set."""
    labels = getattr(coll, "labels", {}) or {}
    tasks = getattr(coll, "tasks", {}) or {}
    out = {}
    for task, names in tasks.items():
        names = [n for n in names if n in coll.table.columns]
        if len(names) >= 2 and all(labels.get(n, {}).get("kind") == "binary" for n in names) and \
                any(w in task.lower() for w in ("member", "class", "source")):
            out[task] = names
    return out


# -------------------------------------------------------------------------------------------------- embeddings

def embeddings(ctx) -> np.ndarray:
    """The sidebar model's ``embed`` of every LoRA (penultimate representation; GL-invariant for invariant
    models), cached per model, device and collection."""
    return cache.model_embeddings(ctx.model.path, ctx.device, ctx.path, ctx.key)
