"""The paper's numbers as data, and ours beside them in the paper's own metrics (``results/paper_comparison.md``).

Reference: Putterman et al., arXiv 2410.04207, first public version, as summarized in ``docs/paper.md`` §4 and issue
12. Tables 2–5 and Figure 4 of the paper; the table numbers other than Table 4 (dataset size, named in issue 12) are
our reading of the paper's order and are recorded here as ``paper_ref`` for orientation only. Percentages are stored
as fractions (91.3 % → 0.913), like every metric of ours.

`paper_comparison` takes the tidy ``runs`` table of `lol.experiments.run_grid` (and its ``predictions`` for the
normalized test MSE) and gives one row per (paper table, task, metric): the paper's GL-net and best other model, ours
for GL-net and for the best other model (chosen on **validation**, as everything here), which of ours is best, GL-net's
place among ours on test, every model's test mean (``ours_test``, JSON), and an empty ``why`` column for measured
notes. The metrics:

* ``mse_norm``: test MSE of the regression target z-scored with the **training split's** mean and std (population
  std, as `lol.targets.TargetSet.fit`), i.e. the loss the models were trained on; the trainer records it
  (`lol.metrics.mse_norm`), and for runs recorded before it did, it is computed from their per-LoRA predictions
  (train rows give the statistics);
* ``kendall`` (τ-b) and ``r2`` (the coefficient of determination; the paper's "R²" may be a correlation, see
  ``docs/paper.md``);
* ``accuracy``: for binary tasks (attributes, membership) the mean over labels of the per-label accuracy at 0.5, for
  a category task (dataset size) the accuracy;
* ``auc`` and ``tpr_at_1pct_fpr`` for membership where we report them (the paper has no number: its columns are NaN).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from . import metrics as M

__all__ = ["PAPER", "PAPER_FIGURE4", "PAPER_MODELS", "PAPER_SIZES", "DEFAULT_TASKS", "mse_norm_rows", "paper_comparison",
           "explain_gaps", "keep_why", "read_paper_comparison", "figure4_ours", "write_paper_comparison"]

# the paper's model families → our model kinds
PAPER_MODELS = {"MLP": "mlp", "O-Align": "oalign", "SVD": "svals", "Dense": "dense", "GL-net": "glnet"}

_T2 = ("Table 2", "CelebA-LoRA CLIP score")
_T3a = ("Table 3", "CelebA-LoRA 5 attributes")
_T3b = ("Table 3", "Imagenette-LoRA class membership")
_T4 = ("Table 4", "Imagenette-LoRA dataset size (number of classes)")
_T5 = ("Table 5", "Qwen2-ARC-LoRA")


def _row(ref, key, metric, higher, values, what=""):
    return {"paper_ref": ref[0], "paper_task": ref[1] + (f": {what}" if what else ""), "key": key, "metric": metric,
            "higher_is_better": higher, "paper": dict(zip(("mlp", "oalign", "svals", "dense", "glnet"), values))}


# (paper ref, our task key, metric, higher is better, paper values for MLP, O-Align, SVD, Dense, GL-net)
PAPER: list[dict] = [
    _row(_T2, "clip_score", "mse_norm", False, (.988, .175, .148, .169, .111)),
    _row(_T2, "clip_score", "kendall", True, (.226, .654, .667, .677, .695)),
    _row(_T2, "clip_score", "r2", True, (.333, .856, .863, .871, .884)),
    _row(_T3a, "attributes", "accuracy", True, (.724, .872, .773, .891, .913), "mean per-label accuracy"),
    _row(_T3b, "membership", "accuracy", True, (.496, .878, .656, .889, .904), "mean per-label accuracy"),
    _row(_T3b, "membership", "auc", True, (math.nan,) * 5, "mean per-label AUC (ours only)"),
    _row(_T3b, "membership", "tpr_at_1pct_fpr", True, (math.nan,) * 5, "TPR at 1% FPR (ours only)"),
    _row(_T4, "dataset_size", "accuracy", True, (.209, .352, .731, .316, .468)),
    _row(_T5, "lm_membership", "accuracy", True, (.516, .550, .551, .625, .605), "source membership"),
    _row(_T5, "lm_membership", "auc", True, (math.nan,) * 5, "source membership AUC (ours only)"),
    _row(_T5, "lm_membership", "tpr_at_1pct_fpr", True, (math.nan,) * 5, "source membership TPR at 1% FPR (ours only)"),
    _row(_T5, "eval_loss", "r2", True, (.113, .821, .999, .987, .998), "finetuning validation loss"),
    _row(_T5, "challenge_accuracy", "r2", True, (.107, .965, .983, .981, .987), "ARC-C test accuracy"),
]

# Figure 4: CelebA attributes, trained on rank 4, BCE test loss at each test rank (lower is better). Dense is given
# in docs/paper.md only as its range over the ranks (.424 at rank 1 to .328); SVD as .571–1.01 (does not transfer)
PAPER_FIGURE4 = pd.DataFrame({
    "rank": [1, 2, 4, 8, 16, 32],
    "glnet": [.418, .335, .323, .324, .317, .284],
    "dense": [.424, math.nan, math.nan, math.nan, math.nan, .328],
})

# our (collection, task) for each paper task key; override with ``tasks=`` where a collection names it otherwise
DEFAULT_TASKS: dict[str, tuple[str, str]] = {
    "clip_score": ("faces", "clip_score"),
    "attributes": ("faces", "attributes"),
    "membership": ("fashion", "membership"),
    "dataset_size": ("fashion", "dataset_size"),
    "lm_membership": ("lm", "membership"),
    "eval_loss": ("lm", "eval_loss"),
    "challenge_accuracy": ("lm", "challenge_accuracy"),
}

_KEYS = ["collection", "task", "model", "seed"]


def mse_norm_rows(predictions: pd.DataFrame, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tidy rows (as ``runs``: collection, task, model, seed, split, label, label_kind, metric, value) of ``mse_norm``
    on every split, from per-LoRA predictions (columns collection, task, model, seed, split, label, y, pred): the
    target is z-scored with the mean and population std of that run's **training** rows (std 0 → 1, as the
    training code). Runs or labels without training rows are left out (the statistics are unknown). Only labels that
    are regression labels in ``runs`` (when given) are used."""
    need = {*_KEYS, "split", "label", "y", "pred"}
    if predictions is None or not len(predictions):
        return pd.DataFrame(columns=[*_KEYS, "split", "label", "label_kind", "metric", "value"])
    missing = need - set(predictions.columns)
    if missing:
        raise ValueError(f"mse_norm_rows: predictions lack column(s) {sorted(missing)}")
    p = predictions
    if runs is not None and len(runs):
        reg = runs[runs.label_kind == "regression"][["collection", "task", "label"]].drop_duplicates()
        p = p.merge(reg, on=["collection", "task", "label"])
    out = []
    for key, g in p.groupby([*_KEYS, "label"], sort=False):
        tr = g[g.split == "train"]["y"].to_numpy(float)
        tr = tr[np.isfinite(tr)]
        if not len(tr):
            continue
        std = float(tr.std())     # population std, as the trainer's (`lol.targets`); 0 counts as 1 in M.mse_norm
        for split, s in g.groupby("split"):
            v = M.mse_norm(s["y"].to_numpy(float), s["pred"].to_numpy(float), std)
            out.append({**dict(zip([*_KEYS, "label"], key)), "split": split, "label_kind": "regression",
                        "metric": "mse_norm", "value": v})
    return pd.DataFrame(out, columns=[*_KEYS, "label", "split", "label_kind", "metric", "value"])


