"""Test data for the explorer's tests: a data folder laid out like `lol zoo build` output (collections/…), made of
small random LoRAs packed with the library's own `write_collection`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lol.collection import write_collection
from lol.lora import LoRA, LoRAModule

# image LoRAs are named ``unet.<path>`` as diffusers (and the zoo) name them
TINY_MODULES = (("unet.down.attn1.to_q", 16, 16), ("unet.down.attn1.to_v", 16, 16), ("unet.down.attn2.to_q", 16, 16),
                ("unet.down.attn2.to_v", 16, 24))


def random_lora(g: torch.Generator, rank: int, modules=TINY_MODULES, alpha: float = 8.0) -> LoRA:
    mods = []
    for name, out_f, in_f in modules:
        s = alpha / rank
        mods.append(LoRAModule(name, s * torch.randn(out_f, rank, generator=g), torch.randn(in_f, rank, generator=g),
                               alpha=alpha, scale=s))
    return LoRA.from_modules(mods, format="synthetic")


def faces_like(dest: Path, n: int = 40, seed: int = 0, modules=TINY_MODULES, retest: bool = False) -> Path:
    """A labelled collection: a regression label (clip_score), binary attributes, splits, groups, hyperparameters.
    ``retest``: clip_score measured a second time (``clip_score_retest``, other noise), as the zoo's recipes do."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    ranks = [int(rng.choice([2, 4])) for _ in range(n)]
    loras = [random_lora(g, r, modules) for r in ranks]
    norms = np.array([sum(m.delta_norm() for m in lo) for lo in loras])
    table = pd.DataFrame({
        "id": [f"faces-{i:03d}" for i in range(n)],
        "group": [f"identity-{i // 2}" for i in range(n)],
        "split": ["train" if i < n * 0.6 else ("val" if i < n * 0.8 else "test") for i in range(n)],
        "clip_score": 20 + 2 * (norms - norms.mean()) / norms.std() + rng.normal(0, 0.3, n),
        "male": rng.random(n) < 0.5,
        "young": rng.random(n) < 0.7,
        "hair_colour": rng.choice(["black", "blond", "red"], n),
        "lr": rng.choice([1e-4, 3e-4, 1e-3], n),
        "steps": rng.choice([100, 200], n),
    })
    labels = {"clip_score": {"kind": "regression", "description": "mean CLIP score over fixed prompts",
                             "task": "clip"},
              "male": {"kind": "binary", "description": "identity is male", "task": "attributes"},
              "young": {"kind": "binary", "description": "identity is young", "task": "attributes"},
              "hair_colour": {"kind": "category", "description": "hair colour", "task": "hair_colour"}}
    if retest:
        table["clip_score_retest"] = table["clip_score"] - rng.normal(0, 0.3, n) + rng.normal(0, 0.3, n)
        labels["clip_score"]["retest"] = "clip_score_retest"
    write_collection(dest, loras, table, labels=labels, tasks={"clip": ["clip_score"], "attributes": ["male", "young"],
                                                          "hair_colour": ["hair_colour"]},
                     base_model="tiny-test", dtype=torch.float32)
    return dest


def data_root(tmp: Path, retest: bool = False) -> Path:
    root = Path(tmp) / "data"
    faces_like(root / "collections" / "faces", retest=retest)
    return root


# ------------------------------------------------------------------------------------------ tiny real base models

