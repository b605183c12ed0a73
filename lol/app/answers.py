"""Answers for LoRAs without labels (uploaded files, an uploaded collection): a trained model for the base they fit
predicts its labels (`lol.predict`), and the nearest LoRAs of the model's own collection in its embedding
(`lol.neighbours.nearest_table`) are listed with their measured labels, so an upload can be read against known
LoRAs."""
from __future__ import annotations

import streamlit as st

from . import cache, fmt
from .. import uploads

__all__ = ["upload_section", "answers_for"]


def answers_for(ctx, base, named: list[tuple[str, object]], key: str) -> None:
    """Predictions of a chosen model for ``named`` LoRAs ``[(name, LoRA)]`` fitting ``base``, then each one's
    nearest LoRAs in the model's collection."""
    from ..catalog import checkpoints_for, home_collection
    from ..neighbours import nearest_table
    from ..paths import shipped_collections
    from ..predict import predict

    models = checkpoints_for(base, ctx.models)  # modules are the base's; labels are not needed
    if not models:
        st.info(f"No trained LoL model for {base.name} yet, so there is nothing to predict with.")
        return
    names = [m.title for m in models]
    pick = st.selectbox("Predict with", names, key=f"{key}_model",
                        index=names.index(ctx.model.title) if ctx.model is not None and ctx.model.title in names else 0,
                        help="Every trained model whose modules are this base's; labels are not needed.")
    model = models[names.index(pick)]
    ck = cache.checkpoint(model.path, ctx.device)
    out = predict(ck, [lo for _, lo in named]).drop(columns=["source"], errors="ignore")
    out.insert(0, "file", [n for n, _ in named])
    st.success(f"Predicted {len(named)} LoRA(s) with {model.title}.")
    st.dataframe(fmt.table(out), hide_index=True, width="stretch")

    shipped = shipped_collections()
    home = home_collection(model.path, base, shipped)
    if home is None:
        return
    path, key = str(shipped[home]), cache.path_key(shipped[home])
    near = nearest_table(ck, named, cache.model_embeddings(model.path, ctx.device, path, key),
                         cache.collection_table(path, key))
    st.markdown(f"**Nearest LoRAs in the {home} collection** (in {model.title}'s embedding)")
    st.dataframe(fmt.table(near), hide_index=True, width="stretch")
    st.caption("Distance between the models' embeddings (each dimension standardised over the collection); for a "
               "GL-invariant model it depends only on ΔW, not on how the file factors it. The labels are the "
               "measured ones of those LoRAs.")


def upload_section(ctx, max_mb: int) -> None:
    """Upload LoRA files on the Predict page: each file is judged on its own (the base it fits, or one line why
    not) and those that fit a base with trained models get predictions and nearest neighbours."""
    files = st.file_uploader("LoRA files", type=uploads.ACCEPTED_TYPES, accept_multiple_files=True,
                             key="pred_upload", help=uploads.limits_text(max_mb))
    st.caption(uploads.limits_text(max_mb))
    if not files:
        return
    sig = tuple((f.name, f.size, getattr(f, "file_id", "")) for f in files)
    cached = st.session_state.get("_lol_pred_upload")
    if cached is None or cached[0] != sig:  # read once per set of files, not on every rerun
        cached = (sig, uploads.read_uploads(files, cache.shipped_bases(), max_mb=max_mb))
        st.session_state["_lol_pred_upload"] = cached
    res = cached[1]
    for e in res.errors:
        st.error(e)
    for i, (base, named) in enumerate(res.by_base()):
        st.markdown(f"**{len(named)} file(s) fit {base.name}**: " + ", ".join(n for n, _ in named))
        answers_for(ctx, base, named, key=f"pred_upload_{i}")
