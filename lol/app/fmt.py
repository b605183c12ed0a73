"""Numbers for people: every float in a table shown with a few significant digits, booleans as yes/no, missing
values as an empty cell (never "None" or "nan"), via a pandas Styler so sorting still uses the true values; the best
value of each results column marked."""
from __future__ import annotations

import math

import pandas as pd

__all__ = ["number", "table", "number_columns", "mark_best"]


def number(v, digits: int = 4) -> str:
    """``0.123456789`` → ``0.1235``; ``12345.678`` → ``12,346``; integers with thousands separators; NaN/None → ""."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 10 ** digits or abs(v) < 10 ** -(digits - 1)):
            return f"{v:.{digits - 1}e}" if abs(v) < 1 else f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def table(df: pd.DataFrame, digits: int = 4):
    """A Styler of ``df`` with `number` applied to every float column and empty cells for missing values."""
    floats = [c for c in df.columns if pd.api.types.is_float_dtype(df[c])]
    return df.style.format(na_rep="").format({c: (lambda v, d=digits: number(v, d)) for c in floats}, na_rep="")


def number_columns(df: pd.DataFrame, digits: int = 4) -> dict:
    """``st.dataframe`` column_config showing every float column with ``digits`` significant digits (cheaper than a
    Styler on large tables; the values, and so sorting, stay exact)."""
    import streamlit as st

    return {c: st.column_config.NumberColumn(format=f"%.{digits}g") for c in df.columns
            if pd.api.types.is_float_dtype(df[c])}


def mark_best(df: pd.DataFrame):
    """A Styler of ``df`` (`table`) with the best value of every numeric column — or of a notebook's ``mean ± spread``
    column (`lol.outputs.leading_number`) — in bold on green: the highest, or the lowest for errors and losses.
    A table too large for pandas' Styler (a per-LoRA table of ~1M cells) is returned as it is."""
    from ..outputs import leading_number
    from .glossary import LOWER_IS_BETTER

    if df.size > pd.get_option("styler.render.max_elements"):
        return df
    sty = table(df)
    for c in df.columns:
        vals = pd.to_numeric(df[c] if pd.api.types.is_numeric_dtype(df[c]) else df[c].map(leading_number),
                             errors="coerce")
        if vals.notna().sum() < 2:
            continue
        best = vals.min() if any(w.lower() in str(c).lower() for w in LOWER_IS_BETTER) else vals.max()
        mark = ["font-weight: bold; background-color: #d7f0d7" if v == best else "" for v in vals]
        sty = sty.apply(lambda _s, m=mark: m, subset=[c])
    return sty
