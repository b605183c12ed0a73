"""Ensembles of trained LoL models: the mean of several models' predictions on the same LoRAs, members chosen on
validation.

An ensemble of GL(r)-invariant models is GL(r)-invariant: each member's output is unchanged by the GL action
(U, V) ↦ (U R, V R⁻ᵀ), so their mean is too. Choose members among `lol.experiments.gl_invariant` kinds to keep that.

Works on the tidy predictions of `lol.experiments.run_grid` (``Grid.predictions``: one row per collection, task,
model, seed, LoRA ``id``, ``split``, label, true ``y`` and ``pred``: the label's value for a regression label, the
probability for a binary one). A grid's seed fixes the split, so the models of one seed saw the same training LoRAs and
are averaged seed by seed.

* `average`: the members' mean prediction per (seed, LoRA, label); a member named twice counts twice (a weight).
* `select_members`: greedy forward selection with replacement (Caruana et al., ICML 2004): start from the best single
  model on validation, add whichever candidate most raises the validation score of the average, stop when none does.
  The score is a task's primary metric (`lol.experiments.PRIMARY_METRIC`), averaged over its labels, then over seeds;
  the first member is thus the best single model on validation.
* `ensemble_runs`: metric rows of the ensemble in `run_grid`'s format (model ``"ensemble"``), every seed and split,
  so `lol.experiments.summarize` scores it beside the single models.
* `ensemble_table`: per task, the members chosen on validation, and on test the ensemble beside the best single model
  (also chosen on validation).
* `count_present`: the number of a LoRA's binary labels predicted present (probability ≥ 0.5): for a membership task,
  the size of the finetuning set counted class by class (the paper's Table 4 quantity, read off membership outputs);
  `count_scores` and `count_score` score that count (accuracy, balanced accuracy, within one).

* `ship_ensemble`: the members of the best validation seed written as one checkpoint, their selection recorded.
* `ensemble_checkpoint`: trained checkpoints of one task and one split assembled into one checkpoint of kind
  ``ensemble`` (`lol.models.Ensemble`), which `lol predict`, the app and `lol.checkpoint.load_checkpoint` read like
  any model; its metrics are computed by running it on the collection's splits.
* `count_checkpoint`: membership checkpoints (one, or several averaged as an ensemble) as one checkpoint of kind
  ``count`` (`lol.models.Count`) for a label that is, on every LoRA, the number of membership labels present (fashion:
  ``n_classes``, the dataset size); `ship_count` chooses its members on the count's validation score, within a byte
  budget, and writes it only where it beats what ships.

Only validation scores choose anything; test scores are reported, never used to select.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from . import metrics as M
from .errors import LoLError
from .labels import infer_kind

__all__ = ["ENSEMBLE", "average", "task_score", "select_members", "ensemble_runs", "ensemble_table", "count_present",
           "count_scores", "count_score", "nearest_class", "ship_ensemble", "ensemble_checkpoint", "counted_label",
           "count_checkpoint", "ship_count"]

ENSEMBLE = "ensemble"   # the model name of an ensemble's rows
_KEYS = ["collection", "task", "seed", "split", "id", "label"]


def _task(pred: pd.DataFrame) -> pd.DataFrame:
    """``pred`` must hold one collection and task (an ensemble averages models of one task)."""
    tasks = pred[["collection", "task"]].drop_duplicates()
    if len(tasks) != 1:
        raise LoLError(f"ensemble: predictions of one task expected, got {len(tasks)}: "
                       f"{[f'{c}/{t}' for c, t in tasks.itertuples(index=False)]}")
    return pred


def average(pred: pd.DataFrame, members: Sequence[str]) -> pd.DataFrame:
    """Mean ``pred`` over ``members`` (model kinds; repeats weigh more) per (seed, split, LoRA, label), on the seeds
    where every member has predictions. Columns: `_KEYS`, ``y``, ``pred``."""
    if not len(members):
        raise LoLError("ensemble: no members to average")
    p = _task(pred)
    missing = sorted(set(members) - set(p.model))
    if missing:
        raise LoLError(f"ensemble: no predictions of model(s) {missing} (models: {sorted(p.model.unique())})")
    seeds = set.intersection(*(set(p.seed[p.model == m]) for m in set(members)))
    if not seeds:
        raise LoLError(f"ensemble: models {sorted(set(members))} share no seed")
    p = p[p.seed.isin(seeds)]
    weight = pd.Series(members).value_counts()
    parts = []
    for m, w in weight.items():
        q = p[p.model == m].set_index(_KEYS)
        if q.index.duplicated().any():
            raise LoLError(f"ensemble: model {m!r} has more than one prediction per seed, LoRA and label")
        parts.append((q[["y", "pred"]], float(w)))
    index = parts[0][0].index
    for q, _ in parts[1:]:
        if len(q) != len(index) or not q.index.isin(index).all():
            raise LoLError("ensemble: the members' predictions cover different LoRAs or splits; train them with the "
                           "same seeds on the same collection (`run_grid`)")
    total = sum(w for _, w in parts)
    mean = sum(q["pred"].reindex(index) * w for q, w in parts) / total
    return pd.DataFrame({"y": parts[0][0]["y"], "pred": mean}).reset_index()


def _kind(label: str, y, kinds: Mapping[str, str] | None) -> str:
    """The label's kind: from ``kinds`` ({label: "regression" | "binary"}, e.g. a grid's ``label_kind`` column), else
    read off its values (`lol.labels.infer_kind`: 0/1 only is binary)."""
    if kinds and label in kinds:
        return kinds[label]
    return infer_kind(np.asarray(y, dtype=float))


def _primary(kind: str) -> str:
    from .experiments import PRIMARY_METRIC

    return PRIMARY_METRIC[kind]


def task_score(avg: pd.DataFrame, split: str = "val", metric: str | None = None,
               kinds: Mapping[str, str] | None = None) -> pd.Series:
    """Per seed, the task's score on ``split``: ``metric`` (default the primary metric of its labels' kind: R² for
    regression, AUC for binary; ``kinds`` as in `_kind`) of each label, averaged over labels (undefined values
    skipped)."""
    q = avg[avg.split == split]
    if q.empty:
        raise LoLError(f"ensemble: no predictions on the {split!r} split")
    out = {}
    for seed, g in q.groupby("seed"):
        vals = []
        for label, h in g.groupby("label"):
            y, p = h.y.to_numpy(float), h.pred.to_numpy(float)
            kind = _kind(label, y, kinds)
            name = metric or _primary(kind)
            ms = M.regression_metrics(y, p) if kind == "regression" else M.binary_metrics(y, p)
            if name not in ms:
                raise LoLError(f"ensemble: metric {name!r} is not one of a {kind} label's ({sorted(ms)})")
            vals.append(ms[name])
        out[seed] = float(np.nanmean(vals)) if np.isfinite(vals).any() else np.nan
    return pd.Series(out, name=metric or "score").rename_axis("seed")


def select_members(pred: pd.DataFrame, candidates: Sequence[str], metric: str | None = None,
                   max_members: int = 8, kinds: Mapping[str, str] | None = None,
                   score: Callable[[pd.DataFrame], float] | None = None, cost: Mapping[str, float] | None = None,
                   budget: float | None = None) -> list[str]:
    """Greedy forward selection with replacement on the validation split (module docstring): the members, in the
    order they were added (a kind may appear more than once). ``metric`` must be one where higher is better.
    ``score``: instead, a function of the members' `average` giving its validation score (higher is better; e.g.
    `count_score`). ``cost`` ({kind: cost, such as a checkpoint's bytes}) with ``budget``: only member sets whose
    distinct kinds cost at most ``budget`` in all (a kind picked twice is stored once)."""
    candidates = list(dict.fromkeys(candidates))
    if budget is not None:
        unknown = [c for c in candidates if cost is None or c not in cost]
        if unknown:
            raise LoLError(f"ensemble: a budget needs the cost of every candidate; none for {unknown}")
        candidates = [c for c in candidates if cost[c] <= budget]
    if not candidates:
        raise LoLError("ensemble: no candidate models"
                       + (f" within the budget {budget:g}" if budget is not None else ""))

    def val(members):
        avg = average(pred, members)
        return float(score(avg)) if score is not None else float(task_score(avg, "val", metric, kinds).mean())

    def fits(members):
        return budget is None or sum(cost[k] for k in set(members)) <= budget

    scores = {c: val([c]) for c in candidates}
    members = [max(scores, key=scores.get)]
    best = scores[members[0]]
    while len(members) < max_members:
        trial = {c: val(members + [c]) for c in candidates if fits(members + [c])}
        if not trial:
            break
        c = max(trial, key=trial.get)
        if not trial[c] > best:
            break
        members, best = members + [c], trial[c]
    return members


def ensemble_runs(pred: pd.DataFrame, members: Sequence[str], name: str = ENSEMBLE,
                  kinds: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Metric rows of the ensemble of ``members`` for every seed, split and label, in `run_grid`'s ``runs`` format
    (``model`` = ``name``, ``gl_invariant`` as given by its members; ``mse_norm`` with the training split's std of
    the label, as `lol.train` scores it)."""
    from .experiments import gl_invariant

    avg = average(pred, members)
    coll, task = pred.collection.iloc[0], pred.task.iloc[0]
    rows = []
    for (seed, label), g in avg.groupby(["seed", "label"]):
        kind = _kind(label, g.y, kinds)
        tr = g.y[g.split == "train"].to_numpy(float)
        scale = float(tr[np.isfinite(tr)].std()) if kind == "regression" and np.isfinite(tr).any() else None
        for split, h in g.groupby("split"):
            y, p = h.y.to_numpy(float), h.pred.to_numpy(float)
            ms = M.regression_metrics(y, p, scale=scale or None) if kind == "regression" else M.binary_metrics(y, p)
            rows += [{"collection": coll, "task": task, "model": name, "members": " + ".join(members),
                      "gl_invariant": all(gl_invariant(m) for m in members), "seed": int(seed), "split": split,
                      "n": len(h), "label": label, "label_kind": kind, "metric": k, "value": float(v)}
                     for k, v in ms.items()]
    return pd.DataFrame(rows)


def ensemble_table(pred: pd.DataFrame, candidates: Sequence[str], metric: str | None = None,
                   max_members: int = 8, kinds: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For every task in ``pred``: select members among ``candidates`` on validation, and on test compare the ensemble
    with the best single candidate (chosen on validation too). ``kinds``: {label: kind} (a grid's runs have them:
    ``dict(zip(runs.label, runs.label_kind))``), else read off the values. → (table: one row per task and metric,
    runs: the ensembles' `ensemble_runs`)."""
    rows, runs = [], []
    for (coll, task), p in pred.groupby(["collection", "task"]):
        cands = [c for c in candidates if c in set(p.model)]
        if not cands:
            continue
        members = select_members(p, cands, metric, max_members, kinds)
        single = members[0]                      # the best single candidate on validation (`select_members`)
        kind = "binary" if all(_kind(n, g.y, kinds) == "binary" for n, g in p.groupby("label")) else "regression"
        name = metric or _primary(kind)
        names = [name, "accuracy"] if kind == "binary" and name != "accuracy" else [name]
        for m in names:
            ens = task_score(average(p, members), "test", m, kinds)
            one = task_score(average(p, [single]), "test", m, kinds)
            gain = ens - one
            rows.append({"collection": coll, "task": task, "metric": m, "members": " + ".join(members),
                         "seeds": len(ens), "ensemble": ens.mean(), "ensemble_std": ens.std(),
                         "best_single": single, "single": one.mean(), "single_std": one.std(),
                         "gain": gain.mean(), "gain_std": gain.std()})
        runs.append(ensemble_runs(p, members, kinds=kinds))
    return pd.DataFrame(rows), (pd.concat(runs, ignore_index=True) if runs else pd.DataFrame())


def count_present(avg: pd.DataFrame, threshold: float = 0.5) -> pd.DataFrame:
    """Per (seed, split, LoRA): the true number of its binary labels that are 1 (``n``) and the number predicted
    present, probability ≥ ``threshold`` (``n_hat``). Every LoRA must have every label (a count needs them all)."""
    per = avg.assign(hat=(avg.pred >= threshold).astype(int)).groupby(["seed", "split", "id"]).agg(
        n=("y", "sum"), n_hat=("hat", "sum"), labels=("y", "size")).reset_index()
    if per.labels.nunique() != 1:
        raise LoLError(f"count_present: LoRAs have predictions for {sorted(per.labels.unique())} labels; a count "
                       f"needs every label of every LoRA")
    per["n"] = per.n.round().astype(int)
    return per.drop(columns="labels")


def nearest_class(n_hat, classes: Sequence[float] | None) -> np.ndarray:
    """Each count as the nearest of ``classes`` (the label's values, as an ordered-category label decodes,
    `lol.targets`), unchanged for None."""
    n_hat = np.asarray(n_hat, dtype=float)
    if classes is None or not len(classes):
        return n_hat
    c = np.sort(np.asarray(classes, dtype=float))
    return c[np.abs(n_hat[:, None] - c[None, :]).argmin(1)]


def count_scores(per: pd.DataFrame, classes: Sequence[float] | None = None) -> pd.DataFrame:
    """Per (seed, split) of `count_present` rows: ``loras``, ``accuracy`` (the count is the true number),
    ``balanced_accuracy`` (accuracy averaged over the true numbers), ``within_one`` and ``majority_baseline`` (always
    answering the commonest true number on that split). ``classes``: the counted label's values; a count is read as
    the nearest of them, as the ``count`` checkpoint decodes it (`nearest_class`)."""
    rows = []
    for (seed, split), g in per.groupby(["seed", "split"]):
        n_hat = nearest_class(g.n_hat, classes)
        err = np.abs(g.n.to_numpy(float) - n_hat)
        rows.append({"seed": seed, "split": split, "loras": len(g), "accuracy": float((err == 0).mean()),
                     "balanced_accuracy": M.balanced_accuracy(g.n.to_numpy(float), n_hat),
                     "within_one": float((err <= 1).mean()),
                     "majority_baseline": float(g.n.value_counts(normalize=True).iloc[0])})
    return pd.DataFrame(rows)


def count_score(avg: pd.DataFrame, classes: Sequence[float] | None = None, metric: str = "balanced_accuracy",
                split: str = "val", threshold: float = 0.5) -> pd.Series:
    """Per seed, ``metric`` (a column of `count_scores`) of the count read off averaged membership predictions
    (`average`) on ``split``; its mean is a ``score`` for `select_members`."""
    sc = count_scores(count_present(avg[avg.split == split], threshold), classes)
    if sc.empty:
        raise LoLError(f"ensemble: no predictions on the {split!r} split to count")
    return sc.set_index("seed")[metric].rename(metric)


def ship_ensemble(pred: pd.DataFrame, members: Sequence[str], models: Mapping, coll, out, metric: str | None = None,
                  kinds: Mapping[str, str] | None = None, candidates: Sequence[str] = (),
                  beat: float | None = None) -> dict | None:
    """Write the ensemble of ``members`` (chosen on validation, `select_members`) of the one task in ``pred`` as a
    checkpoint at ``out``: the members of the seed where the ensemble scores best on validation (as
    `lol.experiments.select_best` ships a single model's best validation seed), found in ``models`` (a grid's
    ``{(collection, task, kind, seed): checkpoint folder}``), assembled by `ensemble_checkpoint` with their selection
    recorded. Returns that record (collection, task, members, seed, metric, validation over seeds and at the seed,
    test at the seed). ``beat``: the mean validation score of the model shipped now; the ensemble is written only if
    its own is higher (else None, nothing written)."""
    p = _task(pred)
    c, t = p.collection.iloc[0], p.task.iloc[0]
    avg = average(p, members)
    val, test = task_score(avg, "val", metric, kinds), task_score(avg, "test", metric, kinds)
    if beat is not None and not float(val.mean()) > float(beat):
        return None
    seed = int(val.idxmax())
    missing = [k for k in members if (c, t, k, seed) not in models]
    if missing:
        raise LoLError(f"ensemble: no trained {missing} of {c}/{t} at seed {seed} to assemble")
    name = metric or val.name
    record = {"collection": c, "task": t, "members": " + ".join(members), "seed": seed, "metric": name,
              "val_mean": float(val.mean()), "val_seed": float(val[seed]), "test_seed": float(test[seed])}
    selection = {"selected_by": f"members by greedy forward selection with replacement on validation (mean {name} "
                                f"over seeds {sorted(int(s) for s in val.index)}), then the seed whose ensemble "
                                f"scores best on validation", "candidates": ", ".join(candidates), **record}
    ensemble_checkpoint([models[(c, t, k, seed)] for k in members], out, coll=coll, extra={"selection": selection})
    return record


def ship_count(pred: pd.DataFrame, candidates: Sequence[str], models: Mapping, coll, out, label: str,
               metric: str = "balanced_accuracy", cost: Mapping[str, float] | None = None,
               budget: float | None = None, beat: float | None = None, threshold: float = 0.5) -> dict:
    """Write a ``count`` checkpoint (`count_checkpoint`) for ``label`` at ``out`` from the one membership task in
    ``pred`` (a grid's predictions): members chosen among ``candidates`` by greedy selection on the validation
    ``metric`` of the count (`count_score`), within ``budget`` of ``cost`` ({kind: bytes}) if given; then the seed
    where that count scores best on validation, its members found in ``models`` (a grid's ``{(collection, task,
    kind, seed): checkpoint folder}``). ``beat``: the mean validation ``metric`` of what ships now for ``label``; the
    count is written only if its own is higher. Returns the record (members, seed, validation over seeds and at the
    seed, test at the seed and over seeds; on test over seeds also the accuracy (mean, std), within one and always
    answering the commonest number; ``beat``, and ``shipped``: whether it was written)."""
    p = _task(pred)
    c, t = p.collection.iloc[0], p.task.iloc[0]
    classes = sorted(pd.to_numeric(coll.table[label], errors="coerce").dropna().unique())
    members = select_members(p, candidates, cost=cost, budget=budget,
                             score=lambda a: float(count_score(a, classes, metric, "val", threshold).mean()))
    avg = average(p, members)
    val, test = (count_score(avg, classes, metric, split, threshold) for split in ("val", "test"))
    seed = int(val.idxmax())
    missing = [k for k in members if (c, t, k, seed) not in models]
    if missing:
        raise LoLError(f"count: no trained {missing} of {c}/{t} at seed {seed} to assemble")
    record = {"collection": c, "task": _task_of(coll, label), "label": label, "counted_from": t,
              "members": " + ".join(members), "seed": seed, "metric": metric, "val_mean": float(val.mean()),
              "val_seed": float(val[seed]), "test_seed": float(test[seed]), "test_mean": float(test.mean())}
    on_test = count_scores(count_present(avg[avg.split == "test"], threshold), classes)   # the paper's accuracy too
    record.update({"test_accuracy": float(on_test.accuracy.mean()), "test_accuracy_std": float(on_test.accuracy.std()),
                   "test_within_one": float(on_test.within_one.mean()),
                   "test_majority_baseline": float(on_test.majority_baseline.mean())})
    if budget is not None:
        record["budget"] = budget
    record["beat"] = beat
    record["shipped"] = beat is None or float(val.mean()) > float(beat)
    if not record["shipped"]:
        return record
    selection = {"selected_by": f"members by greedy forward selection with replacement on the count's validation "
                                f"{metric} (mean over seeds {sorted(int(s) for s in val.index)})"
                                + (f", its distinct members costing at most {budget:g} in all"
                                   if budget is not None else "")
                                + ", then the seed whose count scores best on validation",
                 "candidates": ", ".join(candidates), **record}
    count_checkpoint([models[(c, t, k, seed)] for k in members], out, coll, label, threshold,
                     extra={"selection": selection})
    return record


def _encoding(t) -> str:
    return "scalar" if t.scalar else ("binary" if t.kind == "binary" else "category")


def _members(members: Sequence) -> tuple[list, Counter]:
    """Load the member checkpoints (folders; one named twice weighs twice) and check that they can be combined: the same
    module spec, labels with their normalization, and recorded split (`ensemble_checkpoint`). → (checkpoints in first
    mention order, {folder: weight})."""
    from .checkpoint import load_checkpoint

    if not len(members):
        raise LoLError("ensemble: no member checkpoints")
    weight = Counter(str(Path(m)) for m in members)
    cks = [load_checkpoint(p) for p in weight]
    first = cks[0]
    labels = first.targets.to_json()

    def ids(ck):                # the recorded split by id, without its provenance fields
        return {s: ck.split.get(s) for s in ("train", "val", "test")} if ck.split else None

    split = ids(first)
    for c in cks[1:]:
        if c.spec != first.spec:
            raise LoLError(f"ensemble: {c.path} reads other modules than {first.path}")
        if c.targets.to_json() != labels:
            raise LoLError(f"ensemble: {c.path} predicts other labels (or normalizes them otherwise) than "
                           f"{first.path}: {c.labels} vs {first.labels}")
        if split is None or ids(c) != split:
            raise LoLError(f"ensemble: {c.path} was trained on another split than {first.path} (members must share "
                           f"one seed's split, recorded by id)")
    return cks, weight


def _ensemble(cks: list, weight: Counter):
    """The `Ensemble` of the checked members (`_members`): weights loaded, fitted, in eval mode."""
    from .models import Ensemble

    first = cks[0]
    outputs = [[_encoding(t), t.width] for t in first.targets.targets]
    model = Ensemble(first.spec, first.model.n_outputs,
                     [{"kind": c.kind, "hparams": c.model.config(), "weight": weight[str(c.path)]} for c in cks],
                     outputs)
    for m, c in zip(model.members, cks):
        m.load_state_dict(c.model.state_dict())
    model.fitted = True
    return model.eval()


def _member_records(cks: list, weight: Counter) -> list[dict]:
    """Per member: kind, weight, seed, best epoch and the folder it came from (relative to the repository when inside
    it, so a shipped config names no machine's paths)."""
    from .paths import REPO

    def where(p: Path) -> str:
        p = Path(p).absolute()
        return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)

    return [{"kind": c.kind, "weight": weight[str(c.path)], "from": where(c.path),
             "seed": (c.config.get("train") or {}).get("seed"), "best_epoch": c.config.get("best_epoch")} for c in cks]


def _write(model, targets, first, cks, out, coll, record: dict, half: bool, what: str) -> Path:
    """Save ``model`` (predicting ``targets``, on ``first``'s recorded split) as the checkpoint ``out``, replaced whole
    through a temporary folder; with ``coll``, its metrics are computed by running the written model on each split."""
    from .checkpoint import load_checkpoint, save_checkpoint, store_half

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    record_split = dict(first.split or {})
    if coll is not None:
        from .predict import trained_on

        if not trained_on(first.config, coll)[0]:
            raise LoLError(f"{what}: {first.path} was not trained on {coll.path} (another collection): no split "
                           f"to score it on")
        if not record_split.get("loras"):    # the same LoRAs (same fingerprint): say so, for later relabelling
            record_split["loras"] = coll.loras_fingerprint
    save_checkpoint(tmp, model, targets, fingerprint=first.config.get("fingerprint"),
                    train_config={"members": [c.config.get("train") or {} for c in cks]}, split=record_split or None,
                    extra=record)
    if half:
        store_half(tmp)
    ck = load_checkpoint(tmp)   # what is written must load; with ``coll``, the metrics are this very model's
    if coll is not None:
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["metrics"] = _split_metrics(ck, coll)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def ensemble_checkpoint(members: Sequence, out, coll=None, half: bool = True, extra: dict | None = None) -> Path:
    """Assemble the trained checkpoints ``members`` (folders; one named twice weighs twice, as `select_members`
    returns them) into one checkpoint of kind ``ensemble`` at ``out`` (replaced whole, through a temporary folder).

    The members must predict the same labels with the same normalization, over the same module spec, from the same
    recorded split (the same LoRAs trained, validated and tested on: one seed of a grid); anything else raises a
    `LoLError` naming the member and what differs. Their kinds must be GL(r)-invariant (`lol.models.Ensemble`). With
    ``coll`` (the collection they were trained on), the checkpoint's metrics are the ensemble's own on each split,
    computed by running it; without, it records none. ``half``: store the wide layers in float16 (`store_half`), as
    shipped checkpoints are, before the metrics are computed, so they are the shipped model's."""
    cks, weight = _members(members)
    first = cks[0]
    model = _ensemble(cks, weight)
    record = {k: first.config[k] for k in ("collection", "task", "rows") if k in first.config}
    record["members"] = _member_records(cks, weight)
    return _write(model, first.targets, first, cks, out, coll, {**record, **(extra or {})}, half, "ensemble")


def counted_label(coll, labels: Sequence[str]) -> list[str]:
    """The collection's labels (besides ``labels``) whose value on every LoRA is the number of ``labels`` that are 1:
    for fashion, ``n_classes`` of the membership labels."""
    table = coll.table
    missing = [n for n in labels if n not in table.columns]
    if missing:
        raise LoLError(f"{coll.path}: label column(s) {missing} missing from the table")
    present = table[list(labels)].astype(float)
    if present.isna().any().any():        # a LoRA without every label has no count
        return []
    n = present.sum(axis=1)
    return [name for name in coll.label_columns() if name not in labels and name in table.columns
            and bool((pd.to_numeric(table[name], errors="coerce") == n).all())]


def count_checkpoint(members: Sequence, out, coll, label: str | None = None, threshold: float = 0.5,
                     half: bool = True, extra: dict | None = None) -> Path:
    """A checkpoint of kind ``count`` (`lol.models.Count`) at ``out``: ``label`` (a count) predicted as the number of
    yes/no labels that trained membership checkpoints ``members`` predict present (probability ≥ ``threshold``). One
    member is counted as it is; several (one named twice weighs twice) are checked and averaged as in
    `ensemble_checkpoint`, and their ensemble is counted.

    ``coll`` is the collection they were trained on. ``label`` must be, on every LoRA of it, the number of the members'
    labels that are 1 (`counted_label`; None: the one such label, if there is exactly one), and a count
    (a regression label or an ordered category, `lol.targets`): its normalization is fitted on the members' recorded
    training split, as training would. The checkpoint keeps that split; its metrics are computed by running it."""
    from .models import Count
    from .checkpoint import recorded_split
    from .targets import TargetSet
    from .train import _resolve_data

    cks, weight = _members(members)
    first = cks[0]
    not_binary = [t.name for t in first.targets.targets if t.kind != "binary"]
    if not_binary:
        raise LoLError(f"count: {first.path} predicts labels that are not yes/no ({not_binary}); a count needs "
                       f"binary labels")
    counts = counted_label(coll, first.labels)
    if label is None:
        if len(counts) != 1:
            raise LoLError(f"count: {coll.path} has {len(counts)} labels equal to the number of {first.path}'s labels "
                           f"present ({counts}); name one with label=")
        label = counts[0]
    elif label not in counts:
        raise LoLError(f"count: {coll.path}: label {label!r} is not, on every LoRA, the number of {first.path}'s "
                       f"labels that are 1 ({', '.join(first.labels)}); counting them would not predict it")
    where = recorded_split(first.config, coll.table["id"])
    if where is None or not (where == "train").any():
        raise LoLError(f"count: {first.path} records no training split by id on {coll.path}; the count's "
                       f"normalization is fitted on it")
    _, cols, kinds, ordered, _, _ = _resolve_data(coll, [label], None, None, None)
    targets = TargetSet.fit(cols, kinds, np.flatnonzero(where == "train"), ordered=ordered)
    t = targets.targets[0]
    if not t.scalar:
        raise LoLError(f"count: label {label!r} is a {t.kind} without order; a count is a number (a regression label "
                       f"or an ordered category)")
    one = len(cks) == 1 and weight[str(first.path)] == 1
    inner = first.model.eval() if one else _ensemble(cks, weight)
    model = Count(first.spec, 1, {"kind": inner.kind, "hparams": inner.config()}, labels=len(first.labels),
                  mean=t.mean, std=t.std, threshold=threshold)
    model.member.load_state_dict(inner.state_dict())
    model.fitted = True
    model.eval()
    record = {"collection": first.config.get("collection"), "task": _task_of(coll, label),
              "counted": {"task": first.config.get("task"), "labels": list(first.labels), "kind": inner.kind,
                          "members": _member_records(cks, weight), "threshold": threshold}}
    return _write(model, targets, first, cks, out, coll, {**record, **(extra or {})}, half, "count")


def _task_of(coll, label: str) -> str | None:
    """The collection's task holding ``label`` alone or among others (None if none)."""
    return next((t for t, names in coll.tasks.items() if label in names), None)


def _split_metrics(ck, coll) -> dict:
    """{split: {label: {metric: value}}} of checkpoint ``ck`` on the LoRAs of ``coll`` its recorded split names."""
    from .checkpoint import recorded_split
    from .experiments import evaluate_rows
    where = recorded_split(ck.config, coll.table["id"])
    res = {}
    for s in ("train", "val", "test"):
        idx = np.flatnonzero(where == s)
        if len(idx):
            table = coll.table.iloc[idx]
            cols = {n: table[n].to_numpy() for n in ck.labels}
            res[s] = evaluate_rows(ck.model, ck.targets, coll.batch(idx), cols)
    return res
