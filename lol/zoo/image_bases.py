"""The image base models of the zoo, trained here on the face and Fashion-MNIST worlds and saved with the libraries'
own ``save_pretrained``:

* `CLIPBase` (``OUT/base/clip``): a real `transformers.CLIPModel` (ViT on 64×64 with patch 8, a small text
  transformer, projection dim 64) trained contrastively on (image, caption) pairs of both worlds, plus a
  `CLIPProcessor` whose tokenizer is built offline (`lol.zoo.tokenizer`). It is the CLIP scorer of the zoo.
* `SDBase` (``OUT/base/sd``): a real `diffusers.StableDiffusionPipeline`: an `AutoencoderKL` (64×64×3 → 16×16×4,
  three blocks, factor 4), the *frozen text tower of the CLIP scorer* as its `CLIPTextModel` (as in SD-1.x, whose
  text encoder is a frozen contrastive CLIP text tower; this gives the UNet semantically organised conditioning
  from the first step, which a from-scratch text encoder could not learn within our CPU budget — the price is that
  the generator and the scorer share their text side), a `UNet2DConditionModel` with cross-attention trained from
  scratch on cached latents with classifier-free-guidance caption dropout (DDPM ε-prediction), and a
  `DPMSolverMultistepScheduler` saved for sampling. No safety checker.

Both write ``record.json`` last (the completion marker) with training time, quality figures and config, and build
atomically (a temporary sibling folder renamed into place). ``from_pretrained(path)`` loads them offline, and the
same code loads real CLIP / SD-1.x folders (see `resolve_base`).

Run the default builds in the background with ``python -m lol.zoo.image_bases --preset default --out data``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CLIPBase", "SDBase", "WorldData", "world_pairs", "resolve_base", "pick_device", "load_sd_pipeline",
           "FACE_PROMPTS", "FASHION_PROMPTS"]

# identity seeds / image indices reserved for base-model training and evaluation (LoRA recipes use others)
BASE_FACE_SEED0 = 10_000_000
EVAL_FACE_SEED0 = 20_000_000
EVAL_FASHION_START = 50_000  # base models train on train-split images [0, n); evaluate on [50000, ...)


def pick_device(device: str | None = None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------------------
# data


@dataclass
class WorldData:
    """(image, caption) pairs of both worlds: ``images`` uint8 (N, 64, 64, 3); ``world`` 0 = faces, 1 = fashion;
    ``labels[name]`` per image (-1 where the label does not apply, e.g. ``male`` of a dress)."""

    images: np.ndarray
    captions: list[str]
    world: np.ndarray
    labels: dict[str, np.ndarray]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.captions)


@lru_cache(maxsize=4)
def world_pairs(n_faces: int, n_fashion: int, split: str = "train", size: int = 64) -> WorldData:
    """Faces of identities ``BASE_FACE_SEED0 + i`` (train) or ``EVAL_FACE_SEED0 + i`` (eval), two images each, and
    Fashion-MNIST train-split images ``[0, n)`` (train) or ``[50000, 50000 + n)`` (eval), tinted and captioned."""
    from .faces import ATTRIBUTES, Identity, render_face
    from .fashion import fashion_image

    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    seed0 = BASE_FACE_SEED0 if split == "train" else EVAL_FACE_SEED0
    images, captions, world, ids = [], [], [], []
    labels: dict[str, list] = {a: [] for a in ATTRIBUTES}
    labels["fashion_class"] = []
    for i in range(n_faces):
        f = render_face(Identity.from_seed(seed0 + i // 2), i % 2, size)
        images.append(np.asarray(f.image))
        captions.append(f.caption)
        world.append(0)
        ids.append(f.id)
        for a in ATTRIBUTES:
            labels[a].append(int(f.attributes[a]))
        labels["fashion_class"].append(-1)
    start = 0 if split == "train" else EVAL_FASHION_START
    for i in range(start, start + n_fashion):
        f = fashion_image(i, "train", size)
        images.append(np.asarray(f.image))
        captions.append(f.caption)
        world.append(1)
        ids.append(f.id)
        for a in ATTRIBUTES:
            labels[a].append(-1)
        labels["fashion_class"].append(f.label)
    return WorldData(np.stack(images), captions, np.array(world), {k: np.array(v) for k, v in labels.items()}, ids)


def _pixels(images_uint8: np.ndarray, idx=None) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (equals CLIPProcessor with mean = std = 0.5)."""
    x = torch.from_numpy(images_uint8 if idx is None else images_uint8[idx])
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------------------
# shared helpers


def _atomic_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit_dir(tmp: Path, out_dir: Path, record: dict) -> None:
    (tmp / "record.json").write_text(json.dumps(record, indent=2, default=float))  # written last
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def resolve_base(path: str | Path) -> Path:
    """A base folder, following a ``record.json`` whose ``"pretrained"`` points at a user-given model folder."""
    path = Path(path)
    rec = path / "record.json"
    if rec.is_file():
        target = json.loads(rec.read_text()).get("pretrained")
        if target:
            return Path(target)
    return path


