"""View pieces shared by several pages: the LoRA detail view, collection captions, label lookups."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from . import cache, fmt, nav, plots
from .glossary import metric_help
from . import data as app_data
from ..errors import LoLError
from .errors import plain

__all__ = ["collection_caption", "label_columns", "labels_of_kind", "label_description", "lora_detail",
           "lora_row_markdown"]

_NON_LABEL = {"id", "group", "split", "rank", "path", "file", "source_path"}


def collection_caption(ctx, named: bool = True) -> str:
    """``**lm** · 400 LoRAs · 8 adapted modules · base model: `base/lm` `` (without the name in the sidebar)."""
    c = ctx.collection
    base = app_data.describe_base(getattr(c, "base_model", None))
    bits = [f"**{ctx.source}**"] * named + [f"{len(c)} LoRAs", f"{len(c.spec)} adapted modules"]
    return " · ".join(bits + ([f"base model: `{base}`"] if base else []))


def _labels(coll) -> dict:
    return dict(getattr(coll, "labels", {}) or {})


def label_columns(coll, df: pd.DataFrame) -> list[str]:
    """Columns worth filtering and colouring by: declared labels first, then other metadata (hyperparameters)."""
    declared = [c for c in _labels(coll) if c in df.columns]
    rest = [c for c in df.columns if c not in declared and c not in _NON_LABEL and df[c].nunique(dropna=True) > 1
            and (pd.api.types.is_numeric_dtype(df[c]) or df[c].nunique(dropna=True) <= 30)]
    return declared + rest


def labels_of_kind(coll, kind: str, task: str | None = None) -> list[str]:
    """Declared labels of one kind ("regression", "binary", "category"), optionally of one task."""
    return [n for n, d in _labels(coll).items() if d.get("kind") == kind and (task is None or d.get("task") == task)]


def label_description(coll, name: str) -> str:
    d = _labels(coll).get(name)
    if not d:
        return f"{name}: metadata column"
    return f"{name} ({d.get('kind', '?')}, task {d.get('task', '?')}): {d.get('description', '')}"


def lora_row_markdown(df: pd.DataFrame, lora_id: str, cols=None) -> str:
    row = df[df["id"].astype(str) == str(lora_id)]
    if row.empty:
        return ""
    r = row.iloc[0]
    cols = cols or [c for c in df.columns if c != "id"]
    return " · ".join(f"{c}: **{_fmt(r[c])}**" for c in cols
                      if c in r.index and pd.notna(r[c]) and str(r[c]).strip() != "")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def lora_detail(ctx, index: int, lora_id: str, df: pd.DataFrame) -> None:
    """Per-module shapes, ranks, α, scales, ‖ΔW‖_F and the singular-value spectra of one LoRA (all GL-invariant
    except the raw rank/alpha/scale bookkeeping), with a link to Generate."""
    st.markdown(lora_row_markdown(df, lora_id))
    table, svals = cache.lora_summary(ctx.path, ctx.key, int(index))
    c1, c2, c3 = st.columns(3)
    c1.metric("modules", len(table))
    c2.metric("ranks", ", ".join(str(r) for r in sorted(set(table["rank r"]))))
    c3.metric("‖ΔW‖_F summed over modules", f"{table['‖ΔW‖_F'].sum():.4g}")
    left, right = st.columns([1, 1])
    with left:
        st.dataframe(fmt.table(table), hide_index=True, height=380, width="stretch")
    with right:
        st.plotly_chart(plots.spectra(svals), width="stretch", key=f"spectra_{lora_id}")
    st.caption("‖ΔW‖_F and the singular values σᵢ(ΔW) are computed from the factors (QR of U and V, r×r core), "
               "never forming ΔW; they are invariant to every (U, V) ↦ (UR, VR⁻ᵀ), R ∈ GL(r).")
    if st.button("Generate images with this LoRA", key=f"gen_{lora_id}", icon=":material/image:"):
        nav.open_lora(lora_id, "generate.py")


def gl_check(ctx, limit: int = 300, seed: int = 1) -> None:
    """Raw factors vs invariant features under an independent random R ∈ GL(r) per module and LoRA (float64):
    the measured relative feature change, and the UMAP maps before/after for both."""
    import numpy as np

    n = min(limit, len(ctx.collection))
    if n < 4:
        st.info("The check needs at least 4 LoRAs.")
        return
    raw = cache.invariant_features(ctx.path, ctx.key, "raw", None, n, True)
    raw_gl = cache.invariant_features(ctx.path, ctx.key, "raw", seed, n, True)
    inv = cache.invariant_features(ctx.path, ctx.key, "svals", None, n, True)
    inv_gl = cache.invariant_features(ctx.path, ctx.key, "svals", seed, n, True)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-300))

    c1, c2 = st.columns(2)
    c1.metric("raw factors: relative change under GL", f"{rel(raw, raw_gl):.3g}")
    c2.metric("singular values of ΔW: relative change under GL", f"{rel(inv, inv_gl):.1e}")
    df = ctx.table().reset_index(drop=True).iloc[:n]
    color = next(iter(label_columns(ctx.collection, df)), None)
    fp = str(getattr(ctx.collection, "fingerprint", ctx.key))
    maps = {"raw factors": cache.umap_xy(raw, f"{fp}:raw:{n}"),
            "raw factors after GL": cache.umap_xy(raw_gl, f"{fp}:raw-gl{seed}:{n}"),
            "invariant features": cache.umap_xy(inv, f"{fp}:svals:{n}"),
            "invariant features after GL": cache.umap_xy(inv_gl, f"{fp}:svals-gl{seed}:{n}")}
    names = list(maps)
    for row in (names[:2], names[2:]):
        cols = st.columns(2)
        for col, name in zip(cols, row):
            col.plotly_chart(plots.embedding_scatter(maps[name], df, color, title=name, height=380,
                                                     highlight=nav.highlighted()),
                             width="stretch", key=f"glcheck_{name}")
    moved_raw = _procrustes_disparity(maps["raw factors"], maps["raw factors after GL"])
    moved_inv = _procrustes_disparity(maps["invariant features"], maps["invariant features after GL"])
    st.caption(f"Map disparity after the best rotation, scaling and shift (0 = same map, 1 = unrelated): raw "
               f"{moved_raw:.3f}, invariant {moved_inv:.3f}. First {n} LoRAs, float64, R = Q₁ diag(s) Q₂ with "
               f"condition number 4.")


def _procrustes_disparity(a, b) -> float:
    from scipy.spatial import procrustes

    try:
        return float(procrustes(a, b)[2])
    except ValueError:  # degenerate map (all points equal)
        return float("nan")


# ---------------------------------------------------------------------------------------------------- predictions

def _merge_truth(frame: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    truth = df.assign(id=df["id"].astype(str))
    drop = [c for c in frame.columns if c in truth.columns and c != "id"]
    return truth.merge(frame.drop(columns=drop), on="id", how="inner")


def _split_rows(m: pd.DataFrame, split: str | None) -> pd.DataFrame:
    """Rows in ``split`` by the model's own split column (`preds.SPLIT`), else the table's ``split``."""
    from .preds import SPLIT

    col = SPLIT if SPLIT in m else "split"
    return m[m[col] == split] if split and col in m else m


def pred_vs_true_panel(frame: pd.DataFrame, df: pd.DataFrame, label: str, model_name: str, key: str,
                       color: str | None = None, narrow: bool = False) -> None:
    """Scatter of predicted vs actual ``label`` on the model's test split (`preds.eval_split`) with R², Spearman ρ,
    Kendall τ (`lol.metrics`); clicking a point selects that LoRA and offers its detail view."""
    from ..metrics import kendall, r2, spearman
    from .preds import PRED, eval_split

    split, note = eval_split(frame)
    m = _split_rows(_merge_truth(frame, df), split)
    y, p = m[label].to_numpy(float), m[f"{label}{PRED}"].to_numpy(float)
    st.markdown(f"**{model_name}**")
    c1, c2, c3, c4 = (st.columns(2) + st.columns(2)) if narrow else st.columns(4)
    c1.metric("R²", f"{r2(y, p):.3f}", help=metric_help("R²"))
    c2.metric("Spearman ρ", f"{spearman(y, p):.3f}", help=metric_help("Spearman ρ"))
    c3.metric("Kendall τ", f"{kendall(y, p):.3f}", help=metric_help("Kendall τ"))
    c4.metric("LoRAs", len(m), help=metric_help("LoRAs"))
    hover = [c for c in ("group",) if c in m.columns]
    picked = nav.take_selection(key)  # a box or click here rings the LoRAs on every page's charts
    fig = plots.pred_vs_true(m.rename(columns={f"{label}{PRED}": "predicted"}), label, "predicted", name=model_name,
                             hover=hover, color=color, highlight=nav.highlighted())
    st.caption(note)
    st.plotly_chart(fig, width="stretch", key=key, on_select="rerun", selection_mode=("points", "box", "lasso"))
    if picked:
        st.markdown(f"Selected **{picked[0]}** · " + lora_row_markdown(m, picked[0], [label, f"{label}{PRED}"]))
        if st.button("Open its detail view", key=f"{key}_open", icon=":material/table_view:"):
            nav.open_lora(picked[0], "collection.py")


def attribute_panel(frames: dict, df: pd.DataFrame, labels: list[str], categories: list[str] = ()) -> None:
    """Per binary attribute: AUC and accuracy at 0.5 of each model on its test split (`lol.metrics.binary_metrics`);
    per category label: accuracy and balanced accuracy (`lol.metrics.category_metrics`); and for one chosen LoRA
    its predicted probabilities next to the truth."""
    from ..metrics import binary_metrics, category_metrics
    from .preds import PRED, eval_split

    rows = []
    for name, f in frames.items():
        m = _split_rows(_merge_truth(f, df), eval_split(f)[0])
        for lab in labels:
            if f"{lab}{PRED}" not in m:
                continue
            r = binary_metrics(m[lab].astype(float).to_numpy(), m[f"{lab}{PRED}"].to_numpy(float))
            rows.append({"model": name, "attribute": lab, "AUC": r["auc"], "accuracy @0.5": r["accuracy"],
                         "balanced accuracy": r["balanced_accuracy"], "positives": int(m[lab].astype(float).sum()),
                         "LoRAs": len(m)})
        for lab in categories:
            if f"{lab}{PRED}" not in m:
                continue
            ok = m[lab].notna().to_numpy()
            r = category_metrics(m[lab].to_numpy(object)[ok], m[f"{lab}{PRED}"].to_numpy(object)[ok])
            rows.append({"model": name, "attribute": lab, "AUC": float("nan"), "accuracy @0.5": r["accuracy"],
                         "balanced accuracy": r["balanced_accuracy"], "positives": float("nan"), "LoRAs": int(ok.sum())})
    if rows:
        table = pd.DataFrame(rows).rename(columns={"accuracy @0.5": "accuracy"})
        st.dataframe(fmt.table(table, digits=3), hide_index=True, width="stretch", column_config=metric_columns(table))
        st.caption("Binary attributes: accuracy at probability 0.5; category labels (e.g. hair colour): accuracy of "
                   "the most likely class.")
    if not labels:
        return
    first_name, first = next(iter(frames.items()))
    ids = first["id"].tolist()
    nav.sync_widget("attr_lora", ids)
    lid = st.selectbox("LoRA", ids, key="attr_lora", on_change=nav.chosen_from_widget, args=("attr_lora",))
    m = _merge_truth(first, df)
    row = m[m["id"] == lid]
    if not row.empty:
        st.plotly_chart(_prob_bars(row.iloc[0], labels, f"{lid}: {first_name}"), width="stretch",
                        key="attr_bars")


def _prob_bars(row, labels, title):
    import plotly.graph_objects as go

    from .preds import PRED

    labels = [lab for lab in labels if f"{lab}{PRED}" in row.index]
    truth = [bool(row[lab]) if pd.notna(row[lab]) else None for lab in labels]
    fig = go.Figure(go.Bar(x=labels, y=[float(row[f"{lab}{PRED}"]) for lab in labels],
                           marker_color=[plots.PALETTE[1] if t else plots.PALETTE[0] for t in truth],
                           text=["in" if t else "out" for t in truth], textposition="outside",
                           hovertemplate="%{x}: p = %{y:.3f}<extra></extra>"))
    fig.add_hline(y=0.5, line_dash="dot", line_color="#888")
    fig.update_yaxes(title_text="predicted probability", range=[0, 1.12])
    fig.update_xaxes(title_text="label (bar colour and text: the truth)", type="category")
    return plots.style(fig, title, height=380, legend=False)


# ----------------------------------------------------------------------------------------------------- membership

def membership_section(ctx, coll, tasks: dict, key: str) -> None:
    """Per LoRA: predicted probability per class vs truth. Over the test split: log-scale ROC curves, AUC, TPR at
    1% and 0.1% FPR (`lol.metrics`), and a threshold slider with the resulting counts."""
    import numpy as np

    from .. import metrics as M
    from .preds import PRED, compatible_models, prediction_frame

    df = ctx.table().reset_index(drop=True)
    task = st.selectbox("Task", list(tasks), key=f"{key}_task") if len(tasks) > 1 else next(iter(tasks))
    labels = tasks[task]
    models = [m for m in compatible_models(ctx, coll)]
    frame, model = None, None
    for m in models:  # the first model that predicts this task's labels
        f = prediction_frame(ctx, m, coll)
        if f is not None and any(f"{lab}{PRED}" in f for lab in labels):
            frame, model = f, m
            break
    if frame is None:
        st.info(f"No trained LoL model predicts the {task!r} labels of this collection; showing the truth only.")
        counts = df[labels].astype(float).sum().rename("LoRAs finetuned on it").to_frame()
        st.dataframe(counts, width="stretch")
        return
    labels = [lab for lab in labels if f"{lab}{PRED}" in frame]
    m_all = _merge_truth(frame, df)
    st.caption(f"Model: **{model.name}** · {len(labels)} {task} labels")

    st.subheader("One LoRA")
    ids = m_all["id"].tolist()
    nav.sync_widget(f"{key}_lora", ids)
    lid = st.selectbox("LoRA", ids, key=f"{key}_lora", on_change=nav.chosen_from_widget, args=(f"{key}_lora",))
    row = m_all[m_all["id"] == lid].iloc[0]
    st.plotly_chart(_prob_bars(row, labels, f"{lid}: predicted probability per {task} label"), width="stretch",
                    key=f"{key}_bars")

    from .preds import eval_split

    split, note = eval_split(frame)
    m = _split_rows(m_all, split)
    st.subheader(f"Over the {'test split' if split == 'test' else 'collection'} ({len(m)} LoRAs)")
    st.caption(note)
    truth = {lab: m[lab].astype(float).to_numpy() for lab in labels}
    rows = M.membership_rows(truth, {lab: m[f"{lab}{PRED}"].to_numpy(float) for lab in labels})
    y, p = np.concatenate(list(truth.values())), np.concatenate([m[f"{lab}{PRED}"].to_numpy(float) for lab in labels])
    thr = st.slider("Decision threshold on the predicted probability", 0.0, 1.0, 0.5, 0.01, key=f"{key}_thr")
    k = M.confusion(y, p, thr)
    tp, fp, tn, fn = k["tp"], k["fp"], k["tn"], k["fn"]
    for col, (name, v) in zip(st.columns(6), [("true positives", tp), ("false positives", fp),
                                              ("true negatives", tn), ("false negatives", fn),
                                              ("TPR", f"{tp / max(tp + fn, 1):.3f}"),
                                              ("FPR", f"{fp / max(fp + tn, 1):.4f}")]):
        col.metric(name, v)
    curves = []
    try:
        fpr, tpr, _ = M.roc_curve(y, p)
        curves.append(("all labels pooled", fpr, tpr, rows[0]["AUC"]))
        show = st.multiselect("Also show labels", labels, default=labels[:3], key=f"{key}_roc_labels")
        for lab in show:
            yl, pl = m[lab].astype(float).to_numpy(), m[f"{lab}{PRED}"].to_numpy(float)
            if len(np.unique(yl[np.isfinite(yl)])) == 2:
                f_, t_, _ = M.roc_curve(yl, pl)
                curves.append((lab, f_, t_, M.auc(yl, pl)))
        op = (fp / max(fp + tn, 1), tp / max(tp + fn, 1), f"threshold {thr:.2f}")
        min_fpr = max(1e-4, 0.5 / max(int(np.sum(y == 0)), 1))
        st.plotly_chart(plots.roc_curves(curves, "ROC (log false-positive rate)", min_fpr=min_fpr, points=[op]),
                        width="stretch", key=f"{key}_roc")
    except ValueError as e:
        st.info(f"No ROC curve: {e}")
    table = pd.DataFrame(rows)
    st.dataframe(fmt.table(table, digits=3), hide_index=True, width="stretch", column_config=metric_columns(table))
    st.caption("TPR at a low FPR needs many negatives: with fewer than 100 (1000) negatives, TPR @ 1% (0.1%) FPR is "
               "the TPR at zero false positives.")


def lm_context(ctx):
    """The sidebar's collection when its LoRAs adapt a language model (`lol.showcase.domain`), else the shipped
    ``lm`` collection opened like the sidebar would; None when neither exists."""
    from dataclasses import replace
    from pathlib import Path

    from ..showcase import domain
    from . import data as app_data

    if ctx.collection is not None and domain(ctx.collection) == "language":
        return ctx
    shipped = app_data.shipped_collections().get("lm")
    if shipped is None:
        return None
    try:
        key = cache.path_key(shipped)
        coll = cache.collection(str(shipped), key)
    except (LoLError, OSError) as e:
        st.error(f"Could not open the shipped lm collection: {plain(e)}")
        return None
    return replace(ctx, source="lm (shipped)", path=str(Path(shipped)), key=key, kind="shipped", collection=coll,
                   problem=None)


def metric_columns(table: pd.DataFrame) -> dict:
    """``st.dataframe`` column_config giving every metric column its explanation as a header tooltip."""
    return {c: st.column_config.Column(help=metric_help(str(c))) for c in table.columns if metric_help(str(c))}
