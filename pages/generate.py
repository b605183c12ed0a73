"""Generate: images of the base model and of the chosen LoRA side by side (prompts × seeds), the CLIP score of what
was just generated, and the LoL prediction for the same LoRA."""
import streamlit as st

from lol.app import cache, generation, nav, preds, views
from lol.app import data as app_data
from lol.app.errors import plain
from lol.app.sidebar import render

ctx = render()  # the shared sidebar: collection, device, LoL model
st.title("Generate")
if ctx.require_collection():
    coll = ctx.collection
    df = ctx.table().reset_index(drop=True)
    sd_dir = views.base_model_path(coll, "sd")
    if sd_dir is None:
        st.info(f"No Stable Diffusion base model for this collection: its LoRAs are not image-model LoRAs, or the "
                f"base model is missing (looked at the base recorded with the collection and "
                f"`{app_data.data_root() / 'base' / 'sd'}`; build it with `lol zoo build`). The LoRAs can still be "
                f"inspected on the Collection page.")
    else:
        ids = df["id"].astype(str).tolist()
        nav.sync_widget("gen_lora", ids)
        c1, c2 = st.columns([1, 2])
        with c1:
            lora_id = st.selectbox("LoRA", ids, key="gen_lora", on_change=nav.chosen_from_widget,
                                   args=("gen_lora",))
            st.markdown(views.lora_row_markdown(df, lora_id))
        with c2:
            prompts_text = st.text_area("Prompts (one per line)", value=views.default_prompt(coll, df, lora_id),
                                        key="gen_prompts", height=90)
        c1, c2, c3, c4, c5 = st.columns(5)
        steps0, guidance0 = views.generation_defaults(coll)
        seeds_text = c1.text_input("Seeds", value="42", key="gen_seeds", help="e.g. 42, 43, 44")
        steps = c2.slider("Steps", 1, 50, steps0, key="gen_steps")
        guidance = c3.slider("Guidance scale", 1.0, 12.0, guidance0, 0.5, key="gen_guidance",
                             help="Classifier-free guidance; a zoo base model starts at the scale it was trained "
                                  "and labelled with.")
        strength = c4.slider("LoRA strength", 0.0, 2.0, 1.0, 0.1, key="gen_strength",
                             help="The adapter weight: 0 is the base model, 1 the LoRA as trained.")
        c5.markdown("&nbsp;")
        go = c5.button("Generate", key="gen_go", type="primary", icon=":material/play_arrow:")
        if ctx.device == "cpu":
            st.caption("Running on the CPU: keep prompts × seeds × steps small.")

        if go:
            prompts = [p.strip() for p in prompts_text.splitlines() if p.strip()][:8]
            try:
                seeds = generation.parse_seeds(seeds_text)
                if not prompts:
                    raise ValueError("give at least one prompt")
            except ValueError as e:
                st.error(f"Cannot generate: {e}")
            else:
                bar = st.progress(0.0, text="Loading the pipeline…")
                try:
                    pipe = cache.pipeline(str(sd_dir), ctx.device)
                    lora = coll.lora(ids.index(lora_id))
                    res = generation.generate_side_by_side(
                        pipe, lora, lora_id, prompts, seeds, steps, guidance, strength, ctx.device,
                        progress=lambda f, t: bar.progress(f, text=t))
                    bar.progress(1.0, text=f"Done in {res.seconds:.1f} s")
                    views.score_generation(res, coll, ctx.device)
                    st.session_state["gen_result"] = res
                except Exception as e:  # noqa: BLE001 — a broken base model or LoRA file: one plain line
                    bar.empty()
                    st.error(f"Generation failed: {plain(e)}")

        res = st.session_state.get("gen_result")
        if res is not None and res.lora_id == lora_id:
            views.show_generation(res)
            views.prediction_vs_generation(ctx, res)
        elif res is not None:
            st.caption(f"Last generation was for {res.lora_id}; press Generate for {lora_id}.")
