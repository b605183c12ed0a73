"""Membership: which classes (or, for the LM collection, which data sources) a LoRA was finetuned on. For one LoRA,
predicted probability per class vs the truth; over the test split, log-scale ROC curves, AUC, TPR at 1% and 0.1%
FPR, and a threshold slider with the resulting counts."""
import streamlit as st

from lol.app import views
from lol.app.sidebar import context
from lol.labels import membership_tasks

ctx = context()  # what the sidebar (drawn by app.py) chose: collection, device, LoL model
st.title("Membership")
if ctx.require_collection():
    tasks = membership_tasks(ctx.collection)
    if not tasks:
        st.info("This collection has no membership labels (a group of binary labels such as the classes or the "
                "data sources used for finetuning). The shipped `fashion` and `lm` collections have them.")
    else:
        views.membership_section(ctx, tasks, key="mem")
