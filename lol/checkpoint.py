"""Checkpoints: a folder with ``model.safetensors`` (weights and fitted featurizer state, e.g. the O-Align template, as
tensors) and ``config.json`` (model kind and hyperparameters, label names/kinds and normalization, ModuleSpec,
training-data fingerprint, metrics, training config, and the exact split: ``"split"``, the train/val/test LoRA ids
with the collection fingerprint, see `lol.train.TrainResult.split_record`). Loading needs no pickle and no training
state. `Checkpoint.split_of` is the one place a consumer (e.g. the app) learns which LoRAs a model was trained,
validated and tested on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batch import LoRABatch
from .errors import LoLError
from .lora import ModuleSpec
from .models import LoLModel, build_model, gl_invariant, model_class
from .models.base import iter_chunks
from .targets import TargetSet, nan_to_none

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "default_checkpoint", "store_half", "half_bytes",
           "symmetric_inputs", "fold_symmetric", "unfold_symmetric", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
FORMAT = "lol-checkpoint"
VERSION = 1
FOLDED_VERSION = 2   # a checkpoint with folded weights (`store_half`): lol older than folding cannot read it


def save_checkpoint(path, model: LoLModel, targets: TargetSet, *, fingerprint: str | None = None,
                    metrics: dict | None = None, train_config: dict | None = None, split: dict | None = None,
                    extra: dict | None = None) -> Path:
    """Write the checkpoint folder. ``split`` is the exact split record (`lol.train.TrainResult.split_record`)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": FORMAT, "kind": model.kind})
    config = {"format": FORMAT, "version": VERSION, "kind": model.kind, "hparams": model.config(),
              "n_outputs": model.n_outputs, "invariant_to": model.invariant_to, "requires": model.requires,
              "spec": model.spec.to_json(), "labels": targets.to_json(), "fingerprint": fingerprint,
              "metrics": nan_to_none(metrics or {}), "train": train_config or {}, "split": split, **(extra or {})}
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=1, default=str))
    return path


HALF_MIN_NUMEL = 65_536  # `store_half`: tensors at least this large are stored in float16 (the first layers)


def store_half(path, min_numel: int = HALF_MIN_NUMEL) -> dict[str, Any]:
    """Rewrite a checkpoint's weights compactly, as shipped checkpoints are stored:

    * **folded**: a weight whose input columns read a flattened symmetric matrix per module (the column-space
      projectors of ``colspace``: `lol.models.LoLModel.symmetric_input_weights`) keeps one column per entry i ≤ j, the
      sum of the (i, j) and (j, i) columns, since those act on equal inputs. `load_checkpoint` splits each sum in
      halves again, so the model computes the same function; the weight takes n(n+1)/2 columns instead of n².
    * **float16**: every parameter of at least ``min_numel`` entries (the wide first layers that hold nearly all of
      a shipped model's bytes); smaller parameters and all buffers (fitted featurizer state, normalization
      statistics) stay float32. `load_checkpoint` casts them back into the float32 model, which then predicts with
      the float16-rounded weights.

    ``config.json`` records which tensors were folded and halved (``"stored"``); the folder is rewritten through a
    temporary file, so an interrupted call leaves the old weights. Running it again changes nothing. Returns that
    record."""
    from safetensors.torch import save_file

    path = Path(path)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    state, fold, halve = _compact(path, min_numel)
    before = cfg.get("stored") or {}                     # stored compactly once already: add to it
    record = {"float16": sorted(set(before.get("float16", [])) | set(halve)), "min_numel": int(min_numel),
              "bytes_before": before.get("bytes_before", (path / WEIGHTS_NAME).stat().st_size)}
    folded = sorted(set(before.get("folded", [])) | set(fold))
    if folded:
        record["folded"] = folded
    if fold or halve:
        tmp = path / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": FORMAT, "kind": cfg["kind"]})
        tmp.replace(path / WEIGHTS_NAME)
    record["bytes_after"] = (path / WEIGHTS_NAME).stat().st_size
    cfg["stored"] = record
    if folded:
        cfg["version"] = max(int(cfg.get("version", 1)), FOLDED_VERSION)   # an older lol cannot unfold: it says so
    from .paths import atomic_file

    atomic_file(path / CONFIG_NAME, lambda f: f.write(json.dumps(cfg, indent=1, default=str).encode()))
    return record


def _compact(path: Path, min_numel: int) -> tuple[dict, list[str], list[str]]:
    """A checkpoint's tensors as `store_half` writes them, the names it folds now and the names it halves now: its
    parameters (not buffers) of at least ``min_numel`` floating-point entries, once folded, not in float16 already."""
    from safetensors.torch import load_file

    ck = load_checkpoint(path)
    params = {n for n, _ in ck.model.named_parameters()}
    done = set((ck.config.get("stored") or {}).get("folded", []))
    state = load_file(str(Path(path) / WEIGHTS_NAME))
    blocks = symmetric_inputs(ck.model)
    fold = sorted(k for k in blocks if k in state and k not in done)
    for k in fold:
        state[k] = fold_symmetric(state[k].float(), blocks[k])
    halve = sorted(k for k, v in state.items() if k in params and v.is_floating_point()
                   and v.numel() >= min_numel and v.dtype != torch.float16)
    return {k: (v.to(torch.float16) if k in halve else v) for k, v in state.items()}, fold, halve


