"""View pieces shared by several pages: the LoRA detail view, the GL(r) check, predicted-vs-actual panels,
attribute and membership views. They lay out what the library returns (`lol.predict.CollectionPredictions`,
`lol.metrics`, `lol.precomputed`, `lol.showcase`)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from . import cache, fmt, nav, plots
from .glossary import metric_help
from .. import metrics as M

__all__ = ["lora_row_markdown", "lora_detail", "gl_check", "pred_vs_true_panel", "attribute_panel",
           "membership_section", "lm_context", "metric_columns"]


def lora_row_markdown(df: pd.DataFrame, lora_id: str, cols=None) -> str:
    """``clip_score: **21.3** · male: **True** …``: one LoRA's row of ``df`` (``cols``, default all but ``id``)."""
    row = df[df["id"].astype(str) == str(lora_id)]
    if row.empty:
        return ""
    r = row.iloc[0]
    cols = cols or [c for c in df.columns if c != "id"]
    return " · ".join(f"{c}: **{fmt.number(r[c])}**" for c in cols
                      if c in r.index and pd.notna(r[c]) and str(r[c]).strip() != "")


def lora_detail(ctx, index: int, lora_id: str, df: pd.DataFrame) -> None:
    """Per-module shapes, ranks, α, scales, ‖ΔW‖_F and the singular-value spectra of one LoRA
    (`lol.showcase.module_table`), with a link to Generate."""
    st.markdown(lora_row_markdown(df, lora_id))
    table, svals = cache.lora_summary(ctx.path, ctx.key, int(index))
    c1, c2, c3 = st.columns(3)
    c1.metric("modules", len(table))
    c2.metric("ranks", ", ".join(str(r) for r in sorted(set(table["rank r"]))))
    c3.metric("‖ΔW‖_F summed over modules", f"{table['‖ΔW‖_F'].sum():.4g}")
    left, right = st.columns([1, 1])
    left.dataframe(fmt.table(table), hide_index=True, height=380, width="stretch")
    right.plotly_chart(plots.spectra(svals), width="stretch", key=f"spectra_{lora_id}")
    st.caption("‖ΔW‖_F and the singular values σᵢ(ΔW) are computed from the factors (QR of U and V, r×r core), "
               "never forming ΔW; they are invariant to every (U, V) ↦ (UR, VR⁻ᵀ), R ∈ GL(r).")
    if st.button("Generate images with this LoRA", key=f"gen_{lora_id}", icon=":material/image:"):
        nav.open_lora(lora_id, "generate.py")


def gl_check(ctx, limit: int = 300, seed: int = 1) -> None:
    """Raw factors vs invariant features under an independent random R ∈ GL(r) per module and LoRA
    (`lol.precomputed.gl_check`): the measured relative feature change, and the UMAP maps before/after for both."""
    from ..labels import label_columns
    from ..precomputed import map_disparity

    n = min(limit, len(ctx.collection))
    if n < 4:
        st.info("The check needs at least 4 LoRAs.")
        return
    chk = cache.gl_check(ctx.path, ctx.key, n, seed)
    c1, c2 = st.columns(2)
    c1.metric("raw factors: relative change under GL", f"{chk.raw_change:.3g}")
    c2.metric("singular values of ΔW: relative change under GL", f"{chk.invariant_change:.1e}")
    df = ctx.table().reset_index(drop=True).iloc[:n]
    color = next(iter(label_columns(ctx.collection, df)), None)
    fp = str(getattr(ctx.collection, "fingerprint", ctx.key))
    maps = {"raw factors": cache.umap_xy(chk.raw, f"{fp}:raw:{n}"),
            "raw factors after GL": cache.umap_xy(chk.raw_moved, f"{fp}:raw-gl{seed}:{n}"),
            "invariant features": cache.umap_xy(chk.invariant, f"{fp}:svals:{n}"),
            "invariant features after GL": cache.umap_xy(chk.invariant_moved, f"{fp}:svals-gl{seed}:{n}")}
    names = list(maps)
    for row in (names[:2], names[2:]):
        for col, name in zip(st.columns(2), row):
            col.plotly_chart(plots.embedding_scatter(maps[name], df, color, title=name, height=380,
                                                     highlight=nav.highlighted()),
                             width="stretch", key=f"glcheck_{name}")
    st.caption(f"Map disparity after the best rotation, scaling and shift (0 = same map, 1 = unrelated): raw "
               f"{map_disparity(maps[names[0]], maps[names[1]]):.3f}, invariant "
               f"{map_disparity(maps[names[2]], maps[names[3]]):.3f}. First {n} LoRAs, float64, R = Q₁ diag(s) Q₂ "
               f"with condition number 4.")


