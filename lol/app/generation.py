"""The Generate page's views: image LoRAs drawn next to their base model (`lol.showcase.generate_side_by_side`) with
one explained comparison and the grid, and language-model LoRAs answering questions next to theirs
(`lol.showcase.answer_side_by_side`). The work is the library's; this module lays it out."""
from __future__ import annotations

import streamlit as st

from . import cache
from .fmt import number
from .views import lora_row_markdown
from .. import showcase
from ..labels import label_columns
from ..showcase import SHOW_PX, Generation

__all__ = ["images_view", "answers_view", "show_comparison", "show_grid", "measurements_caption", "prediction_help"]


def _predicted_and_measured(ctx, coll, df, lab: str, lora_id: str, cols, without: str, base_dir=None) -> None:
    """Two metrics: a LoL model's prediction of ``lab`` from the weights alone (`AppContext.model_for`: the
    sidebar's, or the shipped model for ``lab`` when the sidebar's predicts other labels), and the measured value
    with its distance to the prediction — or, for a base folder that records its own value
    (`showcase.base_value`), to the base model's. ``without``: what the prediction does without (", without …")."""
    model = ctx.model_for(lab)
    p = ctx.predictions(model) if model is not None else None
    pv = p.value(lab, lora_id) if p is not None else None
    pv = float(pv) if pv is not None else None
    measured = df.loc[df["id"].astype(str) == lora_id, lab]
    mv = float(measured.iloc[0]) if len(measured) else None
    base = showcase.base_value(base_dir, lab) if base_dir is not None else None
    if base_dir is None:
        delta = f"prediction off by {number(pv - mv, 2)}" if pv is not None and mv is not None else None
    else:
        delta = f"{number(mv - base, 2)} vs base ({number(base, 3)})" if base is not None and mv is not None else None
    cols[0].metric(f"Predicted {lab}", number(pv, 3) if pv is not None else "n/a", help=prediction_help(ctx, model, lab,
                                                                                                     without))
    cols[1].metric(f"Measured {lab}", number(mv, 3) if mv is not None else "n/a", delta=delta,
                   delta_color="off" if base_dir is None else "normal",
                   help=showcase.label_protocol(coll, lab, lora_id).capitalize() + ".")
    if base_dir is None:
        from ..errors import LoLError
        from ..zoo.measure import lora_measurements

        try:
            again = lora_measurements(coll, lab, lora_id)
        except LoLError:                      # measurement files that do not fit this collection: nothing to add
            again = None
        if again is not None:
            st.caption(measurements_caption(again, lab, bool((coll.labels.get(lab) or {}).get("measurements"))))


def prediction_help(ctx, model, lab: str, without: str) -> str:
    """Which model a predicted ``lab`` comes from, in words: the sidebar's, or the shipped one for ``lab`` and why."""
    if model is None:
        return f"No trained checkpoint that fits this collection predicts {lab}."
    whose = ("the sidebar's LoL model" if model is ctx.model else
             f"the shipped model for {lab} (the sidebar's model does not predict {lab})")
    return f"By {whose}, {model.title}, from the LoRA's weights alone{without}."


def measurements_caption(m, lab: str, label_is_mean: bool) -> str:
    """One line on a LoRA measured more than once (`lol.zoo.measure.lora_measurements`): each measurement on the
    build's scale, their spread, and which of them the label is — how far a prediction can be off by noise alone."""
    import numpy as np

    values = ", ".join(f"{number(v, 4)} ({s})" for s, v in zip(m["source"], m["centred"]))
    sd = float(np.std(m["centred"], ddof=1))
    which = f"the {lab} label is their mean" if label_is_mean else f"the {lab} label is the build's measurement"
    return (f"**Measured {len(m)} times** with the same protocol and other noise seeds, each on the build's scale "
            f"(its seed's offset over all LoRAs removed): {values}; std {number(sd, 2)} between them — {which}.")


