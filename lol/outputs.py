"""What the notebooks and benches wrote, read back: result tables (CSV / JSON / parquet), figures (PNG, SVG, plotly
JSON) and speed reports under the results folders (`lol.paths.results_dirs`). Nothing is recomputed here.

* `find_outputs`: every table and figure, newest first; `unique_figures`: one per name (plotly over a PNG export);
* `model_by_task`: a long table (model, task, metric, value) as models × (task · metric), metric keys under their
  names on screen (`lol.metrics.METRIC_NAMES`, also `pretty_columns`); `leading_number` reads a ``mean ± spread`` cell;
* `speed_reports`: the ``speed.md`` files of `lol.speed.write_speed_md`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .metrics import METRIC_NAMES

__all__ = ["Table", "Figure", "Outputs", "find_outputs", "unique_figures", "model_by_task", "pretty_columns",
           "leading_number", "speed_reports", "MAX_FILES"]

TABLE_SUFFIXES = {".csv", ".parquet", ".json"}
FIGURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".svg"}
MAX_FILES = 60


@dataclass
class Table:
    name: str
    path: Path
    frame: pd.DataFrame | None = None
    error: str | None = None  # one line naming the file when it could not be read


@dataclass
class Figure:
    name: str
    path: Path
    kind: str  # "image" | "plotly"


@dataclass
class Outputs:
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def _dirs(dirs) -> list[Path]:
    from .paths import results_dirs

    return list(dirs) if dirs is not None else results_dirs()


def speed_reports(dirs: list[Path] | None = None) -> list[Path]:
    """``speed.md`` of every results folder and of its ``gpu/`` subfolder, existing ones only: LoL against the
    standard evaluation (`lol.speed.write_speed_md`, written by ``python -m bench speed`` and notebook 06)."""
    found: list[Path] = []
    for d in _dirs(dirs):
        found += [p for p in (d / "speed.md", d / "gpu" / "speed.md") if p.is_file() and p not in found]
    return found


def _is_plotly_json(obj) -> bool:
    return isinstance(obj, dict) and "data" in obj and ("layout" in obj or isinstance(obj.get("data"), list))


def _read(p: Path, out: Outputs) -> None:
    suf = p.suffix.lower()
    if suf in FIGURE_SUFFIXES:
        out.figures.append(Figure(p.stem, p, "image"))
    elif suf == ".json":
        try:
            obj = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            out.tables.append(Table(p.stem, p, error=f"{p}: not readable JSON ({e})"))
            return
        if _is_plotly_json(obj):
            out.figures.append(Figure(p.stem, p, "plotly"))
        elif isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
            out.tables.append(Table(p.stem, p, pd.DataFrame(obj)))
        elif isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
            out.tables.append(Table(p.stem, p, pd.DataFrame(obj).T.rename_axis("model").reset_index()))
    else:
        try:
            out.tables.append(Table(p.stem, p, pd.read_csv(p) if suf == ".csv" else pd.read_parquet(p)))
        except (OSError, ValueError, ImportError) as e:
            out.tables.append(Table(p.stem, p, error=f"{p}: could not read the table ({e})"))


def find_outputs(dirs: list[Path] | None = None) -> Outputs:
    """Every table and figure under the results folders (hidden ones skipped), newest first, at most `MAX_FILES`;
    tables named like "results" first. A file that cannot be read is a `Table` with its ``error``."""
    files = []
    for d in _dirs(dirs):
        files += [p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES | FIGURE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(d).parts)]
    files.sort(key=lambda p: (-p.stat().st_mtime, p.name))
    out = Outputs()
    for p in files[:MAX_FILES]:
        _read(p, out)
    out.tables.sort(key=lambda t: ("result" not in t.name.lower(), t.name))
    return out


def unique_figures(figs: list[Figure]) -> list[Figure]:
    """One figure per name: an interactive plotly version wins over a PNG/SVG export of the same figure."""
    by_name: dict[str, Figure] = {}
    for f in figs:
        if f.name not in by_name or (f.kind == "plotly" and by_name[f.name].kind != "plotly"):
            by_name[f.name] = f
    return list(by_name.values())


def model_by_task(df: pd.DataFrame) -> pd.DataFrame | None:
    """A long table (model, task, [metric,] value) pivoted to models × ``task · metric`` (mean over repeats, 4
    decimals); None when it is not such a table."""
    cols = {c.lower(): c for c in df.columns}
    if not {"model", "task", "value"} <= set(cols):
        return None
    columns = [cols["task"]] + ([cols["metric"]] if "metric" in cols else [])
    if "metric" in cols:
        df = df.assign(**{cols["metric"]: df[cols["metric"]].map(lambda m: METRIC_NAMES.get(str(m), str(m)))})
    try:
        wide = df.pivot_table(index=cols["model"], columns=columns, values=cols["value"], aggfunc="mean")
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


def leading_number(v) -> float:
    """``0.468`` for a number or a notebook table's ``"0.468 ± 0.040"`` cell; NaN when there is none."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    m = re.match(r"\s*([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)", str(v)) if isinstance(v, str) else None
    return float(m.group(1)) if m else float("nan")