def pred_vs_true_panel(p, label: str, model_name: str, key: str, color: str | None = None,
                       narrow: bool = False, reliability: dict | None = None) -> None:
    """Scatter of predicted vs actual ``label`` on the model's evaluated rows (its test split) with R², Spearman ρ,
    Kendall τ (`lol.metrics`); a click or box selects those LoRAs on every page and offers the detail view. With the
    label's test–retest ``reliability`` (`lol.reliability.retest_reliability`), R² is shown against its ceiling."""
    m, scores = p.versus(label)
    pred = f"{label} (predicted)"
    st.markdown(f"**{model_name}**")
    cols = (st.columns(2) + st.columns(2)) if narrow else st.columns(4)
    for col, (name, v) in zip(cols, [("R²", f"{scores['r2']:.3f}"), ("Spearman ρ", f"{scores['spearman']:.3f}"),
                                     ("Kendall τ", f"{scores['kendall']:.3f}"), ("LoRAs", len(m))]):
        col.metric(name, v, help=metric_help(name))
    if reliability:
        st.caption(ceiling_text(label, reliability))
    picked = nav.take_selection(key)  # a box or click here rings the LoRAs on every page's charts
    fig = plots.pred_vs_true(m, label, pred, name=model_name, hover=[c for c in ("group",) if c in m.columns],
                             color=color, highlight=nav.highlighted())
    st.caption(p.evaluated()[1])
    st.plotly_chart(fig, width="stretch", key=key, on_select="rerun", selection_mode=("points", "box", "lasso"))
    if picked:
        st.markdown(f"Selected **{picked[0]}** · " + lora_row_markdown(m, picked[0], [label, pred]))
        if st.button("Open its detail view", key=f"{key}_open", icon=":material/table_view:"):
            nav.open_lora(picked[0], "collection.py")


def ceiling_text(label: str, rel: dict) -> str:
    """One line: the R² ceiling a label's measurement noise sets (its test–retest r, `lol.reliability`)."""
    lo, hi = rel["r_ci95"]
    head = f"R² ceiling for `{label}`: **{rel['r2_ceiling']:.3f}** (95 % interval {lo:.3f}–{hi:.3f})."
    if rel.get("method") == "repeated":
        return (f"{head} The label is the mean of {rel['k']} independent measurements of each of {rel['n']} LoRAs: "
                "their noise is not in the weights, so no model's R² can exceed the mean's reliability "
                "(Spearman–Brown from the measurements' correlation).")
    return (f"{head} The label was measured twice, independently, on {rel['n']} LoRAs: the measurement's noise is not "
            "in the weights, so no model's R² can exceed the two measurements' correlation.")


def attribute_panel(preds: dict, labels: list[str], categories: list[str] = ()) -> None:
    """Per binary attribute and category label, each model's AUC, accuracy and balanced accuracy on its evaluated
    rows (`CollectionPredictions.attribute_rows`); and for one chosen LoRA its predicted probabilities and the truth."""
    rows = [{"model": name, **r} for name, p in preds.items() for r in p.attribute_rows([*labels, *categories])]
    if rows:
        table = pd.DataFrame(rows)
        st.dataframe(fmt.table(table, digits=3), hide_index=True, width="stretch", column_config=metric_columns(table))
        st.caption("Binary attributes: accuracy at probability 0.5; category labels (e.g. hair colour): accuracy of "
                   "the most likely class.")
    if labels:
        name, first = next(iter(preds.items()))
        lid = nav.lora_select(first.ids, "attr_lora")
        st.plotly_chart(_prob_bars(first, lid, labels, f"{lid}: {name}"), width="stretch", key="attr_bars")