def show_comparison(ctx, coll, df, res: Generation) -> None:
    """One comparison, explained: the LoL model's prediction of the CLIP-score label from the weights alone next to
    the value measured when the collection was built (same protocol); without such a label, the mean CLIP score of
    the base images against the LoRA images just drawn."""
    import numpy as np

    lab = showcase.clip_label(coll)
    c = st.columns(3)
    if lab is not None:
        _predicted_and_measured(ctx, coll, df, lab, res.lora_id, c, ", without generating anything")
    if res.clip_base is not None:
        b, lo = float(np.mean(res.clip_base)), float(np.mean(res.clip_lora))
        c[2 if lab else 0].metric("CLIP score of these images", f"{number(lo, 3)} LoRA",
                                  delta=f"{number(lo - b, 2)} vs base ({number(b, 3)})",
                                  help="Mean CLIP score (0–100) of each image to its own prompt, for the images "
                                       "below.")
    if lab is not None:
        st.caption(f"**The comparison:** predicted vs measured {lab} — the LoL model reads only the weights; the "
                   f"measured value was {showcase.label_protocol(coll, lab, res.lora_id)}. The images below are "
                   f"illustrations with your prompts and seeds, scored one by one; they are not that measurement.")
    elif res.clip_base is not None:
        st.caption("**The comparison:** how well the base and the LoRA images match their prompts (CLIP score, "
                   "0–100, higher is closer). This collection has no CLIP-score label to predict.")
    else:
        st.caption("No CLIP model for this base here, so the images are not scored.")


def show_grid(res: Generation) -> None:
    """The PNG of the grid and the settings, then one row per prompt × seed (`Generation.grid`): [finetuning image] |
    base | LoRA | difference, each at `SHOW_PX` or its column's width where that is narrower (a 1280-px projector
    gives the four columns ~180 px), so no image runs into its neighbour."""
    rows, settings = res.grid(), f"{res.steps} steps · guidance {res.guidance} · strength {res.strength}"
    c = st.columns([1, 3], vertical_alignment="center")
    c[0].download_button("PNG of the grid", showcase.grid_png(rows, title=f"{res.lora_id} · {settings}"),
                         file_name=f"{res.lora_id}-base-vs-lora.png", mime="image/png", key="gen_png",
                         icon=":material/download:")
    c[1].caption(f"{settings} · {res.seconds:.1f} s")
    for k, cells in enumerate(rows):
        st.markdown(f"**{res.captions[k]}**" + ("" if len(rows) > 1 else " · " + " · ".join(res.heads)))
        for col, (img, cap) in zip(st.columns(len(res.heads)), cells):
            col.image(showcase.sharp(img), caption=cap, width="content")   # SHOW_PX, never wider than the column


def images_view(ctx, coll, df, lora_id: str, lora_index: int, sd_dir, prompt_col, controls_col) -> None:
    """Prompts, settings and the Generate button (in the page's columns), then the comparison and the grid."""
    from .. import catalog
    from ..paths import data_root

    prompts_text = prompt_col.text_area(  # each LoRA starts from its own prompt
        "Prompts (one per line)", value=showcase.default_prompt(coll, df.iloc[lora_index].to_dict()),
        key=f"gen_prompts_{lora_id}", height=68,
        help="Starts from words the base model was trained on, so the LoRA's effect is what differs.")
    steps0, guidance0 = showcase.generation_defaults(coll)
    with controls_col.popover("Settings", icon=":material/tune:"):
        seeds_text = st.text_input("Seeds", value="42", key="gen_seeds", help="e.g. 42, 43, 44")
        steps = st.slider("Steps", 1, 50, steps0, key="gen_steps")
        guidance = st.slider("Guidance scale", 1.0, 12.0, guidance0, 0.5, key="gen_guidance",
                             help="Classifier-free guidance; a zoo base model starts at the scale it was "
                                  "trained and labelled with.")
        strength = st.slider("LoRA strength", 0.0, 2.0, 1.0, 0.1, key="gen_strength",
                             help="The adapter weight: 0 is the base model, 1 the LoRA as trained.")
    go = controls_col.button("Generate", key="gen_go", type="primary", icon=":material/play_arrow:", width="stretch")
    st.caption(lora_row_markdown(df, lora_id, label_columns(coll, df)[:6]))
    if go:
        prompts = [p.strip() for p in prompts_text.splitlines() if p.strip()][:8]
        try:
            seeds = showcase.parse_seeds(seeds_text)
            if not prompts:
                raise ValueError("give at least one prompt")
        except ValueError as e:
            st.error(f"Cannot generate: {e}")
        else:
            bar = st.progress(0.0, text="Waiting for another visitor's generation to finish…"
                              if showcase.PIPELINE_LOCK.locked() else "Loading the pipeline…")
            res = showcase.generate_side_by_side(
                cache.pipeline(str(sd_dir), ctx.device), coll.lora(lora_index), lora_id, prompts, seeds, steps,
                guidance, strength, ctx.device, progress=lambda f, t: bar.progress(f, text=t))
            bar.progress(1.0, text=f"Done in {res.seconds:.1f} s")
            clip_dir = catalog.model_folder(coll, "clip", cache.shipped_bases(), data_root())
            if clip_dir is not None:
                res.score(cache.clip_scorer(str(clip_dir), ctx.device))
            res.finetune = showcase.finetune_images(coll, lora_id, n=len(res.base))
            st.session_state["gen_result"] = res

    res = st.session_state.get("gen_result")
    if res is not None and res.lora_id == lora_id:
        show_comparison(ctx, coll, df, res)
        show_grid(res)
    elif res is not None:
        st.caption(f"Last generation was for {res.lora_id}; press Generate for {lora_id}.")
    else:
        st.caption("Press Generate: the base model and the LoRA draw the same prompts from the same seeds, "
                   f"shown at {SHOW_PX} px with whole-pixel enlargement.")


