"""Generate: what a LoRA does to its base model. For each prompt × seed: the LoRA's own finetuning images (when the
collection records how to draw them), the base model's image, the LoRA's image and their difference, each with its
CLIP score to its prompt; above them one comparison — the LoL model's prediction from the weights alone against the
label measured when the collection was built — and a PNG of the whole grid."""
import streamlit as st

from lol import catalog, showcase
from lol.app import cache, generation, nav, preds, views
from lol.app import data as app_data
from lol.app.sidebar import render

ctx = render()  # the shared sidebar: collection, device, LoL model
st.title("Generate")
if ctx.require_collection():
    coll = ctx.collection
    df = ctx.table().reset_index(drop=True)
    known = cache.shipped_bases()
    sd_dir = catalog.model_folder(coll, "sd", known, app_data.data_root())
    if sd_dir is None:
        st.info("These LoRAs are not for a Stable Diffusion base model that is here (the collection records none, "
                "or it is missing), so there is nothing to draw. Their modules and spectra are on the Collection "
                "page.")
    else:
        ids = df["id"].astype(str).tolist()
        nav.sync_widget("gen_lora", ids)
        c1, c2, c3 = st.columns([2, 4, 1.3], vertical_alignment="bottom")
        lora_id = c1.selectbox("LoRA", ids, key="gen_lora", on_change=nav.chosen_from_widget, args=("gen_lora",))
        row = df[df["id"].astype(str) == lora_id].iloc[0].to_dict()
        prompt_key = f"gen_prompts_{lora_id}"  # each LoRA starts from its own prompt
        prompts_text = c2.text_area("Prompts (one per line)", value=showcase.default_prompt(coll, row),
                                    key=prompt_key, height=68,
                                    help="Starts from words the base model was trained on, so the LoRA's effect "
                                         "is what differs.")
        steps0, guidance0 = showcase.generation_defaults(coll)
        with c3.popover("Settings", icon=":material/tune:"):
            seeds_text = st.text_input("Seeds", value="42", key="gen_seeds", help="e.g. 42, 43, 44")
            steps = st.slider("Steps", 1, 50, steps0, key="gen_steps")
            guidance = st.slider("Guidance scale", 1.0, 12.0, guidance0, 0.5, key="gen_guidance",
                                 help="Classifier-free guidance; a zoo base model starts at the scale it was "
                                      "trained and labelled with.")
            strength = st.slider("LoRA strength", 0.0, 2.0, 1.0, 0.1, key="gen_strength",
                                 help="The adapter weight: 0 is the base model, 1 the LoRA as trained.")
        go = c3.button("Generate", key="gen_go", type="primary", icon=":material/play_arrow:", width="stretch")
        st.caption(views.lora_row_markdown(df, lora_id, [c for c in views.label_columns(coll, df)][:6]))

        if go:
            prompts = [p.strip() for p in prompts_text.splitlines() if p.strip()][:8]
            try:
                seeds = generation.parse_seeds(seeds_text)
                if not prompts:
                    raise ValueError("give at least one prompt")
            except ValueError as e:
                st.error(f"Cannot generate: {e}")
            else:
                busy = generation.PIPELINE_LOCK.locked()
                bar = st.progress(0.0, text="Waiting for another visitor's generation to finish…" if busy
                                  else "Loading the pipeline…")
                pipe = cache.pipeline(str(sd_dir), ctx.device)
                res = generation.generate_side_by_side(
                    pipe, coll.lora(ids.index(lora_id)), lora_id, prompts, seeds, steps, guidance, strength,
                    ctx.device, progress=lambda f, t: bar.progress(f, text=t))
                bar.progress(1.0, text=f"Done in {res.seconds:.1f} s")
                clip_dir = catalog.model_folder(coll, "clip", known, app_data.data_root())
                if clip_dir is not None:
                    scorer = cache.clip_scorer(str(clip_dir), ctx.device)
                    res.clip_base = scorer.score(res.base, res.texts).tolist()
                    res.clip_lora = scorer.score(res.lora, res.texts).tolist()
                res.finetune = showcase.finetune_images(coll, lora_id, n=len(res.base))
                st.session_state["gen_result"] = res

        res = st.session_state.get("gen_result")
        if res is not None and res.lora_id == lora_id:
            generation.show_comparison(ctx, coll, df, res, preds.predictions_or_none(ctx))
            generation.show_grid(res)
        elif res is not None:
            st.caption(f"Last generation was for {res.lora_id}; press Generate for {lora_id}.")
        else:
            st.caption("Press Generate: the base model and the LoRA draw the same prompts from the same seeds, "
                       f"shown at {generation.SHOW_PX} px with whole-pixel enlargement.")
