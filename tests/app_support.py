"""Test data for the explorer's tests: a data folder laid out like `lol zoo build` output (collections/…), made of
small random LoRAs packed with the library's own `write_collection`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lol.collection import write_collection
from lol.lora import LoRA, LoRAModule

TINY_MODULES = (("down.attn1.to_q", 16, 16), ("down.attn1.to_v", 16, 16), ("down.attn2.to_q", 16, 16),
                ("down.attn2.to_v", 16, 24))


def random_lora(g: torch.Generator, rank: int, modules=TINY_MODULES, alpha: float = 8.0) -> LoRA:
    mods = []
    for name, out_f, in_f in modules:
        s = alpha / rank
        mods.append(LoRAModule(name, s * torch.randn(out_f, rank, generator=g), torch.randn(in_f, rank, generator=g),
                               alpha=alpha, scale=s))
    return LoRA.from_modules(mods, format="synthetic")


def faces_like(dest: Path, n: int = 40, seed: int = 0) -> Path:
    """A labelled collection: a regression label (clip_score), binary attributes, splits, groups, hyperparameters."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    ranks = [int(rng.choice([2, 4])) for _ in range(n)]
    loras = [random_lora(g, r) for r in ranks]
    norms = np.array([sum(m.delta_norm() for m in lo) for lo in loras])
    table = pd.DataFrame({
        "id": [f"faces-{i:03d}" for i in range(n)],
        "group": [f"identity-{i // 2}" for i in range(n)],
        "split": ["train" if i < n * 0.6 else ("val" if i < n * 0.8 else "test") for i in range(n)],
        "clip_score": 20 + 2 * (norms - norms.mean()) / norms.std() + rng.normal(0, 0.3, n),
        "male": rng.random(n) < 0.5,
        "young": rng.random(n) < 0.7,
        "lr": rng.choice([1e-4, 3e-4, 1e-3], n),
        "steps": rng.choice([100, 200], n),
    })
    labels = {"clip_score": {"kind": "regression", "description": "mean CLIP score over fixed prompts",
                             "task": "clip"},
              "male": {"kind": "binary", "description": "identity is male", "task": "attributes"},
              "young": {"kind": "binary", "description": "identity is young", "task": "attributes"}}
    write_collection(dest, loras, table, labels=labels, tasks={"clip": ["clip_score"], "attributes": ["male", "young"]},
                     base_model="tiny-test", dtype=torch.float32)
    return dest


def data_root(tmp: Path) -> Path:
    root = Path(tmp) / "data"
    faces_like(root / "collections" / "faces")
    return root
