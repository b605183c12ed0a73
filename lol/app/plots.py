"""Plotly figures of the explorer, styled for a projector: large fonts, axis titles with units, one colour per value.

Every point of a per-LoRA figure carries the LoRA id as its first ``custom_data`` entry, so a click or box
selection (``st.plotly_chart(..., on_select="rerun")``) can be mapped back to the LoRA by `selected_ids`.
Nothing here computes a metric or a feature: figures are drawn from numbers the library produced.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

__all__ = ["PALETTE", "FONT_SIZE", "style", "color_map", "model_color", "axis_title", "pred_vs_true", "roc_curves",
           "spectra", "distribution", "embedding_scatter", "prob_bars", "selected_ids"]

# Okabe–Ito-like qualitative palette (colour-blind safe, readable on a projector), then Tableau for more classes.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
           "#8c564b", "#7f7f7f", "#bcbd22", "#17becf", "#9467bd", "#e377c2", "#2ca02c", "#d62728")
FONT_SIZE = 17
CONTINUOUS = "Viridis"

# units of the labels the zoo produces; anything else is shown without a unit
_UNITS = {"clip": "CLIP score, 0–100", "acc": "fraction correct", "loss": "nats/token", "lr": "log scale",
          "steps": "optimizer steps", "rank": "r", "alpha": "α"}


def axis_title(name: str) -> str:
    """``name (unit)`` for the labels the zoo produces (CLIP score, accuracy, loss …), else ``name``."""
    unit = next((u for k, u in _UNITS.items() if k in name.lower()), "")
    return f"{name} ({unit})" if unit else name


def style(fig: go.Figure, title: str | None = None, height: int = 480, legend: bool = True) -> go.Figure:
    """The one look of every figure: white template, large fonts, tight margins."""
    fig.update_layout(template="plotly_white", height=height, font=dict(size=FONT_SIZE),
                      title=dict(text=title, font=dict(size=FONT_SIZE + 3)) if title else None,
                      margin=dict(l=70, r=20, t=60 if title else 25, b=60), showlegend=legend,
                      legend=dict(font=dict(size=FONT_SIZE - 2)), hoverlabel=dict(font_size=FONT_SIZE - 1))
    fig.update_xaxes(title_font=dict(size=FONT_SIZE + 1), tickfont=dict(size=FONT_SIZE - 2), automargin=True)
    fig.update_yaxes(title_font=dict(size=FONT_SIZE + 1), tickfont=dict(size=FONT_SIZE - 2), automargin=True)
    return fig


def color_map(values: Iterable) -> dict:
    """Value -> colour, deterministic: the sorted distinct values take the palette in order, so one label value
    has the same colour on every page (booleans: False blue, True orange)."""
    distinct = sorted({v for v in values if not _isnan(v)}, key=lambda v: (str(type(v)), v))
    return {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(distinct)}


def model_color(name: str) -> str:
    """A stable colour per model name (same on every page and every run)."""
    h = int(hashlib.sha1(name.encode()).hexdigest(), 16)
    return PALETTE[h % len(PALETTE)]


def _isnan(v) -> bool:
    try:
        return bool(np.isnan(v))
    except (TypeError, ValueError):
        return False


def _is_categorical(s: pd.Series) -> bool:
    return not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s) or s.nunique(dropna=True) <= 2


def _hover(df: pd.DataFrame, extra: Sequence[str]) -> tuple[np.ndarray, str]:
    """``custom_data`` (the LoRA id first, then ``extra`` columns) and the hover template showing them."""
    cols = ["id"] + [c for c in extra if c in df.columns and c != "id"]
    custom = df[cols].astype(object).to_numpy()
    lines = ["<b>%{customdata[0]}</b>"] + [f"{c}: %{{customdata[{i}]}}" for i, c in enumerate(cols) if i]
    return custom, "<br>".join(lines)


def pred_vs_true(df: pd.DataFrame, true_col: str, pred_col: str, *, name: str | None = None, hover: Sequence[str] = (),
                 color: str | None = None, highlight: Sequence[str] = ()) -> go.Figure:
    """Predicted vs actual scatter with the identity line ``y = x``; hover and ``custom_data`` carry the LoRA id;
    the LoRAs in ``highlight`` (selected on any page) are ringed."""
    d = df[[c for c in dict.fromkeys(["id", true_col, pred_col, *hover]) if c in df.columns]].dropna(
        subset=[true_col, pred_col])
    custom, template = _hover(d, [true_col, pred_col, *hover])
    fig = go.Figure()
    if len(d):
        lo = float(min(d[true_col].min(), d[pred_col].min()))
        hi = float(max(d[true_col].max(), d[pred_col].max()))
        pad = 0.03 * (hi - lo or 1.0)
        fig.add_trace(go.Scatter(x=[lo - pad, hi + pad], y=[lo - pad, hi + pad], mode="lines", name="y = x",
                                 line=dict(color="#888888", dash="dash", width=2), hoverinfo="skip"))
    fig.add_trace(go.Scatter(x=d[true_col], y=d[pred_col], mode="markers", name=name or pred_col,
                             customdata=custom, hovertemplate=template + "<extra></extra>",
                             marker=dict(size=10, opacity=0.8, color=color or (model_color(name) if name else
                                                                                PALETTE[0]),
                                         line=dict(width=0.5, color="white"))))
    _ring(fig, d[true_col].to_numpy(), d[pred_col].to_numpy(), d["id"].astype(str).to_numpy(), highlight)
    fig.update_xaxes(title_text="actual " + axis_title(true_col))
    fig.update_yaxes(title_text="predicted " + axis_title(true_col))
    fig.update_layout(dragmode="select")  # dragging selects LoRAs (box) instead of panning
    return style(fig, legend=False)


def roc_curves(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]], title: str | None = None,
               min_fpr: float = 1e-4, points: Sequence[tuple[float, float, str]] = ()) -> go.Figure:
    """ROC curves ``(name, fpr, tpr, auc)`` on a log FPR axis (low-FPR regime, Carlini et al.), with the chance
    line; ``points`` marks operating points ``(fpr, tpr, text)`` such as the current threshold."""
    fig = go.Figure()
    grid = np.logspace(np.log10(min_fpr), 0, 100)
    fig.add_trace(go.Scatter(x=grid, y=grid, mode="lines", name="chance", line=dict(color="#999999", dash="dot"),
                             hoverinfo="skip"))
    for i, (name, fpr, tpr, auc) in enumerate(curves):
        fpr = np.clip(np.asarray(fpr, dtype=float), min_fpr, 1.0)
        fig.add_trace(go.Scatter(x=fpr, y=tpr, mode="lines", name=f"{name} (AUC {auc:.3f})",
                                 line=dict(width=3, color=PALETTE[i % len(PALETTE)], shape="hv")))
    for fpr, tpr, text in points:
        fig.add_trace(go.Scatter(x=[max(fpr, min_fpr)], y=[tpr], mode="markers+text", text=[text],
                                 textposition="bottom right", name="threshold",
                                 marker=dict(size=14, color="#D55E00", symbol="x")))
    ticks = [v for v in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0) if v >= min_fpr * 0.999]
    fig.update_xaxes(type="log", title_text="false positive rate (log scale)", range=[np.log10(min_fpr), 0],
                     tickvals=ticks, ticktext=[f"{100 * v:g}%" for v in ticks])
    fig.update_yaxes(title_text="true positive rate", range=[0, 1.02])
    return style(fig, title)


def spectra(svals: Mapping[str, Sequence[float]]) -> go.Figure:
    """Singular values of ΔW = U Vᵀ per module (index i = 1..r, log scale; the first 64 modules); GL(r)-invariant."""
    fig = go.Figure()
    for i, (name, s) in enumerate(list(svals.items())[:64]):
        s = np.asarray(s, dtype=float)
        fig.add_trace(go.Scatter(x=np.arange(1, len(s) + 1), y=s, mode="lines+markers", name=_short(name),
                                 line=dict(width=2, color=PALETTE[i % len(PALETTE)]), marker=dict(size=7)))
    fig.update_xaxes(title_text="singular value index i", dtick=1)
    fig.update_yaxes(title_text="σᵢ(ΔW) (log scale)", type="log")
    fig = style(fig, legend=True)
    if len(svals) > 12:  # many modules: a compact legend in small type
        fig.update_layout(legend=dict(font=dict(size=FONT_SIZE - 7), itemsizing="constant"))
    return fig


def _short(module: str) -> str:
    """``unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q`` → ``down_blocks.0.attentions.1.attn1.to_q``:
    without the component prefix and the (single) transformer block, still one name per module."""
    parts = module.split(".")
    parts = parts[1:] if parts[0] in ("unet", "text_encoder", "text_encoder_2", "base_model") else parts
    out = [p for i, p in enumerate(parts) if p != "transformer_blocks" and (i == 0 or parts[i - 1] != "transformer_blocks")]
    return ".".join(out) or module


def distribution(df: pd.DataFrame, col: str) -> go.Figure:
    """Histogram of a numeric column or bar counts of a categorical one, in the column's consistent colours."""
    s = df[col].dropna()
    fig = go.Figure()
    if _is_categorical(s):
        counts = s.value_counts()
        cmap = color_map(counts.index)
        order = sorted(counts.index, key=lambda v: (str(type(v)), v))
        fig.add_trace(go.Bar(x=[str(v) for v in order], y=[int(counts[v]) for v in order],
                             marker_color=[cmap[v] for v in order], hovertemplate="%{x}: %{y} LoRAs<extra></extra>"))
        fig.update_xaxes(title_text=axis_title(col), type="category")
    else:
        fig.add_trace(go.Histogram(x=s, marker_color=PALETTE[0], nbinsx=30,
                                   hovertemplate="%{x}: %{y} LoRAs<extra></extra>"))
        fig.update_xaxes(title_text=axis_title(col))
    fig.update_yaxes(title_text="number of LoRAs")
    return style(fig, height=320, legend=False)