def _scores(runs: pd.DataFrame, predictions: pd.DataFrame | None) -> pd.DataFrame:
    """Per (collection, task, model, seed, split, metric): the mean over the task's labels."""
    cols = [*_KEYS, "split", "label", "label_kind", "metric", "value"]
    missing = set(cols) - set(runs.columns)
    if missing:
        raise ValueError(f"paper_comparison: runs lack column(s) {sorted(missing)} (expected run_grid's runs table)")
    r = runs[cols]
    if predictions is not None:     # runs recorded before the trainer recorded mse_norm: from their predictions
        have = pd.MultiIndex.from_frame(r.loc[r.metric == "mse_norm", _KEYS])
        extra = mse_norm_rows(predictions, runs)
        extra = extra[~pd.MultiIndex.from_frame(extra[_KEYS]).isin(have)]
        r = pd.concat([r, extra[cols]], ignore_index=True)
    return r.groupby([*_KEYS, "split", "metric"], dropna=False)["value"].mean().reset_index()


def _fmt(v) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def paper_comparison(runs: pd.DataFrame, predictions: pd.DataFrame | None = None,
                     tasks: Mapping[str, tuple[str, str]] | None = None,
                     rows: Sequence[dict] | None = None) -> pd.DataFrame:
    """The paper's numbers and ours side by side, one row per (paper table, task, metric); see the module docstring.

    ``runs``: `lol.experiments.run_grid`'s tidy table (``grid.runs``, or ``results/runs.csv``); ``predictions``:
    ``grid.predictions`` (all splits; needed for ``mse_norm`` unless ``runs`` has it); ``tasks``: overrides of
    `DEFAULT_TASKS`. Ours are test means over seeds; "best other" and "best" are chosen by the mean **validation**
    value of the same metric (lowest for ``mse_norm``), never on test. A paper task we did not run has empty values
    of ours and says so in ``note``; ``why`` is left empty for measured notes."""
    tasks = {**DEFAULT_TASKS, **dict(tasks or {})}
    s = _scores(runs, predictions)
    mean = s.groupby(["collection", "task", "model", "split", "metric"])["value"].agg(
        ["mean", "std", "count"]).reset_index()
    out = []
    for spec in rows or PAPER:
        coll, task = tasks.get(spec["key"], (None, None))
        metric, higher = spec["metric"], spec["higher_is_better"]
        paper = spec["paper"]
        others = {k: v for k, v in paper.items() if k != "glnet" and math.isfinite(v)}
        pick = max if higher else min
        p_other = pick(others, key=others.get) if others else None
        row = {"paper_ref": spec["paper_ref"], "paper_task": spec["paper_task"],
               "ours": f"{coll}/{task}" if coll else "", "metric": metric,
               "better": "higher" if higher else "lower",
               "paper_glnet": paper.get("glnet", math.nan),
               "paper_best_other": paper[p_other] if p_other else math.nan,
               "paper_best_other_model": p_other or "",
               "ours_glnet": math.nan, "ours_glnet_std": math.nan, "ours_best_other": math.nan,
               "ours_best_other_std": math.nan, "ours_best_other_model": "", "ours_best_model": "",
               "glnet_place": math.nan, "n_models": 0, "n_seeds": 0, "ours_test": "", "note": "", "why": ""}
        have = coll is not None and (coll, task) in set(zip(s.collection, s.task))
        if not have:
            row["note"] = f"no runs of {coll}/{task}" if coll else "no task of ours is mapped to this paper task"
            out.append(row)
            continue
        sel = mean[(mean.collection == coll) & (mean.task == task) & (mean.metric == metric)]
        test = sel[sel.split == "test"].set_index("model")
        val = sel[sel.split == "val"].set_index("model")["mean"].dropna()
        if test.empty:
            row["note"] = f"no {metric} in our runs of {coll}/{task}"
            out.append(row)
            continue
        row["n_models"], row["n_seeds"] = int(test["mean"].notna().sum()), int(test["count"].max())
        row["ours_test"] = json.dumps({m: round(float(v), 6) for m, v in test["mean"].dropna().items()}, sort_keys=True)
        if "glnet" in test.index:
            row["ours_glnet"], row["ours_glnet_std"] = float(test.loc["glnet", "mean"]), float(test.loc["glnet", "std"])
            t = test["mean"].dropna()
            if "glnet" in t.index:  # GL-net's metric can be undefined (NaN, e.g. one class only in a tiny test split)
                row["glnet_place"] = int((t > t["glnet"]).sum() + 1) if higher else int((t < t["glnet"]).sum() + 1)
        val_other = val.drop("glnet", errors="ignore")
        if len(val_other):
            bo = val_other.idxmax() if higher else val_other.idxmin()
            row["ours_best_other_model"] = bo
            row["ours_best_other"], row["ours_best_other_std"] = (float(test.loc[bo, "mean"]),
                                                                  float(test.loc[bo, "std"])) if bo in test.index \
                else (math.nan, math.nan)
        if len(val):
            row["ours_best_model"] = val.idxmax() if higher else val.idxmin()
        else:
            row["note"] = f"no validation {metric}: best not chosen"
        out.append(row)
    return pd.DataFrame(out)


