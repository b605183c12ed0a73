"""Numbers for people: every float in a table shown with a few significant digits, booleans as yes/no, missing
values as an empty cell (never "None" or "nan"), via a pandas Styler so sorting still uses the true values."""
from __future__ import annotations

import math

import pandas as pd

__all__ = ["number", "table", "number_columns"]


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
