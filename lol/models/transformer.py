"""A Transformer over per-module canonical tokens (the follow-up work "Weight2Token", arXiv 2603.15990).

Each module's SVD canonical form (U'_ℓ, V'_ℓ) (see `lol.features.canonical_factors`, standardized with training
statistics) is projected by a per-module linear map to one d-dimensional token, plus a learned module embedding; a
Transformer encoder mixes the L tokens; the mean token goes through (Linear, LayerNorm, ReLU) to the embedding.
Invariant to ∏ GL(r_ℓ) for generic inputs, because the tokens are. Modules with equal n + m share one batched
projection matmul.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..features import SVDCanonical
from ..symmetry import GL
from .base import FeaturizedModel, MLPTrunk, Standardize
from .glnet import _groups

__all__ = ["CanonicalTransformer"]


class CanonicalTransformer(FeaturizedModel):
    """Tokens ``W_ℓ vec(U'_ℓ, V'_ℓ) + e_ℓ`` → ``depth`` pre-norm encoder layers (``d_model``, ``heads``) → mean pool →
    (Linear, LayerNorm, ReLU) → Linear."""

    kind = "canon_transformer"
    requires = "the fitted module spec (any ranks: the canonical columns of the fitted rank's largest singular values)"
    invariant_to = GL
    rank_agnostic = True

    def __init__(self, spec, n_outputs, width: int = 64, d_model: int = 64, depth: int = 2, heads: int = 4,
                 rank: int | None = None):
        super().__init__(spec, n_outputs, width)
        self.d_model, self.depth, self.heads = int(d_model), int(depth), int(heads)
        self.features = SVDCanonical(spec, rank)
        self.built = False
        if rank is not None:
            self._build()

    def _build(self):
        r, d = self.features.rank, self.d_model
        self.sizes = [(o + i) * r for o, i in self.spec.shapes]
        self.groups = _groups(self.sizes)
        self.norm = Standardize(sum(self.sizes))
        self.proj = nn.ParameterList([nn.Parameter(torch.randn(len(idx), D, d) / math.sqrt(D))
                                      for D, idx in self.groups])
        flat = [ell for _, idx in self.groups for ell in idx]
        self.register_buffer("order", torch.argsort(torch.tensor(flat)), persistent=False)
        self.module_embedding = nn.Parameter(torch.randn(len(self.spec), d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, self.heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, self.depth, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(d)
        self.trunk = MLPTrunk(d, self.width, depth=1)
        self.head = nn.Linear(self.width, self.n_outputs)
        self.built = True

    def config(self):
        return {"width": self.width, "d_model": self.d_model, "depth": self.depth, "heads": self.heads,
                "rank": self.features.rank}

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Σ D_ℓ) standardized canonical features → (B, L, d) tokens."""
        chunks = x.split(self.sizes, dim=1)
        out = [torch.bmm(torch.stack([chunks[ell] for ell in idx]), W.to(x.dtype))
               for (_, idx), W in zip(self.groups, self.proj)]                      # (G, B, d) each
        T = torch.cat(out).index_select(0, self.order.to(x.device)).transpose(0, 1)  # (B, L, d)
        return T + self.module_embedding.to(x.dtype)

    def embed_features(self, x):
        h = self.final_norm(self.encoder(self.tokens(x)))
        return self.trunk(h.mean(1))
