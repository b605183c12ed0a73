"""Collection: the LoRA table with filters and search, summary figures, and one LoRA's detail view."""
import pandas as pd
import streamlit as st

from lol.app import fmt, nav, plots, views
from lol.app.sidebar import collection_caption, context
from lol.labels import describe_label, label_columns

ctx = context()  # what the sidebar (drawn by app.py) chose: collection, device, LoL model
st.title("Collection")
if ctx.require_collection():
    coll = ctx.collection
    df = ctx.table()
    st.caption(collection_caption(ctx))

    # ------------------------------------------------------------------------------------------- table + filters
    c1, c2, c3 = st.columns([2, 1, 1])
    query = c1.text_input("Search", key="coll_search", placeholder="id, group, hyperparameter value…",
                          help="Keeps rows where any column contains the text (case-insensitive).")
    splits = sorted(df["split"].dropna().unique().tolist()) if "split" in df else []
    chosen_splits = c2.multiselect("Split", splits, default=splits, key="coll_splits") if splits else []
    label_cols = label_columns(coll, df)
    filt_col = c3.selectbox("Filter by", ["(none)"] + label_cols, key="coll_filter_col")
    view = df
    if query.strip():
        q = query.strip().lower()
        mask = view.astype(str).apply(lambda s: s.str.lower().str.contains(q, regex=False)).any(axis=1)
        view = view[mask]
    if splits:
        view = view[view["split"].isin(chosen_splits)]
    if filt_col != "(none)":
        vals = sorted(df[filt_col].dropna().unique().tolist(), key=str)
        if len(vals) <= 20:
            keep = st.multiselect(f"{filt_col} is one of", vals, default=vals, key="coll_filter_vals")
            view = view[view[filt_col].isin(keep)]
        else:
            lo, hi = float(df[filt_col].min()), float(df[filt_col].max())
            rng = st.slider(f"{filt_col} between", lo, hi, (lo, hi), key="coll_filter_rng")
            view = view[view[filt_col].between(*rng)]
    st.markdown(f"**{len(view)}** of {len(df)} LoRAs shown · select a row to open its detail view")
    event = st.dataframe(view, key="coll_table", on_select="rerun", selection_mode="single-row",
                         hide_index=True, height=300, width="stretch", column_config=fmt.number_columns(view))
    rows = event.selection.rows if event and hasattr(event, "selection") else []
    if rows and rows[0] < len(view):
        nav.choose_once("coll_table", [view.iloc[rows[0]]["id"]])

    # ---------------------------------------------------------------------------------------------- summaries
    st.subheader("Summary")
    tabs = st.tabs(["Labels", "Ranks", "Modules"])
    with tabs[0]:
        if label_cols:
            lab = st.selectbox("Label", label_cols, key="coll_summary_label")
            st.plotly_chart(plots.distribution(view, lab), width="stretch", key="coll_dist")
            st.caption(describe_label(coll, lab))
        else:
            st.info("This collection has no labels (e.g. uploaded files): only ranks and modules are summarised.")
    with tabs[1]:
        if "rank" in view:
            st.plotly_chart(plots.distribution(view, "rank"), width="stretch", key="coll_ranks")
        st.caption("Largest rank r over a LoRA's modules. LoL models that respect GL(r) accept any rank.")
    with tabs[2]:
        spec = coll.spec
        mods = pd.DataFrame({"module": spec.names, "out": [o for o, _ in spec.shapes],
                             "in": [i for _, i in spec.shapes]})
        st.markdown(f"{len(spec)} adapted modules · Σ(n+m) = {spec.total_out_plus_in:,} · "
                    f"Σ n·m = {spec.total_dense:,} (entries of all ΔW)")
        st.dataframe(mods, hide_index=True, height=260, width="stretch")

    # -------------------------------------------------------------------------------------------------- detail
    st.subheader("LoRA detail")
    ids = df["id"].astype(str).tolist()
    lora_id = nav.lora_select(ids, "coll_detail")
    views.lora_detail(ctx, ids.index(lora_id), lora_id, df)
