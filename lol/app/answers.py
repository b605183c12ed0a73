"""Answers for LoRAs without labels (uploaded files, an uploaded collection): every trained model for the base they
fit predicts its labels (`lol.predict`), and the nearest LoRAs of the model's own collection in its embedding
(`lol.neighbours`) are listed with their measured labels, so an upload can be read against known LoRAs."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from . import cache, fmt

__all__ = ["upload_section", "answers_for", "models_for_base"]


def models_for_base(ctx, base) -> list:
    """The sidebar's checkpoints whose module spec is the base's (`lol.catalog.checkpoints_for`; labels not needed)."""
    from ..catalog import checkpoints_for

    fit = set(checkpoints_for(base, [m.path for m in ctx.models]))
    return [m for m in ctx.models if m.path in fit]


def answers_for(ctx, base, named: list[tuple[str, object]], key: str) -> None:
    """Predictions of a chosen model for ``named`` LoRAs ``[(name, LoRA)]`` fitting ``base``, then each one's
    nearest LoRAs in the model's collection."""
    from .. import neighbours
    from ..catalog import home_collection
    from . import data as app_data
    from .preds import predict_loras

    models = models_for_base(ctx, base)
    if not models:
        st.info(f"No trained LoL model for {base.name} yet, so there is nothing to predict with.")
        return
    names = [m.name for m in models]
    default = names.index(ctx.model.name) if ctx.model is not None and ctx.model.name in names else 0
    pick = st.selectbox("Predict with", names, index=default, key=f"{key}_model",
                        help="Every trained model whose modules are this base's; labels are not needed.")
    model = models[names.index(pick)]
    out = predict_loras(model, [lo for _, lo in named], ctx.device).drop(columns=["source"], errors="ignore")
    out.insert(0, "file", [n for n, _ in named])
    st.success(f"Predicted {len(named)} LoRA(s) with {model.name}.")
    st.dataframe(fmt.table(out), hide_index=True, width="stretch")

    shipped = app_data.shipped_collections()
    home = home_collection(model.path, base, shipped)
    if home is None:
        return
    path = shipped[home]
    ck = cache.checkpoint(model.path, ctx.device)
    bank = cache.model_embeddings(model.path, ctx.device, str(path), cache.path_key(path))
    q = neighbours.embed_loras(ck, [lo for _, lo in named])
    idx, dist = neighbours.nearest(q, bank, k=5)
    table = cache.collection_table(str(path), cache.path_key(path)).reset_index(drop=True)
    labels = [c for c in ck.labels if c in table.columns]
    st.markdown(f"**Nearest LoRAs in the {home} collection** (in {model.name}'s embedding)")
    rows = []
    for i, (name, _) in enumerate(named):
        for rank, (j, d) in enumerate(zip(idx[i], dist[i]), 1):
            rows.append({"file": name, "#": rank, "LoRA": str(table.loc[j, "id"]), "distance": float(d),
                         **{lab: table.loc[j, lab] for lab in labels[:6]}})
    st.dataframe(fmt.table(pd.DataFrame(rows)), hide_index=True, width="stretch")
    st.caption("Distance between the models' embeddings (each dimension standardised over the collection); for a "
               "GL-invariant model it depends only on ΔW, not on how the file factors it. The labels are the "
               "measured ones of those LoRAs.")


def upload_section(ctx) -> None:
    """Upload LoRA files on the Predict page: each file is judged on its own (the base it fits, or one line why
    not) and those that fit a base with trained models get predictions and nearest neighbours."""
    from ..uploads import read_uploads
    from .upload import ACCEPTED_TYPES, limits_caption, max_upload_mb

    files = st.file_uploader("LoRA files", type=ACCEPTED_TYPES, accept_multiple_files=True, key="pred_upload",
                             help=limits_caption())
    st.caption(limits_caption())
    if not files:
        return
    sig = tuple((f.name, f.size, getattr(f, "file_id", "")) for f in files)
    cached = st.session_state.get("_lol_pred_upload")
    if cached is None or cached[0] != sig:
        cached = (sig, read_uploads(files, cache.shipped_bases(), max_mb=max_upload_mb()))
        st.session_state["_lol_pred_upload"] = cached
    res = cached[1]
    for e in res.errors:
        st.error(e)
    groups: dict[int, tuple] = {}
    for u in res.loras:
        groups.setdefault(id(u.base), (u.base, []))[1].append((u.name, u.lora))
    for i, (base, named) in enumerate(groups.values()):
        st.markdown(f"**{len(named)} file(s) fit {base.name}**: " + ", ".join(n for n, _ in named))
        answers_for(ctx, base, named, key=f"pred_upload_{i}")