# LoRAs in the paper's collections, by our collection that stands for each (issue 12)
PAPER_SIZES = {"faces": 3900, "fashion": 2046, "lm": 2000}
CURVE_METRIC = {"regression": "r2", "binary": "auc", "category": "balanced_accuracy"}  # a learning curve's metric


def figure4_ours(rank_runs: pd.DataFrame, collection: str = "faces", task: str = "attributes",
                 train_rank: int = 4) -> pd.DataFrame:
    """Our Figure 4 from `lol.experiments.rank_generalization`'s tidy rows (``results/rank_generalization_runs.csv``):
    the test BCE loss (mean over the task's labels, then over seeds) of each model trained on ``train_rank``, at each
    evaluation rank: columns ``rank`` and one per model (GL-net and Dense first, as in the paper). Runs made before
    binary metrics recorded ``bce`` give an empty table (rerun notebook 05)."""
    r = rank_runs[(rank_runs.collection == collection) & (rank_runs.task == task) & (rank_runs.metric == "bce")
                  & (rank_runs.train_rank == train_rank)]
    if r.empty:
        return pd.DataFrame(columns=["rank"])
    per_seed = r.groupby(["model", "seed", "eval_rank"])["value"].mean()
    wide = per_seed.groupby(["model", "eval_rank"]).mean().unstack("model")
    order = [m for m in ("glnet", "dense") if m in wide.columns] + sorted(c for c in wide.columns
                                                                       if c not in ("glnet", "dense"))
    return wide[order].rename_axis(index="rank", columns=None).reset_index()