def _link_pretrained(kind: str, pretrained: Path, out_dir: Path, loader) -> dict:
    """Register a user-given model folder instead of training: check it loads, record where it is."""
    pretrained = Path(pretrained).resolve()
    t0 = time.time()
    loader(pretrained)
    record = {"kind": kind, "pretrained": str(pretrained), "load_seconds": round(time.time() - t0, 2)}
    tmp = _atomic_dir(out_dir)
    _commit_dir(tmp, Path(out_dir), record)
    return record


def _linear_probe(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(train_y)) < 2 or len(test_y) == 0:
        return float("nan")
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(train_x, train_y)
    return float((clf.predict(test_x) == test_y).mean())


# ---------------------------------------------------------------------------------------------------------------------
# CLIP


CLIP_PRESETS: dict[str, dict[str, Any]] = {
    "ci": dict(n_faces=96, n_fashion=96, n_eval=48, steps=6, batch=32, lr=2e-3, warmup=4,
               vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
               text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
               projection_dim=32),
    "default": dict(n_faces=8000, n_fashion=8000, n_eval=1000, steps=1200, batch=128, lr=1e-3, warmup=100,
                    vision=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
                    text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
                    projection_dim=64),
}


def _clip_images(model, images: np.ndarray, device: str, bs: int = 256) -> torch.Tensor:
    """Unit-norm image embeddings of uint8 (N, 64, 64, 3) images."""
    model.eval()
    with torch.no_grad():
        f = torch.cat([model.get_image_features(pixel_values=_pixels(images[i:i + bs]).to(device))
                       .pooler_output.float().cpu() for i in range(0, len(images), bs)])
    return f / f.norm(dim=-1, keepdim=True)


def _clip_texts(model, input_ids: torch.Tensor, device: str, bs: int = 256) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        f = torch.cat([model.get_text_features(input_ids=input_ids[i:i + bs].to(device)).pooler_output.float().cpu()
                       for i in range(0, len(input_ids), bs)])
    return f / f.norm(dim=-1, keepdim=True)