def half_bytes(path, min_numel: int = HALF_MIN_NUMEL) -> int:
    """The bytes of a checkpoint's tensors once `store_half` has run on it (what shipping it costs; the safetensors
    header adds a few kilobytes), computed by `store_half`'s rule without writing anything."""
    state, _, _ = _compact(Path(path), min_numel)
    return int(sum(v.numel() * v.element_size() for v in state.values()))


def symmetric_inputs(model: torch.nn.Module) -> dict[str, list[int]]:
    """``{weight name: n per module}`` for every weight of ``model`` and its sub-models (an ensemble's members, a
    count's member) whose input columns read flattened symmetric n × n matrices
    (`lol.models.LoLModel.symmetric_input_weights`): the weights `store_half` folds."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoLModel):
            for k, blocks in mod.symmetric_input_weights().items():
                out[f"{name}.{k}" if name else k] = blocks
    return out


def _triangle(blocks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For modules of n × n symmetric features (row-major, one after another): the flat index of each entry (i, j)
    with i ≤ j, of its mirror (j, i), and whether it is off the diagonal."""
    upper, lower, off, start = [], [], [], 0
    for n in blocks:
        i, j = torch.triu_indices(int(n), int(n))
        upper.append(start + i * n + j)
        lower.append(start + j * n + i)
        off.append(i != j)
        start += int(n) * int(n)
    return torch.cat(upper), torch.cat(lower), torch.cat(off)


def fold_symmetric(W: torch.Tensor, blocks) -> torch.Tensor:
    """(out, Σ n²) → (out, Σ n(n+1)/2): for each module's entry i ≤ j, the sum of the columns of (i, j) and (j, i)
    (the diagonal's column as it is). On symmetric inputs x, ``fold_symmetric(W) @ x[triangle] == W @ x``."""
    total = sum(int(n) * int(n) for n in blocks)
    if W.ndim != 2 or W.shape[1] != total:
        raise LoLError(f"fold_symmetric: weight of shape {tuple(W.shape)} does not read {total} inputs "
                       f"(modules of {list(blocks)} × themselves)")
    upper, lower, off = _triangle(blocks)
    return W[:, upper] + torch.where(off, W[:, lower], torch.zeros_like(W[:, lower]))


def unfold_symmetric(F: torch.Tensor, blocks) -> torch.Tensor:
    """The inverse of `fold_symmetric` on symmetric inputs: (out, Σ n(n+1)/2) → (out, Σ n²), each folded column
    off the diagonal split in equal halves between (i, j) and (j, i). The same function of symmetric inputs."""
    upper, lower, off = _triangle(blocks)
    if F.ndim != 2 or F.shape[1] != len(upper):
        raise LoLError(f"unfold_symmetric: folded weight of shape {tuple(F.shape)}, expected {len(upper)} columns "
                       f"(modules of {list(blocks)} × themselves, i ≤ j)")
    half = torch.where(off, F / 2, F)
    W = F.new_zeros(F.shape[0], sum(int(n) * int(n) for n in blocks))
    W[:, upper] = half
    W[:, lower] = half
    return W


@dataclass
class Checkpoint:
    path: Path
    model: LoLModel
    targets: TargetSet
    spec: ModuleSpec
    config: dict

    @property
    def kind(self) -> str:
        return self.model.kind

    @property
    def labels(self) -> list[str]:
        return self.targets.names

    @property
    def split(self) -> dict | None:
        """The recorded split (``{"by", "how", "fingerprint", "train", "val", "test"}``), or None (not recorded)."""
        return _split_record(self.config)

    def split_of(self, ids) -> np.ndarray | None:
        """``"train"``/``"val"``/``"test"`` for each LoRA id in ``ids`` as recorded at training time, ``""`` for one the
        model never used; None when the checkpoint records no split by id. Compare the collection's fingerprint with
        ``split["fingerprint"]`` first: ids are only meaningful within the collection the model was trained on."""
        return recorded_split(self.config, ids)

    def predict_batch(self, batch: LoRABatch, chunk: int = 64) -> dict[str, np.ndarray]:
        """{label: predictions} for a batch over this checkpoint's spec (float32 on the model's device)."""
        p = next(iter(self.model.parameters()))
        outs = []
        self.model.eval()
        with torch.no_grad():
            for b in iter_chunks(batch, chunk):
                outs.append(self.model(b.to(device=p.device, dtype=p.dtype)))
        return self.targets.decode(torch.cat(outs))


def _split_record(config: dict) -> dict | None:
    rec = config.get("split")
    return rec if isinstance(rec, dict) and all(s in rec for s in ("train", "val", "test")) else None


