"""Membership: which classes (or, for the LM collection, which data sources) a LoRA was finetuned on. For one LoRA,
predicted probability per class vs the truth; over the test split, log-scale ROC curves, AUC, TPR at 1% and 0.1%
FPR, and a threshold slider with the resulting counts."""
import streamlit as st

from lol.app import cache, views
from lol.app.sidebar import context, open_shipped_button
from lol.errors import LoLError
from lol.labels import membership_tasks
from lol.paths import shipped_collections


def shipped_tasks(path) -> dict:
    """A shipped collection's membership tasks; {} when it cannot be opened (the sidebar says why if chosen)."""
    try:
        return membership_tasks(cache.collection(str(path), cache.path_key(path)))
    except (LoLError, OSError, ValueError):
        return {}


ctx = context()  # what the sidebar (drawn by app.py) chose: collection, device, LoL model
st.title("Membership")
if ctx.require_collection():
    tasks = membership_tasks(ctx.collection)
    if not tasks:
        with_tasks = {name: t for name, p in shipped_collections().items()
                      if str(p) != ctx.path and (t := shipped_tasks(p))}
        st.info("This collection has no membership labels (a group of binary labels such as the classes or the "
                "data sources used for finetuning)." + (" These shipped collections have them:" if with_tasks else ""))
        for name, t in with_tasks.items():
            open_shipped_button(name, ", ".join(f"{task}: {len(labels)} labels" for task, labels in t.items()))
    else:
        views.membership_section(ctx, tasks, key="mem")