def _ours(r) -> list[float]:
    """This row's values of ours (GL-net, best other model) that were measured."""
    return [v for v in (r["ours_glnet"], r["ours_best_other"]) if pd.notna(v)]


def _short_of_paper(r) -> bool:
    """Whether our best of GL-net and the best other model falls short of the paper's best in this row's metric."""
    ours = _ours(r)
    paper = [v for v in (r["paper_glnet"], r["paper_best_other"]) if pd.notna(v)]
    if not ours or not paper:
        return False
    return max(ours) < max(paper) if r["better"] == "higher" else min(ours) > min(paper)


def _ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, …, 11th, 12th, 13th, 21st."""
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def explain_gaps(table: pd.DataFrame, ceilings: Mapping[tuple[str, str], Mapping] | None = None,
                 curves: pd.DataFrame | None = None, sizes: Mapping[str, int] | None = None,
                 search: pd.DataFrame | None = None,
                 counted: Mapping[str, pd.DataFrame] | None = None,
                 averaged: pd.DataFrame | None = None,
                 tuned: pd.DataFrame | None = None,
                 labels: pd.DataFrame | None = None,
                 tails: pd.DataFrame | None = None,
                 shipped_counts: pd.DataFrame | None = None) -> pd.DataFrame:
    """``table`` (`paper_comparison`) with its ``why`` column filled, for every row where ours falls short of the
    paper, from measurements only:

    * ``ceilings`` (`lol.reliability.task_ceilings`: ``{(collection, task): {"r", "n", ...}}``): for a regression
      task, the ceiling the label's own noise puts on R² (the test–retest correlation r);
    * ``curves`` (`lol.experiments.learning_curve`'s tidy rows, ``results/learning_curves_runs.csv``): for the task,
      the curve of the model best at 100 % of the training groups, in the curve's metric (mean over labels and
      seeds), from 50 % to 100 %, and whether it still rises by more than its seeds' std at 100 %;
    * ``sizes`` (LoRAs in each of our collections): against the paper's (`PAPER_SIZES`);
    * ``search`` (`lol.experiments.best_setting` of a `lol.experiments.hparam_search`): per model searched on the
      task, how many settings were tried, the one chosen on validation and its test score, in the task's primary
      metric;
    * ``counted`` (``{"<collection>/<task>": rows}``, rows of `lol.figures.size_from_membership`): for a dataset-size
      task, how often counting the classes a membership model predicts present gives the exact size (the best model
      of those rows), against ours: when counting does better, the weights carry the size and the head trained on the
      size alone is what falls short.
    * ``averaged`` (`lol.experiments.averaging_gain` rows): for a regression task whose label was measured k times on
      some LoRAs, the test R² against the mean of the k of a model trained on one measurement and of one trained on
      the mean: how much of the gap averaging the label would close.

    * ``tuned`` (`lol.experiments.chosen_on_seeds` rows: GL-net's chosen setting trained on notebook 02's seeds): the
      row's metric for that setting, mean ± std over seeds on test, and the place it would take among ours (from
      ``ours_test``; the other models keep notebook 02's one setting).
    * ``labels`` (`lol.experiments.per_label_scores` rows): for a mean per-label accuracy, the label of the row's best
      model with the least gain over always answering its commonest value, and the mean accuracy over the others:
      whether one label the weights do not carry holds the mean down.
    * ``tails`` (`lol.experiments.label_tail` rows): for an R² or normalized MSE, when the label's top share of test
      LoRAs holds more than half of its test variance (a heavy tail), that share and the share of the row's best
      model's squared error those LoRAs make.
    * ``shipped_counts`` (`lol.ensemble.ship_count` records, ``results/shipped_counts.csv``): for an accuracy row of
      a task whose shipped model counts what its membership models predict present, that count's members and its
      test accuracy over seeds.

    A row where ours reaches the paper but GL-net places below second among ours (the paper has it in the top two on
    every task) gets GL-net's own search, when there is one, against the row's best model: whether a setting chosen
    on validation closes the gap.

    Rows that are not short of the paper, or with nothing measured, keep ``why`` as it was."""
    out = table.copy()
    out["why"] = out["why"].fillna("").astype(str) if "why" in out else ""
    rel = {f"{c}/{t}": (float(v["r"]), int(v["n"]), v.get("k") if v.get("method") == "repeated" else None)
           for (c, t), v in (ceilings or {}).items() if math.isfinite(float(v["r"]))}
    curve = {}
    if curves is not None and len(curves):
        c = curves[curves.metric == curves.label_kind.map(CURVE_METRIC)]
        lvl = c.groupby(["collection", "task", "metric", "model", "fraction", "seed"])["value"].mean().reset_index()
        summ = lvl.groupby(["collection", "task", "metric", "model", "fraction"])["value"].agg(["mean", "std"])
        for (coll, task, metric), g in summ.groupby(level=[0, 1, 2]):
            g = g.droplevel([0, 1, 2])
            full = g.xs(g.index.get_level_values("fraction").max(), level="fraction")["mean"].dropna()
            if full.empty:           # the metric is undefined on this test split (e.g. one class only): no curve
                continue
            top = full.idxmax()
            m = g.loc[top]
            if 0.5 in m.index and 1.0 in m.index and math.isfinite(m.loc[0.5, "mean"]):
                a, b, sd = float(m.loc[0.5, "mean"]), float(m.loc[1.0, "mean"]), float(m.loc[1.0, "std"])
                sd = sd if math.isfinite(sd) else 0.0
                trend = "still rising" if b - a > sd else "a rise within the seeds' spread" if b > a else "flat"
                curve[f"{coll}/{task}"] = (f"learning curve ({top}, {metric}) {a:.3f} → {b:.3f} from 50 % to 100 % of "
                                           f"the training groups (seeds' std {sd:.3f}): {trend}")
    averaging = {}
    for a in (averaged.itertuples() if averaged is not None else ()):
        sd = f" ± {a.gain_std:.3f}" if math.isfinite(a.gain_std) else ""
        averaging[f"{a.collection}/{a.task}"] = (
            f"trained on the mean of {a.k} measurements instead of one ({a.model}, the {a.n_loras:,} LoRAs measured "
            f"{a.k} times, {a.seeds} seeds), test R² against that mean goes {a.r2_trained_on_single:.3f} → "
            f"{a.r2_trained_on_mean:.3f} ({a.gain:+.3f}{sd})")
    searched: dict[str, dict[str, str]] = {}                     # collection/task → model → its search, in words
    if search is not None and len(search):
        for (coll, task, model), g in search.groupby(["collection", "task", "model"], sort=False):
            c = g[g.chosen].iloc[0]
            searched.setdefault(f"{coll}/{task}", {})[model] = (
                f"hyperparameter search on validation ({model}, {len(g)} settings, {c.metric}): chosen "
                f"{c.setting}, val {c.val_mean:.3f}, test {c.test_mean:.3f}")
    for i, r in out.iterrows():
        if not r["ours"]:
            continue
        if not _short_of_paper(r):
            glnet = searched.get(r["ours"], {}).get("glnet")
            if glnet and pd.notna(r["glnet_place"]) and r["glnet_place"] > 2:
                out.at[i, "why"] = "; ".join(
                    [f"GL-net places {_ordinal(int(r.glnet_place))} with notebook 02's one setting", glnet,
                     *_tuned_place(r, tuned)])
            continue
        coll = r["ours"].split("/")[0]
        parts = []
        if r["metric"] in ("r2", "kendall", "mse_norm") and r["ours"] in rel:
            v, n, k = rel[r["ours"]]
            how = f"mean of {k} measurements, {n:,} LoRAs" if k else f"test–retest r, {n} LoRAs"
            what = f"label reliability ({how}) {v:.3f}"
            parts.append(f"{what}: not the limit" if v >= 0.99 else f"{what} caps R²")
        if r["metric"] in ("r2", "kendall", "mse_norm") and r["ours"] in averaging:
            parts.append(averaging[r["ours"]])
        if r["metric"] in ("r2", "mse_norm"):
            parts += _heavy_tail(r, tails)
        if r["metric"] == "accuracy":
            parts += _weakest_label(r, labels)
        if r["ours"] in curve:
            parts.append(curve[r["ours"]])
        parts += list(searched.get(r["ours"], {}).values())
        if "glnet" in searched.get(r["ours"], {}):
            parts += _tuned_place(r, tuned)
        rows = (counted or {}).get(r["ours"])
        if rows is not None and len(rows) and r["metric"] == "accuracy":
            c = rows.loc[rows.accuracy.idxmax()]
            text = (f"counting the classes a membership model predicts present gives the exact size for "
                    f"{c.accuracy:.3f} of test LoRAs ({c.model}; within one {c.within_one:.3f}, always-the-commonest "
                    f"{c.majority_baseline:.3f})")
            parts.append(text + (": the weights carry the size; the head trained on the size alone falls short of it"
                                 if c.accuracy > max(_ours(r)) else ""))     # short of the paper: ours is measured
        if r["metric"] == "accuracy":
            parts += _shipped_count(r, shipped_counts)
        if sizes and coll in sizes and coll in PAPER_SIZES:
            parts.append(f"{sizes[coll]:,} LoRAs vs the paper's {PAPER_SIZES[coll]:,}")
        if parts:
            out.at[i, "why"] = "; ".join(parts)
    return out


def _shipped_count(r, shipped: pd.DataFrame | None) -> list[str]:
    """What ships for the task of row ``r`` when it is a count (`lol.ensemble.ship_count`), in the paper's accuracy."""
    if shipped is None or not len(shipped) or "test_accuracy" not in shipped:
        return []
    rows = shipped[(shipped.collection + "/" + shipped.task == r["ours"]) & shipped.shipped.astype(bool)
                   & shipped.test_accuracy.notna()]
    if not len(rows):
        return []
    c = rows.iloc[-1]
    budget = f" within {c.budget:g} MB" if "budget" in rows and pd.notna(c.budget) else ""
    return [f"the shipped model counts the classes its membership models predict present (count of {c.members}, "
            f"chosen on validation {c.metric}{budget}): test accuracy {c.test_accuracy:.3f} ± "
            f"{c.test_accuracy_std:.3f} over seeds, within one {c.test_within_one:.3f}"]


