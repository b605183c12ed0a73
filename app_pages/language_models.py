"""Language models: predicted vs actual challenge accuracy and eval loss for the LM collection, and which question
sources a LoRA was finetuned on."""
import streamlit as st

from lol.app import plots, views
from lol.app.sidebar import collection_caption, context
from lol.labels import labels_of_kind, membership_tasks

ctx = context()  # what the sidebar (drawn by app.py) chose: collection, device, LoL model
st.title("Language models")
lm = views.lm_context(ctx)  # the sidebar's collection when it is a language one, else the shipped lm collection
if lm is None:
    st.info("No language-model collection: choose one in the sidebar, or build the shipped `lm` collection with "
            "`lol zoo build`.")
else:
    df = lm.table().reset_index(drop=True)
    st.caption(collection_caption(lm))
    models = lm.fitting()
    if not models:
        st.info("No trained LoL model fits the LM collection yet; showing the measured labels only.")
        regress = [c for c in labels_of_kind(lm.collection, "regression") if c in df.columns]
        if regress:
            lab = st.selectbox("Label", regress, key="lm_label_only")
            st.plotly_chart(plots.distribution(df, lab), width="stretch", key="lm_dist")
    else:
        names = [m.title for m in models]
        if lm is ctx and ctx.model is not None and ctx.model.title in names:
            pick = ctx.model.title  # the sidebar's model already fits the LM collection
            st.markdown(f"LoL model: **{pick}** (choose it in the sidebar)")
        else:
            pick = st.selectbox("LoL model for the LM collection", names, key="lm_model")
        p = lm.predictions(models[names.index(pick)])
        labels = p.labels("regression")
        cols = st.columns(min(2, len(labels))) if labels else []
        for i, lab in enumerate(labels):
            with cols[i % len(cols)]:
                views.pred_vs_true_panel(p, lab, pick, key=f"lm_pv_{lab}", narrow=len(cols) > 1)
    tasks = membership_tasks(lm.collection)
    if tasks:
        st.subheader("Source membership")
        views.membership_section(lm, tasks, key="lm_mem")
