"""Label kinds: the one home of their names and of how a kind is inferred from a column of values.

``regression`` (numbers), ``binary`` (bool or 0/1 values) and ``category`` (anything else). Used by collections
(label schemas), `lol import` (tables without a schema) and `lol.targets` (model outputs).
"""
from __future__ import annotations

__all__ = ["LABEL_KINDS", "infer_kind"]

LABEL_KINDS = ("regression", "binary", "category")


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
