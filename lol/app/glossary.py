"""Words for people: what each LoL model kind is, what each metric means, and a model's full name (collection,
labels, model family). Used for select-box labels and help tooltips on every page."""
from __future__ import annotations

__all__ = ["FAMILY", "KIND_HELP", "METRIC_HELP", "model_name", "kind_help", "metric_help", "labels_text"]

# short family names and one-line explanations of the kinds in lol.models (README "Models")
FAMILY = {"mlp": "flat MLP", "mlp_aug": "flat MLP + GL augmentation", "dense": "ΔW MLP",
          "colspace": "column-space MLP", "colsketch": "column-space sketch", "svals": "singular-value MLP",
          "oalign": "Procrustes-aligned MLP", "canon_mlp": "SVD-canonical MLP",
          "canon_transformer": "SVD-canonical Transformer", "glnet": "GL-net"}
KIND_HELP = {
    "mlp": "Flat MLP on the raw factors U, V: not invariant to GL(r) (baseline; one rank only).",
    "mlp_aug": "Flat MLP on the raw factors, trained with random GL(r) transforms: approximately invariant.",
    "dense": "MLP on every ΔW = UVᵀ, flattened: GL-invariant (the only model that forms ΔW).",
    "colspace": "MLP on the projector onto each ΔW's column space: GL-invariant, also blind to scale and row space.",
    "colsketch": "Learned quadratic forms of each ΔW's column-space projector (cheap as GL-net): GL-invariant.",
    "svals": "MLP on the singular values of every ΔW (computed from an r×r core): GL-invariant.",
    "oalign": "Factors aligned to a training template by orthogonal Procrustes: invariant to rotations O(r) only.",
    "canon_mlp": "MLP on an SVD canonical form of every module: GL-invariant for generic inputs.",
    "canon_transformer": "Transformer over per-module SVD canonical tokens: GL-invariant for generic inputs.",
    "glnet": "GL-equivariant layers on (U, V) with an invariant head: GL-invariant by construction, any rank.",
}
METRIC_HELP = {
    "R²": "Coefficient of determination: 1 is perfect, 0 is as good as predicting the mean, below 0 worse.",
    "Spearman ρ": "Rank correlation of predicted and actual values: 1 means the ranking is exactly right.",
    "Kendall τ": "Share of LoRA pairs ordered correctly minus share ordered wrongly (−1 to 1).",
    "MAE": "Mean absolute error, in the label's units (lower is better).",
    "AUC": "Area under the ROC curve: chance that a random positive scores above a random negative (0.5 = chance).",
    "accuracy": "Share of LoRAs whose label is predicted exactly (binary labels: at probability 0.5).",
    "balanced accuracy": "Accuracy averaged over the classes, so a rare class counts as much as a common one.",
    "TPR @ 1% FPR": "True-positive rate when only 1% of negatives are flagged (the low-false-alarm regime).",
    "TPR @ 0.1% FPR": "True-positive rate when only 0.1% of negatives are flagged.",
    "LoRAs": "How many LoRAs the metrics are computed on (the model's test split).",
}
LOWER_IS_BETTER = ("MAE", "loss")


def kind_help(kind: str | None) -> str:
    return KIND_HELP.get(kind or "", f"Model kind {kind!r}.")


def metric_help(name: str) -> str:
    return next((v for k, v in METRIC_HELP.items() if name.endswith(k)), "")


def labels_text(labels: list[str]) -> str:
    """``clip_score``; ``male, young``; ``male, young, … (5 labels)``."""
    labels = list(labels)
    if len(labels) <= 2:
        return ", ".join(labels) or "no labels"
    return f"{labels[0]}, {labels[1]}, … ({len(labels)} labels)"


def model_name(rel: str, labels: list[str], kind: str | None) -> str:
    """``faces/attributes — male, young, … (5 labels) · ΔW MLP``: the checkpoint (collection/task), what it
    predicts and its model family."""
    fam = FAMILY.get(kind or "", kind or "?")
    return f"{rel} — {labels_text(labels)} · {fam}"
