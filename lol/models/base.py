"""What every LoL model shares: a spec it was built for, stated input requirements, ``fit`` / ``embed`` / ``forward``.

A model is ``featurize → embed → head``:

* ``featurize(batch)`` is a fixed, parameter-free map (a featurizer from `lol.features`, plus a standardization fitted
  on the training split). Models with ``precompute = True`` let the training loop featurize every LoRA once.
* ``embed_features(x)`` is the learned trunk up to the penultimate representation; ``embed(batch)`` composes the two.
  For an invariant model the embedding is invariant.
* ``head`` (a Linear) maps the embedding to the outputs.

``fit(train_batch)`` sets all data-dependent state (featurizer templates, ranks, normalization) in buffers, so a
model's ``state_dict`` is everything a checkpoint needs; ``config()`` gives the constructor arguments.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..batch import LoRABatch
from ..errors import SpecMismatchError
from ..lora import ModuleSpec
from ..symmetry import NOTHING

__all__ = ["LoLModel", "FeaturizedModel", "MLPTrunk", "Standardize", "iter_chunks", "derived", "clear_derived"]


class MLPTrunk(nn.Sequential):
    """``depth`` × (Linear, LayerNorm, ReLU): the hidden part of the paper's MLP (the final Linear is the head)."""

    def __init__(self, d_in: int, width: int, depth: int = 2):
        layers: list[nn.Module] = []
        for k in range(depth):
            layers += [nn.Linear(d_in if k == 0 else width, width), nn.LayerNorm(width), nn.ReLU()]
        super().__init__(*layers)


class Standardize(nn.Module):
    """``(x − mean) / std`` with statistics of the training split: per feature (``"feature"``) or one scalar for all
    features (``"scalar"``, for very wide inputs such as dense ΔW). A fixed affine map, so it keeps any invariance."""

    def __init__(self, dim: int, mode: str = "feature"):
        super().__init__()
        if mode not in ("feature", "scalar"):
            raise ValueError(f"Standardize: mode must be 'feature' or 'scalar', got {mode!r}")
        self.mode = mode
        n = dim if mode == "feature" else 1
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))

    def fit(self, x: torch.Tensor) -> "Standardize":
        return self.fit_stream([x])

    @torch.no_grad()
    def fit_stream(self, chunks) -> "Standardize":
        """Fit from an iterable of (b, D) chunks (float64 running sums), so wide inputs never sit in memory at once."""
        n, s1, s2 = 0, 0.0, 0.0
        for x in chunks:
            x = x.double()
            if self.mode == "scalar":
                x = x.reshape(-1, 1)
            n += x.shape[0]
            s1 = s1 + x.sum(0)
            s2 = s2 + (x * x).sum(0)
        if n == 0:
            raise ValueError("Standardize: no training rows")
        mean = s1 / n
        std = torch.sqrt(torch.clamp(s2 / n - mean * mean, min=0.0))
        tiny = 1e-6 * float(std.max())
        std = torch.where(std > tiny, std, torch.ones_like(std))
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))
        return self

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class LoLModel(nn.Module):
    """Base class of every model in the registry. Subclasses set ``kind``, ``requires``, ``invariant_to`` (from the
    fixed vocabulary `lol.symmetry.INVARIANCES`) and ``rank_agnostic``."""

    kind = "base"
    requires = "a batch over the model's module spec"
    invariant_to = NOTHING   # one of `lol.symmetry.INVARIANCES`: "nothing", "O(r)", "GL(r)"
    rank_agnostic = False    # reads LoRAs of ranks other than the training rank (any rank, or any rank ≤ a fitted one)
    symmetry_note = ""       # free text for people (e.g. "approximately GL(r) by augmentation"); never compared
    precompute = True    # featurize(batch) is parameter-free: the trainer may compute it once per LoRA
    augment_gl = False   # the trainer applies a random GL(r) element to every training minibatch
    # hyperparameters added after checkpoints of this kind were written, with the value that rebuilds the model such a
    # checkpoint holds (used by `lol.checkpoint.load_checkpoint` only when the saved config lacks the key)
    legacy_hparams: dict = {}

    def __init__(self, spec: ModuleSpec, n_outputs: int, width: int = 64):
        super().__init__()
        self.spec = spec
        self.n_outputs = int(n_outputs)
        self.width = int(width)
        self.fitted = False

    # -- contract ------------------------------------------------------------------------------------------------
    def config(self) -> dict:
        """JSON-able constructor arguments (besides spec and n_outputs)."""
        return {"width": self.width}

    def fit(self, batch: LoRABatch) -> "LoLModel":
        """Set data-dependent state from the training split (no gradient training)."""
        self.check(batch)
        self.fitted = True
        return self

    def featurize(self, batch: LoRABatch):
        self.check(batch)
        return batch

    def symmetric_input_weights(self) -> dict[str, list[int]]:
        """This model's own weights (names relative to it, members' left out) whose input columns read a flattened
        symmetric matrix per module, with each module's n: what `lol.checkpoint.store_half` folds. Empty by default."""
        return {}

    def embed_features(self, x) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, batch: LoRABatch) -> torch.Tensor:
        """The penultimate representation (B, E); invariant wherever the model is."""
        self.check_dtype(batch)
        return self.embed_features(self.featurize(batch))

    def forward_features(self, x) -> torch.Tensor:
        return self.head(self.embed_features(x))

    def forward(self, batch: LoRABatch) -> torch.Tensor:
        self.check_dtype(batch)
        return self.forward_features(self.featurize(batch))

    # -- input checks --------------------------------------------------------------------------------------------
    def check(self, batch: LoRABatch) -> None:
        """Raise `SpecMismatchError` when ``batch`` is not over this model's module spec (names and shapes)."""
        if not isinstance(batch, LoRABatch):
            raise TypeError(f"{self.kind}: expected a LoRABatch, got {type(batch).__name__}")
        got, want = batch.spec, self.spec
        if got.keys == want.keys and tuple(got.shapes) == tuple(want.shapes):
            return
        if len(got) != len(want):
            raise SpecMismatchError(f"model {self.kind!r} expects {len(want)} modules, the batch has {len(got)} "
                                    f"(requires {self.requires})")
        for (n1, s1), k1, (n2, s2), k2 in zip(zip(want.names, want.shapes), want.keys,
                                              zip(got.names, got.shapes), got.keys):
            if k1 != k2 or tuple(s1) != tuple(s2):
                raise SpecMismatchError(f"model {self.kind!r} expects module {n1!r} of shape {s1[0]}×{s1[1]}, the "
                                        f"batch has {n2!r} of shape {s2[0]}×{s2[1]}")

    def check_dtype(self, batch: LoRABatch) -> None:
        """Raise a `TypeError` naming both dtypes when ``batch``'s factors are not in the model's float dtype (the
        layers of `forward` and `embed` compute in it; `fit` and parameter-free featurizers take any float dtype)."""
        self.check(batch)
        want = self.float_dtype
        if want is not None and len(batch) and batch.dtype != want:
            raise TypeError(f"model {self.kind!r} computes in {str(want).removeprefix('torch.')}, the batch's factors "
                            f"are {str(batch.dtype).removeprefix('torch.')}: convert one to the other "
                            f"(batch.to(dtype=...) or model.to(...))")

    @property
    def float_dtype(self) -> torch.dtype | None:
        """The floating dtype of the model's parameters and buffers (None while it has none, e.g. a featurized model
        before `fit` builds its layers)."""
        for t in (*self.parameters(), *self.buffers()):
            if t.is_floating_point():
                return t.dtype
        return None

    def extra_repr(self) -> str:
        return f"modules={len(self.spec)}, outputs={self.n_outputs}, invariant_to={self.invariant_to!r}"


