"""Timing a LoL prediction against the standard evaluation it replaces (paper: "more than 50,000× faster").

* `clip_evaluation`: what a CLIP-score label costs for one face LoRA — load it into the zoo's Stable Diffusion, generate
  one image per prompt of the label's prompt set (same seed, steps, guidance as the zoo), score with the zoo's CLIP.
  It is the zoo's own labelling code, so the recomputed score is checked against the stored label.
* `lm_evaluation`: what a challenge-accuracy label costs for one LM LoRA — load it with PEFT into the base LM and
  score the 4 options of every challenge question (the zoo's `evaluate`); also checked against the stored label.
* `lol_prediction`: a trained checkpoint predicting the same LoRA (batch of one), from factors already in memory.
* `throughput`: LoRAs per second of checkpoints (e.g. GL-net against the dense-ΔW MLP) as the number of LoRAs in one
  call grows.

All times are wall-clock medians over ``repeat`` calls after ``warmup`` calls, measured in the calling process; the
one-off costs (loading the pipeline / LM / checkpoint) are reported separately and not in the per-LoRA time.

Those use our zoo's tiny base models. At the paper's scale (its "> 50,000× faster" claim), with the real architectures
of `lol.architectures` built with random weights (the cost of a forward pass does not depend on the weights):

* `standard_image_evaluation`: one LoRA's CLIP-score label as the paper defines it (`ImageProtocol`: 33 prompts ×
  20 denoising steps with classifier-free guidance, the LoRA loaded into the SD-1.5 UNet with diffusers, VAE decode of
  512×512 images, CLIP ViT-B/16 score); `standard_lm_evaluation`: ARC-Challenge (`ArcProtocol`: 1,172 questions,
  every answer option scored by log-likelihood) by Qwen2-1.5B with the LoRA loaded with PEFT. Each returns `Part`s:
  a few calls of every stage are timed and multiplied by the calls one LoRA needs (the arithmetic is in each part).
* `lol_at_scale`: seconds per LoRA of LoL models on LoRAs of the same shapes (`lol.synth` specs), batched.
* `scale_tables` puts both sides side by side with their ratio; `write_speed_md` writes ``speed.md`` from these
  tables and the tiny-zoo one (``bench speed`` and notebook 06 both call it).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["Timing", "time_call", "clip_evaluation", "lm_evaluation", "lol_prediction", "throughput",
           "collection_throughput", "speed_ratios", "ImageProtocol", "ArcProtocol", "Part", "standard_image_evaluation",
           "standard_lm_evaluation", "lol_at_scale", "shipped_kinds", "scale_tables", "write_speed_md", "GOAL", "CLOCKS"]


@dataclass
class Timing:
    seconds: float          # median seconds of one call (wall clock)
    repeats: list[float]    # every timed call
    value: object = None    # what the call returned (a score, a prediction)
    setup_seconds: float = 0.0
    cpu_seconds: float = float("nan")   # median CPU seconds of this process (all its threads) during one call


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()   # GPU work is asynchronous: a call's time includes the kernels it launched


def time_call(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> Timing:
    value = None
    for _ in range(warmup):
        value = fn()
    times, cpu = [], []
    for _ in range(repeat):
        _sync()
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        _sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return Timing(statistics.median(times), times, value, cpu_seconds=statistics.median(cpu))


def _zoo_settings(coll) -> tuple[str, dict]:
    prov = (coll.provenance or {}).get("zoo") or {}
    if "preset" not in prov:
        raise ValueError(f"{coll.path}: not a zoo collection (no provenance.zoo.preset): the label settings are unknown")
    return prov["preset"], prov


def clip_evaluation(coll, index: int, sd_dir, clip_dir, repeat: int = 3, warmup: int = 1,
                    device: str | None = None) -> Timing:
    """Standard CLIP-score evaluation of LoRA ``index`` of a zoo faces collection (see module docstring). ``value``
    is ``{"score": recomputed, "label": stored}``; ``setup_seconds`` is the pipeline + scorer load time."""
    from .zoo.clipscore import CLIPScorer
    from .zoo.image_recipes import CLIP_SCORE_PROMPTS, FACES_PRESETS, ImageLoRATrainer, load_adapters, \
        sample_with_adapters

    preset, _ = _zoo_settings(coll)
    P = FACES_PRESETS[preset]
    prompts = list(CLIP_SCORE_PROMPTS[:P["clip_prompts"]])
    lora = coll.lora(index)
    t0 = time.perf_counter()
    trainer = ImageLoRATrainer(sd_dir, device)
    scorer = CLIPScorer(clip_dir, device=trainer.device)
    setup = time.perf_counter() - t0

    def run():
        ml = load_adapters(trainer.unet, [lora])
        try:
            images = sample_with_adapters(trainer, ml, [0] * len(prompts), prompts, P["clip_seed"], P["clip_steps"],
                                          P["guidance"])
        finally:
            ml.remove()
        return float(scorer.score(list(images), prompts).mean())

    t = time_call(run, repeat, warmup)
    t.value = {"score": t.value, "label": float(coll.table["clip_score"].iloc[index])}
    t.setup_seconds = setup
    return t


def lm_evaluation(coll, index: int, lm_dir, repeat: int = 3, warmup: int = 1, device: str | None = None) -> Timing:
    """Standard challenge-set evaluation of LoRA ``index`` of a zoo lm collection: the LoRA is written as a PEFT
    folder, loaded with ``PeftModel.from_pretrained`` onto the base LM, and every option of every challenge question
    is scored (max log-likelihood). ``value`` is ``{"accuracy": recomputed, "label": stored}``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .formats import save_peft
    from .zoo.lm import LM_PRESETS, _world, evaluate

    preset, prov = _zoo_settings(coll)
    world = _world(seed=int(prov.get("seed", 0)), **LM_PRESETS[preset]["world"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(lm_dir)
    base = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).to(device).eval()
    setup = time.perf_counter() - t0
    tmp = tempfile.TemporaryDirectory(prefix="lol-speed-")
    folder = save_peft(coll.lora(index), Path(tmp.name) / "adapter")

    def run():
        model = PeftModel.from_pretrained(base, str(folder)).to(device).eval()
        try:
            res = evaluate(model, tok, [], world["challenge"], device)
        finally:
            model.unload()   # back to the plain base model for the next call
        return float(res["correct"].float().mean())

    try:
        t = time_call(run, repeat, warmup)
    finally:
        tmp.cleanup()
    t.value = {"accuracy": t.value, "label": float(coll.table["challenge_accuracy"].iloc[index])}
    t.setup_seconds = setup
    return t


def lol_prediction(checkpoint, coll, index: int, repeat: int = 20, warmup: int = 3, device: str | None = "cpu"
                   ) -> Timing:
    """A checkpoint's prediction for LoRA ``index`` (a batch of one, from the memory-mapped collection: featurize +
    forward, moving the factors to the model's device included). ``value`` is ``{label: prediction}``."""
    from .checkpoint import Checkpoint, load_checkpoint

    t0 = time.perf_counter()
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, device=device)
    setup = time.perf_counter() - t0
    dtype = next(ckpt.model.parameters()).dtype

    def run():
        return {k: v[0] for k, v in ckpt.predict_batch(coll.batch([index], dtype=dtype)).items()}

    t = time_call(run, repeat, warmup)
    t.setup_seconds = setup
    return t


