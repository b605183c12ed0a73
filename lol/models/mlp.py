"""MLPs over fixed featurizations of a LoRA (paper §2): raw factors, raw factors + GL augmentation, dense ΔW,
singular values, O-Aligned factors, SVD canonical form. Each is ``featurizer → standardize → MLP``; the symmetry of
the model is exactly the symmetry of its featurizer (the standardization and MLP act on invariant features)."""
from __future__ import annotations

from torch import nn

from ..features import ColumnSpace, DenseDelta, FlattenFactors, OAlign, SingularValues, SVDCanonical
from ..symmetry import GL, NOTHING, ORTHOGONAL
from .base import FeaturizedModel, MLPTrunk, Standardize, iter_chunks

__all__ = ["FeatureMLP", "FlattenMLP", "AugmentedMLP", "DenseMLP", "ColumnSpaceMLP", "SingularValueMLP", "OAlignMLP",
           "CanonicalMLP", "iter_chunks"]


class FeatureMLP(FeaturizedModel):
    """``featurizer → Standardize → depth × (Linear, LayerNorm, ReLU) → Linear``."""

    featurizer_cls = FlattenFactors
    standardize = "feature"

    def __init__(self, spec, n_outputs, width: int = 64, depth: int = 2, rank: int | None = None):
        super().__init__(spec, n_outputs, width)
        self.depth = int(depth)
        self.features = self.featurizer_cls(spec, rank)
        self.built = False
        if rank is not None or self.featurizer_cls.fixed_dim:
            self._build()

    def _build(self):
        D = self.features.dim()
        self.norm = Standardize(D, self.standardize)
        self.trunk = MLPTrunk(D, self.width, self.depth)
        self.head = nn.Linear(self.width, self.n_outputs)
        self.built = True

    def config(self):
        return {"width": self.width, "depth": self.depth, "rank": self.features.rank}

    def embed_features(self, x):
        return self.trunk(x)

    def symmetric_input_weights(self) -> dict[str, list[int]]:
        """``{"trunk.0.weight": n_ℓ per module}`` when the featurizer's features are symmetric matrices
        (`lol.features.Featurizer.symmetric_blocks`): that weight's columns for entries (i, j) and (j, i) act on equal
        inputs. Empty otherwise."""
        blocks = self.features.symmetric_blocks()
        return {"trunk.0.weight": list(blocks)} if blocks and self.built else {}


class FlattenMLP(FeatureMLP):
    """MLP on the flattened raw factors of all modules. Invariant to nothing."""

    kind = "mlp"
    requires = "the fitted module spec; every module of every LoRA at the fitted rank (uniform rank)"
    invariant_to = NOTHING
    featurizer_cls = FlattenFactors


class AugmentedMLP(FlattenMLP):
    """The flatten MLP trained with a fresh random GL(r) element per module and LoRA on every minibatch: only
    approximately invariant (it learns the symmetry from data; nothing enforces it)."""

    kind = "mlp_aug"
    invariant_to = NOTHING
    symmetry_note = "approximately GL(r) by augmentation"
    precompute = False
    augment_gl = True


class DenseMLP(FeatureMLP):
    """MLP on dense ΔW of every module ("MLP+Mul"): GL-invariant and complete, but Σ n·m inputs. Uses one scalar
    standardization (per-feature statistics would be as large as the input)."""

    kind = "dense"
    requires = "the fitted module spec (any ranks)"
    invariant_to = GL
    rank_agnostic = True
    featurizer_cls = DenseDelta
    standardize = "scalar"
    fit_chunk = 8


class ColumnSpaceMLP(FeatureMLP):
    """MLP on the projector onto each ΔW's column space (`lol.features.ColumnSpace`): GL-invariant, blind by design
    to singular values and to the row space; Σ n² inputs (as costly as dense ΔW for square modules). Scalar
    standardization, as for dense."""

    kind = "colspace"
    requires = "the fitted module spec (any ranks)"
    invariant_to = GL
    rank_agnostic = True
    featurizer_cls = ColumnSpace
    standardize = "scalar"
    fit_chunk = 8


class SingularValueMLP(FeatureMLP):
    """MLP on the singular values of every ΔW ("MLP+SVD"): GL-invariant, not complete. Reads any rank: the k largest
    singular values per module, k fixed at fit (`lol.features.SingularValues`)."""

    kind = "svals"
    requires = "the fitted module spec (any ranks: the fitted rank's number of largest singular values is kept)"
    invariant_to = GL
    rank_agnostic = True
    featurizer_cls = SingularValues


class OAlignMLP(FeatureMLP):
    """MLP on factors aligned by orthogonal Procrustes to a training template: O(r)-invariant only."""

    kind = "oalign"
    requires = "the fitted module spec (any ranks: aligned onto the template's rank)"
    invariant_to = ORTHOGONAL
    featurizer_cls = OAlign


class CanonicalMLP(FeatureMLP):
    """MLP on the SVD canonical form (U', V') of every module: GL-invariant for generic inputs, complete up to the
    fitted rank k; reads any rank (the columns of the k largest singular values, `lol.features.SVDCanonical`)."""

    kind = "canon_mlp"
    requires = "the fitted module spec (any ranks: the canonical columns of the fitted rank's largest singular values)"
    invariant_to = GL
    rank_agnostic = True
    featurizer_cls = SVDCanonical
