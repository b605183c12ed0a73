"""Reading what the notebooks and training runs wrote: result tables (CSV / JSON / parquet), figures (PNG, SVG,
plotly JSON) and the metrics stored with each checkpoint. Nothing is recomputed here."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import data as app_data

__all__ = ["Table", "Figure", "Outputs", "output_dirs", "find_outputs", "model_by_task", "pretty_columns",
           "show_figure", "checkpoint_rows", "METRIC_NAMES", "mark_best", "unique_figures", "speed_reports"]

_TABLE_SUFFIXES = {".csv", ".parquet", ".json"}
_FIG_SUFFIXES = {".png", ".jpg", ".jpeg", ".svg"}
MAX_FILES = 60
# metric keys of lol.metrics -> their names on screen
METRIC_NAMES = {"r2": "R²", "spearman": "Spearman ρ", "kendall": "Kendall τ", "mae": "MAE", "auc": "AUC",
                "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "tpr_at_1pct_fpr": "TPR @ 1% FPR",
                "tpr_at_0.1pct_fpr": "TPR @ 0.1% FPR"}


@dataclass
class Table:
    name: str
    path: Path
    frame: pd.DataFrame | None = None
    error: str | None = None


@dataclass
class Figure:
    name: str
    path: Path
    kind: str  # "image" | "plotly"


@dataclass
class Outputs:
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def output_dirs() -> list[Path]:
    found = app_data.results_dirs()
    return found or [app_data.data_root() / "results"]


def speed_reports(dirs: list[Path] | None = None) -> list[Path]:
    """``speed.md`` of every results folder and of its ``gpu/`` subfolder, existing ones only: LoL against the
    standard evaluation (`lol.speed.write_speed_md`, written by ``python -m bench speed`` and notebook 06)."""
    found: list[Path] = []
    for d in dirs if dirs is not None else app_data.results_dirs():
        for p in (d / "speed.md", d / "gpu" / "speed.md"):
            if p.is_file() and p not in found:
                found.append(p)
    return found


def _is_plotly_json(obj) -> bool:
    return isinstance(obj, dict) and "data" in obj and ("layout" in obj or isinstance(obj.get("data"), list))


def find_outputs(dirs: list[Path] | None = None) -> Outputs:
    """Every table and figure under the notebook output folders (newest first), at most `MAX_FILES`."""
    out = Outputs()
    files = []
    for d in dirs if dirs is not None else app_data.results_dirs():
        files += [p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in _TABLE_SUFFIXES | _FIG_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(d).parts)]
    files.sort(key=lambda p: (-p.stat().st_mtime, p.name))
    for p in files[:MAX_FILES]:
        suf = p.suffix.lower()
        if suf in _FIG_SUFFIXES:
            out.figures.append(Figure(p.stem, p, "image"))
        elif suf == ".json":
            try:
                obj = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError) as e:
                out.tables.append(Table(p.stem, p, error=f"{p}: not readable JSON ({e})"))
                continue
            if _is_plotly_json(obj):
                out.figures.append(Figure(p.stem, p, "plotly"))
            elif isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
                out.tables.append(Table(p.stem, p, pd.DataFrame(obj)))
            elif isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
                out.tables.append(Table(p.stem, p, pd.DataFrame(obj).T.rename_axis("model").reset_index()))
        else:
            try:
                frame = pd.read_csv(p) if suf == ".csv" else pd.read_parquet(p)
                out.tables.append(Table(p.stem, p, frame))
            except (OSError, ValueError, ImportError) as e:
                out.tables.append(Table(p.stem, p, error=f"{p}: could not read the table ({e})"))
    # a table named like "results" first
    out.tables.sort(key=lambda t: ("result" not in t.name.lower(), t.name))
    return out


def model_by_task(df: pd.DataFrame) -> pd.DataFrame | None:
    """A long table (model, task, metric, value) pivoted to models × (task, metric); None when it is not long."""
    cols = {c.lower(): c for c in df.columns}
    if not {"model", "task", "value"} <= set(cols):
        return None
    index = cols["model"]
    columns = [cols["task"]] + ([cols["metric"]] if "metric" in cols else [])
    if "metric" in cols:
        df = df.assign(**{cols["metric"]: df[cols["metric"]].map(lambda m: METRIC_NAMES.get(str(m), str(m)))})
    try:
        wide = df.pivot_table(index=index, columns=columns, values=cols["value"], aggfunc="mean")
    except (ValueError, TypeError):
        return None
    if isinstance(wide.columns, pd.MultiIndex):
        wide.columns = [" · ".join(map(str, c)) for c in wide.columns]
    return wide.round(4)


def pretty_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Metric keys in column names (``faces/clip_score · r2``) shown under their true names (``… · R²``)."""
    def name(c):
        head, sep, tail = str(c).rpartition(" · ")
        return f"{head}{sep}{METRIC_NAMES.get(tail, tail)}" if sep else METRIC_NAMES.get(str(c), c)

    return df.rename(columns=name)