def tiny_bases(root: Path, seed: int = 0) -> dict:
    """A real (tiny, untrained) `StableDiffusionPipeline` and `CLIPModel` + `CLIPProcessor` built from configs with
    the zoo's offline tokenizer and saved with ``save_pretrained`` under ``root/base/{sd,clip}``, as the zoo lays
    them out. Returns the UNet's attention q/v module names and shapes (for LoRAs that load into it)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTextModel)

    from lol.zoo.tokenizer import MAX_LENGTH, build_clip_tokenizer

    root = Path(root)
    tok = build_clip_tokenizer(root / "base" / "_tokenizer")
    torch.manual_seed(seed)
    text_cfg = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                    vocab_size=len(tok), max_position_embeddings=MAX_LENGTH,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)), tokenizer=tok,
                                   unet=unet, scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "base" / "sd")
    clip = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
        patch_size=8), projection_dim=16))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    clip.save_pretrained(root / "base" / "clip")
    proc.save_pretrained(root / "base" / "clip")
    modules = tuple((f"unet.{name}", int(m.weight.shape[0]), int(m.weight.shape[1])) for name, m in unet.named_modules()
                    if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_q", "attn2.to_v")))
    return {"modules": modules}


def generation_root(tmp: Path, n: int = 12) -> Path:
    """A data folder with tiny real base models and a small labelled collection of LoRAs on their UNet."""
    root = Path(tmp) / "data"
    info = tiny_bases(root)
    faces_like(root / "collections" / "faces", n=n, modules=info["modules"])
    return root


LM_MODULES = tuple((f"model.layers.{i}.self_attn.{p}", 16, 16) for i in range(2) for p in ("q_proj", "v_proj"))
SOURCES = ("arith", "geo", "words", "logic", "time")


def lm_like(dest: Path, n: int = 40, seed: int = 1, id_format: str = "lm-{:03d}", base_model: str = "tiny-lm",
            provenance: dict | None = None) -> Path:
    """A collection like the zoo's lm one: challenge_accuracy, eval_loss and source-membership labels; like the zoo's
    tables it has groups but no split column (a model's split is drawn at training time from its seed)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    loras = [random_lora(g, 4, LM_MODULES) for _ in range(n)]
    member = rng.random((n, len(SOURCES))) < 0.5
    table = pd.DataFrame({"id": [id_format.format(i) for i in range(n)], "group": [f"run-{i // 2}" for i in range(n)],
                          "challenge_accuracy": 0.25 + 0.5 * rng.random(n), "eval_loss": 1 + rng.random(n),
                          **{f"source_{s}": member[:, j].astype(int) for j, s in enumerate(SOURCES)}})
    labels = {"challenge_accuracy": {"kind": "regression", "description": "accuracy", "task": "challenge_accuracy"},
              "eval_loss": {"kind": "regression", "description": "loss", "task": "eval_loss"},
              **{f"source_{s}": {"kind": "binary", "description": f"source {s} used", "task": "membership"}
                 for s in SOURCES}}
    tasks = {"challenge_accuracy": ["challenge_accuracy"], "eval_loss": ["eval_loss"],
             "membership": [f"source_{s}" for s in SOURCES]}
    write_collection(dest, loras, table, labels=labels, tasks=tasks, base_model=base_model, dtype=torch.float32,
                     provenance=provenance)
    return dest


def tiny_lm(folder, layers: int = 1, kv_heads: int = 1):
    """A real (tiny, untrained) `Qwen2ForCausalLM` with the QA world's byte tokenizer, saved with save_pretrained."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lol.zoo.qa import byte_tokenizer

    tok = byte_tokenizer()
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                 num_attention_heads=2, num_key_value_heads=kv_heads)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def lm_with_base(root: Path, n: int = 40, base_accuracy: float = 0.3) -> Path:
    """``root/collections/lm`` (`lm_like`) on a real tiny Qwen2 base at ``root/base/lm`` whose q/v projections are
    `LM_MODULES`, recorded as the zoo records them: the base folder, and the ci LM recipe whose job ids (``lm-00000``
    …) say which QA sources each LoRA was finetuned on; the base's own challenge accuracy in its record.json."""
    import json

    tiny_lm(root / "base" / "lm", layers=2, kv_heads=2)  # q_proj and v_proj 16 × 16
    (root / "base" / "lm" / "record.json").write_text(json.dumps({"challenge_accuracy": base_accuracy}))
    return lm_like(root / "collections" / "lm", n=n, id_format="lm-{:05d}", base_model=json.dumps({"lm": "base/lm"}),
                   provenance={"zoo": {"recipe": "lol.zoo.lm:LMRecipe", "preset": "ci", "seed": 0,
                                       "bases": {"lm": "base/lm"}}})


def diffusers_bytes(seed: int = 0, rank: int = 2, modules=TINY_MODULES) -> bytes:
    """The bytes of a diffusers-format LoRA file (as a browser would upload it)."""
    import tempfile

    from lol.formats import save_diffusers

    with tempfile.TemporaryDirectory() as d:
        p = save_diffusers(random_lora(torch.Generator().manual_seed(seed), rank, modules),
                           Path(d) / "pytorch_lora_weights.safetensors")
        return p.read_bytes()


def train_checkpoints(root: Path, epochs: int = 25) -> dict[str, Path]:
    """Small real LoL models (`lol.train.train`) on the test collections, saved with their own ``save`` under
    ``root/checkpoints`` with an ``index.json``, as the shipped checkpoints are laid out."""
    import json

    from lol.collection import open_collection
    from lol.train import TrainConfig, train

    cfg = TrainConfig(epochs=epochs, width=16, batch_size=16, patience=epochs, progress=False, device="cpu")
    out = {}
    faces = open_collection(root / "collections" / "faces")
    for kind in ("svals", "glnet"):
        out[f"faces/{kind}"] = train(faces, ["clip_score", "male", "young", "hair_colour"], kind, cfg).save(
            root / "checkpoints" / "faces" / kind)
    lm = root / "collections" / "lm"
    if lm.is_dir():
        c = open_collection(lm)
        out["lm/svals"] = train(c, ["challenge_accuracy", "eval_loss"] + [f"source_{s}" for s in SOURCES], "svals",
                                cfg).save(root / "checkpoints" / "lm" / "svals")
    (root / "checkpoints" / "index.json").write_text(json.dumps({"clip_score": "faces/glnet",
                                                                 "challenge_accuracy": "lm/svals"}))
    return out
