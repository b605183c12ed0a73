"""The Generate page's views: image LoRAs drawn next to their base model (`lol.showcase.generate_side_by_side`) with
one explained comparison and the grid, and language-model LoRAs answering questions next to theirs
(`lol.showcase.answer_side_by_side`). The work is the library's; this module lays it out."""
from __future__ import annotations

from ..showcase import (PIPELINE_LOCK, SHOW_PX, Generation, difference, generate_side_by_side, grid_png,
                        parse_seeds, sharp)

__all__ = ["images_view", "answers_view", "show_comparison", "show_grid"]


# ------------------------------------------------------------------------------------------------------ on screen

def _clip_label(coll, df) -> str | None:
    """The collection's CLIP-score label (a regression label whose name says clip), if it has one."""
    labels = getattr(coll, "labels", {}) or {}
    return next((n for n, d in labels.items() if d.get("kind") == "regression" and "clip" in n.lower()
                 and n in df.columns), None)


def show_comparison(ctx, coll, df, res: Generation, predictions) -> None:
    """One comparison, explained: the LoL model's prediction of the CLIP-score label from the weights alone next to
    the value measured when the collection was built (same protocol); without such a label, the mean CLIP score of
    the base images against the LoRA images just drawn."""
    import numpy as np
    import streamlit as st

    from .. import showcase
    from .fmt import number
    from .preds import PRED

    lab = _clip_label(coll, df)
    pred_col = f"{lab}{PRED}" if lab else None
    c = st.columns(3)
    if lab is not None:
        measured = df.loc[df["id"].astype(str) == res.lora_id, lab]
        pv = None
        if predictions is not None and pred_col in predictions:
            v = predictions.loc[predictions["id"] == res.lora_id, pred_col]
            pv = float(v.iloc[0]) if len(v) else None
        c[0].metric(f"Predicted {lab}", number(pv, 3) if pv is not None else "n/a",
                    help=f"By the sidebar's LoL model ({ctx.model.name if ctx.model else 'none'}) from the LoRA's "
                         f"weights alone, without generating anything.")
        c[1].metric(f"Measured {lab}", number(float(measured.iloc[0]), 3) if len(measured) else "n/a",
                    delta=None if pv is None or not len(measured) else
                    f"prediction off by {number(pv - float(measured.iloc[0]), 2)}", delta_color="off",
                    help=showcase.label_protocol(coll, lab, res.lora_id).capitalize() + ".")
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
    """One row per prompt × seed: [finetuning image] | base | LoRA | difference, all at `SHOW_PX`; and the PNG."""
    import streamlit as st

    from .fmt import number

    has_ft = bool(res.finetune)
    heads = (["finetuning image"] if has_ft else []) + ["base model", "with the LoRA", "difference ×4"]
    rows = []
    for k in range(len(res.base)):
        diff, mad = difference(res.base[k], res.lora[k])
        sb = f" · CLIP {number(res.clip_base[k], 3)}" if res.clip_base else ""
        sl = f" · CLIP {number(res.clip_lora[k], 3)}" if res.clip_lora else ""
        cells = []
        if has_ft:
            img, cap = res.finetune[k % len(res.finetune)]
            cells.append((img, f"trained on: {cap}"))
        cells += [(res.base[k], f"base{sb}"), (res.lora[k], f"LoRA{sl}"), (diff, f"mean |Δ| {mad:.1f}/255")]
        rows.append(cells)
    for k, cells in enumerate(rows):
        st.markdown(f"**{res.captions[k]}**" if len(rows) > 1 else f"**{res.captions[k]}** · " + " · ".join(heads))
        cols = st.columns(len(heads) + 1)
        for col, (img, cap) in zip(cols, cells):
            col.image(sharp(img), caption=cap, width=SHOW_PX)
        if k == 0:
            cols[-1].download_button(
                "PNG of the grid", grid_png(rows, title=f"{res.lora_id} · {res.steps} steps · guidance "
                                                        f"{res.guidance} · strength {res.strength}"),
                file_name=f"{res.lora_id}-base-vs-lora.png", mime="image/png", key="gen_png",
                icon=":material/download:")
            cols[-1].caption(f"{res.steps} steps · guidance {res.guidance} · strength {res.strength} · "
                             f"{res.seconds:.1f} s")


# ------------------------------------------------------------------------------------------------------ the views