def clip_quality(model, tokenizer, train: WorldData, evald: WorldData, device: str) -> dict:
    """Held-out retrieval and attribute-probe figures of a CLIP model on the two worlds.

    Retrieval counts a hit when the retrieved caption equals the true caption (captions repeat, so identical
    captions are interchangeable); candidates are the distinct held-out captions of the same world.
    Probes: logistic regression on image embeddings, fit on training pairs, scored on held-out pairs.
    """
    def ids(caps):
        return tokenizer(caps, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")["input_ids"]

    out: dict[str, Any] = {}
    ie = _clip_images(model, evald.images, device)
    for w, name in ((0, "faces"), (1, "fashion")):
        sel = np.flatnonzero(evald.world == w)
        if len(sel) == 0:
            continue
        caps = [evald.captions[i] for i in sel]
        uniq = sorted(set(caps))
        te = _clip_texts(model, ids(uniq), device)
        sim = ie[sel] @ te.T
        pos = torch.tensor([uniq.index(c) for c in caps])
        i2t = float((sim.argmax(1) == pos).float().mean())
        best_img = sim.argmax(0)  # for each distinct caption, the best image
        t2i = float(np.mean([caps[int(best_img[j])] == uniq[j] for j in range(len(uniq))]))
        out[f"{name}_image_to_text_top1"] = round(i2t, 4)
        out[f"{name}_text_to_image_top1"] = round(t2i, 4)
        out[f"{name}_distinct_captions"] = len(uniq)
    n_tr = min(len(train), 4000)
    rng = np.random.default_rng(0)
    tr_sel = np.sort(rng.choice(len(train), n_tr, replace=False))
    tr_e = _clip_images(model, train.images[tr_sel], device)
    probes = {}
    for a in ("male", "young", "wearing_lipstick", "big_lips", "no_beard", "eyeglasses", "smiling", "fashion_class"):
        ytr, yte = train.labels[a][tr_sel], evald.labels[a]
        mtr, mte = ytr >= 0, yte >= 0
        probes[a] = round(_linear_probe(tr_e[mtr].numpy(), ytr[mtr], ie[mte].numpy(), yte[mte]), 4)
    out["probe_accuracy"] = probes
    return out


class CLIPBase:
    """The zoo's CLIP scorer (see module docstring). ``CLIPBase(pretrained=PATH)`` registers a real local CLIP
    folder instead of training one."""

    name = "clip"
    requires: tuple[str, ...] = ()

    def __init__(self, pretrained: str | Path | None = None):
        self.pretrained = pretrained

    def is_built(self, out_dir: Path) -> bool:
        return (Path(out_dir) / "record.json").is_file()

    def build(self, preset: str, out_dir: Path, device: str | None = None, seed: int = 0) -> dict[str, Any]:
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

        out_dir = Path(out_dir)
        if self.pretrained is not None:
            return _link_pretrained("clip", self.pretrained, out_dir, lambda p: CLIPModel.from_pretrained(p))
        if preset not in CLIP_PRESETS:
            raise ValueError(f"CLIPBase: unknown preset {preset!r}; known: {sorted(CLIP_PRESETS)}")
        P = CLIP_PRESETS[preset]
        device = pick_device(device)
        t_start = time.time()
        tmp = _atomic_dir(out_dir)
        from .tokenizer import build_clip_tokenizer

        tok = build_clip_tokenizer(tmp / "_tok")
        image_proc = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        processor = CLIPProcessor(image_processor=image_proc, tokenizer=tok)

        t0 = time.time()
        train = world_pairs(P["n_faces"], P["n_fashion"], "train")
        evald = world_pairs(P["n_eval"], P["n_eval"], "eval")
        data_seconds = time.time() - t0
        ids = tok(train.captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")["input_ids"]

        torch.manual_seed(seed)
        config = CLIPConfig(
            text_config=dict(vocab_size=len(tok), max_position_embeddings=tok.model_max_length,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, **P["text"]),
            vision_config=dict(image_size=64, patch_size=8, num_channels=3, **P["vision"]),
            projection_dim=P["projection_dim"])
        model = CLIPModel(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=P["lr"], weight_decay=0.1, betas=(0.9, 0.98))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, P["steps"], P["warmup"]))
        g = torch.Generator().manual_seed(seed)
        losses = []
        t0 = time.time()
        model.train()
        for step in range(P["steps"]):
            b = torch.randint(0, len(train), (P["batch"],), generator=g)
            out = model(input_ids=ids[b].to(device), pixel_values=_pixels(train.images, b.numpy()).to(device),
                        return_loss=True)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(out.loss.item())
            if step % 100 == 0 or step == P["steps"] - 1:
                print(f"[clip] step {step}/{P['steps']} loss {np.mean(losses[-50:]):.4f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
        train_seconds = time.time() - t0

        quality = clip_quality(model, tok, train, evald, device)
        model = model.cpu()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.rmtree(tmp / "_tok")
        record = {"kind": "clip", "preset": preset, "seed": seed, "device": device,
                  "train_seconds": round(train_seconds, 1), "data_seconds": round(data_seconds, 1),
                  "total_seconds": round(time.time() - t_start, 1), "steps": P["steps"], "batch": P["batch"],
                  "train_pairs": len(train), "eval_pairs": len(evald),
                  "final_loss": round(float(np.mean(losses[-50:])), 4), "quality": quality,
                  "config": {k: P[k] for k in ("vision", "text", "projection_dim", "lr")},
                  "parameters": sum(p.numel() for p in model.parameters())}
        _commit_dir(tmp, out_dir, record)
        print(f"[clip] built {out_dir}: {json.dumps(quality)}", flush=True)
        return record


# ---------------------------------------------------------------------------------------------------------------------
# Stable Diffusion

FACE_PROMPTS = [
    "a photo of a smiling young woman with blond hair wearing lipstick",
    "a photo of a young man with black hair and a beard",
    "a photo of an old man with gray hair wearing glasses",
    "a photo of a young woman with red hair",
    "a photo of a smiling old woman with gray hair wearing lipstick and glasses",
    "a photo of a young man with brown hair",
    "a photo of a young woman with black hair wearing lipstick",
    "a photo of a smiling young man with blond hair and a beard",
]
FASHION_PROMPTS = [
    "a photo of a red dress", "a photo of a blue sneaker", "a photo of a trouser", "a photo of a green bag",
    "a photo of a yellow t-shirt", "a photo of a sandal", "a photo of a purple coat", "a photo of an ankle boot",
]
# what each evaluation prompt asserts (for attribute accuracy of generated images)
_PROMPT_FACTS = [
    {"male": 0, "young": 1, "wearing_lipstick": 1, "no_beard": 1},
    {"male": 1, "young": 1, "no_beard": 0, "wearing_lipstick": 0},
    {"male": 1, "young": 0, "eyeglasses": 1, "wearing_lipstick": 0},
    {"male": 0, "young": 1, "no_beard": 1},
    {"male": 0, "young": 0, "wearing_lipstick": 1, "eyeglasses": 1},
    {"male": 1, "young": 1, "wearing_lipstick": 0},
    {"male": 0, "young": 1, "wearing_lipstick": 1},
    {"male": 1, "young": 1, "no_beard": 0},
]
_FASHION_FACT = [3, 7, 1, 8, 0, 5, 4, 9]

# ``parent``: the preset is stage 2 of a two-stage training (`_continue_sd`): the parent preset is built first into
# ``base/sd_v1`` (kept as the sibling base), then continued into ``base/sd``.
SD_PRESETS: dict[str, dict[str, Any]] = {
    "ci1": dict(n_faces=64, n_fashion=64, vae_steps=3, vae_batch=8, unet_steps=3, unet_batch=8,
                vae_channels=(16, 16, 16), unet_channels=(16, 32), eval_images=1, eval_steps=2, lr=1e-3, n_probe=32),
    "v1": dict(n_faces=8000, n_fashion=8000, vae_steps=700, vae_batch=32, unet_steps=1600, unet_batch=64,
               vae_channels=(16, 32, 64), unet_channels=(32, 64), eval_images=4, eval_steps=20, lr=1e-3),
    "ci": dict(parent="ci1", n_faces=64, n_fashion=64, decoder_steps=2, decoder_lr=5e-4, vae_batch=8, unet_steps=2,
                unet_batch=8, unet_lr=5e-4, eval_images=1, eval_steps=2, n_probe=32),
    "default": dict(parent="v1", n_faces=8000, n_fashion=8000, decoder_steps=400, decoder_lr=5e-4, vae_batch=32,
                    unet_steps=1300, unet_batch=64, unet_lr=6e-4, eval_images=8, eval_steps=20),
}
CFG_DROPOUT = 0.1
GUIDANCE = 4.0


def load_sd_pipeline(path: str | Path, device: str | None = None, dtype: torch.dtype = torch.float32):
    """``StableDiffusionPipeline.from_pretrained`` of the zoo's ``base/sd`` or any local SD-1.x folder, offline."""
    from diffusers import StableDiffusionPipeline

    kw = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    pipe = StableDiffusionPipeline.from_pretrained(str(resolve_base(path)), safety_checker=None,
                                                   requires_safety_checker=False, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(pick_device(device))


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: str) -> torch.Tensor:
    """Text-encoder hidden states exactly as `StableDiffusionPipeline.encode_prompt` computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return text_encoder(ids)[0]


class SDBase:
    """The zoo's Stable Diffusion (see module docstring); needs the CLIP base for its text tower.
    ``SDBase(pretrained=PATH)`` registers a real local SD-1.x folder instead of training one."""

    name = "sd"
    requires: tuple[str, ...] = ("clip",)

    def __init__(self, pretrained: str | Path | None = None, clip_dir: str | Path | None = None):
        self.pretrained = pretrained
        self.clip_dir = clip_dir

    def is_built(self, out_dir: Path) -> bool:
        return (Path(out_dir) / "record.json").is_file()

    def build(self, preset: str, out_dir: Path, device: str | None = None, seed: int = 0) -> dict[str, Any]:
        out_dir = Path(out_dir)
        if self.pretrained is not None:
            return _link_pretrained("sd", self.pretrained, out_dir, lambda p: load_sd_pipeline(p, "cpu"))
        if preset not in SD_PRESETS:
            raise ValueError(f"SDBase: unknown preset {preset!r}; known: {sorted(SD_PRESETS)}")
        clip_dir = Path(self.clip_dir) if self.clip_dir else out_dir.parent / "clip"
        if not CLIPBase().is_built(clip_dir):
            raise FileNotFoundError(f"SDBase needs the CLIP base first (its text tower): {clip_dir}/record.json "
                                    f"not found; build 'clip' before 'sd'")
        P = SD_PRESETS[preset]
        if "parent" not in P:
            return _build_sd(P, preset, out_dir, resolve_base(clip_dir), pick_device(device), seed)
        parent = out_dir.parent / f"{out_dir.name}_v1"
        PP = SD_PRESETS[P["parent"]]
        if not (parent / "record.json").is_file():
            _build_sd(PP, P["parent"], parent, resolve_base(clip_dir), pick_device(device), seed)
        recorded = json.loads((parent / "record.json").read_text()).get("config")
        if recorded != {k: (list(v) if isinstance(v, tuple) else v) for k, v in PP.items()}:
            raise ValueError(f"SDBase: {parent} was not built with stage-1 preset {P['parent']!r} (its record.json "
                             f"config differs); remove it to rebuild, or use another --out")
        return _continue_sd(parent, P, preset, out_dir, resolve_base(clip_dir), pick_device(device), seed)


class SDSiblingBase(SDBase):
    """The sibling text-to-image base ``base/sd_v1`` (as SD-1.4 is to SD-1.5): stage 1 of the zoo's ``base/sd``,
    written when ``sd`` is trained (`SDBase`), so it needs nothing of its own. ``SDSiblingBase(pretrained=PATH)``
    registers a real local SD-1.x folder instead (e.g. SD-1.4 beside an SD-1.5 given as ``--base``); linking and
    the completion marker are `SDBase`'s."""

    name = "sd_v1"
    requires: tuple[str, ...] = ("sd",)

    def build(self, preset: str, out_dir: Path, device: str | None = None, seed: int = 0) -> dict[str, Any]:
        out_dir = Path(out_dir)
        if self.pretrained is not None:
            return _link_pretrained("sd", self.pretrained, out_dir, lambda p: load_sd_pipeline(p, "cpu"))
        if not self.is_built(out_dir):
            raise FileNotFoundError(f"{out_dir}: the sibling base is stage 1 of {out_dir.parent / 'sd'} and is "
                                    f"written when that is trained; it is missing (sd was linked from a folder, or "
                                    f"built by a one-stage preset): pass --sibling-base PATH, or rebuild sd")
        return json.loads((out_dir / "record.json").read_text())


def _build_sd(P: dict, preset: str, out_dir: Path, clip_dir: Path, device: str, seed: int) -> dict:
    from diffusers import (AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    t_start = time.time()
    tmp = _atomic_dir(out_dir)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    # text tower of the CLIP scorer, frozen
    clip = CLIPModel.from_pretrained(str(clip_dir))
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir))
    text_encoder = CLIPTextModel(clip.config.text_config)
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())  # v4 / v5
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)
    del clip

    t0 = time.time()
    data = world_pairs(P["n_faces"], P["n_fashion"], "train")
    data_seconds = time.time() - t0

    # 1. VAE: 64x64x3 -> 16x16x4
    ch = tuple(P["vae_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=ch, layers_per_block=1,
                        latent_channels=4, norm_num_groups=16, sample_size=64).to(device)
    t0 = time.time()
    rec_losses = _train_vae(vae, list(vae.parameters()), data, P["vae_steps"], P["vae_batch"], P["lr"], g, device,
                            kl_weight=1e-6, encoder_grad=True, tag="sd/vae")
    vae_seconds = time.time() - t0
    vae.eval().requires_grad_(False)

    # 2. cache latents (posterior mean) and the latent scale (1 / std, as SD's scaling_factor)
    t0 = time.time()
    lat = _posterior_means(vae, data, device)
    scaling = float(1.0 / lat.std())
    vae.register_to_config(scaling_factor=scaling)
    lat = lat * scaling
    vae_psnr = _vae_psnr(vae, lat, data, device)
    cap_index, emb, uncond = _prompt_states(tokenizer, text_encoder, data.captions, device)
    cache_seconds = time.time() - t0

    # 3. UNet from scratch, epsilon prediction, caption dropout for classifier-free guidance
    c = tuple(P["unet_channels"])
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=c,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=4, norm_num_groups=16).to(device)
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                                steps_offset=1)
    t0 = time.time()
    losses = _train_unet(unet, noise_sched, lat, emb, cap_index, uncond, data.captions, tokenizer, text_encoder,
                         steps=P["unet_steps"], batch=P["unet_batch"], lr=P["lr"], warmup=100, g=g, device=device)
    unet_seconds = time.time() - t0
    unet.eval().requires_grad_(False)

    pipe = StableDiffusionPipeline(
        vae=vae.cpu(), text_encoder=text_encoder.cpu(), tokenizer=tokenizer, unet=unet.cpu(),
        scheduler=DPMSolverMultistepScheduler.from_config(noise_sched.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "train_scheduler.json").write_text(json.dumps(dict(noise_sched.config), default=str))

    t0 = time.time()
    quality = sd_quality(str(tmp), clip_dir, P, device, seed,
                         samples_dir=out_dir.parent.parent / "samples", sample_name=f"{out_dir.name}_base")
    quality["vae_psnr_db"] = round(vae_psnr, 2)
    quality["eval"]["scorer"] = _rel(clip_dir, out_dir.parent.parent)
    eval_seconds = time.time() - t0
    record = {"kind": "sd", "preset": preset, "seed": seed, "device": device,
              "text_encoder": f"frozen text tower of the CLIP base at {_rel(clip_dir, out_dir.parent.parent)}",
              "vae_seconds": round(vae_seconds, 1), "cache_seconds": round(cache_seconds, 1),
              "unet_seconds": round(unet_seconds, 1), "data_seconds": round(data_seconds, 1),
              "eval_seconds": round(eval_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
              "train_images": len(data), "vae_final_mse": round(float(np.mean(rec_losses[-50:])), 5),
              "unet_final_loss": round(float(np.mean(losses[-50:])), 5), "latent_scaling_factor": scaling,
              "cfg_dropout": CFG_DROPOUT, "quality": quality,
              "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in P.items()},
              "unet_parameters": sum(p.numel() for p in unet.parameters()),
              "vae_parameters": sum(p.numel() for p in vae.parameters())}
    _commit_dir(tmp, out_dir, record)
    print(f"[sd] built {out_dir}: {json.dumps(quality)}", flush=True)
    return record


def _train_vae(vae, params: list, data: WorldData, steps: int, batch: int, lr: float, g, device: str,
               kl_weight: float, encoder_grad: bool, tag: str) -> list[float]:
    """Reconstruction training (MSE + ½·L1, plus ``kl_weight``·KL) of the ``params`` of ``vae`` on the world's
    images; with ``encoder_grad=False`` the encoder runs without gradients (decoder-only finetuning: every latent
    stays as it was). Returns the per-step reconstruction MSEs."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, 50))
    t0 = time.time()
    rec_losses = []
    for step in range(steps):
        b = torch.randint(0, len(data), (batch,), generator=g)
        x = _pixels(data.images, b.numpy()).to(device)
        with torch.set_grad_enabled(encoder_grad):
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        loss = (rec - x).pow(2).mean() + 0.5 * (rec - x).abs().mean()
        if kl_weight:
            loss = loss + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        rec_losses.append(float((rec - x).detach().pow(2).mean()))
        if step % 100 == 0 or step == steps - 1:
            print(f"[{tag}] step {step}/{steps} mse {np.mean(rec_losses[-50:]):.4f} ({time.time() - t0:.0f}s)",
                  flush=True)
    return rec_losses


@torch.no_grad()
def _posterior_means(vae, data: WorldData, device: str) -> torch.Tensor:
    return torch.cat([vae.encode(_pixels(data.images[i:i + 256]).to(device)).latent_dist.mean.cpu()
                      for i in range(0, len(data), 256)])


@torch.no_grad()
def _vae_psnr(vae, scaled_latents: torch.Tensor, data: WorldData, device: str) -> float:
    """PSNR (dB, images in [-1, 1]) of decoding the first 256 training images' scaled posterior means."""
    n = min(256, len(data))
    z = scaled_latents[:n].to(device) / float(vae.config.scaling_factor)
    recon = vae.decode(z).sample.cpu()
    return float(10 * torch.log10(4.0 / (recon - _pixels(data.images[:n])).pow(2).mean()))


def _prompt_states(tokenizer, text_encoder, captions: list[str], device: str):
    """(caption index per image or None, text states of each distinct caption, the empty prompt's states)."""
    uniq = sorted(set(captions))
    cap_index = torch.tensor([uniq.index(c) for c in captions]) if len(uniq) < 20000 else None
    emb = torch.cat([encode_prompts(tokenizer, text_encoder, uniq[i:i + 512], device).cpu()
                     for i in range(0, len(uniq), 512)])
    return cap_index, emb, encode_prompts(tokenizer, text_encoder, [""], device).cpu()


def _train_unet(unet, noise_sched, lat, emb, cap_index, uncond, captions, tokenizer, text_encoder, steps: int,
                batch: int, lr: float, warmup: int, g, device: str, tag: str = "sd/unet") -> list[float]:
    """ε-prediction training of ``unet`` on cached latents with caption dropout (classifier-free guidance); an EMA
    of the weights (decay up to 0.999) is copied into ``unet`` at the end. Returns the per-step losses."""
    ema = [p.detach().clone() for p in unet.parameters()]
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, warmup))
    alphas = noise_sched.alphas_cumprod
    t0 = time.time()
    losses = []
    unet.train().requires_grad_(True)
    for step in range(steps):
        b = torch.randint(0, len(lat), (batch,), generator=g)
        z0 = lat[b]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (len(b),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        cond = emb[cap_index[b]] if cap_index is not None else encode_prompts(
            tokenizer, text_encoder, [captions[i] for i in b], device).cpu()
        drop = torch.rand(len(b), generator=g) < CFG_DROPOUT
        cond = torch.where(drop.view(-1, 1, 1), uncond.expand_as(cond), cond)
        pred = unet(zt.to(device), t.to(device), encoder_hidden_states=cond.to(device)).sample
        loss = (pred - noise.to(device)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"[{tag}] step {step}/{steps} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f}s)",
                  flush=True)
    with torch.no_grad():
        for e, p in zip(ema, unet.parameters()):
            p.copy_(e)
    return losses


def _rel(path, root) -> str:
    """``path`` relative to the build root when under it (records must not name the build machine's folders),
    else absolute (a user-given model folder, or no root given)."""
    p = Path(path).resolve()
    if root is None:
        return str(p)
    try:
        return str(p.relative_to(Path(root).resolve()))
    except ValueError:
        return str(p)


def _continue_sd(parent: Path, P: dict, preset: str, out_dir: Path, clip_dir: Path, device: str, seed: int) -> dict:
    """Stage 2 of the zoo's SD: continue the training of a parent pipeline, as SD-1.5 continued SD-1.4.

    1. the VAE *decoder* is finetuned (``decoder_steps``) with the encoder frozen, so latents — and with them
       everything the UNet learned — stay exactly as they were, while reconstructions get sharper;
    2. the UNet continues from the parent's (EMA) weights for ``unet_steps`` more steps with a fresh cosine schedule
       from ``unet_lr``, on the same data and objective.
    The parent stays on disk as the *sibling* base (LoRAs trained on one, tested on the other: the paper's
    SD-1.4 → SD-1.5 transfer)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    t_start = time.time()
    tmp = _atomic_dir(out_dir)
    root = out_dir.parent.parent
    parent_rec = json.loads((parent / "record.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(str(parent), safety_checker=None, requires_safety_checker=False)
    vae, unet = pipe.vae.to(device), pipe.unet.to(device)
    text_encoder = pipe.text_encoder.to(device).eval().requires_grad_(False)
    tokenizer = pipe.tokenizer
    torch.manual_seed(seed + 1)
    g = torch.Generator().manual_seed(seed + 1)  # stage 2 draws its own stream
    t0 = time.time()
    data = world_pairs(P["n_faces"], P["n_fashion"], "train")
    data_seconds = time.time() - t0

    # 1. decoder only
    vae.requires_grad_(False)
    dec = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p_ in dec:
        p_.requires_grad_(True)
    t0 = time.time()
    rec_losses = _train_vae(vae, dec, data, P["decoder_steps"], P["vae_batch"], P["decoder_lr"], g, device,
                            kl_weight=0.0, encoder_grad=False, tag="sd2/decoder")
    decoder_seconds = time.time() - t0
    vae.eval().requires_grad_(False)

    # 2. latents (unchanged encoder, the parent's scaling factor) and prompt states
    t0 = time.time()
    scaling = float(vae.config.scaling_factor)
    lat = _posterior_means(vae, data, device) * scaling
    vae_psnr = _vae_psnr(vae, lat, data, device)
    cap_index, emb, uncond = _prompt_states(tokenizer, text_encoder, data.captions, device)
    cache_seconds = time.time() - t0

    # 3. the UNet continues
    noise_sched = DDPMScheduler.from_config(json.loads((parent / "train_scheduler.json").read_text()))
    t0 = time.time()
    losses = _train_unet(unet, noise_sched, lat, emb, cap_index, uncond, data.captions, tokenizer, text_encoder,
                         steps=P["unet_steps"], batch=P["unet_batch"], lr=P["unet_lr"], warmup=50, g=g,
                         device=device, tag="sd2/unet")
    unet_seconds = time.time() - t0
    unet.eval().requires_grad_(False)
    pipe.to("cpu")
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    shutil.copy(parent / "train_scheduler.json", tmp / "train_scheduler.json")

    t0 = time.time()
    quality = sd_quality(str(tmp), clip_dir, P, device, seed, samples_dir=root / "samples")
    quality["vae_psnr_db"] = round(vae_psnr, 2)
    quality["eval"]["scorer"] = _rel(clip_dir, root)
    eval_seconds = time.time() - t0
    pq = parent_rec.get("quality", {})
    record = {"kind": "sd", "preset": preset, "seed": seed, "device": device, "stage": 2,
              "parent": _rel(parent, root),
              "text_encoder": f"frozen text tower of the CLIP base at {_rel(clip_dir, root)} (the parent's)",
              "decoder_seconds": round(decoder_seconds, 1), "cache_seconds": round(cache_seconds, 1),
              "unet_seconds": round(unet_seconds, 1), "data_seconds": round(data_seconds, 1),
              "eval_seconds": round(eval_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
              "train_seconds_with_parent": round(time.time() - t_start + float(parent_rec.get("total_seconds", 0)), 1),
              "unet_steps_total": int(parent_rec.get("config", {}).get("unet_steps", 0)) + P["unet_steps"],
              "train_images": len(data), "decoder_final_mse": round(float(np.mean(rec_losses[-50:])), 5),
              "unet_final_loss": round(float(np.mean(losses[-50:])), 5), "latent_scaling_factor": scaling,
              "cfg_dropout": CFG_DROPOUT, "quality": quality,
              "parent_quality": {k: pq.get(k) for k in ("clip_score_own_prompt", "generated_attribute_accuracy",
                                                        "generated_fashion_class_accuracy", "vae_psnr_db")},
              "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in P.items() if k != "parent"},
              "unet_parameters": sum(p_.numel() for p_ in unet.parameters()),
              "vae_parameters": sum(p_.numel() for p_ in vae.parameters())}
    _commit_dir(tmp, out_dir, record)
    print(f"[sd2] built {out_dir}: {json.dumps(quality)}", flush=True)
    return record


def sd_quality(sd_dir: str, clip_dir: Path, P: dict, device: str, seed: int, samples_dir: Path | None,
               sample_name: str = "sd_base") -> dict:
    """Does the pipeline follow its prompt? Measured with the CLIP scorer on generated images:

    * CLIP score of each image with its own prompt vs with a mismatched prompt of the same world;
    * attribute accuracy: linear probes fit on CLIP embeddings of *real* held-out images, applied to generated
      faces (sex, age, lipstick, beard, glasses asserted by the prompt) and garments (class).
    Saves a sample grid (one row per prompt) to ``samples_dir/sd_base.png``.
    """
    from .clipscore import CLIPScorer

    pipe = load_sd_pipeline(sd_dir, device)
    prompts = FACE_PROMPTS + FASHION_PROMPTS
    n_img = P["eval_images"]
    gen = torch.Generator(device="cpu").manual_seed(seed + 42)
    images = pipe(prompt=[p for p in prompts for _ in range(n_img)], num_inference_steps=P["eval_steps"],
                  guidance_scale=GUIDANCE, generator=gen, output_type="np").images
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)  # (N, H, W, 3)
    scorer = CLIPScorer(clip_dir, device=device)
    own = [p for p in prompts for _ in range(n_img)]
    half = len(FACE_PROMPTS)
    wrong = [prompts[(i // n_img + 3) % half + (half if i // n_img >= half else 0)] for i in range(len(own))]
    s_own = scorer.score(list(images), own)
    s_wrong = scorer.score(list(images), wrong)
    # probes on real images
    real = world_pairs(P.get("n_probe", 400), P.get("n_probe", 400), "eval")
    feats_real = scorer.image_features(list(real.images)).numpy()
    feats_gen = scorer.image_features(list(images)).numpy()
    from sklearn.linear_model import LogisticRegression

    acc: dict[str, list[int]] = {}
    for a in ("male", "young", "wearing_lipstick", "no_beard", "eyeglasses"):
        y = real.labels[a]
        m = y >= 0
        if len(np.unique(y[m])) < 2:
            continue
        clf = LogisticRegression(max_iter=2000).fit(feats_real[m], y[m])
        for pi, facts in enumerate(_PROMPT_FACTS):
            if a in facts:
                pred = clf.predict(feats_gen[pi * n_img:(pi + 1) * n_img])
                acc.setdefault(a, []).extend((pred == facts[a]).astype(int).tolist())
    y = real.labels["fashion_class"]
    m = y >= 0
    fashion_acc = float("nan")
    if len(np.unique(y[m])) >= 2:
        clf = LogisticRegression(max_iter=2000).fit(feats_real[m], y[m])
        pred = clf.predict(feats_gen[half * n_img:])
        fashion_acc = float(np.mean(pred == np.repeat(_FASHION_FACT, n_img)))
    if samples_dir is not None:
        from PIL import Image

        samples_dir.mkdir(parents=True, exist_ok=True)
        H, W = images.shape[1:3]
        grid = Image.new("RGB", (W * n_img * 2, H * half))
        for i, im in enumerate(images):
            p, k = divmod(i, n_img)
            col = k + (n_img if p >= half else 0)
            grid.paste(Image.fromarray(im), (col * W, (p % half) * H))
        grid.save(samples_dir / f"{sample_name}.png")
        (samples_dir / f"{sample_name}_prompts.json").write_text(json.dumps(
            {"left_columns": FACE_PROMPTS, "right_columns": FASHION_PROMPTS, "images_per_prompt": n_img,
             "steps": P["eval_steps"], "guidance": GUIDANCE, "seed": seed + 42}, indent=1))
    return {"clip_score_own_prompt": round(float(s_own.mean()), 3),
            "clip_score_mismatched_prompt": round(float(s_wrong.mean()), 3),
            "clip_score_own_beats_mismatched": round(float((s_own > s_wrong).float().mean()), 3),
            "generated_attribute_accuracy": {a: round(float(np.mean(v)), 3) for a, v in acc.items()},
            "generated_fashion_class_accuracy": round(fashion_acc, 3),
            "eval": {"prompts": prompts, "images_per_prompt": n_img, "steps": P["eval_steps"],
                     "guidance": GUIDANCE, "seed": seed + 42, "resolution": int(images.shape[1]),
                     "scorer": str(clip_dir)}}


def save_world_samples(samples_dir: Path, n: int = 32) -> list[Path]:
    """Grids of real training images of both worlds (8 per row) with their captions, for people to look at."""
    from PIL import Image

    data = world_pairs(n, n, "train")
    samples_dir = Path(samples_dir)
    samples_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for w, name in ((0, "faces_world"), (1, "fashion_world")):
        sel = np.flatnonzero(data.world == w)[:n]
        H, W = data.images.shape[1:3]
        grid = Image.new("RGB", (8 * W, ((len(sel) + 7) // 8) * H))
        for k, i in enumerate(sel):
            grid.paste(Image.fromarray(data.images[i]), ((k % 8) * W, (k // 8) * H))
        grid.save(samples_dir / f"{name}.png")
        (samples_dir / f"{name}.json").write_text(json.dumps(
            {"ids": [data.ids[i] for i in sel], "captions": [data.captions[i] for i in sel]}, indent=1))
        paths.append(samples_dir / f"{name}.png")
    return paths


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build the zoo's image base models (CLIP, then SD).")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--out", default="data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--only", choices=["clip", "sd"], default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    for recipe in (CLIPBase(), SDBase()):
        if args.only and recipe.name != args.only:
            continue
        d = out / "base" / recipe.name
        if recipe.is_built(d):
            print(f"[{recipe.name}] already built at {d}", flush=True)
            continue
        recipe.build(args.preset, d, args.device, args.seed)
    save_world_samples(out / "samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
