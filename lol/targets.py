"""Labels as model outputs: encoding, losses, decoding and metrics for regression, binary and category labels.

* regression: one output; trained on ``(y − mean) / std`` with the **training split's** mean and std (MSE loss);
  decoded back to the label's units.
* binary: one logit; multi-label BCE (each binary label its own sigmoid); decoded to a probability.
* category: one logit per class seen in the data; cross-entropy; decoded to the most likely class.
* ordered category (``Target.ordered``: a count or a level, such as how many classes a LoRA was finetuned on): one
  output, trained like a regression label on the class's value (MSE on ``(y − mean) / std``, training-split
  statistics) and decoded to the nearest class. A softmax treats "3 classes" and "7 classes" as unrelated answers;
  on the fashion dataset-size task (2,046 LoRAs, GL-net, seed 0, validation accuracy) it stopped at epoch 1 with
  0.208, K − 1 threshold logits (Frank & Hall's ordinal classifiers) at epoch 3 with 0.279, the regression head at
  epoch 97 with 0.328. A category label whose classes are all integers is ordered unless ``ordered`` says otherwise
  (`TargetSet.fit`): integer columns are regression unless a schema declares them a category, which is what a count
  or a level is.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import metrics as M
from .errors import LoLError
from .labels import LABEL_KINDS, infer_kind, plain

__all__ = ["Target", "TargetSet", "infer_kind"]

KINDS = LABEL_KINDS  # the one list lives in `lol.labels`


@dataclass
class Target:
    name: str
    kind: str
    mean: float = 0.0
    std: float = 1.0
    classes: list = field(default_factory=list)
    ordered: bool = False            # category only: classes in order, learned as one scalar (module docstring)

    @property
    def width(self) -> int:
        return len(self.classes) if self.kind == "category" and not self.ordered else 1

    @property
    def scalar(self) -> bool:
        """One output trained with MSE on standardized values: a regression label or an ordered category."""
        return self.kind == "regression" or self.ordered


def _train_stats(name: str, v: np.ndarray, train_index) -> tuple[float, float]:
    """(mean, std) of a label's values on the training split (std 1 when they are all equal)."""
    tr = v[train_index] if train_index is not None else v
    tr = tr[np.isfinite(tr)]
    if len(tr) == 0:
        raise LoLError(f"label {name!r}: no finite value in the training split")
    std = float(tr.std())
    return float(tr.mean()), std if std > 0 else 1.0


def _number_classes(classes: list, integers: bool = False) -> bool:
    """Whether every class is a number (an integer, with ``integers``), not a bool."""
    kinds = (int, np.integer) if integers else (int, float, np.number)
    return all(isinstance(c, kinds) and not isinstance(c, (bool, np.bool_)) for c in classes)