def embedding_scatter(xy: np.ndarray, df: pd.DataFrame, color_col: str | None, *, hover: Sequence[str] = (),
                      title: str | None = None, height: int = 560, highlight: Sequence[str] = ()) -> go.Figure:
    """A 2-D map (e.g. UMAP) of LoRAs coloured by one column: discrete colours for categories and booleans, a
    continuous scale for numbers; the LoRAs in ``highlight`` are ringed. Axes are UMAP coordinates (unitless)."""
    d = df.reset_index(drop=True)
    custom, template = _hover(d, [c for c in [color_col, *hover] if c])
    fig = go.Figure()

    def points(m, name, **marker):
        fig.add_trace(go.Scattergl(x=xy[m, 0], y=xy[m, 1], mode="markers", name=name, customdata=custom[m],
                                   hovertemplate=template + "<extra></extra>", marker=marker))

    every = np.ones(len(d), dtype=bool)
    if color_col is None or color_col not in d.columns:
        points(every, "LoRAs", size=9, color=PALETTE[0], opacity=0.85)
    elif _is_categorical(d[color_col]):
        for v, c in color_map(d[color_col]).items():
            points((d[color_col] == v).to_numpy(), f"{color_col} = {v}", size=9, color=c, opacity=0.85)
        if d[color_col].isna().any():
            points(d[color_col].isna().to_numpy(), f"{color_col} unknown", size=7, color="#bbbbbb", opacity=0.6)
    else:
        points(every, color_col, size=9, color=pd.to_numeric(d[color_col], errors="coerce"), colorscale=CONTINUOUS,
               opacity=0.9, colorbar=dict(title=dict(text=axis_title(color_col), side="right")))
    _ring(fig, xy[:, 0], xy[:, 1], d["id"].astype(str).to_numpy(), highlight)
    fig.update_xaxes(title_text="UMAP 1 (unitless)", showticklabels=False)
    fig.update_yaxes(title_text="UMAP 2 (unitless)", showticklabels=False)
    fig.update_layout(dragmode="select")  # dragging selects LoRAs (box) instead of panning
    return style(fig, title, height=height)