def mark_best(df: pd.DataFrame):
    """A Styler with numbers formatted (`lol.app.fmt`) and the best value of every numeric column in bold on
    green: the highest, or the lowest for errors and losses (MAE, loss)."""
    from .fmt import table
    from .glossary import LOWER_IS_BETTER

    if df.size > pd.get_option("styler.render.max_elements"):
        return df  # a per-LoRA table (e.g. predictions_test: ~1M cells) is shown plain: pandas cannot style it
    sty = table(df)
    for c in df.columns:
        vals = df[c] if pd.api.types.is_numeric_dtype(df[c]) else df[c].map(_leading_number)
        if pd.to_numeric(vals, errors="coerce").notna().sum() < 2:
            continue
        vals = pd.to_numeric(vals, errors="coerce")
        low = any(w.lower() in str(c).lower() for w in LOWER_IS_BETTER)
        best = vals.min() if low else vals.max()
        mark = ["font-weight: bold; background-color: #d7f0d7" if v == best else "" for v in vals]
        sty = sty.apply(lambda _s, m=mark: m, subset=[c])
    return sty


def _leading_number(v) -> float:
    """``"0.468 ± 0.040"`` → 0.468 (a mean ± spread cell of the notebooks' tables); NaN when there is none."""
    import re

    m = re.match(r"\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)", str(v)) if isinstance(v, str) else None
    return float(m.group(1)) if m else float("nan")


def unique_figures(figs: list[Figure]) -> list[Figure]:
    """One figure per name: an interactive plotly version wins over a PNG/SVG export of the same figure."""
    by_name: dict[str, Figure] = {}
    for f in figs:
        if f.name not in by_name or (f.kind == "plotly" and by_name[f.name].kind != "plotly"):
            by_name[f.name] = f
    return list(by_name.values())


def show_figure(fig: Figure) -> None:
    import streamlit as st

    try:
        if fig.kind == "plotly":
            import plotly.io as pio

            st.plotly_chart(pio.from_json(fig.path.read_text()), width="stretch", key=f"nbfig_{fig.path}")
        else:
            st.image(str(fig.path), width="stretch")
        st.caption(f"{fig.name} — `{fig.path.name}`")
    except (OSError, ValueError) as e:  # a broken figure file (unreadable image, bad plotly JSON): say which
        st.warning(f"{fig.path}: could not show this figure ({type(e).__name__}: {e})")


def checkpoint_rows(split: str = "test") -> pd.DataFrame | None:
    """One row per (checkpoint, label): model kind, symmetry, and the ``split`` metrics recorded in the checkpoint's
    ``config.json`` when it was trained (`lol.train` writes them); nothing is re-evaluated."""
    from .preds import checkpoint_info

    try:
        index = app_data.checkpoint_index()
        dirs = app_data.checkpoint_dirs()
    except (OSError, ValueError):
        return None
    shipped = {str(p): label for label, p in index.items()}
    root = (app_data.data_root() / "checkpoints").resolve()
    rows = []
    for d in dirs:
        info = checkpoint_info(str(d))
        base = {"checkpoint": str(d.relative_to(root)) if d.is_relative_to(root) else str(d),
                "model": info.get("kind") or "?", "invariant to": info.get("invariant_to") or "?"}
        if info.get("error"):
            rows.append({**base, "label": "", "problem": info["error"]})
            continue
        metrics = (info.get("metrics") or {}).get(split) or {}
        for label in info["labels"]:
            row = {**base, "label": label, "shipped": "yes" if shipped.get(str(d)) == label else ""}
            for k, v in (metrics.get(label) or {}).items():
                row[f"{split} {METRIC_NAMES.get(k, k)}"] = v
            rows.append(row)
    return pd.DataFrame(rows) if rows else None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif not isinstance(v, list):
            out[f"{prefix}{k}"] = v
    return out
