"""Predictions of a trained checkpoint for LoRAs (objects or files)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd

from .batch import LoRABatch
from .checkpoint import Checkpoint, load_checkpoint
from .lora import LoRA

__all__ = ["predict"]


def predict(checkpoint, loras: Sequence[LoRA | str | Path], device=None, chunk: int = 32) -> pd.DataFrame:
    """One row per LoRA: ``source`` then one column per label (regression in its units, binary as probability,
    category as class). Each LoRA is matched to the checkpoint's ModuleSpec by module key; a mismatch raises
    `SpecMismatchError` naming the missing, unexpected or mis-shaped modules."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, device=device)
    items = list(loras)
    rows = []
    for s in range(0, len(items), chunk):
        part = []
        for x in items[s: s + chunk]:
            if not isinstance(x, LoRA):
                from .formats import read_lora
                x = read_lora(x)
            ckpt.spec.check(x, what=f"checkpoint {ckpt.path}")
            part.append(x)
        preds = ckpt.predict_batch(LoRABatch.from_loras(part, ckpt.spec, dtype=next(ckpt.model.parameters()).dtype))
        for i, x in enumerate(part):
            rows.append({"source": x.source, **{k: v[i].item() if hasattr(v[i], "item") else v[i]
                                               for k, v in preds.items()}})
    return pd.DataFrame(rows, columns=["source", *ckpt.labels])