def images_view(ctx, coll, df, lora_id: str, lora_index: int, sd_dir, prompt_col, controls_col) -> None:
    """Prompts, settings and the Generate button (in the page's columns), then the comparison and the grid."""
    import streamlit as st

    from .. import catalog, showcase
    from . import cache, views
    from . import data as app_data
    from .preds import predictions_or_none

    known = cache.shipped_bases()
    c2, c3 = prompt_col, controls_col
    row = df.iloc[lora_index].to_dict()
    prompt_key = f"gen_prompts_{lora_id}"  # each LoRA starts from its own prompt
    prompts_text = c2.text_area("Prompts (one per line)", value=showcase.default_prompt(coll, row),
                                key=prompt_key, height=68,
                                help="Starts from words the base model was trained on, so the LoRA's "
                                     "effect is what differs.")
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
    st.caption(views.lora_row_markdown(df, lora_id, views.label_columns(coll, df)[:6]))
    if go:
        prompts = [p.strip() for p in prompts_text.splitlines() if p.strip()][:8]
        try:
            seeds = parse_seeds(seeds_text)
            if not prompts:
                raise ValueError("give at least one prompt")
        except ValueError as e:
            st.error(f"Cannot generate: {e}")
        else:
            busy = PIPELINE_LOCK.locked()
            bar = st.progress(0.0, text="Waiting for another visitor's generation to finish…" if busy
                              else "Loading the pipeline…")
            pipe = cache.pipeline(str(sd_dir), ctx.device)
            res = generate_side_by_side(
                pipe, coll.lora(lora_index), lora_id, prompts, seeds, steps, guidance, strength,
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
        show_comparison(ctx, coll, df, res, predictions_or_none(ctx))
        show_grid(res)
    elif res is not None:
        st.caption(f"Last generation was for {res.lora_id}; press Generate for {lora_id}.")
    else:
        st.caption("Press Generate: the base model and the LoRA draw the same prompts from the same seeds, "
                   f"shown at {SHOW_PX} px with whole-pixel enlargement.")


def answers_view(ctx, coll, df, lora_id: str, lora_index: int, lm_dir, sources_col, controls_col) -> None:
    """Language-model LoRAs: held-out challenge questions (`lol.showcase.lm_questions`) answered by the base model
    and by the LoRA (`lol.showcase.answer_side_by_side`), side by side, under the measured vs predicted label."""
    import json
    from pathlib import Path

    import streamlit as st

    from .. import showcase
    from . import cache, fmt, views
    from .preds import PRED, predictions_or_none

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
    st.caption(views.lora_row_markdown(df, lora_id, views.label_columns(coll, df)[:6]))
    if go:
        busy = showcase.LM_LOCK.locked()
        with st.spinner("Waiting for another visitor's answers…" if busy else "Answering…"):
            model, tok = cache.language_model(str(lm_dir), ctx.device)
            items = showcase.lm_questions(coll, lora_id, chosen, per, int(offset))
            answers = showcase.answer_side_by_side(model, tok, coll.lora(lora_index), items, strength, mine)
        st.session_state["gen_answers"] = (lora_id, answers)
    done = st.session_state.get("gen_answers")
    if done is None or done[0] != lora_id:
        st.caption("Press Answer: the base model and the LoRA answer the same held-out questions; each picks the "
                   "option it finds most likely (the challenge-accuracy protocol) and also writes its own answer.")
        return
    answers = done[1]
    c = st.columns(3)
    lab = "challenge_accuracy" if "challenge_accuracy" in df.columns else None
    if lab is not None:
        measured = float(df.loc[lora_index, lab])
        p = predictions_or_none(ctx)
        pv = p.loc[p["id"] == lora_id, f"{lab}{PRED}"] if p is not None and f"{lab}{PRED}" in p else []
        base_rec = Path(lm_dir) / "record.json"
        base_acc = json.loads(base_rec.read_text()).get(lab) if base_rec.is_file() else None
        c[0].metric(f"Predicted {lab}", fmt.number(float(pv.iloc[0]), 3) if len(pv) else "n/a",
                    help="By the sidebar's LoL model from the LoRA's weights alone, without running the LM.")
        c[1].metric(f"Measured {lab}", fmt.number(measured, 3),
                    delta=None if base_acc is None else f"{fmt.number(measured - base_acc, 2)} vs base "
                                                        f"({fmt.number(base_acc, 3)})", delta_color="normal",
                    help=showcase.label_protocol(coll, lab, lora_id).capitalize() + ".")
    right_b = sum(a.base_pick == a.correct for a in answers)
    right_l = sum(a.lora_pick == a.correct for a in answers)
    c[2 if lab else 0].metric("Right on these questions", f"{right_l}/{len(answers)} LoRA",
                              delta=f"{right_l - right_b} vs base ({right_b}/{len(answers)})",
                              help="Questions below whose most likely option is the right one.")
    table = showcase.answers_table(answers)
    st.dataframe(table, hide_index=True, width="stretch", column_config={
        c: st.column_config.ProgressColumn(c, format="percent", min_value=0.0, max_value=1.0)
        for c in ("base p(right)", "LoRA p(right)")})
    st.caption("Picks: the option of highest likelihood (✓ right, ✗ wrong) and the probability the model gives it; "
               "'writes': its greedy free answer. The measured label is the share of right picks over the whole "
               "held-out challenge split (every source).")