def prob_bars(labels: Sequence[str], probs: Sequence[float], truth: Sequence[bool | None], title: str) -> go.Figure:
    """One LoRA's predicted probability per binary label, each bar coloured (and labelled in/out) by the truth."""
    fig = go.Figure(go.Bar(x=list(labels), y=list(probs), marker_color=[PALETTE[1] if t else PALETTE[0] for t in truth],
                           text=["in" if t else "out" for t in truth], textposition="outside",
                           hovertemplate="%{x}: p = %{y:.3f}<extra></extra>"))
    fig.add_hline(y=0.5, line_dash="dot", line_color="#888")
    fig.update_yaxes(title_text="predicted probability", range=[0, 1.12])
    fig.update_xaxes(title_text="label (bar colour and text: the truth)", type="category")
    return style(fig, title, height=380, legend=False)


def _ring(fig: go.Figure, x, y, ids, highlight: Sequence[str]) -> None:
    """Black rings around the points whose id is in ``highlight``: the LoRAs selected on this or another chart."""
    want = set(map(str, highlight))
    m = np.array([i in want for i in ids], dtype=bool)
    if m.any():
        fig.add_trace(go.Scatter(x=np.asarray(x)[m], y=np.asarray(y)[m], mode="markers", name="selected",
                                 customdata=np.asarray(ids)[m][:, None], hovertemplate="<b>%{customdata[0]}</b> "
                                 "(selected)<extra></extra>", marker=dict(size=18, symbol="circle-open",
                                                                          color="#000000", line=dict(width=3))))


def selected_ids(event) -> list[str]:
    """LoRA ids of the points selected (clicked, box or lasso) in an ``st.plotly_chart(on_select=...)`` event."""
    if not event:
        return []
    sel = event.get("selection", {}) if isinstance(event, Mapping) else getattr(event, "selection", {})
    points = sel.get("points", []) if isinstance(sel, Mapping) else getattr(sel, "points", [])
    ids = []
    for p in points or []:
        cd = p.get("customdata") if isinstance(p, Mapping) else None
        if cd is None:
            continue
        v = cd[0] if isinstance(cd, (list, tuple)) else cd
        if str(v) not in ids:
            ids.append(str(v))
    return ids
