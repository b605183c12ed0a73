"""Training and prediction on a collection larger than RAM, streamed from its memory-mapped factors file.

`lol.train.train` gathers the whole collection into one in-memory batch (fast for the shipped collections, hundreds
of MB at most). Here nothing but the table and the labels is ever held whole:

* `CollectionStream` (a ``torch.utils.data.IterableDataset``, used through a ``DataLoader``) reads the selected
  LoRAs a *chunk* at a time (``chunk`` consecutive selected LoRAs, a few hundred: per module and rank bucket a run of
  neighbouring rows, so reads are near-sequential), cuts each chunk into minibatches, and calls
  `Collection.release` every ``release_mb`` MB of file spanned, so the pages it has read leave the process: its
  memory is flat whatever the collection's size. Shuffling is two-level: the order of chunks and the order of LoRAs within a
  chunk, both reseeded per epoch (`set_epoch`) — the usual trade-off of streamed datasets (a minibatch holds LoRAs
  of one chunk), harmless when the collection's order carries no signal. With ``num_workers > 0`` each DataLoader
  worker opens the collection itself and takes every ``num_workers``-th chunk.
* `train_stream` trains any registry model for a fixed number of epochs (no early stopping: a cost measurement
  wants a fixed amount of work), with the collection's ``split`` column (else a seeded split) and validation
  metrics after the last epoch; ``model.fit`` (featurizer state, e.g. GL-net's head scale) sees the first
  ``fit_size`` training LoRAs.
* `predict_stream` predicts every selected LoRA, a minibatch at a time.

`bench scale` measures time and peak memory of both at 10³–10⁵ LoRAs.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from .batch import LoRABatch, rank_major
from .collection import Collection, open_collection

__all__ = ["CollectionStream", "stream_loader", "train_stream", "predict_stream", "StreamTrainResult",
           "chunk_size"]

CHUNK_BYTES = 128 << 20  # float32 bytes of one chunk (its minibatches are cut from it)


def chunk_size(coll: Collection, batch_size: int, max_bytes: int = CHUNK_BYTES) -> int:
    """LoRAs per chunk: as many whole minibatches as fit ``max_bytes`` of float32 factors at the collection's largest
    ranks (at least one minibatch)."""
    rmax = coll.ranks.max(dim=0).values.tolist() if len(coll) else [1] * len(coll.spec)
    per_lora = 4 * sum((o + i) * r for (o, i), r in zip(coll.spec.shapes, rmax))
    return max(1, max_bytes // max(1, per_lora * batch_size)) * batch_size


class CollectionStream(torch.utils.data.IterableDataset):
    """Minibatches ``(indices, LoRABatch)`` of the LoRAs ``indices`` (default all) of a collection, streamed a chunk at
    a time from its memory-mapped file (see the module docstring). ``collection`` is a path or an open `Collection`
    (DataLoader workers reopen it by path). Iterate it directly, or through `stream_loader`."""

    def __init__(self, collection, indices=None, batch_size: int = 64, shuffle: bool = False, seed: int = 0,
                 chunk: int | None = None, release_mb: float = 256, dtype: torch.dtype = torch.float32):
        super().__init__()
        coll = collection if isinstance(collection, Collection) else open_collection(collection)
        self.path = Path(coll.path)
        self._coll: Collection | None = coll
        idx = np.arange(len(coll)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        self.indices = np.sort(idx) if shuffle else idx  # chunks of sorted positions read neighbouring rows
        self.batch_size, self.shuffle, self.seed, self.dtype = int(batch_size), bool(shuffle), int(seed), dtype
        self.chunk = int(chunk or chunk_size(coll, self.batch_size))
        self.release_bytes = int(release_mb * (1 << 20))
        self._stored_per_lora = _stored_bytes(coll)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle differently in each epoch (chunk order and order within chunks, seeded by ``(seed, epoch)``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n, c, b = len(self.indices), self.chunk, self.batch_size
        full, rest = divmod(n, c)
        return full * math.ceil(c / b) + math.ceil(rest / b)

    def __getstate__(self):  # to a DataLoader worker: the path, never the mapped tensors
        state = dict(self.__dict__)
        state["_coll"] = None
        return state

    def _collection(self) -> Collection:
        if self._coll is None:
            self._coll = open_collection(self.path)
        return self._coll

    def __iter__(self) -> Iterator[tuple[torch.Tensor, LoRABatch]]:
        coll = self._collection()
        n_chunks = math.ceil(len(self.indices) / self.chunk)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n_chunks, generator=g).tolist() if self.shuffle else list(range(n_chunks))
        info = torch.utils.data.get_worker_info()
        if info is not None:
            order = order[info.id::info.num_workers]
        read = 0
        for k in order:
            idx = torch.from_numpy(self.indices[k * self.chunk:(k + 1) * self.chunk])
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 7_919 + k)
            within = torch.randperm(len(idx), generator=gen) if self.shuffle else torch.arange(len(idx))
            big = coll.batch(idx, dtype=self.dtype)
            # the file span the chunk touched, not only its LoRAs' bytes: a sparse selection (every 10th LoRA) maps
            # the pages between its rows too (the kernel maps neighbouring cached pages on each fault)
            read += (int(idx.max()) - int(idx.min()) + 1) * self._stored_per_lora if len(idx) else 0
            for s in range(0, len(idx), self.batch_size):
                sel = within[s:s + self.batch_size]
                yield idx[sel], _trim(big.select(sel))
            del big
            if read >= self.release_bytes:
                coll.release()
                read = 0


def _stored_bytes(coll: Collection) -> int:
    """Bytes of the factors file per LoRA on average (what a pass reads)."""
    try:
        size = (coll.path / "factors.safetensors").stat().st_size
    except OSError:
        return 1
    return max(1, size // max(1, len(coll)))


def _trim(b: LoRABatch) -> LoRABatch:
    """A minibatch cut from a chunk keeps the chunk's width per module; narrow it to the minibatch's largest rank,
    as `Collection.batch` of those LoRAs alone would be (same values: the columns dropped are zero padding)."""
    if b.uniform_rank is not None:
        return b
    widths = b.ranks.max(dim=0).values.tolist()
    return LoRABatch(b.spec, [rank_major(u[..., :w]) for u, w in zip(b.U, widths)],
                     [rank_major(v[..., :w]) for v, w in zip(b.V, widths)], b.ranks)


def stream_loader(stream: CollectionStream, num_workers: int = 0, prefetch_factor: int | None = None):
    """A ``DataLoader`` over a `CollectionStream` (it yields whole minibatches: ``batch_size=None``)."""
    kw = {"prefetch_factor": prefetch_factor} if num_workers and prefetch_factor else {}
    return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, **kw)


@dataclass
class StreamTrainResult:
    model: torch.nn.Module
    kind: str
    targets: object          # lol.targets.TargetSet
    labels: list[str]
    history: list[dict]      # per epoch: epoch, train_loss, seconds, LoRAs seen
    metrics: dict            # {"val": {label: {metric: value}}} after the last epoch
    seconds: float
    n_train: int
    n_val: int
    fingerprint: str | None = None
    config: dict = field(default_factory=dict)

    def save(self, path) -> Path:
        """A checkpoint `lol predict` and `predict_stream` read (no split record: the split is the collection's)."""
        from .checkpoint import save_checkpoint

        return save_checkpoint(path, self.model, self.targets, fingerprint=self.fingerprint, metrics=self.metrics,
                               train_config={**self.config, "streamed": True},
                               extra={"seconds": round(self.seconds, 2)})


def _split_indices(coll: Collection, seed: int) -> dict[str, np.ndarray]:
    from .splits import make_splits, split_indices

    t = coll.table
    if "split" in t.columns and t["split"].notna().all():
        split = t["split"].astype(str).to_numpy(object)
    else:
        groups = t["group"].to_numpy() if "group" in t.columns else None
        split = make_splits(len(t), seed=seed, groups=groups)
    return split_indices(split)


def train_stream(collection, labels=None, kind: str = "glnet", *, epochs: int = 3, batch_size: int = 64,
                 lr: float = 1e-3, weight_decay: float = 1e-4, width: int = 64, seed: int = 0, model: dict | None = None,
                 fit_size: int = 512, chunk: int | None = None, num_workers: int = 0, release_mb: float = 256,
                 progress: bool = False, log=None) -> StreamTrainResult:
    """Train a ``kind`` model on ``labels`` (task, label or list; all labels by default) of a collection (path or
    `Collection`) for ``epochs`` passes over its training split, streamed (`CollectionStream`); CPU only (the
    point is a machine whose RAM the collection exceeds). Returns the model, its targets, the per-epoch history and
    validation metrics."""
    from .models import build_model
    from .symmetry import gl_act, random_gl_like
    from .targets import TargetSet

    t0 = time.time()
    coll = collection if isinstance(collection, Collection) else open_collection(collection)
    names = coll.label_columns(labels)
    cols = {n: coll.table[n].to_numpy() for n in names}
    kinds = {n: (coll.labels.get(n) or {}).get("kind") for n in names}
    idx = _split_indices(coll, seed)
    if len(idx["train"]) == 0 or len(idx["val"]) == 0:
        from .errors import LoLError
        raise LoLError(f"{coll.path}: need LoRAs in both the train and val splits")
    targets = TargetSet.fit(cols, kinds, idx["train"])
    Y = targets.encode(cols)

    torch.manual_seed(seed)
    net = build_model(kind, coll.spec, targets.n_outputs, width=width, **(model or {}))
    net.fit(coll.batch(np.sort(idx["train"])[:fit_size]))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    train = CollectionStream(coll, idx["train"], batch_size, shuffle=True, seed=seed, chunk=chunk,
                             release_mb=release_mb)
    loader = stream_loader(train, num_workers)
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=epochs * len(train), desc=f"train {kind} (streamed)", unit="batch", leave=False)
    for epoch in range(1, epochs + 1):
        te = time.time()
        train.set_epoch(epoch)
        net.train()
        total, seen = 0.0, 0
        for i, x in loader:
            if net.augment_gl:
                x = gl_act(x, random_gl_like(x, seed=int(torch.randint(2**31, (1,), generator=gen))))
            loss = targets.loss(net(x), Y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(i)
            seen += len(i)
            if bar is not None:
                bar.update(1)
        history.append({"epoch": epoch, "train_loss": total / max(1, seen), "seconds": time.time() - te,
                        "loras": seen})
        if log is not None:
            log(f"epoch {epoch}/{epochs}: train loss {total / max(1, seen):.4f} ({time.time() - te:.1f} s)")
    if bar is not None:
        bar.close()
    net.eval()
    val = np.asarray(idx["val"])
    out = _forward_stream(net, coll, val, max(batch_size, 256), chunk=None, release_mb=release_mb)
    metrics = {"val": targets.metrics(out, {k: v[val] for k, v in cols.items()})}
    cfg = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "width": width,
           "seed": seed, "model": model or {}, "fit_size": fit_size}
    return StreamTrainResult(net, kind, targets, names, history, metrics, time.time() - t0, len(idx["train"]),
                             len(val), coll.fingerprint, cfg)


