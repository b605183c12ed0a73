"""Words for people: what each LoL model kind is and what each metric means. Used for help tooltips on every page
(a model's full name — collection, labels, model family — is `lol.catalog.CheckpointInfo.title`)."""
from __future__ import annotations

__all__ = ["KIND_HELP", "METRIC_HELP", "LOWER_IS_BETTER", "kind_help", "metric_help"]

# one-line explanations of the kinds in lol.models (README "Models"; their short names: `lol.catalog.FAMILY`)
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
    "ensemble": "Several GL-invariant models trained on the same split, their predictions averaged (probabilities for "
                "yes/no labels); members chosen on validation: GL-invariant because every member is.",
    "count": "A count (how many classes a LoRA was finetuned on) read off a membership model: the number of classes it "
             "predicts present; GL-invariant because the membership model is.",
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
    "BCE loss": "Binary cross-entropy of the predicted probabilities (lower is better; 0.693 is a coin flip).",
    "normalized MSE": "Mean squared error of the label z-scored with the training split's mean and std (the paper's "
                      "Table 2 metric; lower is better, 1 is as good as predicting the training mean).",
    "LoRAs": "How many LoRAs the metrics are computed on (the model's test split).",
}
LOWER_IS_BETTER = ("MAE", "MSE", "loss")


def kind_help(kind: str | None) -> str:
    return KIND_HELP.get(kind or "", f"Model kind {kind!r}.")


def metric_help(name: str) -> str:
    return next((v for k, v in METRIC_HELP.items() if name.endswith(k)), "")

