"""Generate: what a LoRA does to its base model. Image LoRAs: for each prompt × seed the LoRA's own finetuning images
(when the collection records how to draw them), the base model's image, the LoRA's image and their difference, each
with its CLIP score to its prompt, and a PNG of the grid. Language-model LoRAs: held-out questions answered by the
base model and by the LoRA side by side. Above both, one comparison: the LoL model's prediction from the weights
alone against the label measured when the collection was built."""
import streamlit as st

from lol.app import cache, generation, nav
from lol.app.sidebar import context
from lol.catalog import model_folder
from lol.paths import data_root

ctx = context()  # what the sidebar (drawn by app.py) chose: collection, device, LoL model
st.title("Generate")
if ctx.require_collection():
    coll = ctx.collection
    df = ctx.table().reset_index(drop=True)
    sd_dir = model_folder(coll, "sd", cache.shipped_bases(), data_root())
    lm_dir = model_folder(coll, "lm", cache.shipped_bases(), data_root()) if sd_dir is None else None
    if sd_dir is None and lm_dir is None:
        st.info("These LoRAs are not for a Stable Diffusion or language base model that is here (the collection "
                "records none, or it is missing), so there is nothing to run. Their modules and spectra are on the "
                "Collection page.")
    else:
        ids = df["id"].astype(str).tolist()
        c1, c2, c3 = st.columns([2, 4, 1.3], vertical_alignment="bottom")
        lora_id = nav.lora_select(ids, "gen_lora", where=c1)
        view = generation.answers_view if lm_dir is not None else generation.images_view
        view(ctx, coll, df, lora_id, ids.index(lora_id), lm_dir or sd_dir, c2, c3)