def throughput(models: dict, batches: Sequence, repeat: int = 3, warmup: int = 1) -> list[dict]:
    """``models``: {name: LoL model}; ``batches``: LoRABatches of growing size. One row per (model, size):
    ``n_loras``, ``seconds`` (median of one forward over the whole batch, featurization included), ``cpu_seconds``
    (the process's CPU time during it), ``loras_per_second``."""
    rows = []
    for name, model in models.items():
        model.eval()
        dev = next(model.parameters()).device
        for b in batches:
            b = b.to(device=dev)
            with torch.no_grad():
                t = time_call(lambda model=model, b=b: model(b), repeat, warmup)
            rows.append({"model": name, "n_loras": len(b), "seconds": t.seconds, "cpu_seconds": t.cpu_seconds,
                         "loras_per_second": len(b) / t.seconds if t.seconds > 0 else np.inf})
    return rows


def collection_throughput(coll, sizes: Sequence[int], kinds: Sequence[str] = ("glnet", "dense", "svals"),
                          repeat: int = 3, device: str | None = None) -> list[dict]:
    """`throughput` of freshly built models of ``kinds`` (weights do not change the cost) on LoRAs of ``coll`` at
    its most common rank, one batch per size (LoRAs repeated when the collection is smaller), on ``device``."""
    from .models import build_model

    idx = list(range(len(coll)))
    if "rank" in coll.table:
        r0 = int(coll.table["rank"].mode().iloc[0])
        idx = (coll.table["rank"] == r0).to_numpy().nonzero()[0].tolist()
    batches = [coll.batch([idx[k % len(idx)] for k in range(n)]) for n in sizes]
    torch.manual_seed(0)
    models = {k: build_model(k, coll.spec, 1).fit(batches[-1]).to(device or "cpu") for k in kinds}
    return throughput(models, batches, repeat=repeat)


def _ratio_row(task: str, what: str, std: Timing, lol: Timing, measured: str, label: str) -> dict:
    return {"task": task, "standard_evaluation": what, "standard_seconds": std.seconds, "lol_seconds": lol.seconds,
            "recomputed_label": std.value[measured], "stored_label": std.value["label"],
            "lol_prediction": float(lol.value[label])}


