"""Experiment runner: model × task × seed grids on packed collections → one tidy table; results tables; the shipped
best checkpoint per task.

* `task_refs` lists the tasks a grid runs (the collections' own `Collection.tasks`; `DEFAULT_TASKS` picks the paper's
  ones) and which rows each uses: a collection with mixed ranks is restricted to its most common rank, since the
  flatten MLP needs one rank (`main_rows`); `rank_generalization` uses the other ranks.
* `run_grid` trains every (task, model, seed) with `lol.train.train` (grouped, seeded splits: the seed changes both the
  split and the initialization, so the seed spread includes split variance), and returns `Grid`: ``runs`` (one row per
  task, model, seed, split, label, metric), ``predictions`` (one row per LoRA, label and run) and the trained models.
  With ``runs_dir`` every finished run is stored (checkpoint + rows) and skipped when the grid is run again.
* `summarize` averages label metrics per task, then mean ± std over seeds; `results_table` / `write_table` give the
  paper-style table (CSV + Markdown); `compare_to_baseline` states, per task, whether the best GL-invariant model
  (chosen on validation) beats the flatten MLP on test by more than the seed spread.
* `hparam_search` + `best_setting`: a grid of training settings for one model kind on one task, on `run_grid`'s
  splits, chosen on validation (the measured answer to "was it the hyperparameters?"); `chosen_on_seeds` trains the
  chosen setting on every seed of the grid, so its test score over seeds stands beside the other models'.
* `select_best` + `write_checkpoints` pick, among GL(r)-invariant kinds, the one with the best mean validation score
  and its best seed, and write ``<root>/<collection>/<task>/`` plus ``<root>/index.json`` ({label: folder}) for
  ``lol predict --task``.

Only validation scores choose anything; test scores are reported, never used to select.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import threading
import time
import types
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import LoLError
from .models import MODELS, gl_invariant as _gl_invariant

__all__ = ["MODEL_KINDS", "BASELINE", "DEFAULT_TASKS", "PRIMARY_METRIC", "TaskRef", "Grid", "gl_invariant",
           "rank_agnostic", "task_digest", "adopt_runs", "ship_tuned", "main_rows", "main_row_indices", "task_refs", "task_data", "run_grid", "task_scores", "summarize", "per_label_scores", "label_tail", "compare_summaries",
           "results_table", "write_table", "compare_to_baseline", "select_best", "write_checkpoints", "retrain_checkpoints",
           "evaluate_rows", "rank_generalization", "learning_curve", "label_averaging", "averaging_gain", "hparam_search", "in_workers", "best_setting", "chosen_on_seeds", "base_transfer", "primary_metric", "load_grid", "splice_runs", "finished_run", "FinishedRun",
           "write_results_readme"]

MODEL_KINDS: tuple[str, ...] = tuple(MODELS)
BASELINE = "mlp"
# the paper's tasks of each default collection; a collection not listed runs all of its tasks
DEFAULT_TASKS: dict[str, tuple[str, ...]] = {
    "faces": ("clip_score", "attributes"),
    "fashion": ("membership", "dataset_size"),
    "lm": ("challenge_accuracy", "eval_loss", "membership"),
}
# the task-level score used to select models (higher is better), by label kind
PRIMARY_METRIC = {"regression": "r2", "binary": "auc", "category": "balanced_accuracy"}


def gl_invariant(kind: str) -> bool:
    """True for model kinds invariant to GL(r) (by construction or by canonicalization), not only O(r)."""
    return _gl_invariant(kind)


def rank_agnostic(kind: str) -> bool:
    """Kinds that read LoRAs of ranks other than the training rank: any rank (``glnet``, ``dense``, ``colspace``) or,
    when built with ``rank=R``, any rank ≤ R zero-padded (``svals``, ``canon_mlp``, ``canon_transformer``,
    ``colsketch``)."""
    return bool(MODELS[kind].rank_agnostic)


@dataclass(frozen=True)
class TaskRef:
    """One task of one collection, on the rows selected by ``where`` ({column: value}; None = all rows)."""

    collection: str
    task: str
    where: tuple = ()          # sorted (column, value) pairs (hashable)

    @property
    def name(self) -> str:
        return f"{self.collection}/{self.task}"

    @property
    def filter(self) -> dict:
        return dict(self.where)


def main_rows(coll) -> dict:
    """``{}`` when every LoRA of ``coll`` has one rank in every module; else ``{"rank": R}`` for the most common rank
    R (needs a ``rank`` column, as zoo collections have)."""
    ranks = coll.ranks
    if len(torch.unique(ranks)) <= 1:
        return {}
    if "rank" not in coll.table.columns:
        raise LoLError(f"{coll.path}: LoRAs have mixed ranks and the table has no 'rank' column to select one")
    return {"rank": int(coll.table["rank"].mode().iloc[0])}


def main_row_indices(coll) -> np.ndarray:
    """Row numbers of the LoRAs the tasks train on (`main_rows`): every row of a one-rank collection."""
    return _rows(coll, main_rows(coll))


def task_refs(collections: Mapping, tasks: Mapping[str, Sequence[str]] | None = None) -> list[TaskRef]:
    """The tasks to run: ``tasks[name]`` (default `DEFAULT_TASKS`, else every task) of each collection, each on
    `main_rows`. Unknown task names given in ``tasks`` raise, naming the collection's tasks; a default task that a
    collection lacks (e.g. ``dataset_size`` of a fashion collection built before it had that label) is left out."""
    out = []
    for name, coll in collections.items():
        want = (tasks or {}).get(name)
        if not want:
            want = tuple(t for t in DEFAULT_TASKS.get(name, ()) if t in coll.tasks) or tuple(coll.tasks)
        bad = [t for t in want if t not in coll.tasks]
        if bad:
            raise LoLError(f"collection {name!r} ({coll.path}) has no task(s) {bad}; tasks: {list(coll.tasks)}")
        where = tuple(sorted(main_rows(coll).items()))
        out += [TaskRef(name, t, where) for t in want]
    return out


def _rows(coll, where: Mapping) -> np.ndarray:
    mask = np.ones(len(coll), dtype=bool)
    for col, val in where.items():
        if col not in coll.table.columns:
            raise LoLError(f"{coll.path}: no column {col!r} to select rows by")
        mask &= (coll.table[col] == val).to_numpy()
    idx = np.nonzero(mask)[0]
    if len(idx) == 0:
        raise LoLError(f"{coll.path}: no LoRA matches {dict(where)}")
    return idx


def task_data(coll, task: str, where: Mapping | None = None, dtype=torch.float32):
    """(batch, {label: values}, {label: kind}, table) of ``task`` on the rows matching ``where``."""
    idx = _rows(coll, where or {})
    labels = coll.label_columns(task)
    table = coll.table.iloc[idx].reset_index(drop=True)
    kinds = {n: coll.labels[n]["kind"] for n in labels}
    return coll.batch(idx, dtype=dtype), {n: table[n].to_numpy() for n in labels}, kinds, table


def primary_metric(kinds: Iterable[str]) -> str:
    """The metric that scores a task with labels of these kinds (higher is better; see `PRIMARY_METRIC`)."""
    return PRIMARY_METRIC[_task_kind(kinds)]


def _task_kind(kinds) -> str:
    """The label kind whose primary metric scores a task (for a task mixing kinds: binary, then category)."""
    return sorted(set(kinds))[0]


# ---------------------------------------------------------------------------------------------------------------------
# the grid

@dataclass
class Grid:
    runs: pd.DataFrame                      # tidy metrics
    predictions: pd.DataFrame               # tidy predictions (regression and binary labels)
    models: dict = field(default_factory=dict)   # (collection, task, model, seed) → TrainResult or checkpoint path
    failures: list = field(default_factory=list)  # (collection, task, model, seed, error message)


def _metric_rows(ref: TaskRef, kind: str, seed: int, res, kinds: dict, n_split: dict) -> list[dict]:
    base = {"collection": ref.collection, "task": ref.task, "model": kind, "invariant_to": MODELS[kind].invariant_to,
            "gl_invariant": gl_invariant(kind), "seed": seed, "rows": json.dumps(ref.filter),
            "best_epoch": res.best_epoch, "epochs_run": len(res.history), "seconds": round(res.seconds, 2),
            "val_loss": min(h["val_loss"] for h in res.history)}
    out = []
    for split, per_label in res.metrics.items():
        for label, ms in per_label.items():
            for metric, value in ms.items():
                out.append({**base, "split": split, "n": n_split[split], "label": label, "label_kind": kinds[label],
                            "metric": metric, "value": float(value) if value is not None else math.nan})
    return out


def _prediction_rows(ref: TaskRef, kind: str, seed: int, res, cols: dict, kinds: dict) -> pd.DataFrame:
    p = res.predictions
    parts = []
    for label, k in kinds.items():
        if k == "category":
            continue
        parts.append(pd.DataFrame({"collection": ref.collection, "task": ref.task, "model": kind, "seed": seed,
                                   "id": p["id"].to_numpy() if "id" in p else np.arange(len(p)),
                                   "split": p["split"].to_numpy(), "label": label,
                                   "y": pd.to_numeric(pd.Series(cols[label]), errors="coerce").to_numpy(float),
                                   "pred": p[label].to_numpy(float)}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _run_dir(runs_dir, ref: TaskRef, kind: str, seed: int) -> Path:
    return Path(runs_dir) / ref.collection / ref.task / kind / f"seed{seed}"


def task_digest(coll, ref: TaskRef) -> str:
    """SHA-256 of what a run of ``ref`` reads from ``coll``'s table besides the LoRAs themselves: the rows it selects,
    its labels' values and schema, and the columns its split is made from (``group``, ``split``)."""
    import hashlib

    idx = _rows(coll, ref.filter)
    names = coll.label_columns(ref.task)
    cols = [c for c in (*names, "group", "split") if c in coll.table.columns]
    h = hashlib.sha256(json.dumps({"rows": idx.tolist(), "columns": cols,
                                   "schema": {n: coll.labels.get(n) for n in names}}, sort_keys=True,
                                  default=str).encode())
    h.update(pd.util.hash_pandas_object(coll.table.iloc[idx][cols], index=False).to_numpy().tobytes())
    return h.hexdigest()


def _data_record(coll, ref: TaskRef) -> dict:
    """What `_cached` compares: the collection's fingerprint, its LoRAs' and the task's own data."""
    return {"fingerprint": coll.fingerprint, "loras": coll.loras_fingerprint, "task_data": task_digest(coll, ref)}


