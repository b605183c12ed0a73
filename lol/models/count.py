"""A count read off a membership model, as one model (kind ``count``): how many of its yes/no labels it predicts
present. For the fashion collection that is the dataset size (the paper's Table 4 task: how many classes a LoRA was
finetuned on), which is exactly the number of classes present.

A head trained on the size alone misses the class directions (fashion, 2,046 LoRAs: test accuracy 0.36, balanced
0.22), while counting the classes a membership model predicts present gets the size exactly for 0.65–0.75 of test
LoRAs (`lol.ensemble.count_present`). So the counted size ships as a checkpoint of its own, which `lol predict`,
the app and the metrics read like any model:

    count(LoRA) = #{k : σ(member(LoRA)_k) ≥ threshold},   output = (count − mean) / std

the encoding of an ordered-category label (`lol.targets`: one scalar, standardized with the training split's mean and
std, decoded to the nearest class). The member is a trained model of a GL(r)-invariant kind (an ``ensemble`` too) whose
outputs are binary logits; `lol.ensemble.count_checkpoint` assembles it from checkpoints and checks that the counted
label is the number of the member's labels present on every LoRA of the collection. The count is a function of the
member's outputs, so it is GL(r)-invariant whenever the member is; the constructor refuses a member that is not.

The output is piecewise constant (a count), so there is nothing to train: ``fit`` refuses; it is in
`lol.models.ASSEMBLED`, not `lol.models.MODELS`.
"""
from __future__ import annotations

import torch

from ..errors import LoLError
from ..symmetry import GL
from .base import LoLModel

__all__ = ["Count"]


class Count(LoLModel):
    kind = "count"
    requires = "what its member requires (the fitted module spec)"
    invariant_to = GL
    precompute = False

    def __init__(self, spec, n_outputs: int, member: dict, labels: int, mean: float, std: float,
                 threshold: float = 0.5, width: int = 0):
        """``member``: ``{"kind", "hparams"}`` of a model with ``labels`` binary outputs (logits); ``mean``, ``std``:
        the counted label's training-split statistics (`lol.targets.Target`); ``threshold``: the probability at or
        above which a label counts as present."""
        from . import build_model, gl_invariant

        super().__init__(spec, n_outputs, width=0)
        if self.n_outputs != 1:
            raise LoLError(f"count: predicts one label (a count), not {self.n_outputs} outputs")
        kind = (member or {}).get("kind")
        if not gl_invariant(kind):
            raise LoLError(f"count: member kind {kind!r} is not GL(r)-invariant; a count keeps the GL(r) promise only "
                           f"if its member does")
        if int(labels) < 1:
            raise LoLError(f"count: the member must have at least one binary output, got {labels}")
        if not (float(std) > 0):
            raise LoLError(f"count: std must be positive, got {std}")
        if not 0 < float(threshold) < 1:
            raise LoLError(f"count: threshold is a probability strictly between 0 and 1, got {threshold}")
        self.member_config = {"kind": kind, "hparams": dict(member.get("hparams") or {})}
        self.labels, self.mean, self.std, self.threshold = int(labels), float(mean), float(std), float(threshold)
        self.member = build_model(kind, spec, self.labels, **self.member_config["hparams"])
        self.rank_agnostic = self.member.rank_agnostic

    def config(self) -> dict:
        return {"member": self.member_config, "labels": self.labels, "mean": self.mean, "std": self.std,
                "threshold": self.threshold}

    def fit(self, batch):
        raise LoLError("count: assembled from a trained membership checkpoint (`lol.ensemble.count_checkpoint`), "
                       "not fitted")

    @property
    def fitted(self) -> bool:
        return getattr(self, "member", None) is not None and self.member.fitted

    @fitted.setter
    def fitted(self, value: bool) -> None:
        if getattr(self, "member", None) is not None:
            self.member.fitted = bool(value)

    def embed(self, batch) -> torch.Tensor:
        self.check_dtype(batch)
        return self.member.embed(batch)

    def present(self, batch) -> torch.Tensor:
        """(B, labels) booleans: the member's labels predicted present."""
        self.check_dtype(batch)
        return torch.sigmoid(self.member(batch)) >= self.threshold

    def forward(self, batch) -> torch.Tensor:
        count = self.present(batch).sum(1, keepdim=True).to(batch.dtype)
        return (count - self.mean) / self.std

    def extra_repr(self) -> str:
        return super().extra_repr() + f", counts {self.labels} labels of {self.member_config['kind']}"