def speed_ratios(base_dir, collections_dir, checkpoints_dir, repeat: int = 3, device: str | None = None) -> list[dict]:
    """One row per task whose collection and shipped checkpoint exist: seconds per LoRA of the standard evaluation
    and of the LoL prediction, both measured here, on ``device`` (default: CUDA when present), for the same LoRA.

    * ``faces/clip_score``: `clip_evaluation` of the first rank-4 face LoRA against the ``faces/clip_score`` checkpoint;
    * ``lm/challenge_accuracy``: `lm_evaluation` of LoRA 0 against the ``lm/challenge_accuracy`` checkpoint.
    ``ratio`` = standard / LoL; the recomputed label is reported next to the stored one as a check."""
    from .collection import open_collection

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base, cdir, ckdir = Path(base_dir), Path(collections_dir), Path(checkpoints_dir)
    rows = []
    if (cdir / "faces" / "collection.json").is_file() and (ckdir / "faces" / "clip_score").is_dir():
        faces = open_collection(cdir / "faces")
        i = int((faces.table["rank"] == 4).to_numpy().nonzero()[0][0])
        std = clip_evaluation(faces, i, base / "sd", base / "clip", repeat=repeat, device=device)
        lol = lol_prediction(ckdir / "faces" / "clip_score", faces, i, repeat=max(20, repeat), device=device)
        rows.append(_ratio_row("faces/clip_score", "generate images + CLIP score", std, lol, "score", "clip_score"))
    if (cdir / "lm" / "collection.json").is_file() and (ckdir / "lm" / "challenge_accuracy").is_dir():
        lm = open_collection(cdir / "lm")
        std = lm_evaluation(lm, 0, base / "lm", repeat=repeat, device=device)
        lol = lol_prediction(ckdir / "lm" / "challenge_accuracy", lm, 0, repeat=max(20, repeat), device=device)
        rows.append(_ratio_row("lm/challenge_accuracy", "run the LM on the challenge set", std, lol, "accuracy",
                               "challenge_accuracy"))
    for r in rows:
        r["ratio"] = r["standard_seconds"] / r["lol_seconds"]
        r["device"] = device
        r["paper_claim"] = "> 50,000×"
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# At the paper's scale: SD-1.5 + CLIP ViT-B/16 and Qwen2-1.5B (lol.architectures, random weights) against LoL models on
# LoRAs of the same shapes (lol.synth specs)

GOAL = 50_000   # the paper: LoL estimates CLIP score and ARC-C accuracy "over 50,000× faster than standard evaluation"
IMAGE, LANGUAGE = "image: SD-1.5 CLIP score", "language: Qwen2-1.5B ARC-C"
# which LoRA shapes each side's LoL models read: (spec name in lol.synth.SPECS, words)
SCALE_SPECS = {IMAGE: (("sd15", "SD-1.5 UNet to_q/to_v"), ("sd15_attn", "SD-1.5 UNet to_q/k/v/out")),
               LANGUAGE: (("qwen2_1_5b", "Qwen2-1.5B q_proj/v_proj"),)}
# the shipped checkpoint whose label each side's standard evaluation measures
SCALE_TASKS = {IMAGE: "faces/clip_score", LANGUAGE: "lm/challenge_accuracy"}
DEFAULT_KINDS = ("dense", "colspace", "svals", "glnet")   # without shipped checkpoints: those, then the paper's GL-net


@dataclass(frozen=True)
class ImageProtocol:
    """One LoRA's CLIP-score label as the paper measures it: one image per prompt (``prompts``), ``steps`` denoising
    steps with classifier-free guidance (the UNet runs on the prompt and on the empty prompt; ``guidance`` mixes
    them), the latents decoded by the VAE, each image scored by CLIP ViT-B/16 against its prompt."""
    prompts: int = 33
    steps: int = 20
    guidance: float = 7.5


@dataclass(frozen=True)
class ArcProtocol:
    """ARC-Challenge as lm-evaluation-harness scores it: each answer option is its own sequence ``Question: …\\nAnswer:
    <option>``, scored by the summed log-likelihood of the option's tokens; the best option is the answer. The token
    lengths are assumptions: ARC-C's prompt with all options and a ~190-character instruction averages 454
    characters (evalscope's ARC statistics), so question and options are ~260 characters, ~4 characters per token:
    ~40 tokens for ``Question: …\\nAnswer:`` and ~6 per option. ARC-C has 3-5 options, almost always 4."""
    questions: int = 1172
    options: int = 4
    prompt_tokens: int = 40
    option_tokens: int = 6


QUICK_IMAGE = ImageProtocol(prompts=2, steps=2)
QUICK_ARC = ArcProtocol(questions=3, options=4, prompt_tokens=6, option_tokens=2)


@dataclass
class Part:
    """One stage of a standard evaluation: ``timing`` of one call doing ``call``, and ``calls`` such calls per LoRA,
    ``arithmetic`` saying how that number is obtained. ``seconds`` = seconds per call × calls: seconds per LoRA (wall
    clock; `row` also gives the process's CPU seconds)."""
    side: str
    name: str
    call: str
    timing: Timing
    calls: float
    arithmetic: str

    @property
    def seconds(self) -> float:
        return self.timing.seconds * self.calls

    def row(self) -> dict:
        t = self.timing
        return {"side": self.side, "part": self.name, "one call": self.call, "timed calls": len(t.repeats),
                "seconds per call": t.seconds, "CPU seconds per call": t.cpu_seconds, "calls per LoRA": self.calls,
                "arithmetic": self.arithmetic, "seconds per LoRA": self.seconds,
                "CPU seconds per LoRA": t.cpu_seconds * self.calls}