def _task_rows(table: pd.DataFrame, r, model: str) -> pd.DataFrame:
    """The rows of ``table`` (any table with collection, task and model columns) for the task of the
    `paper_comparison` row ``r`` and ``model``."""
    coll, task = r["ours"].split("/", 1)
    return table[(table.collection == coll) & (table.task == task) & (table.model == model)]


def _heavy_tail(r, tails: pd.DataFrame | None) -> list[str]:
    """For a `paper_comparison` R² row: when the label's top share of test LoRAs (`lol.experiments.label_tail` rows
    of the row's best model) holds more than half of the label's test variance, in words; else []."""
    if tails is None or not len(tails) or not r["ours_best_model"]:
        return []
    q = _task_rows(tails, r, r["ours_best_model"])
    q = q[q.variance_share > 0.5]
    return [f"heavy tail: the top {t.top:.0%} of test LoRAs by {t.label} (from {t.threshold:.3f}) hold "
            f"{t.variance_share:.0%} of its test variance and make {t.error_share:.0%} of {t.model}'s squared error, "
            f"so R² mostly measures how well those few (~{t.top * t.loras:.0f} per test split) are predicted"
            for t in q.itertuples()]


def _weakest_label(r, labels: pd.DataFrame | None) -> list[str]:
    """For a `paper_comparison` accuracy row: the label of the row's best model (chosen on validation) with the least
    gain over always answering its commonest value (`lol.experiments.per_label_scores` rows), in words, with the mean
    accuracy over the task's other labels; [] without such rows or with one label only."""
    if labels is None or not len(labels) or not r["ours_best_model"]:
        return []
    q = _task_rows(labels, r, r["ours_best_model"]).dropna(subset=["accuracy", "majority"])
    if len(q) < 2:
        return []
    w = q.loc[q.gain.idxmin()]
    auc = f", AUC {w.auc:.3f}" if pd.notna(w.auc) else ""
    return [f"weakest label {w.label} ({w.model}): test accuracy {w.accuracy:.3f} against {w.majority:.3f} for always "
            f"answering its commonest value{auc}; mean accuracy over its other {len(q) - 1} "
            f"label{'s' if len(q) > 2 else ''} {q[q.label != w.label].accuracy.mean():.3f}"]