def answers_view(ctx, coll, df, lora_id: str, lora_index: int, lm_dir, sources_col, controls_col) -> None:
    """Language-model LoRAs: held-out challenge questions (`lol.showcase.lm_questions`) answered by the base model
    and by the LoRA (`lol.showcase.answer_side_by_side`), side by side, under the measured vs predicted label."""
    sources, mine = showcase.lm_sources(coll, lora_id)
    chosen = sources_col.multiselect(
        "Question sources", sources, default=(mine or sources)[:3], key=f"gen_sources_{lora_id}",
        format_func=lambda s: f"{s} (finetuned on)" if s in mine else s,
        help="Held-out challenge questions of these sources of the QA world; the LoRA's finetuning sources are "
             "marked and chosen first.")
    with controls_col.popover("Settings", icon=":material/tune:"):
        per = st.slider("Questions per source", 1, 5, 2, key="gen_per_source")
        offset = st.number_input("First question", 0, 1000, 0, key="gen_offset",
                                 help="Which questions of each source: another number, other questions.")
        strength = st.slider("LoRA strength", 0.0, 2.0, 1.0, 0.1, key="gen_lm_strength",
                             help="ΔW is scaled by this: 0 is the base model, 1 the LoRA as trained.")
    go = controls_col.button("Answer", key="gen_answer", type="primary", icon=":material/play_arrow:",
                             width="stretch")
    st.caption(lora_row_markdown(df, lora_id, label_columns(coll, df)[:6]))
    if go:
        with st.spinner("Waiting for another visitor's answers…" if showcase.LM_LOCK.locked() else "Answering…"):
            model, tok = cache.language_model(str(lm_dir), ctx.device)
            items = showcase.lm_questions(coll, lora_id, chosen, per, int(offset))
            answers = showcase.answer_side_by_side(model, tok, coll.lora(lora_index), items, strength, mine)
        st.session_state["gen_answers"] = (lora_id, answers)
    done = st.session_state.get("gen_answers")
    if done is None or done[0] != lora_id:
        st.caption("Press Answer: the base model and the LoRA answer the same held-out questions; each picks the "
                   "option it finds most likely (the challenge-accuracy protocol) and also writes its own answer.")
        return
    answers, c = done[1], st.columns(3)
    lab = "challenge_accuracy" if "challenge_accuracy" in df.columns else None
    if lab is not None:
        _predicted_and_measured(ctx, coll, df, lab, lora_id, c, ", without running the LM", base_dir=lm_dir)
    right_b, right_l = showcase.right_counts(answers)
    c[2 if lab else 0].metric("Right on these questions", f"{right_l}/{len(answers)} LoRA",
                              delta=f"{right_l - right_b} vs base ({right_b}/{len(answers)})",
                              help="Questions below whose most likely option is the right one.")
    st.dataframe(showcase.answers_table(answers), hide_index=True, width="stretch", column_config={
        c: st.column_config.ProgressColumn(c, format="percent", min_value=0.0, max_value=1.0)
        for c in ("base p(right)", "LoRA p(right)")})
    st.caption("Picks: the option of highest likelihood (✓ right, ✗ wrong) and the probability the model gives it; "
               "'writes': its greedy free answer. The measured label is the share of right picks over the whole "
               "held-out challenge split (every source).")
