"""Embeddings: a UMAP map of GL-invariant embeddings of the collection, coloured by any column; a click opens the
LoRA. The note at the bottom shows why: raw factors move under a GL transform, invariant features do not."""
import streamlit as st

from lol.app import cache, nav, plots, views
from lol.app.sidebar import context
from lol.labels import label_columns

ctx = context()  # what the sidebar (drawn by app.py) chose: collection, device, LoL model
st.title("Embeddings")
if ctx.require_collection():
    coll = ctx.collection
    df = ctx.table().reset_index(drop=True)
    sources = {"Singular values of every ΔW (invariant features)": "svals",
               "SVD canonical form (invariant features)": "canon"}
    if ctx.model is not None:
        sources = {f"LoL model embedding: {ctx.model.title}": "model", **sources}
    c1, c2, c3 = st.columns([2, 1, 1])
    src = c1.selectbox("Embed", list(sources), key="emb_source",
                       help="Every choice is invariant to (U, V) ↦ (UR, VR⁻ᵀ), R ∈ GL(r), per module.")
    n_neighbors = c2.select_slider("UMAP neighbours", [5, 10, 15, 30, 50], value=15, key="emb_nn")
    min_dist = c3.select_slider("UMAP min. distance", [0.0, 0.1, 0.25, 0.5], value=0.1, key="emb_md")

    kind = sources[src]
    ckpt = ctx.model.path if kind == "model" else None
    xy = cache.shipped_map(ctx.path, ctx.key, kind, ckpt, n_neighbors, min_dist)  # `lol zoo precompute` wrote it
    if xy is None:  # computed once (with a spinner), then kept on disk
        feats = cache.model_embeddings(ckpt, ctx.device, ctx.path, ctx.key) if kind == "model" else \
            cache.invariant_features(ctx.path, ctx.key, kind)
        xy = cache.umap_xy(feats, f"{coll.fingerprint}:{kind}:{ckpt or ''}", n_neighbors, min_dist)
    p = ctx.predictions()  # predictions and errors to colour by, beside the labels
    color_df = df if p is None else df.assign(id=df["id"].astype(str)).merge(p.frame(), on="id", how="left")
    options = ["(none)"] + [c for c in color_df.columns if c != "id" and color_df[c].nunique(dropna=True) > 1]
    default = next((c for c in label_columns(coll, df) if c in options), "(none)")
    color = st.selectbox("Colour by (label, attribute, hyperparameter, prediction or error)", options,
                         index=options.index(default), key="emb_color")
    hover = [c for c in ("group", "split") if c in color_df.columns]
    picked = nav.take_selection("emb_map")  # a box or click here rings the LoRAs on every page's charts
    fig = plots.embedding_scatter(xy, color_df, None if color == "(none)" else color, hover=hover,
                                  title=f"UMAP · {src.split(' (')[0]} · {len(df)} LoRAs",
                                  highlight=nav.highlighted())
    st.plotly_chart(fig, width="stretch", key="emb_map", on_select="rerun",
                    selection_mode=("points", "box", "lasso"))
    if picked:
        st.markdown(f"**Selected:** {', '.join(picked[:10])}{' …' if len(picked) > 10 else ''}")
        st.markdown(views.lora_row_markdown(color_df, picked[0]))
        b1, b2 = st.columns(2)
        if b1.button("Open detail view", key="emb_open", icon=":material/table_view:"):
            nav.open_lora(picked[0], "collection.py")
        if b2.button("Generate with it", key="emb_gen", icon=":material/image:"):
            nav.open_lora(picked[0], "generate.py")
    else:
        st.caption("Click a point (or draw a box) to select a LoRA; hover shows its id and labels.")

    with st.expander("Why invariant features? The GL(r) check", expanded=False):
        st.markdown("Each LoRA module can be rewritten as (UR, VR⁻ᵀ) for any invertible R without changing ΔW = UVᵀ. "
                    "Below, every LoRA gets an independent random non-orthogonal R per module: the map of the raw "
                    "factors changes, the invariant features (and hence their map) do not.")
        if st.toggle("Run the check", key="emb_gl_check"):
            views.gl_check(ctx, limit=300)
