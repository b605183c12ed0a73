"""LoL models, by kind name. Each declares its input requirements (``requires``) and symmetry (``invariant_to``),
exposes ``fit(train_batch)``, ``embed(batch)`` and ``forward(batch)``, and fails with `SpecMismatchError` on a batch
it cannot read.

========================= ==================================================== =======================================
kind                      model                                                invariant to
========================= ==================================================== =======================================
``mlp``                   MLP on flattened raw factors                         nothing
``mlp_aug``               same, trained with random GL(r) augmentation         nothing (approximately GL by training)
``dense``                 MLP on dense ΔW ("MLP+Mul")                          GL(r)
``colspace``              MLP on the projector onto each ΔW's column space     GL(r), scale, row space
``colsketch``             learned quadratic forms Φ P Φᵀ of those projectors   GL(r), scale, row space
``svals``                 MLP on singular values of ΔW ("MLP+SVD")             GL(r)
``oalign``                MLP on O-Aligned factors                             O(r) only
``canon_mlp``             MLP on the SVD canonical form                        GL(r), generic inputs
``canon_transformer``     Transformer over per-module canonical tokens         GL(r), generic inputs
``glnet``                 GL-equivariant network with invariant head           GL(r), any rank
========================= ==================================================== =======================================

``ensemble`` (`lol.models.ensemble`, in `ASSEMBLED`, not `MODELS`): trained models of GL-invariant kinds combined into
one, assembled from checkpoints by `lol.ensemble.ensemble_checkpoint`, never trained by a grid. ``count``
(`lol.models.count`, also in `ASSEMBLED`): a count label (the dataset size) read off a trained membership model as the
number of its labels predicted present, assembled by `lol.ensemble.count_checkpoint`.
"""
from __future__ import annotations

from ..errors import LoLError
from ..lora import ModuleSpec
from ..symmetry import GL, INVARIANCES
from .base import LoLModel, MLPTrunk, Standardize
from .colsketch import ColumnSketch
from .count import Count
from .ensemble import Ensemble
from .glnet import GLHidden, GLInput, GLNet, InvariantHead, RowGate
from .mlp import (AugmentedMLP, CanonicalMLP, ColumnSpaceMLP, DenseMLP, FeatureMLP, FlattenMLP, OAlignMLP,
                  SingularValueMLP)
from .transformer import CanonicalTransformer

__all__ = ["MODELS", "ASSEMBLED", "model_class", "Ensemble", "Count", "build_model", "gl_invariant", "gl_invariant_kinds", "LoLModel", "FeatureMLP", "FlattenMLP", "AugmentedMLP", "DenseMLP",
           "ColumnSpaceMLP", "ColumnSketch",
           "SingularValueMLP", "OAlignMLP", "CanonicalMLP", "CanonicalTransformer", "GLNet", "GLInput", "GLHidden",
           "RowGate", "InvariantHead", "MLPTrunk", "Standardize"]

MODELS: dict[str, type[LoLModel]] = {cls.kind: cls for cls in (
    FlattenMLP, AugmentedMLP, DenseMLP, ColumnSpaceMLP, ColumnSketch, SingularValueMLP, OAlignMLP, CanonicalMLP,
    CanonicalTransformer, GLNet)}
# kinds assembled from trained models rather than trained: checkpoints load them, grids and `lol train` never see them
ASSEMBLED: dict[str, type[LoLModel]] = {Ensemble.kind: Ensemble, Count.kind: Count}
for _cls in (*MODELS.values(), *ASSEMBLED.values()):  # the registry is the one home of kinds and their symmetry: no free text
    if _cls.invariant_to not in INVARIANCES:
        raise TypeError(f"model {_cls.kind!r}: invariant_to {_cls.invariant_to!r} is not one of {INVARIANCES}")


def model_class(kind: str) -> type[LoLModel] | None:
    """The class of a trainable kind (`MODELS`) or of an assembled one (`ASSEMBLED`: an ensemble, a count); None if
    unknown."""
    return MODELS.get(kind) or ASSEMBLED.get(kind)


def gl_invariant(kind: str) -> bool:
    """True for kinds invariant to GL(r) (by construction or canonicalization), not only O(r). Unknown kinds:
    False."""
    cls = model_class(kind)
    return cls is not None and cls.invariant_to == GL


def gl_invariant_kinds() -> tuple[str, ...]:
    return tuple(k for k in MODELS if gl_invariant(k))


def build_model(kind: str, spec: ModuleSpec, n_outputs: int, **hparams) -> LoLModel:
    """A new model of ``kind`` for LoRAs over ``spec`` with ``n_outputs`` outputs; ``hparams`` go to its constructor
    (see each class; ``width`` is accepted by all)."""
    cls = model_class(kind)
    if cls is None:
        raise LoLError(f"unknown model kind {kind!r}; choose one of {', '.join(MODELS)}")
    try:
        return cls(spec, n_outputs, **hparams)
    except TypeError as e:
        raise LoLError(f"model {kind!r}: {e}") from None
