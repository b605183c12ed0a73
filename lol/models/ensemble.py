"""An ensemble of trained LoL models as one model (kind ``ensemble``), so that a checkpoint, `lol predict`, the app
and the metrics read it like any other model.

Members are trained models of GL(r)-invariant kinds with the same labels and the same training split (one seed of a
grid; `lol.ensemble.ensemble_checkpoint` assembles and checks them), each with a weight (how many times greedy
selection picked it, `lol.ensemble.select_members`). Their outputs are combined in each label's own space and
encoded back, so `lol.targets.TargetSet.decode` reads the ensemble's output as it reads a member's:

* regression and ordered categories (one scalar, standardized with the training split's statistics, which the members
  share): the weighted mean;
* binary: the weighted mean of the members' probabilities, output as its logit (decoding gives back that mean, the
  quantity the members were selected on in `lol.ensemble.average`);
* category: the log of the weighted mean of the members' class probabilities.

``embed`` puts the members' embeddings side by side. Every member is unchanged by the GL action
(U, V) ↦ (U R, V R⁻ᵀ), so the ensemble is GL(r)-invariant; the constructor refuses a member kind that is not.

Not a trainable kind: it is not in `lol.models.MODELS` (grids and ``lol train`` never see it) and ``fit`` refuses.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import LoLError
from ..symmetry import GL
from .base import LoLModel

__all__ = ["Ensemble", "ENCODINGS"]

ENCODINGS = ("scalar", "binary", "category")


class Ensemble(LoLModel):
    kind = "ensemble"
    requires = "what every member requires (the fitted module spec)"
    invariant_to = GL
    precompute = False

    def __init__(self, spec, n_outputs: int, members: list[dict], outputs: list, width: int = 0):
        """``members``: ``[{"kind", "hparams", "weight"}]`` (a member's constructor arguments, as its checkpoint
        records them, and its positive weight); ``outputs``: ``[[encoding, width], ...]``, one per label in output
        order, encoding one of `ENCODINGS` (`lol.targets.Target.scalar`, binary, else category)."""
        from . import build_model, gl_invariant

        super().__init__(spec, n_outputs, width=0)
        if not members:
            raise LoLError("ensemble: no members")
        bad = [m.get("kind") for m in members if not gl_invariant(m.get("kind"))]
        if bad:
            raise LoLError(f"ensemble: member kind(s) {bad} are not GL(r)-invariant; an ensemble keeps the GL(r) "
                           f"promise only if every member does")
        weights = [float(m.get("weight", 1)) for m in members]
        if not all(w > 0 for w in weights):
            raise LoLError(f"ensemble: member weights must be positive, got {weights}")
        enc = [(str(e), int(w)) for e, w in outputs]
        wrong = [e for e, _ in enc if e not in ENCODINGS]
        if wrong or sum(w for _, w in enc) != self.n_outputs:
            raise LoLError(f"ensemble: outputs {outputs} must be [encoding, width] pairs with encodings in "
                           f"{ENCODINGS} and widths summing to {self.n_outputs}")
        self.member_config = [{"kind": m["kind"], "hparams": dict(m.get("hparams") or {}), "weight": w}
                              for m, w in zip(members, weights)]
        self.outputs = enc
        self.members = nn.ModuleList(build_model(m["kind"], spec, n_outputs, **m["hparams"])
                                     for m in self.member_config)
        self.register_buffer("weights", torch.tensor(weights) / sum(weights), persistent=False)
        self.rank_agnostic = all(m.rank_agnostic for m in self.members)

    def config(self) -> dict:
        return {"members": self.member_config, "outputs": [list(o) for o in self.outputs]}

    def fit(self, batch):
        raise LoLError("ensemble: assembled from trained checkpoints (`lol.ensemble.ensemble_checkpoint`), not fitted")

    @property
    def fitted(self) -> bool:
        return all(m.fitted for m in getattr(self, "members", ()))

    @fitted.setter
    def fitted(self, value: bool) -> None:
        for m in getattr(self, "members", ()):
            m.fitted = bool(value)

    def embed(self, batch) -> torch.Tensor:
        self.check_dtype(batch)
        return torch.cat([m.embed(batch) for m in self.members], dim=1)

    def forward(self, batch) -> torch.Tensor:
        self.check_dtype(batch)
        outs = [m(batch) for m in self.members]
        ww = self.weights.to(outs[0].dtype).view(-1, 1, 1)
        parts, start = [], 0
        for enc, width in self.outputs:
            o = torch.stack([x[:, start:start + width] for x in outs])          # (members, B, width)
            if enc == "scalar":
                parts.append((ww * o).sum(0))
            elif enc == "binary":
                p = (ww * torch.sigmoid(o)).sum(0)
                eps = torch.finfo(p.dtype).eps
                parts.append(torch.logit(p.clamp(eps, 1 - eps)))
            else:
                parts.append(torch.log((ww * torch.softmax(o, dim=-1)).sum(0)))
            start += width
        return torch.cat(parts, dim=1)

    def extra_repr(self) -> str:
        return (super().extra_repr() + ", members=" +
                " + ".join(f"{m['kind']}×{m['weight']:g}" for m in self.member_config))
