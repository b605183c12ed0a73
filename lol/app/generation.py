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

__all__ = ["Generation", "generate_side_by_side", "PIPELINE_LOCK", "parse_seeds"]

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
    clip_base: float | None = None
    clip_lora: float | None = None

    @property
    def captions(self) -> list[str]:
        return [f"{p} · seed {s}" for p in self.prompts for s in self.seeds]


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
    try:
        return {a for names in pipe.get_list_adapters().values() for a in names}
    except Exception:  # noqa: BLE001 — no adapters loaded yet
        return set()