def _tuned_place(r, tuned: pd.DataFrame | None) -> list[str]:
    """For a `paper_comparison` row: GL-net's chosen setting on test over notebook 02's seeds (``tuned`` rows,
    `lol.experiments.chosen_on_seeds`) in the row's metric, and the place it would take among the row's other models
    (``ours_test``), in words; [] without such rows."""
    if tuned is None or not len(tuned) or not r.get("ours_test"):
        return []
    q = _task_rows(tuned, r, "glnet")
    q = q[(q.split == "test") & (q.metric == r["metric"])]
    per_seed = q.groupby("seed")["value"].mean().dropna()
    if per_seed.empty:
        return []
    x, sd = float(per_seed.mean()), float(per_seed.std()) if len(per_seed) > 1 else math.nan
    others = {m: v for m, v in json.loads(r["ours_test"]).items() if m != "glnet" and v is not None}
    higher = r["better"] == "higher"
    place = 1 + sum((v > x) if higher else (v < x) for v in others.values())
    seeds = ", ".join(str(int(s)) for s in per_seed.index)
    pm = f" ± {sd:.3f}" if math.isfinite(sd) else ""
    return [f"GL-net with that setting on seeds {seeds}: test {r['metric']} {x:.3f}{pm}, which would place it "
            f"{_ordinal(place)} of {len(others) + 1} (the other models keep notebook 02's setting)"]


