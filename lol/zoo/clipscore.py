"""CLIP score with torchmetrics' definition, for the zoo's own CLIP and any local CLIP folder.

    CLIPScore(I, C) = max(100 · cos(E_I, E_C), 0)

``E_I`` is ``CLIPModel.get_image_features`` of the processor's pixels, ``E_C`` is ``get_text_features`` of the
processor's tokens (padded, truncated to the text tower's length) — the same calls torchmetrics'
``functional.clip_score`` makes, so a score here equals torchmetrics' score for one pair. Unlike torchmetrics'
functional form, which clamps the *mean* over pairs, `CLIPScorer.score` returns the clamped score of every pair;
averaging is left to the caller. A score means nothing without its settings: `ScoreSettings` records backbone,
prompts, seed, sampling steps, guidance and resolution, and is stored beside every score.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["CLIPScorer", "ScoreSettings"]


@dataclass
class ScoreSettings:
    """What a CLIP score was measured with (store it with the scores)."""

    backbone: str
    prompts: list[str]
    seed: int
    steps: int
    guidance: float
    resolution: int
    scheduler: str = ""
    images_per_prompt: int = 1
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _as_uint8_hwc(images) -> list[np.ndarray]:
    """PIL images, uint8 tensors/arrays (N,3,H,W) or (N,H,W,3), or float tensors in [0, 1] -> list of HWC uint8."""
    if isinstance(images, torch.Tensor):
        x = images.detach().cpu()
        if x.dtype.is_floating_point:
            if x.min() < -1e-3 or x.max() > 1 + 1e-3:
                raise ValueError(f"float images must lie in [0, 1], got range [{float(x.min()):.3f}, "
                                 f"{float(x.max()):.3f}]")
            x = (x * 255).round().clamp(0, 255).to(torch.uint8)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"image tensor must be (N, 3, H, W), got shape {tuple(x.shape)}")
        return list(x.permute(0, 2, 3, 1).numpy())
    out = []
    for im in images:
        if hasattr(im, "convert"):
            out.append(np.asarray(im.convert("RGB")))
        else:
            a = np.asarray(im)
            if a.dtype != np.uint8 or a.ndim != 3:
                raise ValueError(f"images must be PIL or uint8 arrays (H, W, 3), got {a.dtype} {a.shape}")
            out.append(a if a.shape[-1] == 3 else a.transpose(1, 2, 0))
    return out


class CLIPScorer:
    """A frozen CLIP model + processor loaded with ``from_pretrained(path)`` (the zoo's ``base/clip`` or e.g. a local
    ``openai/clip-vit-base-patch16`` folder). Batched; nothing is downloaded."""

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 64):
        from transformers import CLIPModel, CLIPProcessor

        self.path = str(path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = CLIPModel.from_pretrained(self.path).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(self.path)
        self.batch_size = int(batch_size)

    @classmethod
    def from_model(cls, model, processor, backbone: str, batch_size: int = 64) -> "CLIPScorer":
        self = cls.__new__(cls)
        self.path, self.model, self.processor, self.batch_size = backbone, model.eval(), processor, batch_size
        self.device = str(next(model.parameters()).device)
        return self

    @property
    def backbone(self) -> str:
        return self.path

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        """Unit-norm image embeddings (N, d)."""
        arrs = _as_uint8_hwc(images)
        feats = []
        for i in range(0, len(arrs), self.batch_size):
            px = self.processor(images=arrs[i:i + self.batch_size], return_tensors="pt")["pixel_values"]
            feats.append(self._unwrap(self.model.get_image_features(pixel_values=px.to(self.device))).float())
        f = torch.cat(feats)
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (N, d); captions longer than the text tower are truncated."""
        feats = []
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", None)
        for i in range(0, len(texts), self.batch_size):
            tok = self.processor(text=list(texts[i:i + self.batch_size]), return_tensors="pt", padding=True)
            ids, mask = tok["input_ids"], tok["attention_mask"]
            if max_len is not None and ids.shape[-1] > max_len:
                ids, mask = ids[..., :max_len], mask[..., :max_len]
            feats.append(self._unwrap(self.model.get_text_features(input_ids=ids.to(self.device),
                                                                   attention_mask=mask.to(self.device))).float())
        f = torch.cat(feats)
        return f / f.norm(dim=-1, keepdim=True)

    @staticmethod
    def _unwrap(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def score(self, images, texts: Sequence[str]) -> torch.Tensor:
        """Per-pair CLIP score ``max(100 · cos(E_img, E_txt), 0)``, shape (N,)."""
        texts = list(texts)
        img = self.image_features(images)
        if img.shape[0] != len(texts):
            raise ValueError(f"CLIP score needs one text per image, got {img.shape[0]} images and {len(texts)} texts")
        txt = self.text_features(texts)
        return (100 * (img * txt).sum(-1)).clamp(min=0)

    def score_matrix(self, images, texts: Sequence[str]) -> torch.Tensor:
        """All pairs: (N_images, N_texts) matrix of clamped scores."""
        return (100 * self.image_features(images) @ self.text_features(list(texts)).T).clamp(min=0)