def _prob_bars(p, lora_id: str, labels: list[str], title: str):
    return plots.prob_bars(*p.probabilities(lora_id, labels), title)


def membership_section(ctx, tasks: dict, key: str) -> None:
    """Per LoRA: predicted probability per class vs truth. Over the evaluated rows: log-scale ROC curves, AUC, TPR
    at 1% and 0.1% FPR (`lol.metrics.membership_rows`), and a threshold slider with the resulting counts."""
    task = st.selectbox("Task", list(tasks), key=f"{key}_task") if len(tasks) > 1 else next(iter(tasks))
    labels = tasks[task]
    found = ((m, ctx.predictions(m)) for m in ctx.fitting())  # the first model that predicts this task's labels
    model, p = next(((m, p) for m, p in found if p is not None and any(lab in p.values for lab in labels)),
                    (None, None))
    if p is None:
        st.info(f"No trained LoL model predicts the {task!r} labels of this collection; showing the truth only.")
        df = ctx.table()
        st.dataframe(df[labels].astype(float).sum().rename("LoRAs finetuned on it").to_frame(), width="stretch")
        return
    labels = [lab for lab in labels if lab in p.values]
    st.caption(f"Model: **{model.title}** · {len(labels)} {task} labels")

    st.subheader("One LoRA")
    lid = nav.lora_select(p.ids, f"{key}_lora")
    st.plotly_chart(_prob_bars(p, lid, labels, f"{lid}: predicted probability per {task} label"), width="stretch",
                    key=f"{key}_bars")

    rows, note = p.evaluated()
    st.subheader(f"Over the {'test split' if p.tested else 'collection'} ({int(rows.sum())} LoRAs)")
    st.caption(note)
    truth, prob = p.binary(labels)
    thr = st.slider("Decision threshold on the predicted probability", 0.0, 1.0, 0.5, 0.01, key=f"{key}_thr")
    k = M.confusion(np.concatenate(list(truth.values())), np.concatenate(list(prob.values())), thr)
    for col, (name, v) in zip(st.columns(6), [("true positives", k["tp"]), ("false positives", k["fp"]),
                                              ("true negatives", k["tn"]), ("false negatives", k["fn"]),
                                              ("TPR", f"{k['tpr']:.3f}"), ("FPR", f"{k['fpr']:.4f}")]):
        col.metric(name, v)
    table = pd.DataFrame(M.membership_rows(truth, prob))
    try:
        curves, min_fpr = M.membership_curves(truth, prob)
        shown = st.multiselect("Also show labels", labels, default=labels[:3], key=f"{key}_roc_labels")
        st.plotly_chart(plots.roc_curves([(n, *curves[n]) for n in ["all labels pooled", *shown] if n in curves],
                                         "ROC (log false-positive rate)", min_fpr=min_fpr,
                                         points=[(k["fpr"], k["tpr"], f"threshold {thr:.2f}")]),
                        width="stretch", key=f"{key}_roc")
    except ValueError as e:
        st.info(f"No ROC curve: {e}")
    st.dataframe(fmt.table(table, digits=3), hide_index=True, width="stretch", column_config=metric_columns(table))
    st.caption("TPR at a low FPR needs many negatives: with fewer than 100 (1000) negatives, TPR @ 1% (0.1%) FPR is "
               "the TPR at zero false positives.")


def lm_context(ctx):
    """The sidebar's collection when its LoRAs adapt a language model (`lol.showcase.domain`), else the shipped
    ``lm`` collection opened like the sidebar would; None when neither exists."""
    from dataclasses import replace

    from ..paths import shipped_collections
    from ..showcase import domain

    if ctx.collection is not None and domain(ctx.collection) == "language":
        return ctx
    shipped = shipped_collections().get("lm")
    if shipped is None:
        return None
    key = cache.path_key(shipped)  # a failure to open it goes to the page's error boundary
    return replace(ctx, source="lm (shipped)", path=str(shipped), key=key, kind="shipped",
                   collection=cache.collection(str(shipped), key), problem=None)


def metric_columns(table: pd.DataFrame) -> dict:
    """``st.dataframe`` column_config giving every metric column its explanation as a header tooltip."""
    return {c: st.column_config.Column(help=metric_help(str(c))) for c in table.columns if metric_help(str(c))}