def keep_why(table: pd.DataFrame, previous: pd.DataFrame, retrained: Sequence[str]) -> pd.DataFrame:
    """``table`` with the ``why`` of ``previous`` (an earlier `paper_comparison` table with its reasons, e.g. read back
    by `read_paper_comparison`) on every row whose task (``ours``, "collection/task") is not in ``retrained``, matched
    by (paper_ref, paper_task, ours, metric). A partial rerun (notebook 02's ``tasks``) keeps the measured reasons of
    the tasks it did not touch; a retrained task's reason is left empty, since it was measured on the earlier runs
    (notebook 09 measures it again)."""
    out = table.copy()
    key = ["paper_ref", "paper_task", "ours", "metric"]
    old = previous[previous.ours.astype(str).ne("") & ~previous.ours.isin(list(retrained))]
    why = dict(zip(map(tuple, old[key].astype(str).to_numpy()), old["why"].fillna("").astype(str)))
    out["why"] = [why.get(tuple(k), "") if k[2] not in retrained else ""
                  for k in out[key].astype(str).to_numpy().tolist()]
    return out


_TEXT_COLUMNS = ("paper_ref", "paper_task", "ours", "metric", "better", "paper_best_other_model",
                 "ours_best_other_model", "ours_best_model", "ours_test", "note", "why")