def _device_dtype(device, dtype, gpu_dtype):
    from .devices import default_device

    device = default_device(device)
    return device, dtype or (gpu_dtype if device.startswith("cuda") else torch.float32)


def _lora_spec(model, targets, prefix: str = ""):
    from .architectures import linear_shapes
    from .lora import ModuleSpec

    shapes = linear_shapes(model, targets, prefix)
    return ModuleSpec(tuple(shapes), tuple(shapes.values()))


def _lora_layers(model, adapter: str) -> int:
    """Modules of ``model`` carrying a loaded LoRA adapter named ``adapter`` (PEFT's ``lora_A[adapter]``)."""
    return sum(1 for n, _ in model.named_modules() if n.endswith(f"lora_A.{adapter}"))


def _inference(fn):
    def run():
        with torch.inference_mode():
            return fn()
    return run


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def standard_image_evaluation(quick: bool = False, device: str | None = None, dtype: torch.dtype | None = None,
                              prompts_per_call: int = 1, unet_calls: int = 2, repeat: int = 1, warmup: int = 1,
                              rank: int = 4, targets: Sequence[str] = ("to_q", "to_v"),
                              protocol: ImageProtocol | None = None) -> list[Part]:
    """The paper's CLIP-score evaluation of one LoRA (`ImageProtocol`) on SD-1.5's text encoder, UNet and VAE and on
    CLIP ViT-B/16, built from `lol.architectures` with random weights (``quick``: its tiny models). Each stage is
    built, timed and freed in turn (peak memory: the UNet): text encoding of the prompts and the empty prompt; the
    LoRA (rank ``rank`` on ``targets``) written as a diffusers file and loaded with ``UNet.load_lora_adapter`` (what
    ``pipe.load_lora_weights`` calls) then deleted; ``unet_calls`` denoising steps after ``warmup`` with the LoRA
    loaded (UNet on the guided batch, guidance, PNDM step); the VAE decode; the CLIP score (resize to 224, image and
    text towers, cosine). ``prompts_per_call`` prompts go through each call; each `Part` says how many calls one LoRA
    needs. Default dtype: float32 on CPU, float16 on CUDA."""
    device, dtype = _device_dtype(device, dtype, torch.float16)
    P = protocol or (QUICK_IMAGE if quick else ImageProtocol())
    run = _ImageRun(quick, device, dtype, int(prompts_per_call), P, torch.Generator().manual_seed(0))
    text, states = run.text_encoder(repeat, warmup)
    load, step, latents = run.unet(states, rank, targets, unet_calls, repeat, warmup)
    decode, images = run.vae(latents, repeat, warmup)
    return [text, load, step, decode, run.clip(images, repeat, warmup)]


