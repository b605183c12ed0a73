"""Figures of the paper, from the tidy tables of `lol.experiments` (used by the notebooks and the app).

Every function takes a DataFrame and returns a matplotlib ``Figure`` (``*_plotly`` variants return a plotly figure);
nothing is trained or recomputed here except metrics of given predictions (via `lol.metrics`). `save` writes a figure
as PNG (and plotly JSON / HTML) under a results folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from . import metrics as M
from .ensemble import count_present, count_scores

__all__ = ["scatter_pred_actual", "roc_curves", "membership_table", "size_from_membership", "rank_generalization_plot", "base_transfer_plot",
           "learning_curve_plot", "speed_plot",
           "umap_panel", "results_bar", "r2_vs_ceiling", "save", "scatter_pred_actual_plotly"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int, size=(4.0, 3.6), ncols: int | None = None):
    plt = _plt()
    ncols = ncols or min(n, 4)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _one_run(pred: pd.DataFrame, model: str, seeds: Mapping[str, int] | None) -> pd.DataFrame:
    p = pred[pred.model == model]
    seed = (seeds or {}).get(model, int(p.seed.min()) if len(p) else 0)
    return p[p.seed == seed]


def scatter_pred_actual(pred: pd.DataFrame, label: str, models: Sequence[str], split: str = "test",
                        seeds: Mapping[str, int] | None = None, units: str = ""):
    """Predicted against actual ``label`` on ``split``, one panel per model (one seed each: ``seeds[model]``, default
    the smallest), with R², Spearman ρ and Kendall τ in the title and the y = x line."""
    fig, axes = _grid(len(models))
    p = pred[(pred.label == label) & (pred.split == split)]
    lo, hi = np.nanmin(p[["y", "pred"]].to_numpy()) if len(p) else 0, np.nanmax(p[["y", "pred"]].to_numpy()) if len(p) else 1
    for ax, model in zip(axes, models):
        q = _one_run(p, model, seeds)
        ax.scatter(q.y, q.pred, s=10, alpha=0.7)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        m = M.regression_metrics(q.y, q.pred)
        ax.set_title(f"{model}\nR² {m['r2']:.3f} · ρ {m['spearman']:.3f} · τ {m['kendall']:.3f}", fontsize=9)
        ax.set_xlabel(f"actual {label}{f' ({units})' if units else ''}")
        ax.set_ylabel("predicted")
    fig.suptitle(f"{label}: predicted vs actual ({split} split, n = {len(q) if models else 0})")
    fig.tight_layout()
    return fig


def scatter_pred_actual_plotly(pred: pd.DataFrame, label: str, models: Sequence[str], split: str = "test",
                               seeds: Mapping[str, int] | None = None):
    """Interactive version of `scatter_pred_actual` (one colour per model, LoRA id on hover)."""
    import plotly.express as px

    p = pred[(pred.label == label) & (pred.split == split)]
    p = pd.concat([_one_run(p, m, seeds) for m in models], ignore_index=True)
    fig = px.scatter(p, x="y", y="pred", color="model", hover_data=["id", "seed"],
                     labels={"y": f"actual {label}", "pred": f"predicted {label}"},
                     title=f"{label}: predicted vs actual ({split})")
    lo, hi = float(np.nanmin(p[["y", "pred"]].to_numpy())), float(np.nanmax(p[["y", "pred"]].to_numpy()))
    fig.add_shape(type="line", x0=lo, y0=lo, x1=hi, y1=hi, line=dict(dash="dash", color="black", width=1))
    return fig


def _pooled(p: pd.DataFrame):
    """Labels of a multi-label task pooled into one set of (y, score) pairs (micro-average)."""
    return p.y.to_numpy(float), p.pred.to_numpy(float)


def membership_table(pred: pd.DataFrame, models: Sequence[str], split: str = "test",
                     seeds: Mapping[str, int] | None = None) -> pd.DataFrame:
    """Per model: AUC, balanced accuracy, TPR at 1% and 0.1% FPR of the labels pooled (micro), the mean AUC over
    labels (macro), and the number of positive / negative (LoRA, label) pairs — low-FPR values are only meaningful
    with ≥ 100 / 1000 negatives."""
    rows = []
    for model in models:
        q = _one_run(pred[pred.split == split], model, seeds)
        y, s = _pooled(q)
        m = M.binary_metrics(y, s)
        per_label = [M.auc(g.y, g.pred) for _, g in q.groupby("label")]
        rows.append({"model": model, "auc": m["auc"], "auc_macro": float(np.nanmean(per_label)) if per_label else np.nan,
                     "balanced_accuracy": m["balanced_accuracy"], "tpr_at_1pct_fpr": m["tpr_at_1pct_fpr"],
                     "tpr_at_0.1pct_fpr": m["tpr_at_0.1pct_fpr"], "positives": int((y == 1).sum()),
                     "negatives": int((y == 0).sum())})
    return pd.DataFrame(rows)


def size_from_membership(pred: pd.DataFrame, models: Sequence[str], split: str = "test",
                         seeds: Mapping[str, int] | None = None, threshold: float = 0.5) -> pd.DataFrame:
    """The dataset size (how many of a task's labels are present: the paper's Table 4 task on Imagenette-LoRA) read
    off a membership model: per model (one seed each, ``seeds[model]``, default the smallest), how often the number of
    labels it predicts present (score ≥ ``threshold``) is the true number (``accuracy``), within one of it
    (``within_one``), and the accuracy of always answering the most common true number (``majority_baseline``):
    `lol.ensemble.count_scores`. A diagnostic beside a model trained on the size directly: it uses every membership
    label in training."""
    rows = []
    for model in models:
        q = _one_run(pred[pred.split == split], model, seeds)
        if q.empty:
            continue
        s = count_scores(count_present(q, threshold)).iloc[0]
        rows.append({"model": model, "seed": int(q.seed.iloc[0]), "loras": int(s.loras), "accuracy": s.accuracy,
                     "within_one": s.within_one, "majority_baseline": s.majority_baseline})
    return pd.DataFrame(rows)


def roc_curves(pred: pd.DataFrame, models: Sequence[str], split: str = "test", seeds: Mapping[str, int] | None = None,
               title: str = ""):
    """ROC curves with a log-scale FPR axis (Carlini et al.): the task's labels pooled (micro-average), one curve per
    model, AUC and TPR at 1% FPR in the legend; chance is the diagonal."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    n_neg = 0
    for model in models:
        q = _one_run(pred[pred.split == split], model, seeds)
        y, s = _pooled(q)
        if len(np.unique(y[np.isfinite(y)])) < 2:
            continue
        fpr, tpr, _ = M.roc_curve(y, s)
        n_neg = int((y == 0).sum())
        ax.plot(np.clip(fpr, 1e-4, 1), tpr, lw=1.3,
                label=f"{model} (AUC {M.auc(y, s):.3f}, TPR@1% {M.tpr_at_fpr(y, s, 0.01):.2f})")
    grid = np.logspace(-4, 0, 100)
    ax.plot(grid, grid, "k:", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_xlim(max(1e-4, 1.0 / max(n_neg, 1) / 2), 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate (log scale)")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title or f"membership ROC ({split} split, {n_neg} negatives)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def rank_generalization_plot(rows: pd.DataFrame, metric: str):
    """``metric`` (mean over the task's labels; mean ± std over seeds) against evaluation rank, one line per model;
    the training rank is marked."""
    plt = _plt()
    r = rows[rows.metric == metric]
    task_level = r.groupby(["model", "seed", "eval_rank"])["value"].mean().reset_index()
    s = task_level.groupby(["model", "eval_rank"])["value"].agg(["mean", "std"]).reset_index()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for model, g in s.groupby("model", sort=False):
        ax.errorbar(g.eval_rank, g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3, label=model)
    ranks = sorted(r.eval_rank.unique())
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(x) for x in ranks])
    if "train_rank" in r:
        ax.axvline(int(r.train_rank.iloc[0]), color="gray", ls=":", lw=1, label="training rank")
    ax.set_xlabel("rank of the evaluated LoRAs")
    ax.set_ylabel(metric)
    ax.set_title(f"{r.task.iloc[0] if len(r) else ''}: trained on rank {int(r.train_rank.iloc[0]) if len(r) else '?'}",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def base_transfer_plot(rows: pd.DataFrame, metric: str):
    """Per training direction (panel) and model: ``metric`` (mean over the task's labels; mean ± std over seeds) on
    the training base's own test LoRAs and on the sibling base's LoRAs, side by side (`experiments.base_transfer`)."""
    r = rows[rows.metric == metric]
    task_level = r.groupby(["train_collection", "eval", "model", "seed"])["value"].mean().reset_index()
    s = task_level.groupby(["train_collection", "eval", "model"], sort=False)["value"].agg(["mean", "std"]).reset_index()
    dirs = list(dict.fromkeys(r.train_collection))
    fig, axes = _grid(len(dirs), size=(5.0, 3.8))
    for ax, d in zip(axes, dirs):
        g = s[s.train_collection == d]
        models = list(dict.fromkeys(g.model))
        other = r[r.train_collection == d].eval_collection
        sib = next((c for c in other if c != d), "sibling")
        x = np.arange(len(models))
        for k, (where, name) in enumerate((("same base", f"{d} (test split)"), ("sibling base", sib))):
            gg = g[g["eval"] == where].set_index("model").reindex(models)
            ax.bar(x + (k - 0.5) * 0.38, gg["mean"], 0.38, yerr=gg["std"].fillna(0), capsize=2, label=name)
        ax.set_xticks(x, models, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{r.task.iloc[0] if len(r) else ''}: trained on {d}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def learning_curve_plot(rows: pd.DataFrame, metric_by_kind: Mapping[str, str] | None = None):
    """One panel per (collection, task): the task's primary test metric (mean over its labels; mean ± std over
    seeds) against the share of training groups used, one line per model (`experiments.learning_curve`)."""
    metric_by_kind = metric_by_kind or {"regression": "r2", "binary": "auc", "category": "balanced_accuracy"}
    r = rows[rows.metric == rows.label_kind.map(metric_by_kind)]
    panels = list(dict.fromkeys(zip(r.collection, r.task)))
    colour = {m: f"C{i}" for i, m in enumerate(sorted(r.model.unique()))}  # one colour per model in every panel
    fig, axes = _grid(len(panels), size=(4.2, 3.4))
    for ax, (c, t) in zip(axes, panels):
        p = r[(r.collection == c) & (r.task == t)]
        lvl = p.groupby(["model", "seed", "fraction"])["value"].mean().reset_index()
        s = lvl.groupby(["model", "fraction"], sort=False)["value"].agg(["mean", "std"]).reset_index()
        for model, g in s.groupby("model", sort=False):
            ax.errorbar(g.fraction * 100, g["mean"], yerr=g["std"].fillna(0), marker="o", capsize=3, label=model,
                        color=colour[model])
        ax.set_xticks(sorted(p.fraction.unique() * 100))
        ax.set_xlabel("training groups used (%)")
        ax.set_ylabel(p.metric.iloc[0])
        ax.set_title(f"{c} / {t}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def speed_plot(throughput: pd.DataFrame, ratios: pd.DataFrame | None = None):
    """Left: LoRAs per second against collection size, one line per model (log-log). Right (when ``ratios`` is
    given): seconds per LoRA of the standard evaluation and of a LoL prediction, per task, with the ratio."""
    plt = _plt()
    n = 2 if ratios is not None and len(ratios) else 1
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    ax = axes[0, 0]
    for model, g in throughput.groupby("model", sort=False):
        ax.plot(g.n_loras, g.loras_per_second, marker="o", label=model)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("LoRAs predicted in one call")
    ax.set_ylabel("LoRAs per second")
    ax.set_title("LoL throughput", fontsize=10)
    ax.legend(fontsize=8)
    if n == 2:
        ax = axes[0, 1]
        x = np.arange(len(ratios))
        ax.bar(x - 0.2, ratios.standard_seconds, 0.4, label="standard evaluation")
        ax.bar(x + 0.2, ratios.lol_seconds, 0.4, label="LoL prediction")
        ax.set_yscale("log")
        ax.set_xticks(x, [f"{t}\n{r:,.0f}×" for t, r in zip(ratios.task, ratios.ratio)])
        ax.set_ylabel("seconds per LoRA")
        ax.set_title("speed-up measured in one run", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def umap_panel(panels: Mapping[str, np.ndarray], color: np.ndarray | None = None, color_name: str = ""):
    """2-D embeddings side by side: ``panels`` maps a title to an (N, 2) array (same LoRAs in the same order)."""
    fig, axes = _grid(len(panels), size=(3.8, 3.6))
    for ax, (title, xy) in zip(axes, panels.items()):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=color, s=8, cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if color is not None:
        fig.colorbar(sc, ax=axes, shrink=0.8, label=color_name)
    return fig


def results_bar(summary: pd.DataFrame, metric_by_kind: Mapping[str, str] | None = None):
    """Test mean ± std over seeds of each task's primary metric, one panel per task, GL-invariant models highlighted."""
    from .experiments import MODEL_KINDS, PRIMARY_METRIC

    metric_by_kind = metric_by_kind or PRIMARY_METRIC
    tasks = list(dict.fromkeys(zip(summary.collection, summary.task)))
    fig, axes = _grid(len(tasks), size=(4.2, 3.2), ncols=3)
    for ax, (coll, task) in zip(axes, tasks):
        g = summary[(summary.collection == coll) & (summary.task == task)]
        metric = metric_by_kind[g.task_kind.iloc[0]]
        g = g[g.metric == metric].set_index("model").reindex([m for m in MODEL_KINDS if m in set(g.model)])
        colors = ["tab:blue" if inv else "tab:gray" for inv in g.gl_invariant]
        ax.bar(range(len(g)), g["mean"], yerr=g["std"].fillna(0), color=colors, capsize=2)
        ax.set_xticks(range(len(g)), g.index, rotation=60, fontsize=7)
        ax.set_title(f"{coll}/{task}", fontsize=9)
        ax.set_ylabel(f"test {metric}")
    fig.suptitle("test score, mean ± std over seeds (blue: GL-invariant)", fontsize=10)
    fig.tight_layout()
    return fig


def r2_vs_ceiling(summary: pd.DataFrame, ceilings: Mapping[tuple[str, str], Mapping[str, float]]):
    """Each model's test R² (mean ± std over seeds) on every regression task that has a measured reliability, with
    the ceiling that label noise puts on any model (test–retest r, `lol.reliability`) as a dashed line."""
    from .experiments import MODEL_KINDS

    tasks = [t for t in dict.fromkeys(zip(summary.collection, summary.task)) if t in ceilings]
    fig, axes = _grid(max(1, len(tasks)), size=(4.2, 3.2), ncols=3)
    for ax, (coll, task) in zip(axes, tasks):
        g = summary[(summary.collection == coll) & (summary.task == task) & (summary.metric == "r2")]
        g = g.set_index("model").reindex([m for m in MODEL_KINDS if m in set(g.model)])
        colors = ["tab:blue" if inv else "tab:gray" for inv in g.gl_invariant]
        ax.bar(range(len(g)), g["mean"], yerr=g["std"].fillna(0), color=colors, capsize=2)
        c = ceilings[(coll, task)]["r2_ceiling"]
        ax.axhline(c, color="tab:red", ls="--", lw=1.2, label=f"ceiling (test–retest r) {c:.3f}")
        ax.set_xticks(range(len(g)), g.index, rotation=60, fontsize=7)
        ax.set_ylim(min(0.0, float(np.nanmin(g["mean"])) if len(g) else 0.0), 1.0)
        ax.set_title(f"{coll}/{task}", fontsize=9)
        ax.set_ylabel("test R²")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("test R² against the label-noise ceiling (blue: GL-invariant)", fontsize=10)
    fig.tight_layout()
    return fig


def save(fig, out_dir: str | Path, name: str, html: bool = False, dpi: int = 120) -> list[Path]:
    """Write a matplotlib figure as ``<name>.png``, or a plotly figure as ``<name>.json`` (plotly JSON, which the app
    shows interactively) and, with ``html``, ``<name>.html``. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(fig, "savefig"):
        p = out / f"{name}.png"
        fig.savefig(p, dpi=dpi, bbox_inches="tight")
        _plt().close(fig)
        return [p]
    paths = [out / f"{name}.json"]
    paths[0].write_text(fig.to_json())
    if html:
        paths.append(out / f"{name}.html")
        fig.write_html(paths[-1], include_plotlyjs="cdn")
    return paths
