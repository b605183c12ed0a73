"""Training a LoL model on a collection (or a `LoRABatch` with label arrays).

``train(data, labels, kind, config)``:

1. splits: the collection's ``split`` column if present, else a seeded grouped split (`lol.splits.make_splits`, by the
   ``group`` column when there is one);
2. targets (`lol.targets.TargetSet`): regression labels normalized with training-split statistics only; binary labels
   trained with multi-label BCE; categories with cross-entropy, ordered ones (counts) as a regression;
3. ``model.fit(train split)`` sets featurizer state (templates, ranks, standardization) from training LoRAs only;
4. AdamW with minibatches; models whose featurizer is fixed (``precompute``) are featurized once; ``mlp_aug`` gets a
   fresh random GL(r) element per module and LoRA on every minibatch;
5. early stopping on the validation loss (the best epoch's weights are kept);
6. metrics (`lol.metrics`) on every split, in each label's own units.

`TrainResult.save` writes a checkpoint that records the exact split (`TrainResult.split_record`: the train/val/test
LoRA ids and the collection fingerprint), so no consumer re-derives it.

CUDA is used when present (else CPU). A run is deterministic for a given seed on a given device.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .batch import LoRABatch
from .errors import LoLError
from .models import LoLModel, build_model
from .splits import check_grouped, make_splits, split_indices
from .symmetry import gl_act, random_gl_like
from .targets import TargetSet

__all__ = ["TrainConfig", "TrainResult", "train", "resolve_device"]


@dataclass
class TrainConfig:
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 64
    width: int = 64
    seed: int = 0
    patience: int = 30
    device: str | None = None
    fractions: tuple = (0.7, 0.15, 0.15)
    model: dict = field(default_factory=dict)   # further model hyperparameters, e.g. {"channels": 32}
    progress: bool = True


@dataclass
class TrainResult:
    model: LoLModel
    kind: str
    targets: TargetSet
    config: TrainConfig
    metrics: dict[str, dict[str, dict[str, float]]]   # split → label → metric → value
    history: list[dict]
    best_epoch: int
    split: np.ndarray
    predictions: pd.DataFrame                        # one row per LoRA: id (if known), split, predicted labels
    fingerprint: str | None = None
    seconds: float = 0.0
    split_how: str = ""                              # how the split was made, in words
    device: str = ""                                 # where it trained and computed `predictions` (model: on CPU)
    loras_fingerprint: str | None = None             # the LoRAs' identity, labels aside (`Collection.loras_fingerprint`)

    def split_record(self) -> dict:
        """The exact split, for the checkpoint (`lol.checkpoint.save_checkpoint`): ``{"by": "id", "train": [ids],
        "val": [...], "test": [...], "how": ..., "fingerprint": collection fingerprint, "loras": the collection's
        `lol.collection.Collection.loras_fingerprint`}``. LoRAs are named by their ``id`` when the training table had
        one, else (``"by": "position"``) by row number in the training batch."""
        if "id" in self.predictions.columns:
            by, names = "id", [str(i) for i in self.predictions["id"]]
        else:
            by, names = "position", list(range(len(self.split)))
        return {"by": by, "how": self.split_how, "fingerprint": self.fingerprint, "loras": self.loras_fingerprint,
                **{s: [names[i] for i in np.nonzero(self.split == s)[0]] for s in ("train", "val", "test")}}

    def save(self, path) -> "Any":
        from .checkpoint import save_checkpoint
        return save_checkpoint(path, self.model, self.targets, fingerprint=self.fingerprint,
                               metrics=self.metrics, train_config=asdict(self.config), split=self.split_record(),
                               extra={"best_epoch": self.best_epoch, "seconds": round(self.seconds, 2),
                                      "device": self.device})


def resolve_device(device: str | None = None) -> torch.device:
    from .devices import default_device

    return torch.device(default_device(device))


def _resolve_data(data, labels, table, kinds, ordered):
    """→ (batch, {label: values}, kinds, ordered, table, (fingerprint, loras fingerprint)); a collection's schema gives the kinds and
    ``ordered`` flags that the arguments leave out."""
    if hasattr(data, "batch") and hasattr(data, "table") and hasattr(data, "label_columns"):
        names = data.label_columns(labels)
        table = data.table
        schema = {n: data.labels.get(n) or {} for n in names}
        kinds = {n: d.get("kind") for n, d in schema.items()} | dict(kinds or {})
        ordered = {n: bool(d["ordered"]) for n, d in schema.items() if "ordered" in d} | dict(ordered or {})
        missing = [n for n in names if n not in table.columns]
        if missing:
            raise LoLError(f"{getattr(data, 'path', 'collection')}: label column(s) {missing} missing from the table")
        return data.batch(dtype=torch.float32), {n: table[n].to_numpy() for n in names}, kinds, ordered, table, \
            (data.fingerprint, getattr(data, "loras_fingerprint", None))
    if not isinstance(data, LoRABatch):
        raise TypeError(f"train: expected a collection or a LoRABatch, got {type(data).__name__}")
    if isinstance(labels, pd.DataFrame):
        labels = {c: labels[c].to_numpy() for c in labels.columns}
    if isinstance(labels, dict):
        cols = {k: np.asarray(v) for k, v in labels.items()}
    elif table is not None:
        names = [labels] if isinstance(labels, str) else list(labels)
        cols = {n: table[n].to_numpy() for n in names}
    else:
        raise LoLError("train: with a LoRABatch, pass labels as {name: values} or a DataFrame (or table=)")
    bad = {k: len(v) for k, v in cols.items() if len(v) != len(data)}
    if bad:
        raise LoLError(f"train: label lengths {bad} differ from the batch size {len(data)}")
    return data, cols, dict(kinds or {}), dict(ordered or {}), table, (None, None)


def _splits(n, table, cfg):
    """→ (split array, {split: indices}, how the split was made in words)."""
    groups = table["group"].to_numpy() if table is not None and "group" in table.columns else None
    if table is not None and "split" in table.columns and table["split"].notna().all():
        split = table["split"].astype(str).to_numpy(object)
        how = "the collection's split column"
    else:
        split = make_splits(n, cfg.fractions, cfg.seed, groups)
        how = (f"seeded {'grouped ' if groups is not None else ''}split with seed {cfg.seed} and fractions "
               f"{'/'.join(f'{f:g}' for f in cfg.fractions)}")
    if groups is not None:
        check_grouped(split, groups)
    idx = split_indices(split)
    if len(idx["train"]) == 0 or len(idx["val"]) == 0:
        raise LoLError(f"train: need LoRAs in both the train and val splits (got {len(idx['train'])} train, "
                       f"{len(idx['val'])} val)")
    return split, idx, how


def _outputs(model, inputs, n, chunk=256):
    model.eval()
    fwd = model.forward_features if model.precompute else model.forward
    outs = []
    with torch.no_grad():
        for s in range(0, n, chunk):
            outs.append(fwd(inputs(torch.arange(s, min(s + chunk, n)))))
    return torch.cat(outs)


def train(data, labels=None, kind: str = "glnet", config: TrainConfig | None = None, *, table=None, kinds=None,
          ordered=None, **overrides) -> TrainResult:
    """Train a model of ``kind`` to predict ``labels`` (a task name, label name or list for a collection; a dict or
    DataFrame for a LoRABatch). ``overrides`` replace fields of ``config`` (e.g. ``epochs=50``). ``ordered``
    ({label: bool}) overrides which category labels get an ordinal head (`lol.targets`; a collection's schema can
    say so with ``"ordered"``; by default a category of integers is ordered)."""
    cfg = copy.deepcopy(config) if config is not None else TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"train: unknown option {k!r}")
        setattr(cfg, k, v)
    t0 = time.time()
    batch, cols, kinds, ordered, table, (fingerprint, loras_fp) = _resolve_data(data, labels, table, kinds, ordered)
    n = len(batch)
    split, idx, split_how = _splits(n, table, cfg)
    targets = TargetSet.fit(cols, kinds, idx["train"], ordered=ordered)
    Y = targets.encode(cols)
    device = resolve_device(cfg.device)

    torch.manual_seed(cfg.seed)
    model = build_model(kind, batch.spec, targets.n_outputs, width=cfg.width, **cfg.model)
    model.fit(batch.select(idx["train"]))
    model.to(device)

    if model.precompute:
        with torch.no_grad():
            X = torch.cat([model.featurize(batch.select(torch.arange(s, min(s + 256, n))).to(device=device))
                           for s in range(0, n, 256)])
        inputs = lambda i: X[i.to(device)]                               # noqa: E731
    else:
        dev_batch = batch.to(device=device)
        inputs = lambda i: dev_batch.select(i.to(device))               # noqa: E731
    Y = Y.to(device)

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_idx = torch.as_tensor(idx["train"])
    val_idx = torch.as_tensor(idx["val"])
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    history = []
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.epochs, desc=f"train {kind}", unit="epoch", leave=False)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        total = 0.0
        for s in range(0, len(perm), cfg.batch_size):
            i = perm[s: s + cfg.batch_size]
            x = inputs(i)
            if model.augment_gl:
                x = gl_act(x, random_gl_like(x, seed=int(torch.randint(2**31, (1,), generator=gen))))
            out = model.forward_features(x) if model.precompute else model(x)
            loss = targets.loss(out, Y[i.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(i)
        val_loss = float(targets.loss(_outputs(model, lambda j: inputs(val_idx[j]), len(val_idx)),
                                      Y[val_idx.to(device)]))
        history.append({"epoch": epoch, "train_loss": total / len(perm), "val_loss": val_loss})
        if val_loss < best[0]:
            best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
        if bar is not None:
            bar.set_postfix(train=f"{total / len(perm):.4f}", val=f"{val_loss:.4f}", best=best[1])
            bar.update(1)
        if epoch - best[1] >= cfg.patience:
            break
    if bar is not None:
        bar.close()
    model.load_state_dict(best[2])
    model.eval()

    out = _outputs(model, inputs, n)
    metrics = {}
    for s, ix in idx.items():
        if len(ix):
            metrics[s] = targets.metrics(out[torch.as_tensor(ix).to(device)], {k: v[ix] for k, v in cols.items()})
    pred = pd.DataFrame(targets.decode(out))
    pred.insert(0, "split", split)
    if table is not None and "id" in table.columns:
        pred.insert(0, "id", table["id"].to_numpy())
    return TrainResult(model.cpu(), kind, targets, cfg, metrics, history, best[1], split, pred, fingerprint,
                       time.time() - t0, split_how, str(device), loras_fp)