@dataclass
class _ImageRun:
    """The stages of `standard_image_evaluation`, one method each: a stage's models live only inside its call."""
    quick: bool
    device: str
    dtype: torch.dtype
    b: int
    P: ImageProtocol
    g: torch.Generator

    @property
    def cfg(self) -> dict:
        from . import architectures as A
        return A.configs(self.quick)

    def build(self, component: str):
        from . import architectures as A
        return A.build(component, self.quick, self.dtype, self.device)

    def per_prompt(self, name: str, call: str, t: Timing) -> Part:
        return Part(IMAGE, name, call, t, self.P.prompts / self.b, f"{self.P.prompts} prompts ÷ {self.b} per call")

    def text_encoder(self, repeat, warmup) -> tuple[Part, torch.Tensor]:
        te, c = self.build("text_encoder"), self.cfg["text_encoder"]
        ids = torch.randint(c["vocab_size"], (2 * self.b, c["max_position_embeddings"]), generator=self.g)
        ids = ids.to(self.device)
        t = time_call(_inference(lambda: te(input_ids=ids).last_hidden_state), repeat, warmup)
        return self.per_prompt("text encoding (SD's CLIP ViT-L/14 text tower)",
                               f"{self.b} prompt(s) + {self.b} empty prompt(s), {ids.shape[1]} tokens", t), t.value

    def unet(self, states, rank, targets, calls, repeat, warmup) -> tuple[Part, Part, torch.Tensor]:
        from . import architectures as A
        from .formats.diffusers import save_diffusers
        from .synth import random_lora

        unet, P, b = self.build("unet"), self.P, self.b
        spec = _lora_spec(unet, targets, "unet.")
        with tempfile.TemporaryDirectory(prefix="lol-speed-") as tmp:
            file = str(save_diffusers(random_lora(spec, rank, seed=0), Path(tmp)))

            def load():
                unet.load_lora_adapter(file, prefix="unet", adapter_name="timed")
                unet.delete_adapters("timed")
            t = time_call(load, max(repeat, 2), warmup)
            load_part = Part(IMAGE, "load + unload the LoRA (diffusers)", f"load_lora_adapter of {len(spec)} "
                             f"modules, rank {rank}, then delete_adapters", t, 1, "once per LoRA")
            unet.load_lora_adapter(file, prefix="unet", adapter_name="lora")
        if _lora_layers(unet, "lora") != len(spec):
            raise RuntimeError(f"the LoRA reached {_lora_layers(unet, 'lora')} UNet modules, not {len(spec)}")
        sched = A.build("scheduler", self.quick)
        sched.set_timesteps(P.steps)
        s, ch = self.cfg["unet"]["sample_size"], self.cfg["unet"]["in_channels"]
        state = {"i": 0, "latents": torch.randn(b, ch, s, s, generator=self.g).to(self.device, self.dtype)}

        def step():
            if state["i"] == len(sched.timesteps):   # more timed calls than steps: start a new sampling run
                sched.set_timesteps(P.steps)
                state["i"] = 0
            ts = sched.timesteps[state["i"]]
            state["i"] += 1
            x = sched.scale_model_input(torch.cat([state["latents"]] * 2), ts)
            uncond, cond = unet(x, ts, encoder_hidden_states=states).sample.chunk(2)
            state["latents"] = sched.step(uncond + P.guidance * (cond - uncond), ts, state["latents"]).prev_sample
        t = time_call(_inference(step), calls, warmup)
        step_part = Part(IMAGE, "denoising step, LoRA loaded",
                         f"UNet on {2 * b} latents {s}×{s} (classifier-free guidance: {b} prompt(s) + empty), "
                         f"guidance, PNDM step; LoRA on {len(spec)} modules", t, P.steps * P.prompts / b,
                         f"{P.steps} steps × {P.prompts} prompts ÷ {b} per call")
        return load_part, step_part, state["latents"]

    def vae(self, latents, repeat, warmup) -> tuple[Part, torch.Tensor]:
        vae = self.build("vae")
        t = time_call(_inference(lambda: (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5)
                                 .clamp(0, 1)), repeat, warmup)
        h, w = t.value.shape[-2:]
        return self.per_prompt("VAE decode", f"{self.b} latent(s) → {self.b} image(s) {h}×{w}", t), t.value

    def clip(self, images, repeat, warmup) -> Part:
        import torch.nn.functional as F

        clip, dev, dt = self.build("clip"), self.device, self.dtype
        vc, tc = self.cfg["clip"]["vision_config"], self.cfg["clip"]["text_config"]
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=dev, dtype=dt).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=dev, dtype=dt).view(1, 3, 1, 1)
        text = torch.randint(tc["vocab_size"], (self.b, tc["max_position_embeddings"]), generator=self.g).to(dev)

        def pooled(out):
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def score():
            px = F.interpolate(images.float(), size=(vc["image_size"],) * 2, mode="bicubic", antialias=True)
            img = pooled(clip.get_image_features(pixel_values=(px.to(dt) - mean) / std))
            txt = pooled(clip.get_text_features(input_ids=text))
            return (100 * F.cosine_similarity(img.float(), txt.float(), dim=-1)).clamp(min=0)
        t = time_call(_inference(score), repeat, warmup)
        return self.per_prompt("CLIP ViT-B/16 score", f"{self.b} image(s) resized to {vc['image_size']} + {self.b} "
                               "prompt(s): image and text towers, cosine", t)


def standard_lm_evaluation(quick: bool = False, device: str | None = None, dtype: torch.dtype | None = None,
                           sequences_per_call: int = 4, calls: int = 2, warmup: int = 1, rank: int = 4,
                           protocol: ArcProtocol | None = None) -> list[Part]:
    """ARC-Challenge (`ArcProtocol`) of one LoRA on Qwen2-1.5B built from `lol.architectures` with random weights
    (``quick``: a tiny Qwen2): the LoRA (rank ``rank`` on ``q_proj``/``v_proj`` of every layer) written as a PEFT
    folder, loaded with ``PeftModel.from_pretrained`` and unloaded (timed), then ``calls`` forward passes after
    ``warmup`` over ``sequences_per_call`` option sequences of the assumed length (random token ids), each option's
    log-likelihood summed from the full logits as the harness does. Default dtype: float32 on CPU, bfloat16 on CUDA
    (Qwen2's released dtype)."""
    from peft import PeftModel

    from . import architectures as A
    from .formats import save_peft
    from .synth import random_lora

    device, dtype = _device_dtype(device, dtype, torch.bfloat16)
    P = protocol or (QUICK_ARC if quick else ArcProtocol())
    s = int(sequences_per_call)
    lm = A.build("lm", quick, dtype, device)
    spec = _lora_spec(lm, ("q_proj", "v_proj"))
    with tempfile.TemporaryDirectory(prefix="lol-speed-") as tmp:
        folder = str(save_peft(random_lora(spec, rank, seed=0), Path(tmp) / "adapter"))
        t = time_call(lambda: PeftModel.from_pretrained(lm, folder).unload(), 2, warmup)
        load = Part(LANGUAGE, "load + unload the LoRA (PEFT)", f"PeftModel.from_pretrained of {len(spec)} modules, "
                    f"rank {rank}, then unload", t, 1, "once per LoRA")
        model = PeftModel.from_pretrained(lm, folder).eval()
    try:
        if _lora_layers(model, "default") != len(spec):
            raise RuntimeError(f"the LoRA reached {_lora_layers(model, 'default')} LM modules, not {len(spec)}")
        n_tok, p = P.prompt_tokens + P.option_tokens, P.prompt_tokens
        ids = torch.randint(A.configs(quick)["lm"]["vocab_size"], (s, n_tok),
                            generator=torch.Generator().manual_seed(0)).to(device)

        def score():
            logits = model(input_ids=ids).logits[:, p - 1:-1].float()   # the positions predicting the option
            return torch.log_softmax(logits, -1).gather(-1, ids[:, p:, None]).sum((1, 2))
        t = time_call(_inference(score), calls, warmup)
    finally:
        model.unload()
    n = P.questions * P.options
    return [load, Part(LANGUAGE, "score answer options, LoRA loaded",
                       f"{s} option sequences of {n_tok} tokens ({P.prompt_tokens} question + {P.option_tokens} "
                       "option): forward, log-likelihood of the option", t, n / s,
                       f"{P.questions:,} questions × {P.options} options ÷ {s} per call")]