def derived(owner: nn.Module, name: str, sources, make):
    """``make()``, a tensor (or list of tensors) computed from ``sources`` (e.g. a weight in the memory layout a
    kernel reads fastest), cached on ``owner`` until a source changes: another tensor object (the cache holds the
    sources, so none is freed and its memory reused while cached), other storage, dtype or device (``.double()``,
    ``.to(...)`` and ``.data = …`` swap a parameter's data in place of the same object), or an in-place update (its
    version counter: an optimizer step, ``load_state_dict``, any in-place op on the parameter). Not seen: in-place
    changes made through ``.data`` (autograd does not track them either; `clear_derived` drops the cache).
    Inference only: the cached value carries no gradient. A value made for one dtype or device of the inputs (a weight
    cast to the batch's dtype) keeps that in its ``name`` (e.g. ``f"linear|{x.dtype}"``): the sources alone do not
    say it."""
    sources = list(sources)
    key = [(t._version, t.data_ptr(), t.dtype, t.device, t.shape) for t in sources]
    cache = owner.__dict__.setdefault("_derived", {})
    hit = cache.get(name)
    if (hit is None or len(hit[0]) != len(sources) or any(a is not b for a, b in zip(hit[0], sources))
            or hit[1] != key):
        with torch.no_grad():
            hit = cache[name] = (sources, key, make())
    return hit[2]


def clear_derived(model: nn.Module) -> None:
    """Drop every `derived` cache of ``model`` and its submodules."""
    for m in model.modules():
        m.__dict__.pop("_derived", None)


def iter_chunks(batch: LoRABatch, size: int) -> Iterator[LoRABatch]:
    for s in range(0, len(batch), size):
        yield batch.select(torch.arange(s, min(s + size, len(batch))))


class FeaturizedModel(LoLModel):
    """A model over a fixed featurizer: ``fit`` fits the featurizer, builds the layers (whose sizes depend on it) and
    the training-split standardization; ``featurize`` is ``features → Standardize``. Subclasses provide
    ``self.features``, ``self.built``, ``_build()`` and set ``self.norm`` there."""

    fit_chunk = 256      # LoRAs featurized at a time while fitting the standardization

    @torch.no_grad()
    def fit(self, batch: LoRABatch) -> "FeaturizedModel":
        self.check(batch)
        self.features.fit(batch)
        if not self.built:
            self._build()
        self.norm.fit_stream(self.features(c) for c in iter_chunks(batch, self.fit_chunk))
        self.fitted = True
        return self

    def featurize(self, batch: LoRABatch):
        self.check(batch)
        return self.norm(self.features(batch))