def _cached(rdir: Path, coll, ref: TaskRef, config=None) -> bool:
    """A finished run of this very data: the same collection (fingerprint), or the same LoRAs with the same rows,
    labels and split columns for this task (a label of another task re-measured, `lol zoo measure --apply`). A cached
    run of another version (rebuilt, repacked, this task's labels changed) is trained again, never reused; so is one
    of another training than ``config`` (a `TrainConfig`, seed and model hyperparameters included) when given."""
    done = rdir / "done.json"
    if not done.is_file():
        return False
    if config is not None:
        cfg_file = rdir / "checkpoint" / "config.json"
        if not cfg_file.is_file() or not _same_training(json.loads(cfg_file.read_text()).get("train", {}),
                                                        asdict(config)):
            return False
    rec = json.loads(done.read_text())
    if rec.get("fingerprint") == coll.fingerprint:
        return True
    return bool(rec.get("loras")) and rec["loras"] == coll.loras_fingerprint \
        and rec.get("task_data") == task_digest(coll, ref)


def adopt_runs(runs_dir, coll, earlier, name: str | None = None, log: Callable[[str], None] | None = print) -> int:
    """Make the stored runs of ``earlier`` (an earlier version of ``coll``, e.g. before `lol zoo measure --apply`
    re-measured a label) runs of ``coll`` wherever that is true: the same LoRAs (`Collection.loras_fingerprint`) and,
    task by task, the same rows, labels and split columns (`task_digest`). Their ``done.json`` gets ``coll``'s record
    and their checkpoint's split the LoRAs' fingerprint, so `run_grid` reuses them and a checkpoint shipped from them
    knows its LoRAs. Runs of any other version are left as they are (they train again). ``name``: the collection's
    name in ``runs_dir`` (default its folder's). Returns how many runs were adopted."""
    name = name or Path(coll.path).name
    if earlier.loras_fingerprint != coll.loras_fingerprint:
        raise LoLError(f"{earlier.path} and {coll.path} hold other LoRAs: nothing of one is a run of the other")
    adopted = 0
    for done in sorted(Path(runs_dir, name).glob("*/*/seed*/done.json")):
        rec = json.loads(done.read_text())
        cfg_file = done.parent / "checkpoint" / "config.json"
        if rec.get("fingerprint") != earlier.fingerprint or not cfg_file.is_file():
            continue
        cfg = json.loads(cfg_file.read_text())
        task = done.parent.parent.parent.name
        ref = TaskRef(name, task, tuple(sorted((cfg.get("rows") or {}).items())))
        if task not in coll.tasks or task_digest(earlier, ref) != task_digest(coll, ref):
            continue
        if isinstance(cfg.get("split"), dict):
            cfg["split"]["loras"] = coll.loras_fingerprint
            cfg_file.write_text(json.dumps(cfg, indent=1, default=str))
        done.write_text(json.dumps({**rec, **_data_record(coll, ref), "adopted_from": earlier.fingerprint}))
        adopted += 1
    if log:
        log(f"[adopt] {adopted} run(s) of {earlier.path} adopted as runs of {coll.path}")
    return adopted


def _train_record(c: Mapping) -> dict:
    """A `TrainConfig` record (``asdict``) as JSON values, every field but ``progress`` (which only prints): what a
    stored run is compared by."""
    return {k: v for k, v in json.loads(json.dumps(dict(c), default=str)).items() if k != "progress"}


def _same_training(a: Mapping, b: Mapping) -> bool:
    """Two `TrainConfig` records (``asdict``, as JSON) that train the same model: every field but ``progress``."""
    return _train_record(a) == _train_record(b)


@dataclass(frozen=True)
class FinishedRun:
    """A `run_grid` run found by `finished_run`: its folder, its checkpoint's ``config.json`` record, and the split it
    recorded for the asked ids (None when no ids were asked)."""
    path: Path
    record: dict
    split: np.ndarray | None = None


def finished_run(runs_dir, coll, task: str, where: Mapping, kind: str, config, ids=None,
                 split=None) -> FinishedRun | None:
    """The `run_grid` run stored in ``runs_dir`` that is exactly this training — the same version of ``coll``
    (fingerprint), rows ``where``, task, model kind and `TrainConfig` (seed and model hyperparameters included) — or
    None. With ``ids``, also its recorded split of those LoRA ids, which must name every one of them (and equal
    ``split`` when given): a run trained on another split is another training. `learning_curve` at 100 % of the
    training groups and `rank_generalization` on the main rank are such trainings: they read the run's metrics or
    checkpoint instead of training it again. One read of the run's record serves every check."""
    from .checkpoint import recorded_split

    if runs_dir is None:
        return None
    ref = TaskRef(Path(coll.path).name, task, tuple(sorted(dict(where).items())))
    rdir = _run_dir(runs_dir, ref, kind, int(config.seed))
    cfg_file = rdir / "checkpoint" / "config.json"
    if not (cfg_file.is_file() and _cached(rdir, coll, ref)):
        return None
    rec = json.loads(cfg_file.read_text())
    rows = json.loads(json.dumps(dict(where), default=int))
    if rec.get("rows") != rows or not _same_training(rec.get("train", {}), asdict(config)):
        return None
    stored = None
    if ids is not None:
        stored = recorded_split(rec, ids)
        if stored is None or (stored == "").any():
            return None
        if split is not None and not (stored == np.asarray(split, dtype=object)).all():
            return None
    return FinishedRun(rdir, rec, stored)


