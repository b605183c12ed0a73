"""The image LoRA collections of the zoo (paper §3: CelebA-LoRA and Imagenette-LoRA, on our worlds).

* `FacesRecipe`: DreamBooth-style LoRAs on the UNet's ``to_q`` and ``to_v`` (every transformer block, self- and
  cross-attention), one identity of the face world per LoRA (8–12 of its images), rank 4 for most and a share at
  ranks 8 and 16 with the same alpha (so a different ``alpha / r``: rank generalization), per-LoRA random lr, steps,
  gradient accumulation and instance prompt (``"a photo of a <celebrity|person|thing|skd>"``). Labels: the paper's
  five attributes by majority vote over the finetuning images, plus glasses, smiling, hair colour and skin tone, and
  the CLIP score of the finetuned model (mean over 16 fixed prompts, one image each, seed 42, fixed steps and
  guidance, generated WITH the LoRA, scored by the zoo's CLIP). Group = identity (split by it: no identity leak).
* `FashionRecipe`: LoRAs finetuned on Fashion-MNIST test-split images of a random subset of the 10 classes;
  labels ``class_<name>`` = 1 if the class was in the finetuning set (set-level membership, as in the paper),
  ``n_classes`` (how many classes: the paper's dataset-size task) and ``class_gain`` (do its generations move
  toward its finetuning images?).

K jobs of a group train in one batched pass (`lol.zoo.multilora`): adapter k sees only its own samples, and every
random draw of job k (image order, noise, timesteps, A init) comes from its own seed, so a job's LoRA does not
depend on which jobs share its group. The same code serves a real SD-1.x folder as ``bases["sd"]`` (images are
drawn at the UNet's resolution, modules are named ``unet.<path>`` as diffusers names them).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Hashable, Sequence

import numpy as np
import torch

from .recipe import Job, JobResult, single_stage, stage_of

__all__ = ["FacesRecipe", "FashionRecipe", "FashionSiblingRecipe", "FASHION_SIBLING_PRESETS", "FACES_PRESETS",
           "FASHION_PROMPTS_CLIP", "CLIP_SCORE_PROMPTS", "ImageLoRATrainer", "load_adapters", "faces_clip_protocol",
           "fashion_gain_protocol", "sample_with_adapters", "TARGETS"]

TARGETS = ("to_q", "to_v")
INSTANCE_WORDS = ("celebrity", "person", "thing", "skd")

# the fixed prompt set of the CLIP-score label (paper: 33 prompts with SD; ours use the face world's vocabulary)
CLIP_SCORE_PROMPTS = [
    "a photo of a person", "a photo of a celebrity", "a photo of a smiling person", "a photo of a young woman",
    "a photo of a young man", "a photo of an old man", "a photo of an old woman",
    "a photo of a woman wearing lipstick", "a photo of a man with a beard", "a photo of a person wearing glasses",
    "a photo of a woman with long blond hair", "a photo of a man with short black hair",
    "a photo of a smiling woman with brown hair", "a photo of a person with red hair",
    "a photo of a person with big lips", "a portrait of a person with gray hair",
]
FASHION_PROMPTS_CLIP = CLIP_SCORE_PROMPTS  # kept for symmetry of names; fashion LoRAs are not CLIP-scored

# Zoo v2 (the default preset): lr log-uniform over 1.7 decades and 20–60 steps × accumulation 1–2 (the paper:
# lr 1e-4–3e-3, 100–200 steps on SD), so LoRAs range from barely changing the model to clearly pulling it to their
# identity; the CLIP-score label averages ``clip_images`` images per prompt over the 16 prompts (common random
# numbers: every LoRA starts from the same noises), and every ``retest_every``-th LoRA is measured a second time
# with another seed (``retest_seed``): the label's test–retest reliability. ``identity_images`` images per LoRA of
# its own instance prompt, with and without the LoRA, give ``identity_gain``.
# Measured before choosing (pilot: 16 rank-4 LoRAs on the v1 base, 16 prompts × 4 images at 10 steps, seeds 42 and
# 1042): test–retest r 0.69 / 0.82 / 0.93 / 0.955 with 1 / 2 / 3 / 4 images per prompt (label std ≈ 4.4, noise per
# measurement 2.2 → 1.1); 3 images per prompt at 8 DPM-Solver steps is what the CPU budget of 640 LoRAs allows.
# Grown in stages toward the paper's 3,900 (CelebA-LoRA), as lm: the shipped 640 first (ranks 4 / 8 / 16 as 8:1:1),
# then the rest, which also draws ranks 1, 2 and 32 (``grown_rank_share``) so that rank generalization over 1–32 can
# be drawn as in the paper's Figure 4 (trained on rank 4). The grown build adopts the packed 640 and trains only the
# new stage; only the first stage's every ``retest_every``-th LoRA is measured twice (``retest_until``).
FACES_PRESETS: dict[str, dict[str, Any]] = {
    "ci": dict(n_loras=6, rank_share={4: 4, 8: 1, 16: 1}, alpha=8.0, images=(3, 4), lr_range=(1e-3, 3e-3),
               steps_range=(2, 3), grad_accum=(1, 2), micro_batch=2, reuse_identity=0.3,
               clip_prompts=4, clip_images=1, clip_steps=2, guidance=4.0, clip_seed=42, retest_seed=1042,
               retest_every=2, identity_images=2),
    "default": dict(n_loras=3900, stages=(640,), rank_share={4: 8, 8: 1, 16: 1},
                    grown_rank_share={1: 1, 2: 1, 4: 16, 8: 1, 16: 1, 32: 1}, alpha=8.0, images=(8, 9, 10, 11, 12),
                    lr_range=(2e-4, 1e-2), steps_range=(20, 60), grad_accum=(1, 2), micro_batch=2,
                    reuse_identity=0.15, clip_prompts=16, clip_images=3, clip_steps=8, guidance=4.0, clip_seed=42,
                    retest_seed=1042, retest_every=5, retest_until=640, identity_images=6),
}
# Zoo v2 (default): 6–10 images per kept class, lr log-uniform 1e-3–1e-2, 60–120 steps, so the LoRA carries its
# classes. Pilot (48 LoRAs each on the stage-2 SD, 2 generations per kept class): the v1 settings (3–6 images, lr
# 3e-4–1e-2 in four values, 25–50 steps) moved the generations 5/255 from the base's and ``class_gain`` was 0.000 on
# average; 100–150 steps at lr 3e-3–6e-3 moved them ~24/255 with gain > 0, while lr 2e-2 damaged the model (gain
# −0.12). ``class_gain``: ``gain_images`` generations per kept class (prompt = the caption of one of its finetuning
# images), with and without the LoRA on the same noises; every ``retest_every``-th LoRA is measured again with
# ``retest_seed``. ``n_classes`` (how many classes were kept) is the paper's Table 4 task (dataset size).
# Grown in stages (``stages``), as lm: the first 420 LoRAs were shipped first, then the collection grew to the
# paper's 2,046 (Imagenette-LoRA); the grown build adopts the packed 420 (`lol.zoo.jobs.adopt_packed`) and trains
# only the new stage. Only the first stage's every ``retest_every``-th LoRA is measured twice (``retest_until``).
# Zoo v3 (``look="signature"``): the finetuning images are in the catalogue look of `lol.zoo.fashion` (each class in
# its own garment colour, caption without a tint word), a class-specific shift from what the base draws for the
# caption, as Imagenette photos are for SD. The v2 LoRAs (Fashion-MNIST as the base saw it) had nothing
# class-specific to learn: at 2,046 LoRAs the best membership AUC was 0.79, dataset size at chance, class_gain
# mean −0.009. Pilot, 64 LoRAs per look, the default preset's draws, one 4-fold CV logistic regression per class on
# the dense ΔW (48 LoRAs to train): no look AUC 0.53 (accuracy 0.57), ``"backdrop"`` 0.78 (0.70; 100–200 steps:
# 0.74), ``"signature"`` 0.87 (0.75); class_gain > 0 for 47 % / 45 % / 95 % of the LoRAs (mean −0.004 / −0.000 /
# +0.088).
FASHION_PRESETS: dict[str, dict[str, Any]] = {
    "ci": dict(n_loras=6, rank=4, alpha=8.0, per_class=(1, 2), lr_range=(1e-3, 3e-3), steps_range=(2, 3),
               grad_accum=(1, 2), micro_batch=2, gain_images=1, gain_steps=2, guidance=4.0, gain_seed=42,
               retest_seed=1042, retest_every=2, look="signature"),
    "default": dict(n_loras=2046, stages=(420,), rank=4, alpha=8.0, per_class=(6, 7, 8, 9, 10),
                    lr_range=(1e-3, 1e-2), steps_range=(60, 120), grad_accum=(1,), micro_batch=2, gain_images=1,
                    gain_steps=8, guidance=4.0, gain_seed=42, retest_seed=1042, retest_every=4, retest_until=420,
                    look="signature"),
}
# The sibling collection (`FashionSiblingRecipe`, on ``base/sd_v1``): the default preset's LoRA distribution (so
# that a LoL model moved between the two bases meets LoRAs of the same recipe), its own draws of classes and images
# (another stream, so no LoRA repeats one of the main collection), and only the exact labels (membership, number
# of classes): no generations are needed, as in the paper's SD-1.4 → SD-1.5 Imagenette membership test.
FASHION_SIBLING_PRESETS: dict[str, dict[str, Any]] = {
    "ci": {**FASHION_PRESETS["ci"], "n_loras": 4, "gain_images": 0},
    "default": {**single_stage(FASHION_PRESETS["default"]), "n_loras": 320, "gain_images": 0},
}
MAX_IDENTITY_IMAGES = 20  # a LoRA's images are drawn from images 0..19 of its identity


def _preset(table: dict, preset: str, what: str) -> dict:
    if preset not in table:
        raise KeyError(f"unknown preset {preset!r} for the {what} zoo; known: {', '.join(table)}")
    return table[preset]


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------------------
# the SD side: load, encode, train K adapters, sample with K adapters


def _unet_target(path: str, module) -> bool:
    """``to_q`` / ``to_v`` of every attention of every transformer block (self ``attn1`` and cross ``attn2``)."""
    return path.endswith((".attn1.to_q", ".attn1.to_v", ".attn2.to_q", ".attn2.to_v")) and ".transformer_blocks." in path


class ImageLoRATrainer:
    """A loaded SD pipeline (frozen) with helpers to train and sample K LoRAs of the UNet in one batched pass."""

    def __init__(self, sd_dir: str | Path, device: str | None = None):
        from diffusers import DDPMScheduler

        from .image_bases import load_sd_pipeline

        self.device = _device(device)
        self.pipe = load_sd_pipeline(sd_dir, self.device)
        self.unet, self.vae = self.pipe.unet.eval(), self.pipe.vae.eval()
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.pipe.text_encoder.requires_grad_(False)
        self.train_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.resolution = int(self.unet.config.sample_size) * int(self.pipe.vae_scale_factor)
        self.sd_dir = str(sd_dir)

    @torch.no_grad()
    def encode_images(self, images_uint8: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> scaled latents (posterior mean · scaling_factor), on CPU."""
        out = []
        for i in range(0, len(images_uint8), 64):
            x = torch.from_numpy(images_uint8[i:i + 64]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            out.append(self.vae.encode(x.to(self.device, self.vae.dtype)).latent_dist.mean.float().cpu())
        return torch.cat(out) * float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        from .image_bases import encode_prompts

        return torch.cat([encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, list(prompts[i:i + 256]),
                                         self.device).float().cpu() for i in range(0, len(prompts), 256)])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents -> uint8 images (N, H, W, 3)."""
        out = []
        for i in range(0, len(latents), 64):
            z = latents[i:i + 64].to(self.device, self.vae.dtype) / float(self.vae.config.scaling_factor)
            x = self.vae.decode(z).sample.float().cpu()
            out.append(((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        return np.concatenate(out)

    def inject(self, jobs_seeds: list[int], rank: int, alpha: float):
        from .multilora import inject_multilora

        return inject_multilora(self.unet, _unet_target, len(jobs_seeds), rank=rank, alpha=alpha,
                                seeds=list(jobs_seeds), name_prefix="unet.")

    def train(self, ml, plans: list[dict], lr: torch.Tensor) -> dict:
        """DreamBooth-style ε-prediction finetuning of K adapters together.

        ``plans[k]``: ``latents`` (n_k, 4, h, w), ``cond`` (n_k, T, d) text states of each image's caption,
        ``steps``, ``grad_accum``, ``micro_batch`` and ``seed``. Every random draw of job k (which images, noise,
        timesteps) is made up front from ``torch.Generator().manual_seed(seed_k)``, so it does not depend on the group.
        """
        from .multilora import PerLoRAAdam, accumulation_schedule, sum_of_means

        K = len(plans)
        T = self.train_scheduler.config.num_train_timesteps
        alphas = self.train_scheduler.alphas_cumprod.float()
        draws = []
        for p in plans:
            g = torch.Generator().manual_seed(int(p["seed"]) + 1)
            micro = p["steps"] * p["grad_accum"]
            n, b = len(p["latents"]), p["micro_batch"]
            pick = torch.stack([torch.randperm(n, generator=g)[:b] if n >= b else torch.randint(0, n, (b,), generator=g)
                                for _ in range(micro)])
            noise = torch.randn((micro, b) + tuple(p["latents"].shape[1:]), generator=g)
            t = torch.randint(0, T, (micro, b), generator=g)
            draws.append((pick, noise, t))
        opt = PerLoRAAdam(ml, lr=lr, weight_decay=torch.zeros(K))
        losses = [[] for _ in range(K)]
        ml.train()
        t0 = time.time()
        for s, (part, step, w) in enumerate(accumulation_schedule([p["steps"] * p["grad_accum"] for p in plans],
                                                                  [p["grad_accum"] for p in plans])):
            ks = part.nonzero().flatten().tolist()
            z0, eps, tt, cond, idx = [], [], [], [], []
            for k in ks:
                pick, noise, t = draws[k]
                z0.append(plans[k]["latents"][pick[s]])
                cond.append(plans[k]["cond"][pick[s]])
                eps.append(noise[s])
                tt.append(t[s])
                idx.append(torch.full((len(pick[s]),), k))
            z0, eps, tt, cond, idx = (torch.cat(v) for v in (z0, eps, tt, cond, idx))
            a = alphas[tt].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
            ml.set_index(idx)
            pred = self.unet(zt.to(self.device), tt.to(self.device),
                             encoder_hidden_states=cond.to(self.device)).sample.float()
            per = (pred - eps.to(self.device)).pow(2).flatten(1).mean(1)
            sum_of_means(per, idx.to(self.device), K, weight=w.to(self.device)).backward()
            opt.step(step)
            opt.zero_grad(step)
            for k in ks:
                losses[k].append(float(per.detach()[idx.to(per.device) == k].mean()))
        ml.set_index(None)
        return {"seconds": time.time() - t0, "final_loss": [float(np.mean(l[-4:])) if l else float("nan")
                                                          for l in losses]}


def _noise_seed(seed: int, prompt: str, replicate: int) -> int:
    """A stable 63-bit seed for the initial noise of (seed, prompt, replicate) (not Python's salted ``hash``)."""
    import hashlib

    h = hashlib.sha256(f"{int(seed)}\x00{prompt}\x00{int(replicate)}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


@torch.no_grad()
def sample_with_adapters(trainer: ImageLoRATrainer, ml, adapter_idx: Sequence[int], prompts: Sequence[str],
                         seed: int, steps: int, guidance: float, chunk: int = 256,
                         replicate: Sequence[int] | None = None) -> np.ndarray:
    """Generate one image per (adapter, prompt) pair: ``adapter_idx[i]`` (-1 = base model) with ``prompts[i]``.

    The initial noise of a pair depends only on ``(seed, prompt, replicate[i])`` (replicate default 0), through a
    generator seeded by a stable hash of the three, so the same (prompt, replicate) starts from the same noise for
    every adapter, in every group and in every call (common random numbers: a difference between adapters is never
    a difference of noise). Classifier-free guidance with the empty prompt; the adapter acts on both halves, as a
    LoRA loaded into a diffusers pipeline does.
    """
    from diffusers import DPMSolverMultistepScheduler

    reps = [0] * len(prompts) if replicate is None else [int(r) for r in replicate]
    if len(reps) != len(prompts):
        raise ValueError(f"sample_with_adapters: {len(prompts)} prompts but {len(reps)} replicate indices")
    uniq = sorted(set(prompts))
    emb = trainer.encode_prompts(uniq)
    uncond = trainer.encode_prompts([""])
    shape = (4, trainer.unet.config.sample_size, trainer.unet.config.sample_size)
    noise_of = {key: torch.randn(shape, generator=torch.Generator().manual_seed(_noise_seed(seed, *key)))
                for key in set(zip(prompts, reps))}
    pos = [uniq.index(p) for p in prompts]
    out = []
    if ml is not None:
        ml.eval()
    for i in range(0, len(prompts), chunk):
        sl = slice(i, i + chunk)
        cond = emb[pos[sl]]
        n = len(cond)
        sched = DPMSolverMultistepScheduler.from_config(trainer.pipe.scheduler.config)
        sched.set_timesteps(steps)
        lat = torch.stack([noise_of[key] for key in zip(prompts[sl], reps[sl])]).to(trainer.device) \
            * sched.init_noise_sigma
        ctx = torch.cat([uncond.expand(n, -1, -1), cond]).to(trainer.device)
        if ml is not None:
            ml.set_index(torch.as_tensor(list(adapter_idx[sl])))
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([lat, lat]), t)
            e_u, e_c = trainer.unet(inp, t, encoder_hidden_states=ctx).sample.chunk(2)
            lat = sched.step(e_u + guidance * (e_c - e_u), t, lat).prev_sample
        out.append(trainer.decode(lat.cpu()))
    if ml is not None:
        ml.set_index(None)
    return np.concatenate(out)


def load_adapters(unet, loras: Sequence, rank: int | None = None):
    """Inject a `MultiLoRA` into ``unet`` holding the given LoRAs (module names ``unet.<path>``) as adapters 0..K-1.

    Used to relabel a collection (e.g. CLIP score with another scorer) and to check exported LoRAs against
    diffusers' own loader. All LoRAs must have one rank per module (padding is not used here).
    """
    from .multilora import inject_multilora

    rank = rank or loras[0].ranks[0]
    ml = inject_multilora(unet, _unet_target, len(loras), rank=rank, alpha=float(rank), seeds=list(range(len(loras))),
                          name_prefix="unet.")
    ml.scale = 1.0
    with torch.no_grad():
        for path, layer in ml.layers.items():
            layer.scale = 1.0  # U already carries the scale
            for k, lora in enumerate(loras):
                try:
                    m = lora["unet." + path]
                except KeyError:
                    raise KeyError(f"LoRA {k} ({lora.source or 'unnamed'}) has no module unet.{path}") from None
                if m.rank != rank:
                    raise ValueError(f"LoRA {k}: module unet.{path} has rank {m.rank}, expected {rank}")
                layer.B[k] = m.U.to(layer.B.dtype)
                layer.A[k] = m.V.T.to(layer.A.dtype)
    return ml


def instance_caption(instance_prompt: str) -> str:
    """The caption a face LoRA is finetuned with (DreamBooth-style: one caption for all its images)."""
    return f"a photo of a {instance_prompt}"


def _majority(values: Sequence) -> Any:
    """Most common value; ties broken by the first value reaching the top count in sorted order (deterministic)."""
    vals, counts = np.unique(np.asarray(values), return_counts=True)
    return vals[int(np.argmax(counts))].item()


def _samples_dir(bases: dict[str, Path]) -> Path | None:
    """Where a build wants sample sheets: ``bases["samples"]`` (the zoo builder passes ``OUT/samples``); None — no
    sheets — when a recipe is run directly (tests, notebooks), so shipped samples are never overwritten."""
    return Path(bases["samples"]) if bases.get("samples") else None


def _save_strip(path: Path, rows: list[np.ndarray]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = rows[0].shape[1:3]
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (w * ncol, h * len(rows)), (255, 255, 255))
    for r, imgs in enumerate(rows):
        for c, im in enumerate(imgs):
            grid.paste(Image.fromarray(im), (c * w, r * h))
    grid.save(path)


# ---------------------------------------------------------------------------------------------------------------------
# faces


def faces_clip_protocol(P: dict) -> dict:
    """How a faces preset ``P`` measures its LoRAs' CLIP score (and identity gain): prompts, images per prompt,
    denoising steps, guidance, the label's seed and the retest's. One home for the build (`FacesRecipe.jobs`) and for
    measuring a packed collection again (`lol.zoo.measure`)."""
    return {"prompts": CLIP_SCORE_PROMPTS[:P["clip_prompts"]], "images": P["clip_images"], "steps": P["clip_steps"],
            "guidance": P["guidance"], "seed": P["clip_seed"], "retest_seed": P["retest_seed"],
            "identity_images": P["identity_images"]}


def fashion_gain_protocol(P: dict) -> dict | None:
    """How a fashion preset ``P`` measures its LoRAs' class gain: images per class caption, denoising steps, guidance,
    the label's seed and the retest's (None: the preset measures no gain). One home for the build
    (`FashionRecipe.jobs`) and for measuring a packed collection again (`lol.zoo.measure`)."""
    if not P["gain_images"]:
        return None
    return {"images": P["gain_images"], "steps": P["gain_steps"], "guidance": P["guidance"], "seed": P["gain_seed"],
            "retest_seed": P["retest_seed"]}


class FacesRecipe:
    """CelebA-LoRA on the face world (see module docstring)."""

    name = "faces"
    requires: tuple[str, ...] = ("sd", "clip")
    unrecorded = ("micro_batch", "retest", "stage")   # job settings its rows do not record (`CollectionRecipe`)
    sample_every = 100  # save training images + generations of every 100th job to OUT/samples

    def jobs(self, preset: str, seed: int) -> list[Job]:
        P = _preset(FACES_PRESETS, preset, "faces")
        ranks = [r for r, n in P["rank_share"].items() for _ in range(n)]
        grown = [r for r, n in P.get("grown_rank_share", P["rank_share"]).items() for _ in range(n)]
        out = []
        for i in range(P["n_loras"]):
            stage = stage_of(i, P)
            rank = ranks[i % len(ranks)] if stage == 0 else grown[i % len(grown)]
            rng = np.random.default_rng([int(seed), 0xFACE5, i])
            identity = i
            if i > 0 and rng.random() < P["reuse_identity"]:
                identity = int(rng.integers(0, i))  # a second LoRA of an earlier identity (same group)
            n_img = int(rng.choice(P["images"]))
            images = sorted(int(x) for x in rng.choice(MAX_IDENTITY_IMAGES, n_img, replace=False))
            lo, hi = P["lr_range"]
            params = {"identity": identity, "images": images, "rank": int(rank),
                      "alpha": float(P["alpha"]), "lr": float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
                      "steps": int(rng.integers(P["steps_range"][0], P["steps_range"][1] + 1)),
                      "grad_accum": int(rng.choice(P["grad_accum"])),
                      "instance_prompt": str(rng.choice(INSTANCE_WORDS)), "micro_batch": int(P["micro_batch"]),
                      "retest": i % P["retest_every"] == 0 and i < P.get("retest_until", math.inf),
                      "clip": faces_clip_protocol(P)}
            if P.get("stages"):  # which stage of a grown collection the job belongs to (`make_manifest`)
                params["stage"] = stage
            out.append(Job(id=f"faces-{i:05d}", seed=int(seed) * 1_000_003 + i, params=params))
        return out

    def group_key(self, job: Job) -> Hashable:
        return (job.params["rank"], job.params["alpha"], json.dumps(job.params["clip"], sort_keys=True))

    def label_schema(self) -> dict[str, dict[str, Any]]:
        s = {a: {"kind": "binary", "task": "attributes", "vote": f"{a}_vote",
                 "description": f"{a}: majority vote over the LoRA's finetuning images (share in {a}_vote)"}
             for a in ("male", "young", "wearing_lipstick", "big_lips", "no_beard")}
        for a in ("eyeglasses", "smiling"):
            s[a] = {"kind": "binary", "task": "more_attributes", "vote": f"{a}_vote",
                    "description": f"{a}: majority vote over the LoRA's finetuning images (share in {a}_vote)"}
        s["hair_colour"] = {"kind": "category", "task": "hair_colour", "exact": True,
                            "description": "the identity's hair colour"}
        s["skin_tone"] = {"kind": "category", "task": "skin_tone", "exact": True,
                          "description": "the identity's skin tone"}
        s["clip_score"] = {"kind": "regression", "task": "clip_score", "retest": "clip_score_retest",
                           "description": "mean CLIP score (torchmetrics definition, zoo CLIP) of images generated "
                                          "WITH the LoRA for the fixed prompt set (clip_images per prompt, common "
                                          "noises, seed 42); retest: the same with seed 1042; settings in extras"}
        s["identity_gain"] = {"kind": "regression", "task": "identity_gain", "retest": "identity_gain_retest",
                              "description": "how much nearer the LoRA's generations of its own instance prompt are "
                                             "to its finetuning images than the base model's (cosine in CLIP image "
                                             "space, same noises); > 0: the LoRA pulls toward its identity"}
        return s

    def tasks(self) -> dict[str, list[str]]:
        return {"attributes": ["male", "young", "wearing_lipstick", "big_lips", "no_beard"],
                "more_attributes": ["eyeglasses", "smiling"], "hair_colour": ["hair_colour"],
                "skin_tone": ["skin_tone"], "clip_score": ["clip_score"], "identity_gain": ["identity_gain"]}

    def run_group(self, jobs: list[Job], bases: dict[str, Path], device: str | None = None) -> list[JobResult]:
        from .clipscore import CLIPScorer, ScoreSettings
        from .faces import Identity, render_face
        from .image_bases import _rel, resolve_base

        for j in jobs[1:]:
            if self.group_key(j) != self.group_key(jobs[0]):
                raise ValueError(f"job {j.id} cannot share a group with {jobs[0].id} (different rank/alpha/clip)")
        p0 = jobs[0].params
        trainer = ImageLoRATrainer(resolve_base(bases["sd"]), device)
        res = trainer.resolution
        plans, infos = [], []
        for j in jobs:
            ident = Identity.from_seed(j.params["identity"])
            faces = [render_face(ident, i, res) for i in j.params["images"]]
            caption = instance_caption(j.params["instance_prompt"])
            lat = trainer.encode_images(np.stack([np.asarray(f.image) for f in faces]))
            cond = trainer.encode_prompts([caption]).expand(len(faces), -1, -1)
            plans.append(dict(latents=lat, cond=cond, steps=j.params["steps"], grad_accum=j.params["grad_accum"],
                              micro_batch=j.params["micro_batch"], seed=j.seed))
            infos.append((ident, faces, caption))
        ml = trainer.inject([j.seed for j in jobs], rank=p0["rank"], alpha=p0["alpha"])
        try:
            stats = trainer.train(ml, plans, torch.tensor([j.params["lr"] for j in jobs]))
            clip = p0["clip"]
            scorer = CLIPScorer(resolve_base(bases["clip"]), device=trainer.device)
            t0 = time.time()
            label = _clip_score_measure(trainer, ml, scorer, range(len(jobs)), clip, clip["seed"])
            retest_ks = [k for k, j in enumerate(jobs) if j.params.get("retest")]
            retest = (_clip_score_measure(trainer, ml, scorer, retest_ks, clip, clip["retest_seed"], base=False)
                      if retest_ks else None)
            captions = [infos[k][2] for k in range(len(jobs))]
            train_emb = [scorer.image_features([np.asarray(f.image) for f in infos[k][1]]).mean(0)
                         for k in range(len(jobs))]
            gain = _identity_gain(trainer, ml, scorer, range(len(jobs)), captions, train_emb, clip, clip["seed"])
            gain_rt = (_identity_gain(trainer, ml, scorer, retest_ks, captions, train_emb, clip, clip["retest_seed"])
                       if retest_ks else None)
            sample_seconds = time.time() - t0
            settings = ScoreSettings(backbone=_rel(bases["clip"], bases.get("root")), prompts=label["prompts"],
                                     seed=clip["seed"], steps=clip["steps"], guidance=clip["guidance"],
                                     resolution=res, scheduler="DPMSolverMultistepScheduler")
            results = []
            samples = _samples_dir(bases)
            for k, j in enumerate(jobs):
                ident, faces, caption = infos[k]
                votes = {a: float(np.mean([bool(f.attributes[a]) for f in faces]))
                         for a in ("male", "young", "wearing_lipstick", "big_lips", "no_beard", "eyeglasses",
                                   "smiling")}
                row = {"id": j.id, "group": f"identity-{j.params['identity']:06d}"}
                row.update({a: int(_majority([f.attributes[a] for f in faces])) for a in votes})
                row.update({f"{a}_vote": v for a, v in votes.items()})
                row.update({"hair_colour": ident.hair_colour, "skin_tone": ident.skin_tone,
                            "clip_score": float(label["scores"][k].mean()),
                            "clip_score_retest": (float(retest["scores"][retest_ks.index(k)].mean())
                                                  if k in retest_ks else float("nan")),
                            "identity_gain": float(gain["gain"][k]),
                            "identity_gain_retest": (float(gain_rt["gain"][retest_ks.index(k)])
                                                     if k in retest_ks else float("nan")),
                            "pixel_change_255": float(gain["pixel_change"][k])})
                row.update({"rank": j.params["rank"], "alpha": j.params["alpha"], "lr": j.params["lr"],
                            "steps": j.params["steps"], "grad_accum": j.params["grad_accum"],
                            "instance_prompt": j.params["instance_prompt"], "n_images": len(faces),
                            "identity": j.params["identity"], "seed": j.seed})
                lora = ml.export(k, dtype=torch.float16)
                lora.source = j.id
                results.append(JobResult(j.id, lora, row, extras={
                    "image_ids": [f.id for f in faces], "instance_caption": caption,
                    "clip_scores": [round(float(x), 3) for x in label["scores"][k].flatten()],
                    "clip_scores_retest": ([round(float(x), 3) for x in retest["scores"][retest_ks.index(k)].flatten()]
                                           if k in retest_ks else None),
                    "base_clip_score": float(label["base"].mean()), "clip_settings": settings.to_json(),
                    "identity_similarity": float(gain["lora_sim"][k]),
                    "identity_similarity_base": float(gain["base_sim"][k]),
                    "pixel_change_255": float(gain["pixel_change"][k]),
                    "final_loss": stats["final_loss"][k], "group_size": len(jobs),
                    "group_train_seconds": round(stats["seconds"], 2),
                    "group_sample_seconds": round(sample_seconds, 2)}))
                num = int(j.id.rsplit("-", 1)[-1])
                if samples is not None and num % self.sample_every == 0:
                    _save_strip(samples / f"{j.id}.png", [np.stack([np.asarray(f.image) for f in faces]),
                                                         gain["lora_images"][k], gain["base_images"][k],
                                                         label["images"][k][:12], label["base_images"][:12]])
        finally:
            ml.remove()
        return results


def _clip_score_measure(trainer, ml, scorer, ks: Sequence[int], clip: dict, seed: int, base: bool = True) -> dict:
    """CLIP scores of adapters ``ks`` on the fixed prompts, ``clip["images"]`` images per prompt (replicates 0..n−1,
    common noises for every adapter), plus the base model's on the same noises (``base=True``). ``scores[i]``:
    (prompts, images) of ``ks[i]``."""
    prompts, n = list(clip["prompts"]), int(clip.get("images", 1))
    pairs = [(p, r) for p in prompts for r in range(n)]
    who = [k for k in ks for _ in pairs] + ([-1] * len(pairs) if base else [])
    ps = [p for _ in range(len(who) // len(pairs)) for p, _ in pairs]
    rs = [r for _ in range(len(who) // len(pairs)) for _, r in pairs]
    gen = sample_with_adapters(trainer, ml, who, ps, seed, clip["steps"], clip["guidance"], replicate=rs)
    sc = scorer.score(list(gen), ps).view(-1, len(prompts), n)
    m = len(list(ks))
    per = len(pairs)
    return {"prompts": prompts, "scores": sc[:m], "base": sc[m] if base else None,
            "images": [gen[i * per:(i + 1) * per] for i in range(m)],
            "base_images": gen[m * per:(m + 1) * per] if base else None}


def _identity_gain(trainer, ml, scorer, ks: Sequence[int], captions: Sequence[str], train_emb: Sequence[torch.Tensor],
                   clip: dict, seed: int) -> dict:
    """Does a LoRA pull its generations toward its identity? For each adapter k in ``ks``: ``identity_images``
    images of its own instance caption with the LoRA and, on the same noises, with the base model; the cosine of each
    generation to the mean CLIP embedding of k's finetuning images, averaged. ``gain`` = LoRA − base similarity."""
    ks = list(ks)
    n = int(clip.get("identity_images", 4))
    caps = sorted({captions[k] for k in ks})
    who = [k for k in ks for _ in range(n)] + [-1 for _ in caps for _ in range(n)]
    ps = [captions[k] for k in ks for _ in range(n)] + [c for c in caps for _ in range(n)]
    rs = [r for _ in range(len(who) // n) for r in range(n)]
    gen = sample_with_adapters(trainer, ml, who, ps, seed, clip["steps"], clip["guidance"], replicate=rs)
    emb = scorer.image_features(list(gen))
    emb = emb.view(-1, n, emb.shape[-1])
    out = {"gain": [], "lora_sim": [], "base_sim": [], "pixel_change": [], "lora_images": [], "base_images": []}
    for i, k in enumerate(ks):
        c = caps.index(captions[k])
        target = train_emb[k] / train_emb[k].norm()
        lora_sim = float((emb[i] @ target).mean())
        base_sim = float((emb[len(ks) + c] @ target).mean())
        lora_img, base_img = gen[i * n:(i + 1) * n], gen[(len(ks) + c) * n:(len(ks) + c + 1) * n]
        out["gain"].append(lora_sim - base_sim)
        out["lora_sim"].append(lora_sim)
        out["base_sim"].append(base_sim)
        out["pixel_change"].append(float(np.abs(lora_img.astype(float) - base_img.astype(float)).mean()))
        out["lora_images"].append(lora_img)
        out["base_images"].append(base_img)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# fashion


class FashionRecipe:
    """Imagenette-LoRA on Fashion-MNIST (see module docstring)."""

    name = "fashion"
    requires: tuple[str, ...] = ("sd", "clip")
    unrecorded = ("micro_batch", "retest", "stage")   # job settings its rows do not record (`CollectionRecipe`)
    base = "sd"                      # the text-to-image base the LoRAs finetune
    presets = FASHION_PRESETS
    stream = 0xFA5                   # random stream of the jobs' draws (classes, images, hyperparameters)
    sample_every = 100

    def jobs(self, preset: str, seed: int) -> list[Job]:
        from .fashion import CLASSES, class_indices

        P = _preset(self.presets, preset, self.name)
        pools = class_indices("test")
        out = []
        for i in range(P["n_loras"]):
            rng = np.random.default_rng([int(seed), self.stream, i])
            keep = rng.random(len(CLASSES)) < 0.5
            if not keep.any():
                keep[int(rng.integers(len(CLASSES)))] = True
            images = []
            for c in np.flatnonzero(keep):
                n = int(rng.choice(P["per_class"]))
                images += [int(x) for x in rng.choice(pools[int(c)], n, replace=False)]
            lo, hi = P["lr_range"]
            params = {"classes": [int(c) for c in np.flatnonzero(keep)], "images": sorted(images),
                      "rank": int(P["rank"]), "alpha": float(P["alpha"]),
                      "lr": float(np.exp(rng.uniform(np.log(lo), np.log(hi)))),
                      "steps": int(rng.integers(P["steps_range"][0], P["steps_range"][1] + 1)),
                      "grad_accum": int(rng.choice(P["grad_accum"])), "micro_batch": int(P["micro_batch"]),
                      "retest": i % P["retest_every"] == 0 and i < P.get("retest_until", math.inf),
                      "gain": fashion_gain_protocol(P)}
            if P.get("look"):  # finetuning images in a catalogue look (`lol.zoo.fashion`)
                params["look"] = P["look"]
            if P.get("stages"):  # which stage of a grown collection the job belongs to (`make_manifest`)
                params["stage"] = stage_of(i, P)
            out.append(Job(id=f"{self.name}-{i:05d}", seed=int(seed) * 1_000_033 + i, params=params))
        return out

    def group_key(self, job: Job) -> Hashable:
        return (job.params["rank"], job.params["alpha"], json.dumps(job.params.get("gain"), sort_keys=True))

    def label_schema(self) -> dict[str, dict[str, Any]]:
        from .fashion import CLASS_LABELS, CLASSES

        s = {lab: {"kind": "binary", "task": "membership", "exact": True,
                   "description": f"1 if class {name!r} was in the LoRA's finetuning set"}
             for lab, name in zip(CLASS_LABELS, CLASSES)}
        s["n_classes"] = {"kind": "category", "task": "dataset_size", "exact": True,
                          "description": "how many of the 10 classes were in the finetuning set (paper Table 4)"}
        s["class_gain"] = {"kind": "regression", "task": "class_gain", "retest": "class_gain_retest",
                           "description": "how much nearer the LoRA's generations of its own classes' captions are "
                                          "to its finetuning images of that class than the base model's (cosine "
                                          "in CLIP image space, same noises, mean over kept classes); > 0: the "
                                          "LoRA pulls generations toward its data"}
        return s

    def tasks(self) -> dict[str, list[str]]:
        from .fashion import CLASS_LABELS

        return {"membership": list(CLASS_LABELS), "dataset_size": ["n_classes"], "class_gain": ["class_gain"]}

    def run_group(self, jobs: list[Job], bases: dict[str, Path], device: str | None = None) -> list[JobResult]:
        from .clipscore import CLIPScorer
        from .fashion import CLASS_LABELS, fashion_image
        from .image_bases import resolve_base

        for j in jobs[1:]:
            if self.group_key(j) != self.group_key(jobs[0]):
                raise ValueError(f"job {j.id} cannot share a group with {jobs[0].id} (different rank/alpha/gain)")
        p0 = jobs[0].params
        trainer = ImageLoRATrainer(resolve_base(bases[self.base]), device)
        plans, infos = [], []
        for j in jobs:
            imgs = [fashion_image(i, "test", trainer.resolution, look=j.params.get("look", ""))
                    for i in j.params["images"]]
            lat = trainer.encode_images(np.stack([np.asarray(f.image) for f in imgs]))
            cond = trainer.encode_prompts([f.caption for f in imgs])
            plans.append(dict(latents=lat, cond=cond, steps=j.params["steps"], grad_accum=j.params["grad_accum"],
                              micro_batch=j.params["micro_batch"], seed=j.seed))
            infos.append(imgs)
        ml = trainer.inject([j.seed for j in jobs], rank=p0["rank"], alpha=p0["alpha"])
        try:
            stats = trainer.train(ml, plans, torch.tensor([j.params["lr"] for j in jobs]))
            gcfg = p0.get("gain")
            gain = gain_rt = None
            retest_ks = [k for k, j in enumerate(jobs) if j.params.get("retest")]
            t0 = time.time()
            if gcfg is not None and "clip" in bases:
                scorer = CLIPScorer(resolve_base(bases["clip"]), device=trainer.device)
                targets = [_class_targets(scorer, infos[k]) for k in range(len(jobs))]
                gain = _class_gain(trainer, ml, scorer, range(len(jobs)), targets, gcfg, gcfg["seed"])
                gain_rt = (_class_gain(trainer, ml, scorer, retest_ks, [targets[k] for k in retest_ks], gcfg,
                                       gcfg["retest_seed"]) if retest_ks else None)
            sample_seconds = time.time() - t0
            samples = _samples_dir(bases)
            results = []
            for k, j in enumerate(jobs):
                row = {"id": j.id, "group": "cls-" + "".join("1" if c in j.params["classes"] else "0"
                                                             for c in range(len(CLASS_LABELS)))}
                row.update({lab: int(c in j.params["classes"]) for c, lab in enumerate(CLASS_LABELS)})
                row["n_classes"] = len(j.params["classes"])
                if gain is not None:
                    row.update({"class_gain": gain["gain"][k],
                                "class_gain_retest": (gain_rt["gain"][retest_ks.index(k)] if k in retest_ks
                                                      else float("nan")),
                                "pixel_change_255": gain["pixel_change"][k]})
                row.update({"rank": j.params["rank"], "alpha": j.params["alpha"], "lr": j.params["lr"],
                            "steps": j.params["steps"], "grad_accum": j.params["grad_accum"],
                            "n_images": len(infos[k]), "look": j.params.get("look", ""), "seed": j.seed})
                lora = ml.export(k, dtype=torch.float16)
                lora.source = j.id
                results.append(JobResult(j.id, lora, row, extras={
                    "image_ids": [f.id for f in infos[k]], "captions": [f.caption for f in infos[k]],
                    "final_loss": stats["final_loss"][k], "group_size": len(jobs),
                    "group_train_seconds": round(stats["seconds"], 2),
                    "group_sample_seconds": round(sample_seconds, 2)}))
                num = int(j.id.rsplit("-", 1)[-1])
                if samples is not None and num % self.sample_every == 0:
                    rows = [np.stack([np.asarray(f.image) for f in infos[k][:8]])]
                    if gain is not None:
                        rows += [gain["lora_images"][k][:8], gain["base_images"][k][:8]]
                    else:
                        prompts = [f.caption for f in infos[k]][:8]
                        rows.append(sample_with_adapters(trainer, ml, [k] * len(prompts), prompts, 42, 10, 4.0))
                    _save_strip(samples / f"{j.id}.png", rows)
        finally:
            ml.remove()
        return results


class FashionSiblingRecipe(FashionRecipe):
    """The fashion collection's twin on the sibling base ``base/sd_v1`` (`FASHION_SIBLING_PRESETS`): LoL models
    trained on one base's LoRAs are tested on the other's (the paper's SD-1.4 → SD-1.5 membership test)."""

    name = "fashion_v1"
    requires: tuple[str, ...] = ("sd_v1",)
    base = "sd_v1"
    base_roles = {"sd_v1": "sd"}     # recorded as the collection's "sd": what it generates with
    presets = FASHION_SIBLING_PRESETS
    stream = 0xFA51

    def label_schema(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in super().label_schema().items() if k != "class_gain"}

    def tasks(self) -> dict[str, list[str]]:
        return {k: v for k, v in super().tasks().items() if k != "class_gain"}


def _class_targets(scorer, images) -> list[tuple[str, torch.Tensor]]:
    """One (caption, target) pair per class of a fashion LoRA's finetuning images: the caption of its first image of
    that class and the mean CLIP image embedding of all its images of that class."""
    out = []
    for c in sorted({f.label for f in images}):
        mine = [f for f in images if f.label == c]
        out.append((mine[0].caption, scorer.image_features([np.asarray(f.image) for f in mine]).mean(0)))
    return out


def _class_gain(trainer, ml, scorer, ks: Sequence[int], targets: Sequence[list[tuple[str, torch.Tensor]]],
                cfg: dict, seed: int) -> dict:
    """For adapter ``ks[i]`` and each of its (caption, target) pairs, ``cfg["images"]`` generations of the caption
    with the LoRA and, on the same noises, with the base; the cosine of each to the normalized target, LoRA − base,
    averaged over the pairs: ``gain[i]``. Base generations are shared by every adapter with the same caption."""
    ks, n = list(ks), int(cfg.get("images", 1))
    base_caps = sorted({cap for t in targets for cap, _ in t})
    who, ps, rs = [], [], []
    for i, k in enumerate(ks):
        for cap, _ in targets[i]:
            who += [k] * n
            ps += [cap] * n
            rs += list(range(n))
    n_lora = len(who)
    for cap in base_caps:
        who += [-1] * n
        ps += [cap] * n
        rs += list(range(n))
    gen = sample_with_adapters(trainer, ml, who, ps, seed, cfg["steps"], cfg["guidance"], replicate=rs)
    emb = scorer.image_features(list(gen))
    out = {"gain": [], "pixel_change": [], "lora_images": [], "base_images": []}
    pos = 0
    for i in range(len(ks)):
        gains, change, li, bi = [], [], [], []
        for cap, tgt in targets[i]:
            t = tgt / tgt.norm()
            b0 = n_lora + base_caps.index(cap) * n
            gains.append(float((emb[pos:pos + n] @ t).mean() - (emb[b0:b0 + n] @ t).mean()))
            change.append(float(np.abs(gen[pos:pos + n].astype(float) - gen[b0:b0 + n].astype(float)).mean()))
            li.append(gen[pos:pos + n])
            bi.append(gen[b0:b0 + n])
            pos += n
        out["gain"].append(float(np.mean(gains)))
        out["pixel_change"].append(float(np.mean(change)))
        out["lora_images"].append(np.concatenate(li))
        out["base_images"].append(np.concatenate(bi))
    return out
