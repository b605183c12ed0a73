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
           "collection_throughput", "speed_ratios"]


@dataclass
class Timing:
    seconds: float          # median seconds of one call
    repeats: list[float]    # every timed call
    value: object = None    # what the call returned (a score, a prediction)
    setup_seconds: float = 0.0


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()   # GPU work is asynchronous: a call's time includes the kernels it launched


def time_call(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> Timing:
    value = None
    for _ in range(warmup):
        value = fn()
    times = []
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        value = fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), times, value)


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
    ``n_loras``, ``seconds`` (median of one forward over the whole batch, featurization included), ``loras_per_second``."""
    rows = []
    for name, model in models.items():
        model.eval()
        dev = next(model.parameters()).device
        for b in batches:
            b = b.to(device=dev)
            with torch.no_grad():
                t = time_call(lambda model=model, b=b: model(b), repeat, warmup)
            rows.append({"model": name, "n_loras": len(b), "seconds": t.seconds,
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