def shipped_kinds(checkpoints_dir) -> dict[str, dict]:
    """``{kind: {"tasks": ["faces/clip_score", …], "hparams": {…}}}`` of the checkpoints under ``checkpoints_dir``
    (``<collection>/<task>/config.json``); empty when there are none."""
    import json

    out: dict[str, dict] = {}
    for cfg in sorted(Path(checkpoints_dir).glob("*/*/config.json")):
        try:
            c = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        if "kind" not in c:
            continue
        k = out.setdefault(c["kind"], {"tasks": [], "hparams": dict(c.get("hparams") or {})})
        k["tasks"].append(f"{cfg.parent.parent.name}/{cfg.parent.name}")
    return out


def _accepts(kind: str, name: str) -> bool:
    import inspect

    from .models import MODELS

    return name in inspect.signature(MODELS[kind].__init__).parameters


def lol_at_scale(spec, kinds: Sequence[str], hparams: dict | None = None, batch: int = 64, rank: int = 4,
                 memory_budget: float = 3e9, repeat: int = 3, warmup: int = 1, device: str | None = None
                 ) -> list[dict]:
    """Seconds per LoRA of a fresh model of every kind in ``kinds`` (``hparams[kind]`` as shipped; weights do not
    change the cost) on ``batch`` random rank-``rank`` LoRAs over ``spec``, factors in memory, featurization included
    (`throughput`). A model whose weights exceed ``memory_budget`` bytes (dense ΔW and column-space projectors: Σ n·m
    or Σ n² inputs × width) is timed at the largest power-of-two fraction of its width that fits, and its time at
    the full width bounded by ``measured × width / timed width`` (its featurization does not grow with the width,
    its first layer grows linearly: the bound is an over-estimate); its batch is cut to what the budget holds."""
    from .batch import LoRABatch
    from .models import build_model
    from .synth import random_lora

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    hparams = hparams or {}
    loras = [random_lora(spec, rank, seed=i) for i in range(min(int(batch), 4))]
    rows = []
    for kind in kinds:
        hp = dict(hparams.get(kind) or {})
        if _accepts(kind, "rank"):
            hp.setdefault("rank", rank)
        width = int(hp.get("width", 64))
        hp["width"] = width

        def sizes(w, hp=hp, kind=kind):
            with torch.device("meta"):
                m = build_model(kind, spec, 1, **{**hp, "width": w})
            feats = getattr(m, "features", None)
            per_lora = 3 * 4 * feats.dim() if feats is not None and hasattr(feats, "dim") else 0
            return 4 * sum(p.numel() for p in m.parameters()), per_lora
        w = width
        while sizes(w)[0] > memory_budget and w > 1:
            w //= 2
        per_lora = sizes(w)[1]
        n = int(min(batch, max(1, memory_budget // per_lora))) if per_lora else int(batch)
        torch.manual_seed(0)
        with torch.device(device):   # built and fitted where it runs (a GPU run need not hold it in host memory)
            model = build_model(kind, spec, 1, **{**hp, "width": w})
        with torch.no_grad():
            model.fit(LoRABatch.from_loras(loras[:min(n, len(loras))], spec).to(device=device))   # within budget
        lb = LoRABatch.from_loras([loras[i % len(loras)] for i in range(n)], spec).to(device=device)
        r = throughput({kind: model}, [lb], repeat=repeat, warmup=warmup)[0]
        measured, cpu = r["seconds"] / n, r["cpu_seconds"] / n
        rows.append({"kind": kind, "LoRAs per call": n, "width": width, "timed width": w,
                     "seconds per LoRA, timed": measured, "seconds per LoRA": measured * width / w,
                     "CPU seconds per LoRA, timed": cpu, "CPU seconds per LoRA": cpu * width / w,
                     "how": (f"timed at batch {n}" if w == width else
                             f"timed at batch {n}, width {w} (weights of width {width} exceed "
                             f"{memory_budget / 1e9:g} GB), × {width}/{w}: an upper bound")})
        del model, lb
        _free(device)
    return rows


CLOCKS = {"wall": "seconds", "cpu": "CPU seconds"}   # which time a ratio divides: wall clock, or this process's CPU


def scale_tables(parts: Sequence[dict], lol_rows: Sequence[dict], shipped: dict | None = None, clock: str = "wall"):
    """``(standard, comparison)`` DataFrames. ``parts``: `Part.row` dicts of both sides; ``standard`` adds one total row
    per side. ``lol_rows``: `lol_at_scale` rows with ``side`` and ``LoRA`` added; ``comparison`` adds the side's
    standard seconds (wall and CPU), the ``ratio`` standard / LoL on ``clock`` (`CLOCKS`: ``cpu`` = the process's CPU
    time, which other processes sharing the cores do not inflate — with one thread, the work's time on a free core),
    whether it reaches `GOAL`, and which shipped checkpoints use the kind (``shipped``: `shipped_kinds`), marking the
    one whose label the side measures."""
    import pandas as pd

    col = f"{CLOCKS[clock]} per LoRA"
    std = pd.DataFrame(list(parts))
    totals = {c: std.groupby("side", sort=False)[c].sum() for c in ("seconds per LoRA", "CPU seconds per LoRA")}
    total_rows = pd.DataFrame([{"side": s, "part": "total", **{c: totals[c][s] for c in totals}}
                               for s in totals["seconds per LoRA"].index])
    std = pd.concat([std, total_rows], ignore_index=True)
    cmp = pd.DataFrame(list(lol_rows))
    if len(cmp):
        for c in totals:
            cmp[f"standard {c}"] = cmp["side"].map(totals[c])
        cmp["clock"] = clock
        cmp["ratio"] = cmp[f"standard {col}"] / cmp[col]
        cmp[f"≥ {GOAL:,}×"] = cmp["ratio"].map(lambda r: "yes" if r >= GOAL else "no")
        shipped = shipped or {}

        def used(row):
            tasks = (shipped.get(row["kind"]) or {}).get("tasks", [])
            return ", ".join(f"**{t}**" if t == SCALE_TASKS.get(row["side"]) else t for t in tasks) or "not shipped"
        cmp.insert(cmp.columns.get_loc("kind") + 1, "shipped for", cmp.apply(used, axis=1) if len(cmp) else "")
    return std, cmp


def _fmt_s(v) -> str:
    import math

    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    v = float(v)
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 1e-3:
        return f"{v:.4g}"
    return f"{v:.3g}"


def _md(df, formats: dict) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if c in formats else "---" for c in cols) + "|"]
    for row in df.itertuples(index=False):
        cells = []
        for c, v in zip(cols, row):
            isnan = isinstance(v, float) and v != v
            cells.append("" if isnan or v is None else formats[c](v) if c in formats else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_speed_md(out_dir) -> Path:
    """``<out_dir>/speed.md`` from the tables there: the paper-scale comparison (``speed_scale.csv``,
    ``speed_scale_standard.csv``, ``speed_scale.json`` written by ``bench speed``) and the tiny-zoo rows
    (``speed.csv``, notebook 06 or ``bench speed -- --zoo``), each section present when its files are. Only copies
    and formats what the files hold."""
    import json

    import pandas as pd

    out = Path(out_dir)
    parts = ["# Speed: LoL against the standard evaluation it replaces\n"]
    cmp_f, std_f, meta_f = out / "speed_scale.csv", out / "speed_scale_standard.csv", out / "speed_scale.json"
    if cmp_f.is_file() and std_f.is_file():
        meta = json.loads(meta_f.read_text()) if meta_f.is_file() else {}
        cmp, std = pd.read_csv(cmp_f), pd.read_csv(std_f)
        parts.append(
            ("## Quick mode: tiny models of the same classes (the code path of the paper-scale comparison)\n\n"
             if meta.get("quick") else
             "## At the paper's scale: Stable Diffusion 1.5 + CLIP ViT-B/16, and Qwen2-1.5B\n\n")
            + f"Both sides timed in one run (`{meta.get('command', 'python -m bench speed')}`, {meta.get('date', '?')}) "
            f"on {meta.get('device', '?')}; standard evaluation in {meta.get('dtype', '?')}, LoL in float32."
            + (" **Quick mode: tiny models, not the paper's scale.**" if meta.get("quick") else "")
            + " The standard evaluation runs the published architectures (`lol/architectures.py`: SD-1.5's UNet, VAE "
            "and text encoder, CLIP ViT-B/16, Qwen2-1.5B, copied from their `config.json`) with random weights: "
            "the time of a forward pass does not depend on the weights. The paper claims LoL is over "
            f"{GOAL:,}× faster.\n")
        clock = str(cmp["clock"].iloc[0]) if "clock" in cmp and len(cmp) else "wall"
        col, unit = f"{CLOCKS[clock]} per LoRA", "CPU s" if clock == "cpu" else "s"
        show = cmp.rename(columns={col: f"LoL {unit} per LoRA", f"standard {col}": f"standard {unit} per LoRA"})
        cols = ["side", "LoRA", "kind", "shipped for", "LoRAs per call", f"LoL {unit} per LoRA",
                f"standard {unit} per LoRA", "ratio", f"≥ {GOAL:,}×"]
        ok = cmp.groupby("kind", sort=False)["ratio"].agg(["min", "max"])
        met, missed = ok[ok["min"] >= GOAL], ok[ok["min"] < GOAL]
        summary = []
        if len(met):
            summary.append(f"**≥ {GOAL:,}× on every side and LoRA shape**: {', '.join(met.index)} (smallest ratio "
                           f"{met['min'].min():,.0f}×)")
        if len(missed):
            summary.append(f"**not ≥ {GOAL:,}× everywhere** (ratio range): " + ", ".join(
                f"{k} ({r['min']:,.0f}×–{r['max']:,.0f}×)" for k, r in missed.iterrows()))
        parts.append("Result: " + "; ".join(summary) + ".\n")
        parts.append(f"### {'CPU seconds' if clock == 'cpu' else 'Seconds'} per LoRA, LoL against the standard "
                     "evaluation\n\n"
                     + ("Times are this process's CPU seconds (`time.process_time`, one torch thread): the cores "
                        "were shared with other work, which inflates wall-clock times unevenly but not the CPU time "
                        "a single-threaded computation needs; the wall-clock times are in the CSV files.\n\n"
                        if clock == "cpu" else "")
                     + _md(show[[c for c in cols if c in show]],
                           {"LoRAs per call": lambda v: f"{int(v):,}", f"LoL {unit} per LoRA": _fmt_s,
                            f"standard {unit} per LoRA": _fmt_s, "ratio": lambda v: f"{v:,.0f}×"}) + "\n\n"
                     + "The checkpoint in **bold** is the shipped one for the label the side measures. Each LoL time "
                       "was timed at the batch shown"
                     + ("; except:\n\n" + "\n".join(
                         f"- {r['LoRA']}, {r['kind']}: {r['how']} ({_fmt_s(r[f'{CLOCKS[clock]} per LoRA, timed'])} "
                         f"{unit} per LoRA at width {r['timed width']})" for _, r in scaled.iterrows())
                        if len(scaled := cmp[cmp["timed width"] != cmp["width"]]) else ".") + "\n")
        std_show = std.rename(columns={f"{CLOCKS[clock]} per call": f"{unit} per call", col: f"{unit} per LoRA"})
        parts.append("### The standard evaluation of one LoRA: the parts timed, multiplied out\n\n"
                     "Each part: a few calls timed (median), × the calls one LoRA needs.\n\n"
                     + _md(std_show[["side", "part", "one call", "timed calls", f"{unit} per call", "calls per LoRA",
                                     "arithmetic", f"{unit} per LoRA"]],
                           {"timed calls": lambda v: f"{int(v)}", f"{unit} per call": _fmt_s,
                            "calls per LoRA": lambda v: f"{v:,.4g}", f"{unit} per LoRA": _fmt_s}) + "\n")
        if meta.get("notes"):
            parts.append("Notes:\n\n" + "\n".join(f"- {n}" for n in meta["notes"]) + "\n")
    zoo = out / "speed.csv"
    if zoo.is_file():
        z = pd.read_csv(zoo)
        parts.append("## Our zoo's tiny base models (not the paper's scale)\n\n"
                     "Standard evaluation = the zoo's own labelling code on its small bases (a 64-px Stable "
                     "Diffusion, a 4-layer LM), recomputing the stored label, against the shipped checkpoint's "
                     "prediction for the same LoRA (batch of one, read from the collection); notebook 06 "
                     "(`lol.speed.speed_ratios`). These bases are far cheaper to run than SD-1.5 or Qwen2-1.5B, so "
                     "these ratios say nothing about the paper's claim.\n\n"
                     + _md(z, {c: _fmt_s for c in ("standard_seconds", "lol_seconds")}
                           | {c: (lambda v: f"{v:.4g}") for c in ("recomputed_label", "stored_label",
                                                                   "lol_prediction")}
                           | {"ratio": lambda v: f"{v:,.0f}×"}) + "\n")
    path = out / "speed.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def scale_specs(quick: bool = False) -> dict[str, list[tuple[str, object]]]:
    """``{side: [(words, ModuleSpec), …]}``: the LoRA shapes each side's LoL models read — `lol.synth`'s SD-1.5 q/v
    and all-attention specs and its Qwen2-1.5B q/v spec; ``quick``: the same targets on the tiny models of
    `lol.architectures` (read from their structure, no weights)."""
    from . import architectures as A
    from .synth import spec_by_name

    if not quick:
        return {side: [(words, spec_by_name(name)) for name, words in specs] for side, specs in SCALE_SPECS.items()}
    unet, lm = A.build("unet", True, device="meta"), A.build("lm", True, device="meta")
    return {IMAGE: [("tiny UNet to_q/to_v", _lora_spec(unet, ("to_q", "to_v"), "unet.")),
                    ("tiny UNet to_q/k/v/out", _lora_spec(unet, ("to_q", "to_k", "to_v", "to_out.0"), "unet."))],
            LANGUAGE: [("tiny Qwen2 q_proj/v_proj", _lora_spec(lm, ("q_proj", "v_proj")))]}