def recorded_split(config: dict, ids) -> np.ndarray | None:
    """`Checkpoint.split_of` from a checkpoint's ``config.json`` alone (no weights loaded)."""
    rec = _split_record(config)
    if rec is None or rec.get("by", "id") != "id":
        return None
    where = {str(i): s for s in ("train", "val", "test") for i in rec[s]}
    return np.array([where.get(str(i), "") for i in ids], dtype=object)


def load_checkpoint(path, device=None) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise LoLError(f"{path}: no such checkpoint folder")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise LoLError(f"{path}: not a LoL checkpoint (missing {p.name})")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise LoLError(f"{cfg_path}: invalid JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise LoLError(f"{cfg_path}: not a LoL checkpoint config (format {config.get('format')!r})")
    if int(config.get("version", 0)) > FOLDED_VERSION:
        raise LoLError(f"{cfg_path}: checkpoint version {config['version']} is newer than this lol "
                       f"({FOLDED_VERSION})")
    spec = ModuleSpec.from_json(config["spec"])
    targets = TargetSet.from_json(config["labels"])
    legacy = getattr(model_class(config["kind"]), "legacy_hparams", {})
    model = build_model(config["kind"], spec, int(config["n_outputs"]), **{**legacy, **config["hparams"]})
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError) as e:
        raise LoLError(f"{w_path}: cannot read weights ({e})") from None
    _unfold_stored(state, model, config, w_path)
    want = set(model.state_dict())
    missing, extra = sorted(want - set(state)), sorted(set(state) - want)
    if missing or extra:
        raise LoLError(f"{w_path}: weights do not match a {config['kind']!r} model with these hyperparameters "
                       f"(missing {missing[:3]}, unexpected {extra[:3]})")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise LoLError(f"{w_path}: {str(e).splitlines()[0]}") from None
    model.fitted = True
    model.eval()
    if device is not None:
        model.to(device)
    return Checkpoint(path, model, targets, spec, config)


def _unfold_stored(state: dict, model: LoLModel, config: dict, w_path: Path) -> None:
    """Undo `store_half`'s folding in ``state`` (in place), checking each recorded weight against ``model``."""
    folded = (config.get("stored") or {}).get("folded") or []
    if not folded:
        return
    blocks = symmetric_inputs(model)
    for k in folded:
        if k not in blocks:
            raise LoLError(f"{w_path}: {k!r} is recorded as folded, but a {config['kind']!r} model with these "
                           f"hyperparameters has no such symmetric-input weight")
        if k not in state:
            raise LoLError(f"{w_path}: folded weight {k!r} is missing")
        want = sum(n * (n + 1) // 2 for n in blocks[k])
        if state[k].ndim != 2 or state[k].shape[1] != want:
            raise LoLError(f"{w_path}: folded weight {k!r} has shape {tuple(state[k].shape)}, expected "
                           f"{want} columns (modules of {blocks[k]} × themselves, i ≤ j)")
        state[k] = unfold_symmetric(state[k].float(), blocks[k])


def default_checkpoint(label: str, index: Path | None = None) -> Path:
    """The shipped checkpoint for ``label`` from the checkpoint index (``$LOL_DATA/checkpoints/index.json``, default
    ``<repo>/data``; `lol.paths`), ``{label: folder relative to the index}``.

    A default keeps the GL(r) promise: a checkpoint whose model kind is not GL(r)-invariant (``mlp``, ``mlp_aug``,
    ``oalign``) is refused as a default (pass its folder explicitly to use it anyway)."""
    from .paths import checkpoint_index, checkpoint_index_path

    index = Path(index) if index is not None else checkpoint_index_path()
    if not index.is_file():
        raise LoLError(f"no default checkpoint for {label!r}: {index} does not exist (set LOL_DATA to a data folder "
                       f"with checkpoints/index.json, or train one with `lol train ... --out DIR` and pass "
                       f"--checkpoint DIR)")
    try:
        table = checkpoint_index(index)
    except ValueError as e:
        raise LoLError(str(e)) from None
    if label not in table:
        raise LoLError(f"{index}: no default checkpoint for {label!r} (available: {', '.join(sorted(table)) or 'none'})")
    path = table[label]
    cfg_path = path / CONFIG_NAME
    try:
        kind = json.loads(cfg_path.read_text()).get("kind")
    except (OSError, json.JSONDecodeError) as e:
        raise LoLError(f"{cfg_path}: the default checkpoint for {label!r} cannot be read ({e})") from None
    if not gl_invariant(kind):
        inv = getattr(model_class(kind), "invariant_to", "unknown")
        raise LoLError(f"{index}: the default checkpoint for {label!r} ({path}) is a {kind!r} model, invariant to "
                       f"{inv} only, not GL(r): defaults must be GL(r)-invariant (same ΔW, same prediction); pass "
                       f"--checkpoint {path} to use it anyway")
    return path
