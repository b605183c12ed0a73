"""Predict: predicted vs actual (CLIP score and other regression labels) on the test split with R², Spearman ρ and
Kendall τ; two models side by side; attribute predictions vs truth; predictions for uploaded LoRA files."""
import streamlit as st

from lol.app import answers, cache, plots, views
from lol.app.sidebar import max_upload_mb, context

ctx = context()  # what the sidebar (drawn by app.py) chose: collection, device, LoL model
st.title("Predict")
if ctx.require_collection():
    coll = ctx.collection
    models = ctx.fitting()
    base = next((b for b in cache.shipped_bases() if b.spec.keys == coll.spec.keys), None)
    if not getattr(coll, "labels", None) and base is not None:
        # no labels (e.g. uploaded files): predictions and nearest known LoRAs instead of predicted-vs-actual
        st.markdown(f"These LoRAs fit **{base.name}**; they have no measured labels, so here are the predictions "
                    f"and, for each, the nearest LoRAs of the collection the model was trained on.")
        ids = ctx.table()["id"].astype(str).tolist()[:64]
        answers.answers_for(ctx, base, [(i, coll.lora(k)) for k, i in enumerate(ids)], key="pred_coll")
    elif not models:
        st.info("No trained LoL model fits this collection (same modules and labels). Train one with `lol train` "
                "or the notebooks, or choose another collection.")
    else:
        names = [m.title for m in models]
        first = ctx.model if ctx.model is not None and ctx.model.title in names else models[0]
        st.markdown(f"LoL model: **{first.title}** (choose it in the sidebar)")
        second = st.selectbox("Compare with", ["(none)"] + [n for n in names if n != first.title], key="pred_compare")
        chosen = [first] + ([models[names.index(second)]] if second != "(none)" else [])
        preds = {m.title: ctx.predictions(m) for m in chosen}
        # labels every shown model predicts: a comparison is only drawn on labels both models have
        regress, binary, category = (sorted(set.intersection(*(set(p.labels(kind)) for p in preds.values())))
                                     for kind in ("regression", "binary", "category"))
        if len(preds) > 1 and not (regress or binary or category):
            (a, pa), (b, pb) = preds.items()
            st.info(f"**{a}** and **{b}** predict no label in common, so there is nothing to compare "
                    f"({a}: {', '.join(pa.labels())}; {b}: {', '.join(pb.labels())}).")
        if regress:
            label = st.selectbox("Label", regress, key="pred_label",
                                 index=next((i for i, r in enumerate(regress) if "clip" in r), 0))
            rel = cache.label_reliability(ctx.path, ctx.key).get(label)
            rel = rel if rel and rel.get("method") == "retest" and rel["r"] == rel["r"] else None   # r not NaN
            for i, (col, (name, p)) in enumerate(zip(st.columns(len(preds)), preds.items())):
                with col:  # first model blue, the compared one orange
                    views.pred_vs_true_panel(p, label, name, key=f"pv_{name}", color=plots.PALETTE[i],
                                             narrow=len(preds) > 1, reliability=rel)
        if binary or category:
            st.subheader("Attributes: predicted vs truth")
            views.attribute_panel(preds, binary, category)
    st.subheader("Predict for your own LoRA files")
    answers.upload_section(ctx, max_upload_mb())
