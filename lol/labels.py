"""Labels: the one home of the kinds' names, of how a kind is inferred from a column of values, and of what a
collection's label schema (``Collection.labels``: ``{name: {"kind", "task", "description"}}``, ``Collection.tasks``)
says about its columns.

``regression`` (numbers), ``binary`` (bool or 0/1 values) and ``category`` (anything else). Used by collections
(label schemas), `lol import` (tables without a schema), `lol.targets` (model outputs) and the explorer (which
columns to filter and colour by, which tasks are membership tasks).
"""
from __future__ import annotations

__all__ = ["LABEL_KINDS", "plain", "infer_kind", "label_columns", "labels_of_kind", "describe_label", "membership_tasks"]

LABEL_KINDS = ("regression", "binary", "category")
NOT_LABELS = {"id", "group", "split", "rank", "path", "file", "source_path"}  # bookkeeping columns of a table


def plain(v):
    """A table cell as the plain Python value a recipe's row or a label holds: numpy (and torch) scalars → int /
    float / bool / str; anything else unchanged."""
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 0) == 0 else v


def infer_kind(values) -> str:
    """``binary`` for bool or 0/1 values (at least one present), ``regression`` for other numbers, ``category``
    otherwise. Missing values are ignored."""
    import numpy as np
    import pandas as pd

    s = pd.Series(values).dropna()
    if pd.api.types.is_bool_dtype(s) or (pd.api.types.is_numeric_dtype(s) and len(s)
                                         and set(np.unique(s.to_numpy()).tolist()) <= {0, 1}):
        return "binary"
    return "regression" if pd.api.types.is_numeric_dtype(s) else "category"


def _schema(coll) -> dict:
    return dict(getattr(coll, "labels", {}) or {})


def label_columns(coll, table) -> list[str]:
    """Columns of ``table`` worth filtering and colouring by: the collection's declared labels first, then other
    metadata (hyperparameters) with more than one value — numbers, or at most 30 distinct values."""
    import pandas as pd

    declared = [c for c in _schema(coll) if c in table.columns]
    rest = [c for c in table.columns if c not in declared and c not in NOT_LABELS
            and table[c].nunique(dropna=True) > 1
            and (pd.api.types.is_numeric_dtype(table[c]) or table[c].nunique(dropna=True) <= 30)]
    return declared + rest


def labels_of_kind(coll, kind: str, task: str | None = None) -> list[str]:
    """Declared labels of one kind (``regression``, ``binary``, ``category``), optionally of one task."""
    return [n for n, d in _schema(coll).items() if d.get("kind") == kind and (task is None or d.get("task") == task)]


def describe_label(coll, name: str) -> str:
    """``clip_score (regression, task clip): mean CLIP score …``, or ``name: metadata column`` when undeclared."""
    d = _schema(coll).get(name)
    if not d:
        return f"{name}: metadata column"
    return f"{name} ({d.get('kind', '?')}, task {d.get('task', '?')}): {d.get('description', '')}"


def membership_tasks(coll) -> dict[str, list[str]]:
    """``{task: labels}`` of the tasks that say which classes or data sources were in a LoRA's finetuning set: at least
    two labels in the table, all binary, and a task name with ``member``, ``class`` or ``source`` in it."""
    labels, out = _schema(coll), {}
    for task, names in (getattr(coll, "tasks", {}) or {}).items():
        names = [n for n in names if n in coll.table.columns]
        if len(names) >= 2 and all(labels.get(n, {}).get("kind") == "binary" for n in names) and \
                any(w in task.lower() for w in ("member", "class", "source")):
            out[task] = names
    return out
