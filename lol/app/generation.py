"""Images of the base model and of base + LoRA, side by side, with the same prompts and seeds.

The LoRA is written with `lol.formats.save_diffusers` into a temporary folder and loaded with diffusers' own
``pipe.load_lora_weights`` (the path a user's own LoRA file takes), so what is shown is what diffusers does with the
file. ``strength`` is the adapter weight (``set_adapters``); the base images use the same pipeline with the adapter
disabled. One lock serialises use of the shared cached pipeline across browser sessions.
"""
from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["Generation", "generate_side_by_side", "PIPELINE_LOCK", "parse_seeds", "sharp", "difference",
           "grid_png", "SHOW_PX"]

SHOW_PX = 192  # every image is shown this size: small generations are upscaled by whole pixels (nearest neighbour)

PIPELINE_LOCK = threading.Lock()


@dataclass
class Generation:
    lora_id: str
    prompts: list[str]
    seeds: list[int]
    steps: int
    guidance: float
    strength: float
    base: list = field(default_factory=list)     # PIL images, prompt-major: (p0,s0), (p0,s1), …
    lora: list = field(default_factory=list)
    seconds: float = 0.0
    clip_base: list[float] | None = None   # CLIP score of each base image to its own prompt
    clip_lora: list[float] | None = None
    finetune: list = field(default_factory=list)  # (PIL image, caption) the LoRA was finetuned on, when known

    @property
    def captions(self) -> list[str]:
        return [f"{p} · seed {s}" for p in self.prompts for s in self.seeds]

    @property
    def texts(self) -> list[str]:
        """The prompt of each image, in image order."""
        return [p for p in self.prompts for _ in self.seeds]


def sharp(img, px: int = SHOW_PX):
    """``img`` at about ``px`` pixels wide, enlarged by a whole factor with nearest-neighbour (pixels stay
    crisp squares), never shrunk below its own size."""
    from PIL import Image

    k = max(1, px // max(img.width, 1))
    return img.convert("RGB").resize((img.width * k, img.height * k), Image.NEAREST)


def difference(base, lora, gain: float = 4.0):
    """|LoRA − base| per pixel and channel, times ``gain`` (clipped): black where the LoRA changed nothing.
    Returns (PIL image, mean absolute difference in 0–255 units)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(base.convert("RGB"), dtype=np.float32)
    b = np.asarray(lora.convert("RGB"), dtype=np.float32)
    d = np.abs(b - a)
    return Image.fromarray(np.clip(d * gain, 0, 255).astype(np.uint8), "RGB"), float(d.mean())


def grid_png(rows: Sequence[Sequence[tuple[object, str]]], px: int = SHOW_PX, title: str = "") -> bytes:
    """One PNG of rows of ``(image, caption)`` (each image shown `sharp` at ``px``), captions under the images in
    PIL's built-in font (no font file or download needed)."""
    import io

    from PIL import Image, ImageDraw

    cols = max((len(r) for r in rows), default=1)
    cap_h, pad, top = 30, 8, 26 if title else 4
    cell = px + pad
    out = Image.new("RGB", (cols * cell + pad, top + len(rows) * (px + cap_h + pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((pad, 6), title, fill="black")
    for r, row in enumerate(rows):
        y = top + r * (px + cap_h + pad)
        for c, (img, cap) in enumerate(row):
            im = sharp(img, px)
            if im.width != px:
                im = im.resize((px, px), Image.NEAREST)
            x = pad + c * cell
            out.paste(im, (x, y))
            for k, line in enumerate(_wrap(cap, px // 6)[:2]):
                draw.text((x, y + px + 2 + 12 * k), line, fill="black")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def _wrap(text: str, width: int) -> list[str]:
    words, lines, cur = str(text).split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + ([cur] if cur else [])


def parse_seeds(text: str, max_seeds: int = 8) -> list[int]:
    """``"42, 43 44"`` -> [42, 43, 44]; raises ValueError naming the bad token."""
    seeds = []
    for tok in text.replace(",", " ").split():
        try:
            seeds.append(int(tok))
        except ValueError:
            raise ValueError(f"seed {tok!r} is not an integer") from None
    if not seeds:
        raise ValueError("give at least one seed")
    if len(seeds) > max_seeds:
        raise ValueError(f"at most {max_seeds} seeds at once (got {len(seeds)})")
    return seeds


def generate_side_by_side(pipe, lora, lora_id: str, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                          guidance: float, strength: float, device: str,
                          progress: Callable[[float, str], None] | None = None) -> Generation:
    """Base and LoRA images for every (prompt, seed); ``progress(fraction, text)`` is called after each step."""
    import torch

    from ..formats import save_diffusers

    gen = Generation(lora_id, list(prompts), list(seeds), int(steps), float(guidance), float(strength))
    total = 2 * len(prompts) * len(seeds) * steps
    done = [0]

    def on_step(_pipe, _i, _t, kwargs):
        done[0] += 1
        if progress:
            progress(min(done[0] / total, 1.0), f"step {done[0]} of {total}")
        return kwargs

    t0 = time.perf_counter()
    with PIPELINE_LOCK, tempfile.TemporaryDirectory(prefix="lol-gen-") as tmp:
        file = Path(tmp) / "pytorch_lora_weights.safetensors"
        save_diffusers(lora, file)
        name = "lol_app"
        if name in _adapters(pipe):
            pipe.delete_adapters(name)
        pipe.load_lora_weights(tmp, weight_name=file.name, adapter_name=name)
        try:
            for which in ("base", "lora"):
                if which == "base":
                    pipe.disable_lora()
                else:
                    pipe.enable_lora()
                    pipe.set_adapters([name], adapter_weights=[float(strength)])
                out = getattr(gen, which)
                for p in prompts:
                    for s in seeds:
                        g = torch.Generator(device="cpu").manual_seed(int(s))
                        img = pipe(p, num_inference_steps=int(steps), guidance_scale=float(guidance), generator=g,
                                   callback_on_step_end=on_step).images[0]
                        out.append(img)
        finally:
            pipe.enable_lora()
            pipe.delete_adapters(name)
    gen.seconds = time.perf_counter() - t0
    return gen


def _adapters(pipe) -> set[str]:
    return {a for names in pipe.get_list_adapters().values() for a in names}


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