def _worker_start(parent: int, poll: float = 1.0) -> None:
    """Initializer of every `in_workers` process: one torch thread, and a daemon thread that ends this worker when
    its parent is gone. A parent killed by a signal (``pkill``, ``kill -9``, a closed terminal) runs no clean-up, so
    without this its workers would keep computing, and a rerun's workers would write the same files beside them. The
    worker sees its parent die as a change of ``os.getppid()`` (it is re-parented), checked every ``poll`` seconds:
    portable, and it does not depend on which parent thread spawned it (Linux's ``PR_SET_PDEATHSIG`` does)."""
    torch.set_num_threads(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(3)                          # files are written atomically (`lol.paths`), so nothing is left half

    threading.Thread(target=watch, name="lol-parent-watch", daemon=True).start()


@contextlib.contextmanager
def _plain_main():
    """A spawned worker first re-imports its parent's ``__main__`` (by module name or file path). Under Streamlit that
    is the page script (its script runner installs a fake ``__main__``), and under other hosts any script: nothing a
    worker should run. The workers need only lol's module-level functions, so while they start, ``__main__`` is an
    empty module (no name, no file) and they import nothing of the caller's."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def in_workers(fn: Callable, calls: Sequence[tuple], workers: int = 1) -> list:
    """``[fn(*args) for args in calls]``, run by ``workers`` spawned processes with one torch thread each (the fast way
    to use several cores for many small models: one process per core, not one process with several threads). ``fn``
    must be a module-level function and its arguments picklable (pass a collection's path, not the collection).
    Results come back in the order of ``calls``; ``workers <= 1`` runs them here, in order."""
    if workers <= 1 or len(calls) <= 1:
        return [fn(*a) for a in calls]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(int(workers), len(calls)), mp_context=mp.get_context("spawn"),
                             initializer=_worker_start, initargs=(os.getpid(),)) as ex:
        with _plain_main():                  # workers are spawned as the calls are submitted
            futures = [ex.submit(fn, *a) for a in calls]
        return [f.result() for f in futures]


def _grid_unit(paths: dict, ref: TaskRef, kind: str, seed: int, config, hparams, runs_dir: str) -> list:
    """One (task, kind, seed) run of `run_grid` in a worker: trained and stored in ``runs_dir``; returns failures."""
    from .collection import open_collection

    colls = {ref.collection: open_collection(paths[ref.collection])}
    return run_grid(colls, [ref], [kind], [seed], config, hparams, runs_dir, errors="record", log=None).failures


def run_grid(collections: Mapping, refs: Sequence[TaskRef] | None = None, models: Sequence[str] = MODEL_KINDS,
             seeds: Sequence[int] = (0, 1, 2), config=None, hparams: Mapping[str, dict] | None = None,
             runs_dir: str | Path | None = None, errors: str = "raise",
             log: Callable[[str], None] | None = print, workers: int = 1) -> Grid:
    """Train every model kind in ``models`` with every seed on every task of ``refs`` (default: `task_refs`).

    ``config`` is a `lol.train.TrainConfig` (its ``seed`` and ``model`` fields are set per run); ``hparams`` maps a
    kind to extra model hyperparameters. ``errors="record"`` keeps going when a run fails and lists it in
    ``Grid.failures``; ``"raise"`` stops. With ``runs_dir``, each finished run is saved there (checkpoint, metric
    rows, predictions) and reused, not retrained, when found. ``workers`` > 1 (with ``runs_dir``) trains the runs not
    stored yet in that many processes (`in_workers`), then reads them all back from ``runs_dir``: the same table."""
    from .train import TrainConfig, train

    if errors not in ("raise", "record"):
        raise ValueError(f"run_grid: errors must be 'raise' or 'record', got {errors!r}")
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise LoLError(f"unknown model kind(s) {bad}; choose from {', '.join(MODELS)}")
    config = config or TrainConfig()
    hparams = dict(hparams or {})
    refs = list(refs) if refs is not None else task_refs(collections)
    runs, preds, grid = [], [], Grid(pd.DataFrame(), pd.DataFrame())
    t_all = time.time()
    if workers > 1:
        if runs_dir is None:
            raise LoLError("run_grid: workers > 1 needs a runs_dir (the workers store their runs there)")
        paths = {name: str(c.path) for name, c in collections.items()}
        calls = [(paths, ref, kind, int(seed), config, hparams, str(runs_dir)) for ref in refs for kind in models
                 for seed in seeds if not _cached(_run_dir(runs_dir, ref, kind, seed), collections[ref.collection], ref,
                                                  replace(config, seed=int(seed), model=dict(hparams.get(kind, {}))))]
        if log and calls:
            log(f"[grid] {len(calls)} run(s) to train in {min(workers, len(calls))} worker processes")
        for failures in in_workers(_grid_unit, calls, workers):
            if failures and errors == "raise":
                raise LoLError(f"run_grid: a run failed in a worker: {failures[0]}")
            grid.failures += failures
    failed = {tuple(f[:4]) for f in grid.failures}
    for ref in refs:
        coll = collections[ref.collection]
        batch, cols, kinds, table = task_data(coll, ref.task, ref.filter)
        for kind in models:
            for seed in seeds:
                key = (ref.collection, ref.task, kind, int(seed))
                if key in failed:    # failed in a worker: recorded there, not tried again here
                    continue
                rdir = _run_dir(runs_dir, ref, kind, seed) if runs_dir is not None else None
                cfg = replace(config, seed=int(seed), model=dict(hparams.get(kind, {})))
                if rdir is not None and _cached(rdir, coll, ref, cfg):
                    runs.append(pd.read_csv(rdir / "metrics.csv"))
                    if (rdir / "predictions.parquet").is_file():
                        preds.append(pd.read_parquet(rdir / "predictions.parquet"))
                    grid.models[key] = rdir / "checkpoint"
                    continue
                try:
                    res = train(batch, cols, kind, cfg, table=table, kinds=kinds)
                except Exception as e:  # noqa: BLE001 — recorded and shown by the caller when errors="record"
                    if errors == "raise":
                        raise
                    msg = f"{type(e).__name__}: {e}"
                    grid.failures.append((*key, msg))
                    if log:
                        log(f"[grid] {ref.name} {kind} seed {seed}: FAILED {msg}")
                    continue
                res.fingerprint, res.loras_fingerprint = coll.fingerprint, coll.loras_fingerprint
                n_split = {s: int((res.split == s).sum()) for s in ("train", "val", "test")}
                rows = pd.DataFrame(_metric_rows(ref, kind, int(seed), res, kinds, n_split))
                pr = _prediction_rows(ref, kind, int(seed), res, cols, kinds)
                runs.append(rows)
                preds.append(pr)
                if rdir is not None:
                    tmp = rdir.with_name(rdir.name + ".tmp")
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                    _save(res, tmp / "checkpoint", ref)
                    rows.to_csv(tmp / "metrics.csv", index=False)
                    if len(pr):
                        pr.to_parquet(tmp / "predictions.parquet", index=False)
                    (tmp / "done.json").write_text(json.dumps({"seconds": res.seconds, **_data_record(coll, ref)}))
                    shutil.rmtree(rdir, ignore_errors=True)
                    tmp.rename(rdir)
                    grid.models[key] = rdir / "checkpoint"
                else:
                    grid.models[key] = res
                if log:
                    val = _task_value(rows, "val")
                    log(f"[grid] {ref.name} {kind} seed {seed}: val {val[0]} {val[1]:.4f}, best epoch "
                        f"{res.best_epoch}/{len(res.history)}, {res.seconds:.1f} s ({time.time() - t_all:.0f} s total)")
    grid.runs = pd.concat(runs, ignore_index=True) if runs else pd.DataFrame()
    grid.predictions = pd.concat([p for p in preds if len(p)], ignore_index=True) if any(len(p) for p in preds) \
        else pd.DataFrame()
    return grid


def _save(res, path: Path, ref: TaskRef, extra: dict | None = None) -> Path:
    from .checkpoint import save_checkpoint

    return save_checkpoint(path, res.model, res.targets, fingerprint=res.fingerprint, metrics=res.metrics,
                           train_config=asdict(res.config), split=res.split_record(),
                           extra={"best_epoch": res.best_epoch, "seconds": round(res.seconds, 2),
                                  "collection": ref.collection, "task": ref.task, "rows": ref.filter,
                                  **(extra or {})})


def _task_value(rows: pd.DataFrame, split: str) -> tuple[str, float]:
    metric = PRIMARY_METRIC[_task_kind(rows["label_kind"])]
    v = rows[(rows.split == split) & (rows.metric == metric)]["value"]
    return metric, float(v.mean()) if len(v) else math.nan


def load_grid(runs_dir: str | Path) -> Grid:
    """Every finished run stored under ``runs_dir`` (as `run_grid` writes them)."""
    runs, preds, models = [], [], {}
    for done in sorted(Path(runs_dir).glob("*/*/*/seed*/done.json")):
        d = done.parent
        m = pd.read_csv(d / "metrics.csv")
        runs.append(m)
        if (d / "predictions.parquet").is_file():
            preds.append(pd.read_parquet(d / "predictions.parquet"))
        r = m.iloc[0]
        models[(r.collection, r.task, r.model, int(r.seed))] = d / "checkpoint"
    if not runs:
        raise LoLError(f"{runs_dir}: no finished runs")
    return Grid(pd.concat(runs, ignore_index=True), pd.concat(preds, ignore_index=True) if preds else pd.DataFrame(),
                models)


def splice_runs(earlier_runs: pd.DataFrame, earlier_predictions: pd.DataFrame | None,
                runs: pd.DataFrame | None, predictions: pd.DataFrame | None = None,
                keys: Sequence[str] = ("collection", "task")) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A partial rerun put in its place: every (collection, task) that ``runs`` holds replaces that task's rows of
    the earlier tables (``results/runs.csv``, ``results/predictions_test.parquet``, or any tidy table with those
    columns, such as learning-curve or search rows), and every other task's rows are kept as they were (``runs``
    None or empty: all of them). → (runs, predictions), earlier tasks first. Notebooks 02 and 09 use it for their
    ``tasks`` parameter, so work too long for one sitting can be rerun task by task, each part committed. ``keys``:
    the columns that name a part (notebook 08's transfer rows: ``("train_collection", "task")``, so rerunning one
    pair of bases keeps the other pair's rows)."""
    keys = list(keys)
    missing = [c for c in (*keys, "model", "seed", "metric", "value") if c not in earlier_runs.columns]
    if missing:
        raise LoLError(f"splice_runs: the earlier runs table lacks column(s) {missing} (expected run_grid's runs)")
    done = pd.MultiIndex.from_frame(runs[keys]) if runs is not None and len(runs) else []

    def keep(df):
        if df is None or not len(df):
            return pd.DataFrame()
        return df[~pd.MultiIndex.from_frame(df[keys]).isin(done)]

    def join(a, b):
        parts = [df for df in (a, b) if df is not None and len(df)]
        return pd.concat(parts, ignore_index=True) if parts else (a if a is not None else pd.DataFrame())

    return join(keep(earlier_runs), runs), join(keep(earlier_predictions), predictions)


# ---------------------------------------------------------------------------------------------------------------------
# tables

def task_scores(runs: pd.DataFrame) -> pd.DataFrame:
    """One value per (collection, task, model, seed, split, metric): the mean over the task's labels that have the
    metric (NaN values, e.g. an AUC on a split with one class, are skipped). ``label_kind`` is the kind of those
    labels; ``task_kind`` the kind whose primary metric scores the task (they differ only for tasks mixing kinds)."""
    keys = ["collection", "task", "model", "gl_invariant", "seed", "split", "metric", "label_kind"]
    kinds = runs.groupby(["collection", "task"])["label_kind"].agg(_task_kind).rename("task_kind")
    out = runs.groupby(keys, dropna=False)["value"].mean().reset_index()
    return out.join(kinds, on=["collection", "task"])


def summarize(runs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Mean and std over seeds (sample std; NaN with one seed) of every task-level metric on ``split``."""
    s = task_scores(runs)
    s = s[s.split == split]
    g = s.groupby(["collection", "task", "model", "gl_invariant", "metric", "label_kind", "task_kind"])["value"]
    out = g.agg(mean="mean", std="std", n_seeds="count").reset_index()
    out.insert(0, "split", split)
    return out


def per_label_scores(runs: pd.DataFrame, predictions: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Per (collection, task, model, binary label) on ``split``, means over seeds: accuracy and AUC (from ``runs``),
    the label's positive share and the accuracy of always answering its commonest value (``majority``, from the
    true values in ``predictions``, seed by seed: each seed has its own split), and ``gain`` = accuracy − majority.
    A label whose gain is near 0 is one the weights do not carry for that model, however well the others do."""
    cols = ["collection", "task", "model", "label", "seeds", "accuracy", "auc", "positive_share", "majority", "gain"]
    r = runs[(runs.split == split) & (runs.label_kind == "binary") & runs.metric.isin(["accuracy", "auc"])]
    p = predictions[predictions.split == split]
    if r.empty or p.empty:
        return pd.DataFrame(columns=cols)
    keys = ["collection", "task", "model", "label"]
    score = r.pivot_table(index=[*keys, "seed"], columns="metric", values="value", dropna=False)
    score = score.reindex(columns=["accuracy", "auc"]).reset_index()   # an AUC undefined on every split stays NaN
    pos = p.groupby([*keys, "seed"])["y"].mean().rename("positive_share").reset_index()
    pos["majority"] = np.maximum(pos.positive_share, 1 - pos.positive_share)
    m = score.merge(pos, on=[*keys, "seed"])
    out = m.groupby(keys).agg(seeds=("seed", "nunique"), accuracy=("accuracy", "mean"), auc=("auc", "mean"),
                              positive_share=("positive_share", "mean"), majority=("majority", "mean")).reset_index()
    out["gain"] = out.accuracy - out.majority
    return out[cols]


def label_tail(predictions: pd.DataFrame, top: float = 0.1, split: str = "test") -> pd.DataFrame:
    """Per (collection, task, model, regression label) on ``split``, means over seeds: of the LoRAs whose true value
    is in the label's top ``top`` share on that seed's split (``threshold``: the value where it starts), the share of
    the label's variance they hold (``variance_share``: Σ over them of (y − ȳ)² / Σ over all) and the share of the
    model's squared error they make (``error_share``). When a few LoRAs hold most of the variance, R² mostly measures
    how well those few are predicted. Rows are the labels of ``predictions`` (its ``y`` and ``pred``) that are not
    0/1, on splits of at least 1/``top`` LoRAs (fewer have no top share to speak of)."""
    cols = ["collection", "task", "model", "label", "seeds", "loras", "top", "threshold", "variance_share",
            "error_share"]
    p = predictions[predictions.split == split].dropna(subset=["y", "pred"])
    rows = []
    for (coll, task, model, label, seed), g in p.groupby(["collection", "task", "model", "label", "seed"]):
        y, e = g.y.to_numpy(float), (g.pred.to_numpy(float) - g.y.to_numpy(float)) ** 2
        if set(np.unique(y)) <= {0.0, 1.0} or len(y) < math.ceil(1 / top) or not (e.sum() > 0 and y.var() > 0):
            continue                             # a binary label, a split too small for a top share, or nothing to share
        thr = float(np.quantile(y, 1 - top))
        tail, d2 = y >= thr, (y - y.mean()) ** 2
        rows.append({"collection": coll, "task": task, "model": model, "label": label, "seed": seed, "loras": len(y),
                     "threshold": thr, "variance_share": float(d2[tail].sum() / d2.sum()),
                     "error_share": float(e[tail].sum() / e.sum())})
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows).groupby(["collection", "task", "model", "label"]).agg(
        seeds=("seed", "nunique"), loras=("loras", "mean"), threshold=("threshold", "mean"),
        variance_share=("variance_share", "mean"), error_share=("error_share", "mean")).reset_index()
    out["top"] = top
    return out[cols]


def compare_summaries(old: pd.DataFrame, new: pd.DataFrame, old_name: str = "v1", new_name: str = "v2"
                      ) -> pd.DataFrame:
    """Per task present in both: the primary test metric of the best model (by test mean; both tables are test
    summaries) and of GL-net, before and after — e.g. the shipped collections before and after a rebuild. Accepts
    `summarize` output (``mean``) or its saved CSV (``value``)."""
    def norm(df):
        df = df.rename(columns={"value": "mean"})
        return df[df.split == "test"] if "split" in df.columns else df

    old, new = norm(old), norm(new)
    rows = []
    for (coll, task), g_new in new.groupby(["collection", "task"], sort=False):
        g_old = old[(old.collection == coll) & (old.task == task)]
        if g_old.empty:
            continue
        metric = PRIMARY_METRIC[g_new.task_kind.iloc[0]]
        row = {"collection": coll, "task": task, "metric": metric}
        for name, g in ((old_name, g_old), (new_name, g_new)):
            g = g[g.metric == metric]
            best = g.loc[g["mean"].idxmax()]
            gl = g[g.model == "glnet"]
            row[f"best {name}"] = f"{best['mean']:.3f} ({best.model})"
            row[f"glnet {name}"] = f"{gl['mean'].iloc[0]:.3f}" if len(gl) else "n/a"
            row[f"_best_{name}"] = float(best["mean"])
        row["gain (best)"] = f"{row.pop(f'_best_{new_name}') - row.pop(f'_best_{old_name}'):+.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(mean, std) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if np.isfinite(std) else f"{mean:.3f}"


def results_table(summary: pd.DataFrame, metrics: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Models (rows, registry order) × (task · metric) (columns) of "mean ± std" strings. ``metrics`` maps a label
    kind to the metrics shown (default: r2, spearman, kendall for regression; auc, tpr@1% FPR for binary)."""
    metrics = metrics or {"regression": ("r2", "spearman", "kendall"), "binary": ("auc", "tpr_at_1pct_fpr"),
                          "category": ("accuracy", "balanced_accuracy")}
    rows = summary[summary.apply(lambda r: r.metric in metrics.get(r.label_kind, ()), axis=1)].copy()
    rows["column"] = rows.collection + "/" + rows.task + " · " + rows.metric
    rows["cell"] = [_fmt(m, s) for m, s in zip(rows["mean"], rows["std"])]
    wide = rows.pivot(index="model", columns="column", values="cell")
    order = [m for m in MODEL_KINDS if m in wide.index]
    cols = list(dict.fromkeys(rows.sort_values(["collection", "task"], kind="stable")["column"]))
    return wide.loc[order, cols].fillna("n/a")


def write_table(df: pd.DataFrame, out_dir: str | Path, name: str, index: bool = True,
                title: str | None = None) -> tuple[Path, Path]:
    """``df`` as ``<out_dir>/<name>.csv`` and ``<name>.md`` (a Markdown table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{name}.csv", out / f"{name}.md"
    df.to_csv(csv, index=index)
    body = df.to_markdown(index=index) if _has_tabulate() else _markdown(df, index)
    md.write_text((f"# {title}\n\n" if title else "") + body + "\n")
    return csv, md


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
        return True
    except ImportError:
        return False


def _markdown(df: pd.DataFrame, index: bool) -> str:
    d = df.reset_index() if index else df
    cells = [[str(c) for c in d.columns]] + [["" if (isinstance(v, float) and math.isnan(v)) else
                                               (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row]
                                              for row in d.itertuples(index=False)]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in cells[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines)


def compare_to_baseline(runs: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Per task: the GL-invariant model with the best mean **validation** primary metric, its **test** mean ± std,
    the baseline's test mean ± std, the margin (difference of means) and the spread (the larger of the two seed
    stds). ``beats_by_more_than_spread`` is margin > spread (False when undefined, e.g. one seed)."""
    val, test = summarize(runs, "val"), summarize(runs, "test")
    out = []
    for (coll, task), g in test.groupby(["collection", "task"], sort=False):
        metric = PRIMARY_METRIC[g.task_kind.iloc[0]]
        v = val[(val.collection == coll) & (val.task == task) & (val.metric == metric) & val.gl_invariant]
        v = v[np.isfinite(v["mean"])]
        t = g[g.metric == metric].set_index("model")
        row = {"collection": coll, "task": task, "metric": metric, "split": "test"}
        best = v.sort_values("mean", ascending=False)["model"].iloc[0] if len(v) else None
        row["best_gl_invariant"] = best
        for name, kind in (("best", best), ("baseline", baseline)):
            ok = kind is not None and kind in t.index
            row[f"{name}_mean"] = float(t.loc[kind, "mean"]) if ok else math.nan
            row[f"{name}_std"] = float(t.loc[kind, "std"]) if ok else math.nan
        row["baseline"] = baseline
        row["margin"] = row["best_mean"] - row["baseline_mean"]
        row["spread"] = max(row["best_std"], row["baseline_std"])
        row["beats_by_more_than_spread"] = bool(np.isfinite(row["margin"]) and np.isfinite(row["spread"])
                                                and row["margin"] > row["spread"])
        row["n_seeds"] = int(g.n_seeds.min())
        out.append(row)
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------------------------------
# best checkpoints

def select_best(runs: pd.DataFrame, gl_only: bool = True) -> pd.DataFrame:
    """Per task: the model kind with the best mean validation primary metric over seeds, and its seed with the best
    validation value. Only GL(r)-invariant kinds are candidates (``gl_only``, the default): what this selects is
    shipped as the default of ``lol predict --task`` and the app, and a default must give the same prediction for the
    same ΔW (`lol.checkpoint.default_checkpoint` refuses other kinds); a task with no GL-invariant run is an error, not
    a silent fallback. Where the metric is undefined for every candidate run (e.g. a validation split with one class,
    as in the tiny CI collections), the lowest validation loss decides instead (column ``selected_by`` says which).
    Columns: collection, task, model, seed, metric, selected_by, candidates, val_mean, val_seed, test_seed."""
    s = task_scores(runs)
    losses = runs.groupby(["collection", "task", "model", "seed"])["val_loss"].first()
    out = []
    for (coll, task), g in s.groupby(["collection", "task"], sort=False):
        metric = PRIMARY_METRIC[g.task_kind.iloc[0]]
        kinds_run = sorted(set(g.model))
        candidates = [k for k in kinds_run if gl_invariant(k)] if gl_only else kinds_run
        if not candidates:
            from .models import gl_invariant_kinds

            raise LoLError(f"select_best: task {coll}/{task} has no run of a GL(r)-invariant model kind (kinds run: "
                           f"{', '.join(kinds_run)}); a shipped default must be one of {', '.join(gl_invariant_kinds())}"
                           f" (or pass gl_only=False to choose among all kinds)")
        g = g[g.model.isin(candidates)]
        v = g[(g.split == "val") & (g.metric == metric)].set_index(["model", "seed"])["value"].dropna()
        by = f"validation {metric}"
        sign = 1.0
        if v.empty:
            lv = losses.loc[(coll, task)]
            v = -lv[lv.index.get_level_values("model").isin(candidates)].dropna()
            by, sign = "validation loss (the primary metric is undefined on every validation split)", -1.0
        means = v.groupby(level="model").mean()
        kind = means.idxmax()
        per_seed = v.loc[kind]
        seed = int(per_seed.idxmax())
        t = g[(g.split == "test") & (g.metric == metric) & (g.model == kind) & (g.seed == seed)]["value"]
        among = "GL(r)-invariant kinds" if gl_only else "all kinds"
        out.append({"collection": coll, "task": task, "model": kind, "seed": seed, "metric": metric,
                    "selected_by": f"best mean {by} over seeds among {among}, then best seed",
                    "candidates": ", ".join(candidates),
                    "val_mean": sign * float(means[kind]), "val_seed": sign * float(per_seed[seed]),
                    "test_seed": float(t.iloc[0]) if len(t) else math.nan})
    return pd.DataFrame(out)


def write_checkpoints(grid: Grid, best: pd.DataFrame, root: str | Path, refs: Sequence[TaskRef] | None = None,
                      index: bool = True, half: bool = True) -> dict[str, str]:
    """Write each selected run to ``<root>/<collection>/<task>/`` (config.json records the selection) and merge
    ``{label: "<collection>/<task>"}`` into ``<root>/index.json`` (entries of other tasks are kept). Returns the
    entries written. With ``half`` (the default) the wide first layers are stored in float16 (`store_half`): a
    shipped checkpoint is about half the bytes."""
    from .checkpoint import load_checkpoint, store_half

    root = Path(root)
    where = {(r.collection, r.task): r for r in (refs or [])}
    entries = {}
    for b in best.itertuples(index=False):
        key = (b.collection, b.task, b.model, int(b.seed))
        if key not in grid.models:
            raise LoLError(f"no trained model for {key} in this grid")
        m = grid.models[key]
        dest = root / b.collection / b.task
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        selection = {"selected_by": b.selected_by, "metric": b.metric, "candidates": getattr(b, "candidates", None),
                     "val_mean": b.val_mean, "val_seed": b.val_seed, "test_seed": b.test_seed}
        if isinstance(m, (str, Path)):
            shutil.copytree(m, tmp)
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["selection"] = selection
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
        else:
            ref = where.get((b.collection, b.task), TaskRef(b.collection, b.task))
            _save(m, tmp, ref, {"selection": selection})
        if half:
            store_half(tmp)
        load_checkpoint(tmp)   # what we ship must load
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        labels = json.loads((dest / "config.json").read_text())["labels"]
        for lab in labels:
            entries[lab["name"]] = f"{b.collection}/{b.task}"
    if index:
        path = root / "index.json"
        current = json.loads(path.read_text()) if path.is_file() else {}
        current.update(entries)
        tmp = path.with_name(".index.json.tmp")
        tmp.write_text(json.dumps(dict(sorted(current.items())), indent=1) + "\n")
        tmp.replace(path)
    return entries


def retrain_checkpoints(collections: Mapping, root: str | Path, names: Sequence[str] | None = None,
                        log: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Retrain the shipped checkpoints of ``collections`` (default: every checkpoint under ``root`` whose collection
    is given; ``names``: only these ``"<collection>/<task>"``) on the collections as they are now — after a collection
    grew, a checkpoint trained on its earlier LoRAs would otherwise meet a collection of another fingerprint and
    count LoRAs it trained on as unseen. Each keeps the kind, seed, model hyperparameters, training config and rows
    recorded in its ``config.json``: the selection made on the earlier grid is reused, not redone (its
    ``selected_by`` says so), so a full grid (notebook 02) should follow when the compute is there. Returns the
    written rows (as `select_best`'s), with the new validation and test values."""
    from .train import TrainConfig

    root = Path(root)
    fields = set(TrainConfig.__dataclass_fields__)
    grids = {}
    for cfg_path in sorted(root.glob("*/*/config.json")):
        cfg = json.loads(cfg_path.read_text())
        coll, task = cfg.get("collection"), cfg.get("task")
        if coll not in collections or (names is not None and f"{coll}/{task}" not in names):
            continue
        train = {k: (tuple(v) if k == "fractions" else v) for k, v in (cfg.get("train") or {}).items() if k in fields}
        seed, kind = int(train.pop("seed", 0)), cfg["kind"]
        hp = dict(train.pop("model", {}) or {})
        ref = TaskRef(coll, task, tuple(sorted((cfg.get("rows") or {}).items())))
        if log:
            log(f"[retrain] {coll}/{task}: {kind}, seed {seed}, on {len(collections[coll])} LoRAs")
        grid = run_grid({coll: collections[coll]}, [ref], models=[kind], seeds=[seed],
                        config=TrainConfig(**{**train, "progress": False}), hparams={kind: hp}, log=None)
        best = select_best(grid.runs)
        old = cfg.get("selection") or {}
        before = old.get("selected_by", "as recorded")
        base = before.split("; retrained")[0]
        best["selected_by"] = (f"{base}; retrained on {len(collections[coll])} LoRAs (fingerprint "
                               f"{collections[coll].fingerprint[:12]}) with the kind and seed selected then")
        best["candidates"] = old.get("candidates", kind)
        grids[(coll, task)] = (grid, best, ref)
    for grid, best, ref in grids.values():
        write_checkpoints(grid, best, root, [ref])
    return pd.concat([best for _, best, _ in grids.values()], ignore_index=True) if grids else pd.DataFrame()


# ---------------------------------------------------------------------------------------------------------------------
# evaluation on other rows (rank generalization)

@torch.no_grad()
def evaluate_rows(model, targets, batch, cols: Mapping) -> dict[str, dict[str, float]]:
    """{label: {metric: value}} of a trained model on ``batch`` against raw label values ``cols``."""
    model.eval()
    p = next(model.parameters())
    outs = [model(batch.select(torch.arange(s, min(s + 64, len(batch)))).to(device=p.device, dtype=p.dtype))
            for s in range(0, len(batch), 64)]
    return targets.metrics(torch.cat(outs), dict(cols))


def _rank_unit(path: str, task: str, kind: str, seed: int, config, train_rank: int, eval_ranks, hparams, runs_dir):
    from .collection import open_collection

    return rank_generalization(open_collection(path), task, [kind], [seed], config, train_rank, eval_ranks, hparams,
                               log=None, runs_dir=runs_dir)


def rank_generalization(coll, task: str, models: Sequence[str], seeds: Sequence[int] = (0, 1, 2), config=None,
                        train_rank: int = 4, eval_ranks: Sequence[int] = (8, 16), hparams=None,
                        log: Callable[[str], None] | None = print, workers: int = 1,
                        runs_dir: str | Path | None = None) -> pd.DataFrame:
    """Train each rank-agnostic model on the rank-``train_rank`` LoRAs of ``coll`` (grouped split) and evaluate it on
    that split's test LoRAs and on every LoRA of rank ``eval_ranks`` whose group (identity) is not in its train or
    val split. The collection's U carries each LoRA's own scale alpha/r, so ΔW = U Vᵀ is exact at every rank.
    Rank-padded kinds (svals, canon_*) are built with ``rank=max(eval_ranks)``. Returns tidy rows (model, seed,
    eval_rank, n, label, metric, value). ``workers`` > 1: each (model, seed) in its own process (`in_workers`).
    ``runs_dir`` (`run_grid`'s): a model `run_grid` already trained on these very rows and settings
    (`finished_run`) is loaded from its checkpoint, with its recorded split, not trained again."""
    from .train import TrainConfig

    bad = [m for m in models if not rank_agnostic(m)]
    if bad:
        raise LoLError(f"rank generalization needs rank-agnostic models; {bad} read only their training rank")
    config = config or TrainConfig()
    if workers > 1 and len(models) * len(seeds) > 1:
        calls = [(str(coll.path), task, kind, int(seed), config, train_rank, tuple(eval_ranks), hparams,
                  None if runs_dir is None else str(runs_dir)) for kind in models for seed in seeds]
        return pd.concat(in_workers(_rank_unit, calls, workers), ignore_index=True)
    top = max(eval_ranks)
    batch, cols, kinds, table = task_data(coll, task, {"rank": train_rank})
    others = {r: task_data(coll, task, {"rank": r}) for r in eval_ranks}
    rows = []
    for kind in models:
        hp = dict((hparams or {}).get(kind, {}))
        if kind in ("svals", "canon_mlp", "canon_transformer"):
            hp.setdefault("rank", top)
        for seed in seeds:
            cfg = replace(config, seed=int(seed), model=hp)
            model, targets, split, how = _trained(runs_dir, coll, task, {"rank": train_rank}, kind, cfg, batch, cols,
                                                  kinds, table)
            seen = set(table["group"][split != "test"]) if "group" in table else set()
            te = np.nonzero(split == "test")[0]
            evals = [(train_rank, batch.select(te), {k: v[te] for k, v in cols.items()})]
            for r, (b, c, _, t) in others.items():
                keep = np.array([g not in seen for g in t["group"]]) if "group" in t else np.ones(len(t), bool)
                k = np.nonzero(keep)[0]
                if len(k):
                    evals.append((r, b.select(k), {n: v[k] for n, v in c.items()}))
            for r, b, c in evals:
                for label, ms in evaluate_rows(model, targets, b, c).items():
                    for metric, value in ms.items():
                        rows.append({"collection": str(coll.path.name), "task": task, "model": kind, "seed": seed,
                                     "train_rank": train_rank, "eval_rank": r, "n": len(b), "label": label,
                                     "label_kind": kinds[label], "metric": metric, "value": value})
            if log:
                log(f"[rank] {kind} seed {seed}: {how} on {int((split == 'train').sum())} rank-{train_rank} "
                    f"LoRAs, evaluated on ranks {[e[0] for e in evals]}")
    return pd.DataFrame(rows)


def _trained(runs_dir, coll, task, where, kind, cfg, batch, cols, kinds, table):
    """(model, targets, split per row of ``table``, "trained" or "reused from run_grid"): `run_grid`'s stored run of
    exactly this training when there is one whose recorded split names every row, else a new one."""
    from .checkpoint import load_checkpoint
    from .train import train

    run = finished_run(runs_dir, coll, task, where, kind, cfg, ids=table["id"].astype(str)) \
        if "id" in table.columns else None
    if run is not None:
        ck = load_checkpoint(run.path / "checkpoint")
        return ck.model, ck.targets, run.split, "reused from run_grid"
    res = train(batch, cols, kind, cfg, table=table, kinds=kinds)
    return res.model, res.targets, res.split, "trained"


def _curve_unit(path: str, task: str, kind: str, fractions, seed: int, config, hparams, runs_dir) -> pd.DataFrame:
    from .collection import open_collection

    return learning_curve(open_collection(path), task, [kind], fractions, [seed], config, hparams, log=None,
                          runs_dir=runs_dir)


def learning_curve(coll, task: str, models: Sequence[str], fractions: Sequence[float] = (0.25, 0.5, 1.0),
                   seeds: Sequence[int] = (0, 1, 2), config=None, hparams=None,
                   log: Callable[[str], None] | None = print, workers: int = 1,
                   runs_dir: str | Path | None = None) -> pd.DataFrame:
    """Test score against the amount of training data: per seed, the grouped split of `run_grid` (same seed, same
    fractions); then each model is trained on the first ``f`` of the training *groups* in a seeded order (nested:
    the 25 % are inside the 50 %), always with the same validation and test splits, so only the training data
    change. A curve still rising at 1.0 says more LoRAs would help. Returns tidy rows (collection, task, model, seed,
    fraction, n_train, label, label_kind, metric, value), test split only. ``workers`` > 1 trains each (model, seed)
    in its own process (`in_workers`); the rows are the same, in the same order. ``runs_dir`` (`run_grid`'s): at
    100 % the training is `run_grid`'s own, so a run it stored (`finished_run`) gives its test metrics, untrained."""
    from .splits import make_splits
    from .train import TrainConfig, train

    config = config or TrainConfig()
    for f in fractions:
        if not 0 < f <= 1:
            raise LoLError(f"learning_curve: fractions must be in (0, 1], got {f}")
    if workers > 1 and len(models) * len(seeds) > 1:
        calls = [(str(coll.path), task, kind, tuple(fractions), int(seed), config, hparams,
                  None if runs_dir is None else str(runs_dir)) for seed in seeds for kind in models]
        if log:
            log(f"[curve] {task}: {len(calls)} (model, seed) pairs in {min(workers, len(calls))} worker processes")
        rows = pd.concat(in_workers(_curve_unit, calls, workers), ignore_index=True)
        order = {k: i for i, k in enumerate(models)}   # the order of the sequential loop: seed, fraction, model
        rows = rows.assign(_m=rows.model.map(order), _f=rows.fraction.map({float(f): i for i, f in enumerate(fractions)}))
        return rows.sort_values(["seed", "_f", "_m"], kind="stable").drop(columns=["_m", "_f"]).reset_index(drop=True)
    batch, cols, kinds, table = task_data(coll, task, main_rows(coll))
    groups = table["group"].astype(str).to_numpy() if "group" in table.columns else np.arange(len(table)).astype(str)
    rows = []
    for seed in seeds:
        split = make_splits(len(table), config.fractions, int(seed), groups if "group" in table.columns else None)
        train_groups = np.unique(groups[split == "train"])
        order = np.random.default_rng([int(seed), 0x1C]).permutation(train_groups)
        for f in fractions:
            keep = set(order[:max(1, int(round(f * len(order))))])
            idx = np.nonzero((split != "train") | np.isin(groups, list(keep)))[0]
            t = table.iloc[idx].reset_index(drop=True).assign(split=split[idx])
            b, c = batch.select(torch.as_tensor(idx)), {k: v[idx] for k, v in cols.items()}
            n_train = int((split[idx] == "train").sum())
            for kind in models:
                cfg = replace(config, seed=int(seed), model=dict((hparams or {}).get(kind, {})))
                # 100 %: run_grid's training, if it had this very split
                run = finished_run(runs_dir, coll, task, main_rows(coll), kind, cfg, ids=t["id"].astype(str),
                                   split=t["split"]) if len(idx) == len(table) and "id" in t.columns else None
                if run is not None:
                    test = pd.read_csv(run.path / "metrics.csv").query("split == 'test'")
                    scores = [(r.label, r.metric, r.value) for r in test.itertuples()]
                else:
                    res = train(b, c, kind, cfg, table=t, kinds=kinds)
                    scores = [(label, metric, value) for label, ms in res.metrics["test"].items()
                              for metric, value in ms.items()]
                rows += [{"collection": str(Path(coll.path).name), "task": task, "model": kind, "seed": seed,
                          "fraction": float(f), "n_train": n_train, "label": label, "label_kind": kinds[label],
                          "metric": metric, "value": value} for label, metric, value in scores]
                if log:
                    log(f"[curve] {task} {kind} seed {seed}: {f:.0%} of the training groups ({n_train} LoRAs)"
                        + (", run_grid's run reused" if run is not None else ""))
    return pd.DataFrame(rows)


def _averaging_unit(path: str, task: str, kind: str, seed: int, config, ids) -> pd.DataFrame:
    from .collection import open_collection

    return label_averaging(open_collection(path), task, kind, [seed], config, log=None, ids=ids)


def label_averaging(coll, task: str, kind: str, seeds: Sequence[int] = (0, 1, 2), config=None,
                    log: Callable[[str], None] | None = print, workers: int = 1,
                    ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Would a label averaged over k measurements (`lol.zoo.measure`) raise what a model learns, and by how much?
    On the LoRAs (of `main_rows`) that every measurement of the task's one regression label covers, ``kind`` is
    trained per seed twice, on the build's single measurement and on the mean of all k, on `run_grid`'s grouped split
    of that seed restricted to those LoRAs; both are scored on test against the single measurement and against the
    mean (R²). The label's noise bounds R² against a single measurement; the mean is the better estimate of what
    the LoRA does, so the gain of the mean-trained model, scored against the mean, is what averaging the whole
    collection's label would buy (measured on fewer LoRAs than the full collection: a lower bound on the data side).

    Each measurement is first centred on the build's mean over those LoRAs: a noise seed shifts every LoRA's score
    alike (the measurements share their noises across LoRAs), an offset between seeds, not between LoRAs, which
    would otherwise count against the model trained on the build's scale. Returns tidy rows (collection, task,
    model, seed, k, n_loras, n_train, n_test, trained_on, scored_against, metric, value); ``trained_on`` and
    ``scored_against`` are ``"single"`` or ``"mean"``. ``workers`` > 1 trains each seed in its own process, on the
    LoRAs measured every time when it starts (a measuring run may add more meanwhile). ``ids``: only these LoRAs (each
    must be measured every time)."""
    from .metrics import r2
    from .train import TrainConfig, _splits, train
    from .zoo.measure import centred_on_build, measurements

    config = config or TrainConfig()
    labels = coll.label_columns(task)
    if len(labels) != 1 or coll.labels[labels[0]].get("kind") != "regression":
        raise LoLError(f"label_averaging: task {task!r} of {coll.path} must have one regression label, has {labels}")
    label = labels[0]
    where = main_rows(coll)
    batch, _, _, table = task_data(coll, task, where)
    values, _ = measurements(coll, label)
    M = values.to_numpy(float)[main_row_indices(coll)]
    if M.shape[1] < 2:
        raise LoLError(f"label_averaging: {coll.path} has no measurement of {label!r} beyond the build's "
                       "(`lol zoo measure`)")
    every = np.isfinite(M).all(1)
    if ids is not None:
        want = set(map(str, ids))
        pick = table["id"].astype(str).isin(want).to_numpy()
        if pick.sum() != len(want) or not every[pick].all():
            raise LoLError(f"label_averaging: of the {len(want)} LoRAs asked for, {int((pick & every).sum())} are "
                           f"in {coll.path}'s main rows and measured every time")
        every = pick
    idx = np.nonzero(every)[0]
    if workers > 1 and len(seeds) > 1:
        chosen = table["id"].astype(str).to_numpy()[idx].tolist()
        calls = [(str(coll.path), task, kind, int(seed), config, chosen) for seed in seeds]
        return pd.concat(in_workers(_averaging_unit, calls, workers), ignore_index=True)
    M = centred_on_build(M[idx])                             # seed offsets removed, on the build's scale
    y = {"single": M[:, 0], "mean": M.mean(1)}
    rows = []
    for seed in seeds:
        split = _splits(len(table), table, replace(config, seed=int(seed)))[0][idx]       # run_grid's split
        n = {s: int((split == s).sum()) for s in ("train", "val", "test")}
        if min(n.values()) == 0:
            raise LoLError(f"label_averaging: the {len(idx)} LoRAs measured {M.shape[1]} times leave split {n} with "
                           f"seed {seed}: measure more of them")
        t = table.iloc[idx].reset_index(drop=True).assign(split=split)
        test = split == "test"
        for trained_on, target in y.items():
            res = train(batch.select(torch.as_tensor(idx)), {label: target}, kind, replace(config, seed=int(seed)),
                        table=t, kinds={label: "regression"})
            pred = res.predictions[label].to_numpy(float)[test]
            rows += [{"collection": str(Path(coll.path).name), "task": task, "model": kind, "seed": int(seed),
                      "k": M.shape[1], "n_loras": len(idx), "n_train": n["train"], "n_test": n["test"],
                      "trained_on": trained_on, "scored_against": against, "metric": "r2",
                      "value": r2(y[against][test], pred)} for against in y]
            if log:
                log(f"[averaging] {task} {kind} seed {seed}: trained on the {trained_on} "
                    f"({n['train']} LoRAs), test R² against the mean {rows[-1]['value']:.3f}")
    return pd.DataFrame(rows)


def averaging_gain(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (collection, task, model) of `label_averaging` rows: test R² against the mean of the k measurements of
    the model trained on one measurement (``single``) and of the one trained on the mean (``mean``), means over
    seeds, and the gain (``mean − single``, its mean ± std over seeds: each seed's pair shares split and
    initialization), with k, the LoRAs used and the seeds."""
    q = rows[rows.scored_against == "mean"]
    out = []
    for (coll, task, model), g in q.groupby(["collection", "task", "model"], sort=False):
        w = g.pivot_table(index="seed", columns="trained_on", values="value")
        d = w["mean"] - w["single"]
        out.append({"collection": coll, "task": task, "model": model, "k": int(g.k.iloc[0]),
                    "n_loras": int(g.n_loras.iloc[0]), "seeds": len(w), "r2_trained_on_single": float(w["single"].mean()),
                    "r2_trained_on_mean": float(w["mean"].mean()), "gain": float(d.mean()),
                    "gain_std": float(d.std()) if len(d) > 1 else math.nan})
    return pd.DataFrame(out)


def _settings(space: Mapping[str, Sequence]) -> list[dict]:
    """Every combination of ``space`` (a grid), in the order the keys and values are given."""
    import itertools

    keys = list(space)
    for k in keys:
        if not isinstance(space[k], (list, tuple)) or not space[k]:
            raise LoLError(f"hparam_search: space[{k!r}] must be a non-empty list of values, got {space[k]!r}")
    return [dict(zip(keys, vals)) for vals in itertools.product(*(space[k] for k in keys))]


def _apply(config, setting: Mapping, seed: int):
    """``config`` with ``setting`` applied: `TrainConfig` fields by name, model hyperparameters as ``model.<name>``."""
    fields = {k: v for k, v in setting.items() if not k.startswith("model.")}
    bad = [k for k in fields if not hasattr(config, k) or k in ("seed", "model")]
    if bad:
        raise LoLError(f"hparam_search: {bad} are not TrainConfig fields (model hyperparameters go as 'model.<name>')")
    model = {**config.model, **{k[len("model."):]: v for k, v in setting.items() if k.startswith("model.")}}
    return replace(config, **fields, seed=int(seed), model=model)


def _search_unit(path: str, task: str, kind: str, setting: dict, seed: int, config, runs_dir=None) -> pd.DataFrame:
    from .collection import open_collection

    return hparam_search(open_collection(path), task, kind, {k: [v] for k, v in setting.items()}, [seed], config,
                         log=None, runs_dir=runs_dir)


def _search_record(coll, task: str, kind: str, config) -> dict:
    """What makes a search run this very training: the collection's LoRAs (`Collection.loras_fingerprint`) and the
    task's own data (`task_digest`: rows, label values and schema, split columns), the task, the model kind and every
    `TrainConfig` field (seed and model hyperparameters included; ``progress`` only prints). Not the collection's
    whole fingerprint: re-measuring another label (`lol zoo measure --apply`) leaves a search run valid, as
    `_cached` leaves a grid run."""
    train = _train_record(asdict(config))
    ref = TaskRef(str(Path(coll.path).name), task, tuple(sorted(main_rows(coll).items())))
    return {"collection": ref.collection, "loras": coll.loras_fingerprint, "task_data": task_digest(coll, ref),
            "task": task, "model": kind, "train": train}


def _legacy_search_record(coll, record: dict) -> dict:
    """The record a search run stored before `_search_record` named the LoRAs and the task's data: the collection's
    whole fingerprint in their place. A run stored so is still reused on that very collection version."""
    return {"collection": record["collection"], "fingerprint": coll.fingerprint, "task": record["task"],
            "model": record["model"], "train": record["train"]}


def _search_file(runs_dir, record: dict) -> Path:
    """``<runs_dir>/<collection>/<task>/<kind>/search/<digest>.parquet``, the digest that of the run's record."""
    import hashlib

    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return Path(runs_dir) / record["collection"] / record["task"] / record["model"] / "search" / f"{digest}.parquet"


def _search_cached(runs_dir, record: dict, legacy: dict | None = None) -> pd.DataFrame | None:
    """The stored rows of a finished search run with exactly this record (checked field by field, not by the digest
    alone), or with the ``legacy`` record (`_legacy_search_record`), or None."""
    if runs_dir is None:
        return None
    for rec in (record, legacy):
        if rec is None:
            continue
        f = _search_file(runs_dir, rec)
        meta = f.with_suffix(".json")
        if f.is_file() and meta.is_file() and json.loads(meta.read_text()) == rec:
            return pd.read_parquet(f)
    return None


def _search_store(runs_dir, record: dict, rows: pd.DataFrame) -> None:
    """Store one finished search run: the rows first, then the record that marks it finished (written last, by
    rename, so an interrupted run leaves nothing that reads as finished)."""
    f = _search_file(runs_dir, record)
    f.parent.mkdir(parents=True, exist_ok=True)
    rows.to_parquet(f, index=False)
    tmp = f.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, sort_keys=True))
    tmp.replace(f.with_suffix(".json"))


def hparam_search(coll, task: str, kind: str, space: Mapping[str, Sequence] | Sequence[Mapping[str, Sequence]],
                  seeds: Sequence[int] = (0, 1, 2), config=None, log: Callable[[str], None] | None = print,
                  workers: int = 1, runs_dir: str | Path | None = None) -> pd.DataFrame:
    """Train ``kind`` on ``task`` with every setting of the grid ``space`` and every seed, on `run_grid`'s split of
    that seed (same rows, same grouped split), and score it on validation and test.

    ``space`` maps a `lol.train.TrainConfig` field (``lr``, ``width``, ``weight_decay``, ``epochs``, ...) or a model
    hyperparameter written ``model.<name>`` (e.g. ``model.channels``) to the values to try. Or it is a list of such
    grids, searched in stages (coordinate-wise): each stage tries its grid on top of the setting chosen on validation
    so far (`best_setting` over every earlier stage's rows), a setting that is the same training as one already run
    (e.g. a stage's value that is the config's own) is not run again, and the rows of every stage are returned, so
    `best_setting` chooses among all of them. Returns tidy rows
    (collection, task, model, setting (JSON), seed, val_loss, split, label, label_kind, metric, value) for ``split``
    in val and test; `best_setting` chooses on validation only. ``workers`` > 1 trains each (setting, seed) in its
    own process (`in_workers`): the same rows, in the same order. With ``runs_dir`` each finished (setting, seed) run
    is stored there (its rows, and a record of the collection's version, the task, the model and every training
    setting) and reused, not trained again, when the same run is asked for, under this setting's name: an
    interrupted search resumes where it stopped, and a grid grown by one value (or one stage) trains only the new
    settings."""
    from .train import TrainConfig

    config = config or TrainConfig()
    if isinstance(space, Mapping):
        return _search_grid(coll, task, kind, _settings(space), seeds, config, log, workers, runs_dir)
    stages = list(space) if isinstance(space, (list, tuple)) else []
    if not stages or not all(isinstance(grid, Mapping) for grid in stages):
        raise LoLError(f"hparam_search: space must be a grid (a dict of lists) or a non-empty list of grids, "
                       f"got {space!r}")
    parts, chosen, trained = [], {}, set()
    for grid in stages:
        settings = []
        for setting in ({**chosen, **s} for s in _settings(grid)):
            training = _training(kind, _apply(config, setting, 0))
            if training not in trained:
                trained.add(training)
                settings.append(setting)
        if settings:
            parts.append(_search_grid(coll, task, kind, settings, seeds, config, log, workers, runs_dir))
        best = best_setting(pd.concat(parts, ignore_index=True))
        chosen = json.loads(best[best.chosen].setting.iloc[0])
    return pd.concat(parts, ignore_index=True)


def _training(kind: str, config) -> str:
    """What a training of ``kind`` with ``config`` is: its `_train_record`, the model's hyperparameters with its
    constructor's defaults filled in (so ``model.depth`` = the model's own depth names the same training as no depth
    at all)."""
    import inspect

    from .models import model_class

    cls = model_class(kind)
    params = inspect.signature(cls.__init__).parameters.items() if cls is not None else ()
    defaults = {n: p.default for n, p in params if p.default is not inspect.Parameter.empty and n != "width"}
    train = _train_record(asdict(config))
    return json.dumps({**train, "model": {**defaults, **train["model"]}}, sort_keys=True, default=str)


def _search_grid(coll, task: str, kind: str, settings: list[dict], seeds: Sequence[int], config, log, workers: int,
                 runs_dir) -> pd.DataFrame:
    """`hparam_search` of one grid's ``settings``."""
    from .train import train

    _apply(config, settings[0], 0)                       # a wrong name fails here, before any worker starts
    units = [(setting, int(seed)) for setting in settings for seed in seeds]
    records = [_search_record(coll, task, kind, _apply(config, setting, seed)) for setting, seed in units]
    found = [_search_cached(runs_dir, rec, _legacy_search_record(coll, rec)) for rec in records]
    # a stored run is this very training, perhaps asked for under another name (a grid grown by an axis whose value
    # is the config's own): its rows take this setting's name
    found = [f if f is None else f.assign(setting=json.dumps(units[i][0], sort_keys=True))
             for i, f in enumerate(found)]
    todo = [i for i, f in enumerate(found) if f is None]
    if log and runs_dir is not None and len(todo) < len(units):
        log(f"[search] {task} {kind}: {len(units) - len(todo)} of {len(units)} (setting, seed) runs found in {runs_dir}")
    if workers > 1 and len(todo) > 1:
        calls = [(str(coll.path), task, kind, units[i][0], units[i][1], config,
                  None if runs_dir is None else str(runs_dir)) for i in todo]
        if log:
            log(f"[search] {task} {kind}: {len(calls)} (setting, seed) pairs in {min(workers, len(calls))} workers")
        for i, rows in zip(todo, in_workers(_search_unit, calls, workers)):
            found[i] = rows
        return pd.concat(found, ignore_index=True)
    data = task_data(coll, task, main_rows(coll)) if todo else None
    for i in todo:
        setting, seed = units[i]
        batch, cols, kinds, table = data
        key = json.dumps(setting, sort_keys=True)
        res = train(batch, cols, kind, _apply(config, setting, seed), table=table, kinds=kinds)
        val_loss = min(h["val_loss"] for h in res.history)
        rows = []
        for split in ("val", "test"):
            for label, ms in res.metrics[split].items():
                for metric, value in ms.items():
                    rows.append({"collection": str(Path(coll.path).name), "task": task, "model": kind,
                                 "setting": key, "seed": int(seed), "val_loss": val_loss, "split": split,
                                 "label": label, "label_kind": kinds[label], "metric": metric,
                                 "value": float(value) if value is not None else math.nan})
        found[i] = pd.DataFrame(rows)
        if runs_dir is not None:
            _search_store(runs_dir, records[i], found[i])
        if log:
            log(f"[search] {task} {kind} {key} seed {seed}: best epoch {res.best_epoch}, {res.seconds:.1f} s")
    return pd.concat(found, ignore_index=True)


def best_setting(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (collection, task, model) of `hparam_search` rows: every setting's task score (the primary metric, mean
    over labels, then mean ± std over seeds) on val and test, best validation first; ``chosen`` marks the setting
    with the best validation mean (test never chooses). Where the metric is undefined on every validation split (one
    class only), the lowest mean validation loss chooses, as in `select_best` (column ``selected_by``)."""
    out = []
    for (coll, task, model), g in rows.groupby(["collection", "task", "model"], sort=False):
        metric = primary_metric(g["label_kind"].unique())
        loss = g.groupby("setting", sort=False)["val_loss"].mean()
        g = g[g.metric == metric]
        per_seed = g.groupby(["setting", "split", "seed"], sort=False)["value"].mean()
        agg = per_seed.groupby(level=["setting", "split"], sort=False).agg(["mean", "std"]).unstack("split")
        agg.columns = [f"{split}_{stat}" for stat, split in agg.columns]
        agg = agg.reset_index()
        agg["val_loss"] = agg.setting.map(loss)
        by = f"validation {metric}"
        if agg.val_mean.notna().any():
            agg = agg.sort_values("val_mean", ascending=False, kind="stable", na_position="last")
        else:
            agg = agg.sort_values("val_loss", kind="stable")
            by = "validation loss (the primary metric is undefined on every validation split)"
        agg.insert(0, "metric", metric)
        agg.insert(0, "model", model)
        agg.insert(0, "task", task)
        agg.insert(0, "collection", coll)
        agg["chosen"] = False
        agg.iloc[0, agg.columns.get_loc("chosen")] = True
        agg["selected_by"] = by
        out.append(agg)
    cols = ["collection", "task", "model", "metric", "setting", "val_mean", "val_std", "test_mean", "test_std",
            "val_loss", "chosen", "selected_by"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def chosen_on_seeds(collections: Mapping, search_rows: pd.DataFrame, seeds: Sequence[int], config=None,
                    models: Sequence[str] = ("glnet",), log: Callable[[str], None] | None = print,
                    workers: int = 1, runs_dir: str | Path | None = None) -> pd.DataFrame:
    """`hparam_search` rows of each searched model's chosen setting (`best_setting`: on validation) on every seed of
    ``seeds`` — notebook 02's seeds, so the setting's test score over seeds stands beside the other models' — for the
    models in ``models`` and the collections in ``collections``. Rows the search already has for a seed are reused;
    the other seeds are trained (`hparam_search` with that one setting: `run_grid`'s split of each seed, stored in and
    reused from ``runs_dir`` when given)."""
    if search_rows is None or not len(search_rows):
        return pd.DataFrame()
    chosen = best_setting(search_rows)
    chosen = chosen[chosen.chosen & chosen.model.isin(list(models)) & chosen.collection.isin(list(collections))]
    parts = []
    for c in chosen.itertuples(index=False):
        mine = search_rows[(search_rows.collection == c.collection) & (search_rows.task == c.task)
                           & (search_rows.model == c.model) & (search_rows.setting == c.setting)]
        have = mine[mine.seed.isin(list(seeds))]
        parts.append(have)
        rest = [int(s) for s in seeds if s not in set(have.seed)]
        if rest:
            space = {k: [v] for k, v in json.loads(c.setting).items()}
            parts.append(hparam_search(collections[c.collection], c.task, c.model, space, rest, config, log=log,
                                       workers=workers, runs_dir=runs_dir))
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=search_rows.columns)


def ship_tuned(collections: Mapping, tuned_rows: pd.DataFrame | None, runs: pd.DataFrame, root: str | Path,
               seeds: Sequence[int], config=None, tasks: Sequence[str] | None = None,
               log: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Per task of ``runs`` (notebook 02's grid rows, whose `select_best` choice ships): its validation score, the
    task's primary metric averaged over ``seeds``, beside that of each searched model's chosen setting on the same
    seeds (``tuned_rows``: `chosen_on_seeds`). Where a setting scores higher, it is trained at its best validation
    seed and written in the shipped checkpoint's place under ``root`` (`write_checkpoints`). ``tasks``: only these
    ``"<collection>/<task>"``. Returns one row per task: what ships now (``model``, ``setting``, ``"notebook 02"``
    where unchanged), its ``val_mean`` over ``seeds`` (what an ensemble must beat, `lol.ensemble.ship_ensemble`) and
    ``replaced``."""
    from .train import TrainConfig

    config = config or TrainConfig()
    seeds = [int(s) for s in seeds]
    scores = task_scores(runs)
    out = []
    for b in select_best(runs).itertuples(index=False):
        name = f"{b.collection}/{b.task}"
        if (tasks is not None and name not in tasks) or b.collection not in collections:
            continue
        mine = scores[(scores.collection == b.collection) & (scores.task == b.task) & (scores.model == b.model)
                      & (scores.split == "val") & (scores.metric == b.metric) & scores.seed.isin(seeds)]
        row = {"collection": b.collection, "task": b.task, "model": b.model, "setting": "notebook 02",
               "seeds": len(mine), "val_mean": float(mine.value.mean()) if len(mine) else math.nan, "replaced": False}
        found = pd.DataFrame() if tuned_rows is None or not len(tuned_rows) else tuned_rows[
            (tuned_rows.collection == b.collection) & (tuned_rows.task == b.task) & (tuned_rows.metric == b.metric)
            & (tuned_rows.split == "val") & tuned_rows.seed.isin(seeds)].dropna(subset=["value"])
        if len(found) and np.isfinite(row["val_mean"]):
            per_seed = found.groupby(["model", "setting", "seed"]).value.mean()
            means = per_seed.groupby(level=["model", "setting"]).mean()
            (kind, setting), val_mean = means.idxmax(), float(means.max())
            if val_mean > row["val_mean"]:
                seed = int(per_seed.loc[(kind, setting)].idxmax())
                cfg = _apply(config, json.loads(setting), seed)
                coll = collections[b.collection]
                ref = next(r for r in task_refs({b.collection: coll}) if r.task == b.task)
                grid = run_grid({b.collection: coll}, [ref], [kind], [seed], replace(cfg, model={}),
                                hparams={kind: cfg.model}, log=log)
                got = task_scores(grid.runs)
                got = got[got.metric == b.metric].set_index("split").value
                sel = pd.DataFrame([{
                    "collection": b.collection, "task": b.task, "model": kind, "seed": seed, "metric": b.metric,
                    "selected_by": f"{b.selected_by}: {b.model} with notebook 02's setting (val {row['val_mean']:.4f}"
                                   f" over seeds {seeds}); the setting notebook 09's search chose for {kind}, "
                                   f"{setting}, scores {val_mean:.4f} on the same seeds: trained at its best seed",
                    "candidates": b.candidates, "val_mean": val_mean, "val_seed": float(got["val"]),
                    "test_seed": float(got["test"])}])
                write_checkpoints(grid, sel, root, [ref])
                row.update(model=kind, setting=setting, val_mean=val_mean, replaced=True, seed=seed,
                           val_seed=float(got["val"]), test_seed=float(got["test"]))
        out.append(row)
    return pd.DataFrame(out)


def _transfer_unit(train_path: str, eval_path: str, task: str, kind: str, seed: int, config, hparams):
    from .collection import open_collection

    return base_transfer(open_collection(train_path), open_collection(eval_path), task, [kind], [seed], config,
                         hparams, log=None)


def base_transfer(train_coll, eval_coll, task: str, models: Sequence[str], seeds: Sequence[int] = (0, 1, 2),
                  config=None, hparams=None, log: Callable[[str], None] | None = print,
                  workers: int = 1) -> pd.DataFrame:
    """Train on the LoRAs of one base model, test on the LoRAs of its sibling (the paper's SD-1.4 → SD-1.5 test).

    Each model is trained on ``train_coll`` (grouped split, selected on its validation split) and scored on that
    collection's own test split (``eval = "same base"``) and on every LoRA of ``eval_coll`` (``"sibling base"``):
    LoRAs of another base, none of which was seen. The two collections must adapt the same modules with the same
    shapes (siblings share an architecture). Returns tidy rows (train_collection, eval_collection, eval, model,
    seed, n, label, label_kind, metric, value). ``workers`` > 1: each (model, seed) in its own process
    (`in_workers`)."""
    from .train import TrainConfig, train

    a, b = train_coll.spec, eval_coll.spec
    if list(a.names) != list(b.names) or list(a.shapes) != list(b.shapes):
        raise LoLError(f"{eval_coll.path} does not adapt the same modules as {train_coll.path}: a LoL model reads "
                       f"one module layout (siblings share the architecture)")
    config = config or TrainConfig()
    if workers > 1 and len(models) * len(seeds) > 1:
        calls = [(str(train_coll.path), str(eval_coll.path), task, kind, int(seed), config, hparams)
                 for kind in models for seed in seeds]
        if log:
            log(f"[transfer] {task}: {len(calls)} (model, seed) pairs in {min(workers, len(calls))} worker processes")
        return pd.concat(in_workers(_transfer_unit, calls, workers), ignore_index=True)
    batch, cols, kinds, table = task_data(train_coll, task, main_rows(train_coll))
    ob, oc, okinds, _ = task_data(eval_coll, task, main_rows(eval_coll))
    if okinds != kinds:
        raise LoLError(f"task {task!r} has labels {okinds} in {eval_coll.path} but {kinds} in {train_coll.path}")
    names = (str(Path(train_coll.path).name), str(Path(eval_coll.path).name))
    rows = []
    for kind in models:
        for seed in seeds:
            res = train(batch, cols, kind, replace(config, seed=int(seed), model=dict((hparams or {}).get(kind, {}))),
                        table=table, kinds=kinds)
            te = np.nonzero(res.split == "test")[0]
            evals = [("same base", names[0], batch.select(te), {k: v[te] for k, v in cols.items()}),
                     ("sibling base", names[1], ob, oc)]
            for where, coll_name, bb, cc in evals:
                for label, ms in evaluate_rows(res.model, res.targets, bb, cc).items():
                    for metric, value in ms.items():
                        rows.append({"train_collection": names[0], "eval_collection": coll_name, "eval": where,
                                     "task": task, "model": kind, "seed": seed, "n": len(bb), "label": label,
                                     "label_kind": kinds[label], "metric": metric, "value": value})
            if log:
                log(f"[transfer] {task} {kind} seed {seed}: trained on {int((res.split == 'train').sum())} LoRAs of "
                    f"{names[0]}, tested on {len(te)} of them and {len(ob)} of {names[1]}")
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------------
# results/README.md

README_SECTIONS = (
    ("Results table (test, mean ± std over seeds)", "results.md", ["results_bar.png"]),
    ("Best GL-invariant model vs the flatten MLP", "gl_vs_mlp.md", []),
    ("Shipped checkpoints", "best_checkpoints.md", []),
    ("Before and after growing the collections", "growth.md", []),
    ("Fashion recipe v2 → v3 (the catalogue look)", "fashion_v3.md", []),
    ("Regression: predicted vs actual", None, ["scatter_*.png"]),
    ("Membership", "membership_metrics.md", ["roc_*.png"]),
    ("Dataset size counted from the membership models", "size_from_membership.md", []),
    ("Rank generalization", "rank_generalization.md", ["rank_generalization_*.png"]),
    ("Transfer to a sibling base", "base_transfer.md", ["base_transfer_*.png"]),
    ("Learning curves", "learning_curves.md", ["learning_curves.png"]),
    ("Hyperparameter search on validation", "hparam_search.md", []),
    ("GL-net with its chosen setting on every seed", "hparam_tuned.md", []),
    ("Per-label scores beside always answering the commonest value", "per_label.md", []),
    ("How much of a regression label its top 10 % of LoRAs hold", "label_tail.md", []),
    ("Training on the mean of a label's measurements", "label_averaging.md", []),
    ("Ensembles of GL-invariant models", "ensembles.md", []),
    ("Dataset size counted from the membership ensemble", "ensemble_size.md", []),
    ("What ships after the hyperparameter search", "shipped_tuned.md", []),
    ("Ensembles shipped in place of a single model", "shipped_ensembles.md", []),
    ("Dataset size counted from the membership models, shipped", "shipped_counts.md", []),
    ("Speed", "speed.md", ["speed.png"]),
    ("Embeddings under a random GL transform", "embeddings_gl_change.md", ["umap_*.png"]),
)


def write_results_readme(out_dir: str | Path) -> Path:
    """``<out_dir>/README.md``: the Markdown tables and PNG figures the notebooks wrote there, in paper order. Only
    copies what the files hold: no number is typed here."""
    out = Path(out_dir)
    parts = ["# Results\n\nGenerated by the notebooks in `notebooks/` (each section names its source files); "
             "rerun them to regenerate. Models are selected on validation; every number below is a test-split "
             "number unless stated.\n"]
    for title, md, figs in README_SECTIONS:
        body = []
        if md and (out / md).is_file():
            text = (out / md).read_text().strip().splitlines()
            body.append("\n".join(text[1:] if text and text[0].startswith("# ") else text).strip())
        for pattern in figs:
            body += [f"![{p.stem}]({p.name})" for p in sorted(out.glob(pattern))]
        if body:
            parts.append(f"## {title}\n\n" + "\n\n".join(body) + "\n")
    path = out / "README.md"
    path.write_text("\n".join(parts))
    return path
