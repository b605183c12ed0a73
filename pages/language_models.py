"""Language models: predicted vs actual challenge accuracy and eval loss for the LM collection, and which question
sources a LoRA was finetuned on."""
import streamlit as st

from lol.app import preds, views
from lol.app.sidebar import render

ctx = render()  # the shared sidebar: collection, device, LoL model
st.title("Language models")
lm = views.lm_context(ctx)
if lm is None:
    st.info("No language-model collection: choose one in the sidebar, or build the shipped `lm` collection with "
            "`lol zoo build`.")
else:
    coll = lm.collection
    df = lm.table().reset_index(drop=True)
    st.caption(views.collection_caption(lm))
    models = preds.compatible_models(lm, coll)
    regress = [c for c in views.labels_of_kind(coll, "regression") if c in df.columns]
    if not models:
        st.info("No trained LoL model fits the LM collection yet; showing the measured labels only.")
        if regress:
            lab = st.selectbox("Label", regress, key="lm_label_only")
            from lol.app import plots
            st.plotly_chart(plots.distribution(df, lab), width="stretch", key="lm_dist")
    else:
        names = [m.name for m in models]
        if lm is ctx and ctx.model is not None and ctx.model.name in names:
            pick = ctx.model.name  # the sidebar's model already fits the LM collection
            st.markdown(f"LoL model: **{pick}** (choose it in the sidebar)")
        else:
            pick = st.selectbox("LoL model for the LM collection", names, key="lm_model")
        model = models[names.index(pick)]
        f = preds.prediction_frame(lm, model, coll)
        if f is not None:
            labels = [c for c in preds.predicted_labels(f, coll, "regression")]
            if labels:
                cols = st.columns(min(2, len(labels)))
                for i, lab in enumerate(labels[:2] if len(labels) <= 2 else labels):
                    with cols[i % len(cols)]:
                        views.pred_vs_true_panel(f, df, lab, pick, key=f"lm_pv_{lab}", narrow=len(cols) > 1)
    tasks = preds.membership_tasks(coll)
    if tasks:
        st.subheader("Source membership")
        views.membership_section(lm, coll, tasks, key="lm_mem")
