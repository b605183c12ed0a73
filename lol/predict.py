"""Predictions of a trained checkpoint for LoRAs: objects or files (`predict`), whole folder trees of files, on this
machine or on a Ray cluster (`predict_files`), or every LoRA of a packed collection beside its measured labels and the
split the model was trained on (`CollectionPredictions`)."""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .batch import LoRABatch
from .checkpoint import Checkpoint, load_checkpoint
from .lora import LoRA

__all__ = ["predict", "predict_files", "trained_on", "find_lora_files", "FilePredictions", "CollectionPredictions", "EXECUTORS"]

EXECUTORS = ("local", "ray")


def predict(checkpoint, loras: Sequence[LoRA | str | Path], device=None, chunk: int = 32) -> pd.DataFrame:
    """One row per LoRA: ``source`` then one column per label (regression in its units, binary as probability,
    category as class). Each LoRA is matched to the checkpoint's ModuleSpec by module key; a mismatch raises
    `SpecMismatchError` naming the missing, unexpected or mis-shaped modules."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, device=device)
    items = list(loras)
    rows = []
    for s in range(0, len(items), chunk):
        part = []
        for x in items[s: s + chunk]:
            if not isinstance(x, LoRA):
                from .formats import read_lora
                x = read_lora(x)
            ckpt.spec.check(x, what=f"checkpoint {ckpt.path}")
            part.append(x)
        preds = ckpt.predict_batch(LoRABatch.from_loras(part, ckpt.spec, dtype=next(ckpt.model.parameters()).dtype))
        for i, x in enumerate(part):
            rows.append({"source": x.source, **{k: v[i].item() if hasattr(v[i], "item") else v[i]
                                               for k, v in preds.items()}})
    return pd.DataFrame(rows, columns=["source", *ckpt.labels])


# ------------------------------------------------------------------------------------------------ collections

def trained_on(config: dict, coll) -> tuple[bool, bool]:
    """``(same, relabelled)`` for a checkpoint's ``config.json`` and a collection. ``same``: the checkpoint's ids
    name this collection's LoRAs — its recorded fingerprint is the collection's, or its recorded LoRAs' identity
    (`lol.collection.Collection.loras_fingerprint`) is, which survives re-measured labels; a checkpoint that records
    neither counts as trained here (nothing says otherwise). ``relabelled``: same LoRAs, another table."""
    rec = config.get("split") if isinstance(config.get("split"), dict) else {}
    fp = rec.get("fingerprint") or config.get("fingerprint")
    if not fp or fp == getattr(coll, "fingerprint", None):
        return True, False
    loras = rec.get("loras")
    same = bool(loras) and loras == getattr(coll, "loras_fingerprint", None)
    return same, same


@dataclass
class CollectionPredictions:
    """One checkpoint's predictions for every LoRA of a packed collection, beside the collection's measured labels.

    ``values``: one column per label the checkpoint predicts (regression in its units, binary as probability,
    category as class), one row per LoRA in table order, like ``truth`` (the collection's table, ``id`` as text).
    ``split``: where each LoRA was when the model was trained, from the ids the checkpoint records
    (`Checkpoint.split_of`), never re-derived — ``train``/``val``/``test``, ``""`` for a LoRA it did not use, ``unseen``
    for every LoRA of a collection it was not trained on (another fingerprint); ``split_note`` says which. Metrics are
    computed on the `evaluated` rows."""

    checkpoint: str
    truth: pd.DataFrame
    values: pd.DataFrame
    kinds: dict[str, str]  # the collection's declared kind of each label
    split: np.ndarray
    split_note: str

    @classmethod
    def of(cls, ckpt: Checkpoint, coll, values: pd.DataFrame | None = None) -> "CollectionPredictions":
        """``values`` (default: `lol.precomputed.predict_collection`, i.e. the model run on every LoRA) with the
        model's split of ``coll``."""
        if values is None:
            from .precomputed import predict_collection

            values = predict_collection(ckpt, coll)
        truth = coll.table.reset_index(drop=True)
        truth = truth.assign(id=truth["id"].astype(str))
        rec = ckpt.split or {}
        same, relabelled = trained_on(ckpt.config, coll)
        split = ckpt.split_of(truth["id"]) if same else None
        if not same:
            split, note = np.full(len(truth), "unseen", dtype=object), \
                "this model was trained on another collection: every LoRA here is unseen by it"
        elif split is None:
            split, note = np.full(len(truth), "", dtype=object), "the checkpoint does not record which LoRAs it used"
        else:
            note = f"the split recorded with the model: {rec.get('how') or 'its train/val/test LoRA ids'}"
            if relabelled:
                note += " (the same LoRAs; labels were re-measured since it was trained, metrics use today's)"
        kinds = {n: d.get("kind") for n, d in (getattr(coll, "labels", {}) or {}).items()}
        return cls(str(ckpt.path), truth, values.drop(columns=["id"], errors="ignore").reset_index(drop=True), kinds,
                   split, note)

    @property
    def ids(self) -> list[str]:
        return self.truth["id"].tolist()

    def labels(self, kind: str | None = None) -> list[str]:
        """The predicted labels the collection declares (as ``kind``) and has values for: regression, binary, then
        category labels, each in the checkpoint's order."""
        kinds = (kind,) if kind else ("regression", "binary", "category")
        return [c for k in kinds for c in self.values.columns if self.kinds.get(c) == k and c in self.truth.columns]

    @property
    def tested(self) -> bool:
        """Whether the model has a test split among these LoRAs."""
        return bool((self.split == "test").any())

    def evaluated(self) -> tuple[np.ndarray, str]:
        """``(row mask, one sentence)``: the rows to score the model on — its test split when it has one here, else
        the LoRAs it never saw (a model of another collection), else all (it records no split)."""
        if self.tested:
            return self.split == "test", f"Metrics on the model's test split ({self.split_note}); only test LoRAs " \
                                         f"are drawn."
        if (self.split == "unseen").any():
            return self.split == "unseen", f"Metrics on all LoRAs: {self.split_note}."
        return np.ones(len(self.split), dtype=bool), "Metrics on the whole collection (the model records no test " \
                                                     "split: includes its training LoRAs)."

    def value(self, label: str, lora_id: str):
        """The prediction of ``label`` for one LoRA, or None when that LoRA or label is not here."""
        rows = np.flatnonzero(self.truth["id"].to_numpy() == str(lora_id))
        return self.values[label].iloc[rows[0]] if len(rows) and label in self.values else None

    def versus(self, label: str) -> tuple[pd.DataFrame, dict[str, float]]:
        """Predicted vs measured regression ``label`` on the `evaluated` rows: the collection's rows with a
        ``<label> (predicted)`` column, and their `lol.metrics.regression_metrics`."""
        from .metrics import regression_metrics

        rows = self.evaluated()[0]
        pred = f"{label} (predicted)"
        m = self.truth[rows].assign(**{pred: self.values[label][rows].to_numpy()})
        return m, regression_metrics(m[label].to_numpy(float), m[pred].to_numpy(float))

    def binary(self, labels) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``({label: 0/1 truth}, {label: predicted probability})`` on the `evaluated` rows, for the binary
        ``labels`` predicted here (as `lol.metrics.membership_rows` and `membership_curves` take them)."""
        rows, labels = self.evaluated()[0], [lab for lab in labels if lab in self.values]
        return ({lab: self.truth[lab][rows].astype(float).to_numpy() for lab in labels},
                {lab: self.values[lab][rows].to_numpy(float) for lab in labels})

    def probabilities(self, lora_id: str, labels) -> tuple[list[str], list[float], list[bool | None]]:
        """One LoRA's predicted probability and truth (None when unknown) for the binary ``labels`` predicted here."""
        i, labels = self.ids.index(lora_id), [lab for lab in labels if lab in self.values]
        truth = [self.truth[lab].iloc[i] for lab in labels]
        return labels, [float(self.values[lab].iloc[i]) for lab in labels], \
            [bool(t) if pd.notna(t) else None for t in truth]

    def attribute_rows(self, labels) -> list[dict]:
        """Per binary or category label of ``labels`` predicted here, on the `evaluated` rows: ``AUC``, ``accuracy``
        (a binary label at probability 0.5, a category as its most likely class) and ``balanced accuracy``
        (`lol.metrics`), the ``positives`` of a binary label and the number of ``LoRAs`` scored."""
        from .metrics import binary_metrics, category_metrics

        rows, (mask, _) = [], self.evaluated()
        for lab in [lab for lab in labels if lab in self.values]:
            y, p = self.truth[lab][mask], self.values[lab][mask]
            if self.kinds.get(lab) == "category":
                ok = y.notna().to_numpy()
                r = category_metrics(y.to_numpy(object)[ok], p.to_numpy(object)[ok])
                rows.append({"attribute": lab, "AUC": float("nan"), "accuracy": r["accuracy"],
                             "balanced accuracy": r["balanced_accuracy"], "positives": float("nan"),
                             "LoRAs": int(ok.sum())})
            else:
                r = binary_metrics(y.astype(float).to_numpy(), p.to_numpy(float))
                rows.append({"attribute": lab, "AUC": r["auc"], "accuracy": r["accuracy"],
                             "balanced accuracy": r["balanced_accuracy"], "positives": int(y.astype(float).sum()),
                             "LoRAs": int(mask.sum())})
        return rows

    def frame(self) -> pd.DataFrame:
        """For people (tables, hover, colour): ``id``, ``<label> (predicted)`` for every predicted label,
        ``<label> error`` (predicted − measured) for every numeric regression label, and ``split (model)``."""
        out = self.values.rename(columns=lambda c: f"{c} (predicted)")
        out.insert(0, "id", self.truth["id"])
        out["split (model)"] = self.split
        for lab in self.labels("regression"):
            if pd.api.types.is_numeric_dtype(self.truth[lab]):
                out[f"{lab} error"] = self.values[lab].to_numpy(float) - self.truth[lab].to_numpy(float)
        return out


# ------------------------------------------------------------------------------------------------ folder trees

@dataclass
class FilePredictions:
    """What `predict_files` returns. ``table``: ``path`` then one column per label, one row per scored LoRA, in the
    order the files were found (sorted within each folder; arguments in the order given) — the same for every
    executor. ``skipped``: ``path`` and ``reason`` for every file found that was not scored (unreadable, another
    module spec, not a LoRA file, a worker that died on it), in the same order. Nothing found is in neither."""

    table: pd.DataFrame
    skipped: pd.DataFrame
    executor: str = "local"

    def __len__(self) -> int:
        return len(self.table)

    def save(self, out) -> list[Path]:
        """Write ``table`` to ``out`` (``.parquet``, ``.tsv``, else CSV) and ``skipped`` beside it as
        ``<stem>.skipped.csv`` (always written, empty when nothing was skipped). Returns both paths."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix in (".parquet", ".pq"):
            self.table.to_parquet(out, index=False)
        else:
            self.table.to_csv(out, index=False, sep="\t" if out.suffix == ".tsv" else ",")
        side = out.with_name(out.stem + ".skipped.csv")
        self.skipped.to_csv(side, index=False)
        return [out, side]


def find_lora_files(paths) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(LoRAs, not LoRAs)`` for paths given by a user: a file or a PEFT folder is one LoRA; any other folder is
    searched recursively (`lol.formats.scan_tree`: ``.safetensors`` files and PEFT folders, sorted; every other
    file listed with its reason). A missing path and a packed collection are listed with their reason."""
    from .formats import PEFT_CONFIG_NAME, scan_tree

    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        if not p.exists():
            skipped.append((p, "no such file or folder"))
        elif p.is_file() or (p / PEFT_CONFIG_NAME).is_file():
            found.append(p)
        elif (p / "collection.json").is_file():
            skipped.append((p, "a packed collection, not LoRA files: predict it with lol.stream.predict_stream"))
        else:
            f, s = scan_tree(p)
            found += f
            skipped += s
    return found, skipped


def _chunk_results(ckpt: Checkpoint, paths: Sequence[str]) -> list[tuple[str, object]]:
    """``("ok", {label: value})`` or ``("skip", reason)`` per path: every file read and checked against the
    checkpoint's spec on its own (a bad one is skipped with its reason, never raised), the good ones predicted as one
    batch, in order. The executors call this on the same chunks, so their numbers are the same."""
    from .formats import read_lora

    out: list[tuple[str, object]] = []
    good: list[tuple[int, LoRA]] = []
    for p in paths:
        try:
            lora = read_lora(p)
            ckpt.spec.check(lora, what=f"checkpoint {ckpt.path}")
        except Exception as e:  # noqa: BLE001 -- any failure on one file skips that file, named with its reason
            out.append(("skip", _reason(e, p)))
            continue
        good.append((len(out), lora))
        out.append(("ok", None))
    if good:
        dtype = next(ckpt.model.parameters()).dtype
        preds = ckpt.predict_batch(LoRABatch.from_loras([x for _, x in good], ckpt.spec, dtype=dtype))
        for b, (i, _) in enumerate(good):
            out[i] = ("ok", {k: v[b].item() if hasattr(v[b], "item") else v[b] for k, v in preds.items()})
    return out


def _reason(e: BaseException, path: str) -> str:
    """One line: the library's own message (without a leading ``PATH: ``, the row names the file), else the
    exception's type and message."""
    from .errors import LoLError

    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror
    elif not isinstance(e, LoLError):
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    for prefix in (f"{path}: ", f"{Path(path)}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg or type(e).__name__


def _chunks(items: list, size: int) -> list[list]:
    return [items[s:s + size] for s in range(0, len(items), size)]


def predict_files(checkpoint, paths, executor: str = "local", *, batch_size: int = 32, files_per_task: int = 256,
                  ray_address: str | None = None, num_cpus: int | None = None, device=None,
                  progress: bool = False) -> FilePredictions:
    """Predict every LoRA file under ``paths`` (files, PEFT folders, folder trees; any format `lol.formats` reads)
    with ``checkpoint`` (a folder or a loaded `Checkpoint`). Returns a `FilePredictions` (``table`` and ``skipped``);
    a file that cannot be scored never stops the run and is never dropped silently: it is in ``skipped`` with its
    reason.

    ``executor="local"`` scores in this process; ``"ray"`` spreads the files over a Ray cluster: tasks of
    ``files_per_task`` files (one CPU each), the checkpoint shipped once through the object store (workers need no
    copy of it), the LoRA files read by the workers from the same paths (a multi-machine cluster needs them on
    shared storage). It uses the running Ray instance when this process has one (``ray.init`` in a notebook),
    else connects to ``ray_address`` (``"auto"``: the cluster `ray start` began on this machine), else starts a
    local one with ``num_cpus`` CPUs (default all) and shuts it down at the end. Both executors predict the same
    chunks of ``batch_size`` files, so the table is the same, row for row and bit for bit (tested with one torch
    thread on both sides; Ray workers run one thread per task, and GL-net's outputs were also bitwise the same at 1
    and 2 threads); a task whose worker dies is retried file by file (those files then predicted alone, equal up to
    float rounding), and a file whose own task dies is skipped with the error."""
    if executor not in EXECUTORS:
        from .errors import LoLError
        raise LoLError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, device=device)
    found, not_lora = find_lora_files(paths)
    files = [str(p) for p in found]
    chunks = _chunks(files, max(1, int(batch_size)))
    if executor == "local":
        results: list[tuple[str, object]] = []
        bar = _bar(len(files), "predicting", progress)
        for c in chunks:
            results += _chunk_results(ckpt, c)
            bar.update(len(c))
        bar.close()
    else:
        results = _run_ray(ckpt, chunks, max(1, int(files_per_task) // max(1, int(batch_size))), ray_address,
                           num_cpus, progress)
    rows = [{"path": f, **r} for f, (kind, r) in zip(files, results) if kind == "ok"]
    skipped = [(str(p), why) for p, why in not_lora] + [(f, r) for f, (kind, r) in zip(files, results)
                                                       if kind == "skip"]
    order = {str(p): i for i, p in enumerate([*found, *(p for p, _ in not_lora)])}
    skipped.sort(key=lambda x: order.get(x[0], len(order)))
    return FilePredictions(pd.DataFrame(rows, columns=["path", *ckpt.labels]),
                           pd.DataFrame(skipped, columns=["path", "reason"]), executor)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="file", file=sys.stderr, mininterval=0.5)


# ---------------------------------------------------------------------------------------------------------- Ray

_WORKER_CKPT: dict[str, Checkpoint] = {}  # per Ray worker process: checkpoints already loaded, by content hash


def _checkpoint_blob(ckpt: Checkpoint) -> dict:
    """The checkpoint folder's two files as bytes (what a worker on another machine needs), with their hash."""
    from .checkpoint import CONFIG_NAME, WEIGHTS_NAME

    files = {name: (Path(ckpt.path) / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    key = hashlib.sha256(b"".join(files[n] for n in sorted(files))).hexdigest()
    return {"key": key, "files": files, "path": str(ckpt.path)}


def _worker_checkpoint(blob: dict) -> Checkpoint:
    ck = _WORKER_CKPT.get(blob["key"])
    if ck is None:
        with tempfile.TemporaryDirectory(prefix="lol-ckpt-") as d:
            for name, data in blob["files"].items():
                (Path(d) / name).write_bytes(data)
            ck = load_checkpoint(d, device="cpu")
        ck.path = Path(blob["path"])  # named as on the driver (messages, e.g. spec mismatches, say the same)
        _WORKER_CKPT[blob["key"]] = ck
    return ck


def _ray_task(blob: dict, chunks: list[list[str]]) -> list[list[tuple[str, object]]]:
    """One Ray task: each chunk scored as the local executor scores it."""
    ck = _worker_checkpoint(blob)
    return [_chunk_results(ck, c) for c in chunks]


def _run_ray(ckpt: Checkpoint, chunks: list[list[str]], chunks_per_task: int, address: str | None,
             num_cpus: int | None, progress: bool) -> list[tuple[str, object]]:
    import ray

    started = False
    if not ray.is_initialized():
        kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **kw)
        started = True
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_task)  # a dead task is retried file by file (below)
        blob = ray.put(_checkpoint_blob(ckpt))
        groups = _chunks(list(range(len(chunks))), chunks_per_task)  # chunk numbers per task
        futures = {task.remote(blob, [chunks[i] for i in g]): g for g in groups}
        done: dict[int, list[tuple[str, object]]] = {}
        bar = _bar(sum(len(c) for c in chunks), "predicting (ray)", progress)
        pending = list(futures)
        retry: dict = {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ref = ready[0]
            try:
                out = ray.get(ref)
            except (ray.exceptions.RayError, OSError) as e:
                if ref in futures:  # a whole task failed (its worker died?): every file again on its own
                    for i in futures[ref]:
                        for j, f in enumerate(chunks[i]):
                            r = task.remote(blob, [[f]])
                            retry[r] = (i, j, len(chunks[i]))
                            pending.append(r)
                else:  # a single file's own task failed: that file is skipped with the error
                    i, j, n = retry[ref]
                    done.setdefault(i, [None] * n)[j] = ("skip", f"worker failed on this file: "
                                                                 f"{_first_line(e)}")
                    bar.update(1)
                continue
            if ref in futures:
                for i, res in zip(futures[ref], out):
                    done[i] = res
                    bar.update(len(res))
            else:
                i, j, n = retry[ref]
                done.setdefault(i, [None] * n)[j] = out[0][0]
                bar.update(1)
        bar.close()
    finally:
        if started:
            ray.shutdown()
    return [r for i in range(len(chunks)) for r in done[i]]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".strip()
