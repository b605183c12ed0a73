"""What a collection records about how its LoRAs were made, for showing one of them next to its base model: the
prompt and generation settings the base model knows, the LoRA's own finetuning images (redrawn from the recipe,
preset and seed the zoo recorded in the collection's provenance, when it recorded them), and how its labels were
measured. Everything is read from the collection (its provenance and table) or recomputed from it; nothing about a
collection is guessed from its name. Collections without a zoo record get generic defaults and no finetuning images.
"""
from __future__ import annotations

import importlib
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from .errors import LoLError

__all__ = ["module_table", "Generation", "generate_side_by_side", "PIPELINE_LOCK", "parse_seeds", "sharp", "difference",
           "grid_png", "SHOW_PX", "domain", "zoo_record", "job_params", "default_prompt", "generation_defaults",
           "finetune_images", "clip_label", "label_protocol", "base_value", "Answer", "lm_sources", "lm_questions",
           "load_lm", "answer_side_by_side", "answers_table", "right_counts"]

GENERIC_PROMPT = "a photo"


def module_table(lora):
    """(one row per module: shape, rank r, α, scale s, ‖ΔW‖_F, σ₁(ΔW); ``{module: σ(ΔW) descending}``). Both are
    GL(r)-invariant (except the rank/α/scale bookkeeping): ‖ΔW‖_F from `LoRAModule.delta_norm` (r×r Gram matrices),
    σ(ΔW) from `lol.features.singular_values` in float64, never forming ΔW."""
    import pandas as pd

    from .features import singular_values

    rows, svals = [], {}
    for m in lora:
        s = singular_values(m.U.double().unsqueeze(0), m.V.double().unsqueeze(0))[0].tolist()
        svals[m.name] = s
        rows.append({"module": m.name, "out × in": f"{m.out_features} × {m.in_features}", "rank r": m.rank,
                     "alpha α": float(m.alpha), "scale s": float(m.scale), "‖ΔW‖_F": m.delta_norm(),
                     "σ₁(ΔW)": float(s[0]) if s else 0.0})
    return pd.DataFrame(rows), svals


def zoo_record(coll) -> dict:
    """The collection's zoo provenance (``{"recipe": "module:Class", "preset": ..., "seed": ...}``) or {}."""
    prov = getattr(coll, "provenance", None)
    rec = prov.get("zoo") if isinstance(prov, dict) else None
    return rec if isinstance(rec, dict) else {}