@torch.no_grad()
def _forward_stream(net, coll: Collection, indices, batch_size: int, chunk=None, release_mb: float = 256,
                    num_workers: int = 0) -> torch.Tensor:
    """Raw model outputs for ``indices`` in that order (the stream does not shuffle)."""
    net.eval()
    p = next(iter(net.parameters()))
    stream = CollectionStream(coll, indices, batch_size, shuffle=False, chunk=chunk, release_mb=release_mb,
                              dtype=p.dtype)
    outs = [net(x.to(device=p.device)) for _, x in stream_loader(stream, num_workers)]
    return torch.cat(outs) if outs else torch.zeros(0, net.n_outputs)


def predict_stream(checkpoint, collection, indices=None, batch_size: int = 256, chunk: int | None = None,
                   release_mb: float = 256, num_workers: int = 0) -> pd.DataFrame:
    """Predictions of a checkpoint (folder, `Checkpoint`, or `StreamTrainResult`) for the LoRAs ``indices`` (default
    all) of a collection, streamed: one row per LoRA in that order, ``id`` then one column per label (as
    `lol.predict.predict`)."""
    from .checkpoint import Checkpoint, load_checkpoint

    if isinstance(checkpoint, StreamTrainResult):
        net, targets = checkpoint.model, checkpoint.targets
    else:
        ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        net, targets = ck.model, ck.targets
    coll = collection if isinstance(collection, Collection) else open_collection(collection)
    idx = np.arange(len(coll)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    out = _forward_stream(net, coll, idx, batch_size, chunk, release_mb, num_workers)
    df = pd.DataFrame(targets.decode(out))
    df.insert(0, "id", coll.table["id"].to_numpy()[idx])
    return df