def read_paper_comparison(path: str | Path) -> pd.DataFrame:
    """A table written by `write_paper_comparison` (its ``.csv``), read back as `paper_comparison` made it: empty
    text cells as "" (not NaN)."""
    t = pd.read_csv(path)
    for c in _TEXT_COLUMNS:
        if c in t:
            t[c] = t[c].fillna("").astype(str)
    return t


def write_paper_comparison(table: pd.DataFrame, out_dir: str | Path, name: str = "paper_comparison",
                           figure4: pd.DataFrame | None = None) -> tuple[Path, Path]:
    """``table`` (from `paper_comparison`) as ``<out_dir>/<name>.csv`` and a Markdown page ``<name>.md``: one section
    per paper table, ``ours (± std over seeds)`` beside the paper's GL-net / best other, then Figure 4 (the paper's
    rank-generalization numbers, and ours when ``figure4`` is given: columns rank and one per model)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{name}.csv", out / f"{name}.md"
    table.to_csv(csv, index=False)

    def pm(v, sd):
        return _fmt(v) + (f" ± {_fmt(sd)}" if _fmt(sd) else "") if _fmt(v) else "–"

    lines = ["# The paper's numbers and ours", "",
             "Paper: Putterman et al., arXiv 2410.04207 (first version; tables as summarized in docs/paper.md). Ours: "
             "test mean ± std over seeds. *best other* is the best non-GL-net model (paper: on test as published; "
             "ours: chosen on validation). *GL-net place*: GL-net's rank among our models on test (1 = best). "
             "Fractions, not percent. `mse_norm`: test MSE of the target z-scored with training-split statistics.",
             ""]
    head = ["paper task", "ours", "metric", "paper GL-net", "paper best other", "ours GL-net",
            "ours best other", "ours best (val)", "GL-net place", "note", "why"]
    for ref, g in table.groupby("paper_ref", sort=False):
        lines += [f"## {ref}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in g.itertuples(index=False):
            place = f"{int(r.glnet_place)}/{r.n_models}" if _fmt(float(r.glnet_place)) else ""
            best_other = (f"{_fmt(r.paper_best_other)} ({r.paper_best_other_model})"
                          if r.paper_best_other_model else "–")
            ours_other = (f"{pm(r.ours_best_other, r.ours_best_other_std)} ({r.ours_best_other_model})"
                          if r.ours_best_other_model else "–")
            cells = [r.paper_task, r.ours or "–", f"{r.metric} ({r.better} is better)", _fmt(r.paper_glnet) or "–",
                     best_other, pm(r.ours_glnet, r.ours_glnet_std), ours_other, r.ours_best_model or "–", place,
                     r.note, r.why]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    ours = figure4.set_index("rank") if figure4 is not None else pd.DataFrame()
    head = ["rank", "paper GL-net", "paper Dense", *(f"ours {c}" for c in ours.columns)]
    lines += ["## Figure 4 (rank generalization, CelebA attributes, trained on rank 4, BCE test loss)", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in PAPER_FIGURE4.itertuples(index=False):
        cells = [str(r.rank), _fmt(r.glnet) or "–", _fmt(r.dense) or "–"]
        cells += [_fmt(float(ours.loc[r.rank, c])) or "–" if r.rank in ours.index else "–" for c in ours.columns]
        lines.append("| " + " | ".join(cells) + " |")
    md.write_text("\n".join(lines) + "\n")
    return csv, md