def domain(coll) -> str | None:
    """``"image"`` or ``"language"``: what kind of base model the collection's LoRAs adapt, from the base models its
    zoo record names (``sd`` / ``lm``), else from its module names (diffusers ``unet.`` / ``text_encoder.`` modules;
    transformer ``layers.N.self_attn`` / ``mlp`` modules); None when neither tells."""
    bases = zoo_record(coll).get("bases")
    if isinstance(bases, dict):
        if "lm" in bases:
            return "language"
        if "sd" in bases:
            return "image"
    names = list(getattr(coll.spec, "names", ()))
    if names and all(n.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2", "transformer") for n in names):
        return "image"
    if names and all(".layers." in f".{n}" and (".self_attn." in n or ".mlp." in n) for n in names):
        return "language"
    return None


def _recipe_name(coll) -> str:
    return str(zoo_record(coll).get("recipe", "")).rpartition(":")[2]


@lru_cache(maxsize=8)
def _jobs(recipe: str, preset: str, seed: int) -> dict[str, dict]:
    module, _, cls = recipe.partition(":")
    if not module.startswith("lol.zoo."):  # only the project's own recipes are imported
        return {}
    obj = getattr(importlib.import_module(module), cls)()
    return {j.id: j.params for j in obj.jobs(preset, seed)}


def job_params(coll, lora_id: str) -> dict | None:
    """The zoo job parameters that made ``lora_id`` (finetuning images, identity, CLIP protocol …), recomputed from
    the recorded recipe, preset and seed (the zoo's jobs are a pure function of them); None without a record."""
    rec = zoo_record(coll)
    if not rec.get("recipe") or rec.get("preset") is None or rec.get("seed") is None:
        return None
    try:
        return _jobs(str(rec["recipe"]), str(rec["preset"]), int(rec["seed"])).get(str(lora_id))
    except (ImportError, AttributeError, KeyError, ValueError, TypeError):
        return None


def default_prompt(coll, row: dict) -> str:
    """A prompt in words the base model was trained on, so base and LoRA images can be compared:

    * faces: the caption of the LoRA's identity in the face world's words (``"a photo of a young man with brown
      hair"``); the DreamBooth word it was finetuned with ("celebrity") is one the small base never saw;
    * fashion: the caption of the first class in its finetuning set (``"a photo of a sneaker"``);
    * else a ``prompt`` / ``caption`` column, or a generic prompt."""
    name = _recipe_name(coll)
    if name == "FacesRecipe" and row.get("identity") is not None:
        from .zoo.faces import Identity, caption

        return caption(Identity.from_seed(int(row["identity"])).attributes())
    if name == "FashionRecipe":
        from .zoo.fashion import CLASS_LABELS, caption

        members = [i for i, lab in enumerate(CLASS_LABELS) if str(row.get(lab, 0)) in ("1", "True", "1.0")]
        if members:
            return caption(members[0])
    for col in ("prompt", "caption"):
        if isinstance(row.get(col), str) and row[col].strip():
            return row[col]
    return GENERIC_PROMPT


def generation_defaults(coll) -> tuple[int, float]:
    """(steps, guidance scale): for a zoo collection its base model's own guidance (what it was trained and
    labelled with) and 20 steps; else diffusers' usual Stable Diffusion settings (30 steps, guidance 7.5)."""
    if zoo_record(coll):
        from .zoo.image_bases import GUIDANCE

        return 20, float(GUIDANCE)
    return 30, 7.5


def finetune_images(coll, lora_id: str, n: int = 4, size: int = 64) -> list[tuple[object, str]]:
    """Up to ``n`` of the images ``lora_id`` was finetuned on, as ``(PIL image, caption)``, redrawn exactly as the
    zoo drew them; [] when the collection does not record how (or the data they come from is not installed)."""
    params = job_params(coll, lora_id)
    if not params or not params.get("images"):
        return []
    name = _recipe_name(coll)
    idx = list(params["images"])[:n]
    try:
        if name == "FacesRecipe":
            from .zoo.faces import Identity, render_face

            ident = Identity.from_seed(int(params["identity"]))
            return [(f.image, f.caption) for f in (render_face(ident, i, size) for i in idx)]
        if name == "FashionRecipe":
            from .zoo.fashion import fashion_image

            look = params.get("look", "")
            return [(f.image, f.caption) for f in (fashion_image(i, "test", size, look=look) for i in idx)]
    except (LoLError, OSError, ImportError, ValueError) as e:  # e.g. Fashion-MNIST not installed here
        import logging

        logging.getLogger("lol").info("finetuning images of %s not drawn: %s", lora_id, e)
    return []


def clip_label(coll) -> str | None:
    """The collection's CLIP-score label (a declared regression label whose name says clip, present in its table)."""
    labels = getattr(coll, "labels", {}) or {}
    return next((n for n, d in labels.items() if d.get("kind") == "regression" and "clip" in n.lower()
                 and n in coll.table.columns), None)


def base_value(base_dir, label: str) -> float | None:
    """The value of ``label`` the zoo measured for the base model itself (its ``record.json``), or None."""
    import json

    rec = Path(base_dir) / "record.json"
    return json.loads(rec.read_text()).get(label) if rec.is_file() else None


def label_protocol(coll, label: str, lora_id: str) -> str:
    """How ``label`` was measured for ``lora_id``, in one sentence (from the job's recorded protocol)."""
    params = job_params(coll, lora_id) or {}
    clip = params.get("clip") if isinstance(params.get("clip"), dict) else None
    desc = ((getattr(coll, "labels", {}) or {}).get(label) or {}).get("description", "")
    if clip and "clip" in label:
        return (f"measured when the collection was built: mean CLIP score of the LoRA's images over "
                f"{len(clip.get('prompts', []))} fixed prompts × {clip.get('images', 1)} image(s), seed "
                f"{clip.get('seed')}, {clip.get('steps')} steps, guidance {clip.get('guidance')}")
    return f"measured when the collection was built{': ' + desc if desc else ''}"


# --------------------------------------------------------------------------------------- language models: answers

LM_LOCK = threading.Lock()  # the cached base model is shared: one adapter on it at a time


@dataclass
class Answer:
    """One question answered by the base model and by base + LoRA: each option's probability (softmax over the
    options' summed token log-likelihoods, the zoo's challenge-accuracy protocol) and the greedy free answer."""

    source: str
    question: str
    choices: tuple[str, ...]
    correct: int
    base_probs: tuple[float, ...]
    lora_probs: tuple[float, ...]
    base_text: str
    lora_text: str
    finetuned_on: bool  # the LoRA was finetuned on this question's source

    @property
    def base_pick(self) -> int:
        return max(range(len(self.choices)), key=self.base_probs.__getitem__)

    @property
    def lora_pick(self) -> int:
        return max(range(len(self.choices)), key=self.lora_probs.__getitem__)


def lm_sources(coll, lora_id: str) -> tuple[list[str], list[str]]:
    """(every source of the QA world, the sources ``lora_id`` was finetuned on; [] when not recorded)."""
    from .zoo.qa import SOURCES

    params = job_params(coll, lora_id) or {}
    return list(SOURCES), [s for s in params.get("sources", []) if s in SOURCES]


def lm_questions(coll, lora_id: str, sources, per_source: int = 1, offset: int = 0) -> list:
    """``per_source`` questions (`lol.zoo.qa.QAItem`) of each of ``sources`` from the held-out challenge split of
    the world the LoRA's collection was built in (its recorded world; the default world without a record), from
    question ``offset`` on: questions no LoRA was finetuned on, measured as the challenge-accuracy label."""
    from .zoo.lm import LM_PRESETS, _world

    world = (job_params(coll, lora_id) or {}).get("world") or {"seed": 0, **LM_PRESETS["default"]["world"]}
    items = _world(**world)["challenge"]
    out = []
    for src in sources:
        mine = [it for it in items if it.source == src]
        out += [mine[(offset + k) % len(mine)] for k in range(min(per_source, len(mine)))] if mine else []
    return out


def load_lm(folder, device: str = "cpu"):
    """(model, tokenizer) of a causal-LM base folder (`transformers`, offline; a zoo ``record.json`` pointing at a
    real model folder is followed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .zoo.image_bases import resolve_base

    path = resolve_base(folder)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tok


def answer_side_by_side(model, tokenizer, lora, items, strength: float = 1.0, finetuned=(),
                        max_new_tokens: int = 12) -> list[Answer]:
    """Every item answered by ``model`` and by ``model`` + ``lora`` (ΔW scaled by ``strength``); ``finetuned``: the
    sources the LoRA was finetuned on (`lm_sources`). The LoRA is written as
    a PEFT adapter (`lol.formats.save_peft`) and loaded with peft's own ``PeftModel.from_pretrained`` — what a user
    does with the file — and unloaded again, so ``model`` is unchanged afterwards."""
    import tempfile

    import torch
    from peft import PeftModel

    from .formats import save_peft
    from .lora import LoRA
    from .zoo.lm import _batched, encode_options
    from .zoo.qa import prompt_text

    items = list(items)
    if not items:
        return []
    scaled = LoRA.from_modules([replace(m, U=m.U * float(strength)) for m in lora])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    seqs, masks = encode_options(items, tokenizer)

    def run(m):
        lp, _ = _batched(m, None, seqs, masks, pad, device, 1, 16384)
        probs = torch.softmax(lp.view(len(items), 4), -1).tolist()
        texts = []
        for it in items:
            ids = tokenizer(prompt_text(it), return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            out = m.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip())
        return probs, texts

    with LM_LOCK, tempfile.TemporaryDirectory(prefix="lol-lm-") as tmp, torch.no_grad():
        base_probs, base_texts = run(model)
        save_peft(scaled, tmp)
        peft_model = PeftModel.from_pretrained(model, tmp, adapter_name="lol_showcase")
        try:
            lora_probs, lora_texts = run(peft_model)
        finally:
            peft_model.unload()  # the LoRA layers out again, the base weights untouched
    return [Answer(it.source, it.question, tuple(it.choices), it.answer_index, tuple(bp), tuple(lp), bt, lt,
                   it.source in set(finetuned))
            for it, bp, lp, bt, lt in zip(items, base_probs, lora_probs, base_texts, lora_texts)]


def answers_table(answers: list[Answer]):
    """One row per question for people: the question and its right answer, what base and LoRA pick (with the
    probability they give it) and write freely, and the probability each gives the right answer."""
    import pandas as pd

    def pick(a, probs, k):
        return f"{'✓' if k == a.correct else '✗'} {a.choices[k]} ({probs[k]:.0%})"

    return pd.DataFrame([{
        "source": a.source + (" (finetuned on)" if a.finetuned_on else ""), "question": a.question,
        "right answer": a.choices[a.correct], "base picks": pick(a, a.base_probs, a.base_pick),
        "LoRA picks": pick(a, a.lora_probs, a.lora_pick), "base p(right)": a.base_probs[a.correct],
        "LoRA p(right)": a.lora_probs[a.correct], "base writes": a.base_text, "LoRA writes": a.lora_text}
        for a in answers])


def right_counts(answers: list[Answer]) -> tuple[int, int]:
    """(questions the base model picks right, questions the LoRA picks right)."""
    return sum(a.base_pick == a.correct for a in answers), sum(a.lora_pick == a.correct for a in answers)


# ------------------------------------------------------------------------------------------------ images: side by side
# The LoRA is written with `lol.formats.save_diffusers` into a temporary folder and loaded with diffusers' own
# ``pipe.load_lora_weights`` (the path a user's own LoRA file takes), so what is shown is what diffusers does with the
# file. ``strength`` is the adapter weight (``set_adapters``); the base images use the same pipeline with the adapter
# disabled. One lock serialises use of a shared cached pipeline across callers (an explorer's browser sessions).

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

    @property
    def heads(self) -> list[str]:
        return (["finetuning image"] if self.finetune else []) + ["base model", "with the LoRA", "difference ×4"]

    def score(self, scorer) -> None:
        """Each image's CLIP score to its own prompt (``scorer``: `lol.zoo.clipscore.CLIPScorer`)."""
        self.clip_base = scorer.score(self.base, self.texts).tolist()
        self.clip_lora = scorer.score(self.lora, self.texts).tolist()

    def grid(self) -> list[list[tuple[object, str]]]:
        """One row per prompt × seed of ``(image, caption)``: [a finetuning image] | base | LoRA | `difference`, each
        image with its CLIP score when scored; what a page shows and `grid_png` draws."""
        def clip(scores, k):
            return f" · CLIP {scores[k]:.3g}" if scores else ""

        rows = []
        for k in range(len(self.base)):
            diff, mad = difference(self.base[k], self.lora[k])
            ft = [self.finetune[k % len(self.finetune)]] if self.finetune else []
            rows.append([(img, f"trained on: {cap}") for img, cap in ft] + [
                (self.base[k], f"base{clip(self.clip_base, k)}"), (self.lora[k], f"LoRA{clip(self.clip_lora, k)}"),
                (diff, f"mean |Δ| {mad:.1f}/255")])
        return rows


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

    from .formats import save_diffusers

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