class TargetSet:
    """The ordered labels a model predicts, and how each maps to its output columns."""

    def __init__(self, targets: list[Target]):
        self.targets = list(targets)
        bad = [t.kind for t in self.targets if t.kind not in KINDS]
        if bad:
            raise LoLError(f"unknown label kind(s) {bad}; expected one of {KINDS}")
        self.slices, s = [], 0
        for t in self.targets:
            self.slices.append(slice(s, s + t.width))
            s += t.width
        self.n_outputs = s

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    @classmethod
    def fit(cls, columns: dict, kinds: dict | None = None, train_index=None,
            ordered: dict | None = None) -> "TargetSet":
        """Targets for ``columns`` ({name: values}); regression statistics from the rows in ``train_index`` only.
        ``ordered`` ({name: bool}) says which category labels have ordered classes; a category label it does not
        name is ordered when its classes are all integers."""
        kinds, ordered = kinds or {}, dict(ordered or {})
        out = []
        for name, values in columns.items():
            kind = kinds.get(name) or infer_kind(values)
            s = pd.Series(values)
            if kind == "regression":
                mean, std = _train_stats(name, pd.to_numeric(s, errors="raise").to_numpy(float), train_index)
                out.append(Target(name, kind, mean, std))
            elif kind == "binary":
                v = pd.to_numeric(s.astype("float64"), errors="raise").dropna().to_numpy()
                if not set(np.unique(v)) <= {0.0, 1.0}:
                    raise LoLError(f"binary label {name!r} has values other than 0/1: {sorted(set(v))[:5]}")
                out.append(Target(name, kind))
            else:
                classes = sorted({plain(v) for v in s.dropna()}, key=lambda x: (str(type(x)), x))
                if len(classes) < 2:
                    raise LoLError(f"category label {name!r} has fewer than two classes: {classes}")
                if not ordered.get(name, _number_classes(classes, integers=True)):
                    out.append(Target(name, kind, classes=classes))
                    continue
                if not _number_classes(classes):
                    raise LoLError(f"category label {name!r} is declared ordered but its classes are not numbers "
                                   f"(whose order is known): {classes[:5]}")
                mean, std = _train_stats(name, pd.to_numeric(s, errors="raise").to_numpy(float), train_index)
                out.append(Target(name, kind, mean, std, classes=sorted(classes), ordered=True))
        return cls(out)

    def encode(self, columns: dict) -> torch.Tensor:
        """(N, n_labels) float32 targets: normalized regression (and ordered category) values, 0/1, or class index;
        NaN where missing."""
        cols = []
        for t in self.targets:
            if t.name not in columns:
                raise LoLError(f"label {t.name!r} is missing from the data")
            s = pd.Series(columns[t.name])
            if t.scalar:
                v = (pd.to_numeric(s).to_numpy(float) - t.mean) / t.std
            elif t.kind == "binary":
                v = s.astype("float64").to_numpy()
            else:
                index = {c: i for i, c in enumerate(t.classes)}
                v = np.array([np.nan if pd.isna(x) else index.get(plain(x), np.nan) for x in s], dtype=float)
            cols.append(v)
        return torch.tensor(np.stack(cols, 1), dtype=torch.float32)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over labels of MSE (regression, ordered category), BCE-with-logits (binary) or cross-entropy
        (category)."""
        parts = []
        for j, (t, sl) in enumerate(zip(self.targets, self.slices)):
            ok = torch.isfinite(y[:, j])
            if not bool(ok.any()):
                continue
            o, yy = out[ok, sl], y[ok, j]
            if t.scalar:
                parts.append(F.mse_loss(o[:, 0], yy))
            elif t.kind == "binary":
                parts.append(F.binary_cross_entropy_with_logits(o[:, 0], yy))
            else:
                parts.append(F.cross_entropy(o, yy.long()))
        return torch.stack(parts).mean() if parts else out.sum() * 0.0

    def decode(self, out: torch.Tensor) -> dict[str, np.ndarray]:
        """Model outputs → {label: values in the label's own terms} (units, probability, or class)."""
        out = out.detach().double().cpu()
        res = {}
        for t, sl in zip(self.targets, self.slices):
            o = out[:, sl]
            if t.scalar:
                value = (o[:, 0] * t.std + t.mean).numpy()
                if t.ordered:    # the nearest class
                    value = np.array(t.classes, dtype=object)[
                        np.abs(value[:, None] - np.array(t.classes, dtype=float)[None, :]).argmin(1)]
                res[t.name] = value
            elif t.kind == "binary":
                res[t.name] = torch.sigmoid(o[:, 0]).numpy()
            else:
                res[t.name] = np.array(t.classes, dtype=object)[o.argmax(1).numpy()]
        return res

    def metrics(self, out: torch.Tensor, columns: dict) -> dict[str, dict[str, float]]:
        """{label: {metric: value}} of decoded predictions against the raw label values (missing rows skipped)."""
        pred = self.decode(out)
        res = {}
        for t in self.targets:
            y = pd.Series(columns[t.name])
            ok = ~y.isna().to_numpy()
            if t.kind == "regression":
                res[t.name] = M.regression_metrics(y.to_numpy(float)[ok], pred[t.name][ok], scale=t.std)
            elif t.kind == "binary":
                res[t.name] = M.binary_metrics(y.astype("float64").to_numpy()[ok], pred[t.name][ok])
            else:
                res[t.name] = M.category_metrics(y.map(plain).to_numpy(object)[ok], pred[t.name][ok])
                if t.ordered:
                    res[t.name]["mae"] = M.mae(y.map(plain).to_numpy(float)[ok], pred[t.name][ok].astype(float))
        return res

    def to_json(self) -> list[dict]:
        return [asdict(t) for t in self.targets]

    @classmethod
    def from_json(cls, d: list[dict]) -> "TargetSet":
        return cls([Target(**t) for t in d])

    def __repr__(self):
        return f"TargetSet({', '.join(f'{t.name}:{t.kind}' for t in self.targets)})"


def nan_to_none(d):
    """JSON-safe copy of nested metric dicts (NaN → None)."""
    if isinstance(d, dict):
        return {k: nan_to_none(v) for k, v in d.items()}
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d
