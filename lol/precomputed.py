"""What an explorer shows first, computed once and shipped with a collection: its 2-D maps (UMAP of its GL-invariant
features and of each trained model's embedding) and each trained model's predictions for it.

* `collection_features`: one feature row per LoRA (``svals``, ``canon`` … of `lol.features.FEATURIZERS`, or the raw
  factors), optionally after an independent random GL(r) move of every module (the invariance check).
* `gl_check`: raw factors against invariant features under such a move, and `map_disparity` of two maps.
* `umap_2d`: the map itself (features standardised per dimension, then seeded UMAP); `cached_umap` keeps each map
  computed on the fly in a folder, keyed by the data and the parameters.
* `predict_collection`: a checkpoint's predictions for every LoRA of a collection.
* `write_precomputed`: the default maps of a packed collection (the invariant features and every given checkpoint
  whose modules fit) and those checkpoints' predictions, written beside it as ``precomputed.npz`` +
  ``precomputed.json``, keyed by the collection fingerprint, the checkpoint's weights (SHA-256) and the UMAP
  parameters. `lol zoo precompute` runs it; run it again after a collection is rebuilt (nothing whose fingerprint no
  longer matches is ever used).
* `shipped_map`, `shipped_predictions`: what was stored for a (kind, checkpoint, parameters), or None.

The file is not part of the collection's fingerprint (``collection.json`` + ``loras.parquet``), so writing it changes
nothing a model or a cached experiment is keyed by.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .paths import atomic_file

__all__ = ["DATA_NAME", "META_NAME", "DEFAULT_PARAMS", "INVARIANT_KINDS", "collection_features", "GLCheck", "gl_check",
           "map_disparity", "umap_2d", "cached_umap",
           "weights_sha256", "predict_collection", "write_precomputed", "shipped_map", "shipped_predictions",
           "map_key"]

DATA_NAME, META_NAME = "precomputed.npz", "precomputed.json"
DEFAULT_PARAMS = {"n_neighbors": 15, "min_dist": 0.1, "seed": 0}  # what an explorer shows first
INVARIANT_KINDS = ("svals", "canon")


def collection_features(coll, kind: str = "svals", gl_seed: int | None = None, limit: int | None = None,
                        float64: bool = False, chunk: int = 128) -> np.ndarray:
    """Features of the first ``limit`` (all) LoRAs of a packed collection, one row per LoRA (float64 numpy).

    ``kind`` is a `lol.features.FEATURIZERS` name (``svals``: singular values of each ΔW; ``canon``: SVD canonical
    factors; both ∏GL(r_ℓ)-invariant) or ``"raw"``: the flattened raw (U, V), zero-padded to the largest rank,
    invariant to nothing. With ``gl_seed``, every module of every LoRA first gets an independent random
    non-orthogonal R ∈ GL(r) (`lol.symmetry.random_gl_like` + `gl_act`): invariant features must not move."""
    import torch

    from .features import FEATURIZERS
    from .symmetry import gl_act, random_gl_like

    ranks = np.asarray(coll.ranks)
    rank = int(ranks.max()) if ranks.size else 1
    feat = None if kind == "raw" else FEATURIZERS[kind](coll.spec, rank=rank)
    dtype = torch.float64 if float64 else torch.float32
    if feat is not None and float64:
        feat = feat.double()
    n = len(coll) if limit is None else min(limit, len(coll))
    out = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            batch = coll.batch(list(range(start, min(start + chunk, n))), dtype=dtype, device="cpu")
            if gl_seed is not None:
                batch = gl_act(batch, random_gl_like(batch, seed=gl_seed * 100_003 + start))
            f = torch.cat([t.flatten(1) for t in batch.U + batch.V], dim=1) if feat is None else feat(batch)
            out.append(f.double().cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0))


def _relative_change(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-300))


@dataclass
class GLCheck:
    """Features of the first LoRAs of a collection before and after an independent random non-orthogonal
    R ∈ GL(r) per module and LoRA (float64): the raw factors (which move) and invariant features (which must not)."""

    raw: np.ndarray
    raw_moved: np.ndarray
    invariant: np.ndarray
    invariant_moved: np.ndarray

    @property
    def raw_change(self) -> float:
        """‖raw − raw moved‖_F / ‖raw‖_F: large, the factors are not invariant."""
        return _relative_change(self.raw, self.raw_moved)

    @property
    def invariant_change(self) -> float:
        """The same for the invariant features: float64 round-off (~1e-15)."""
        return _relative_change(self.invariant, self.invariant_moved)


def gl_check(coll, limit: int = 300, seed: int = 1, kind: str = "svals") -> GLCheck:
    """`collection_features` of the first ``limit`` LoRAs, raw and ``kind``, in float64, without and with the GL move
    seeded by ``seed``."""
    return GLCheck(*(collection_features(coll, k, s, limit, True) for k in ("raw", kind) for s in (None, seed)))


def map_disparity(a: np.ndarray, b: np.ndarray) -> float:
    """How different two 2-D maps of the same points are after the best rotation, scaling and shift (Procrustes
    disparity: 0 = the same map, 1 = unrelated); NaN for a degenerate map (all points equal)."""
    from scipy.spatial import procrustes

    try:
        return float(procrustes(a, b)[2])
    except ValueError:
        return float("nan")


def umap_2d(features: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0) -> np.ndarray:
    """(n, 2) UMAP of ``features`` (rows = LoRAs), each dimension standardised first; fewer than 4 rows are laid
    out on a line in row order. ``n_neighbors`` is capped at n − 1."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 4:
        return np.stack([np.arange(len(x), dtype=float), np.zeros(len(x))], axis=1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    import umap

    reducer = umap.UMAP(n_neighbors=int(min(n_neighbors, len(x) - 1)), min_dist=float(min_dist),
                        random_state=int(seed), init="spectral" if len(x) > 50 else "random")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)  # seeded UMAP: one thread
        return np.asarray(reducer.fit_transform(x), dtype=np.float64)


def cached_umap(features: np.ndarray, key: str, folder, n_neighbors: int = 15, min_dist: float = 0.1,
                seed: int = 0) -> np.ndarray:
    """`umap_2d` of ``features``, kept as ``folder/<digest>.npy`` keyed by ``key`` (name the data and the feature
    kind, e.g. the collection fingerprint) and the parameters, so later calls — across processes — read the file.
    ``n_neighbors`` is capped at n − 1 as `umap_2d` does, so both spellings share one file."""
    n = len(features)
    params = dict(n_neighbors=int(min(n_neighbors, max(2, n - 1))), min_dist=float(min_dist), seed=int(seed))
    file = Path(folder) / f"{hashlib.sha1((key + json.dumps(params, sort_keys=True)).encode()).hexdigest()[:20]}.npy"
    if file.is_file():
        xy = np.load(file, allow_pickle=False)
        if xy.shape == (n, 2):
            return xy
    xy = umap_2d(features, **params)
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_file(file, lambda f: np.save(f, xy, allow_pickle=False))
    return xy


def predict_collection(ckpt, coll, chunk: int = 256):
    """``Checkpoint.predict_batch`` over every LoRA of a packed collection: a DataFrame of ``id`` plus one column
    per label (regression in its units, binary as probability, category as class), in table order. A checkpoint
    for other modules raises `SpecMismatchError` naming the differences."""
    import pandas as pd

    from .errors import SpecMismatchError

    if ckpt.spec.keys != coll.spec.keys:
        ckpt.spec.check(coll.lora(0), what=f"checkpoint {ckpt.path}")  # names the differences
        raise SpecMismatchError(f"checkpoint {ckpt.path}: modules are in another order than the collection's")
    dtype = next(ckpt.model.parameters()).dtype
    parts: dict[str, list] = {name: [] for name in ckpt.labels}
    for s in range(0, len(coll), chunk):
        out = ckpt.predict_batch(coll.batch(list(range(s, min(s + chunk, len(coll)))), dtype=dtype))
        for name in ckpt.labels:
            parts[name].append(np.asarray(out[name]))
    df = pd.DataFrame({name: np.concatenate(v) for name, v in parts.items()})
    df.insert(0, "id", coll.table["id"].astype(str).to_numpy())
    return df


def weights_sha256(checkpoint_dir) -> str:
    """SHA-256 of a checkpoint's weights file: what a model map is keyed by (a retrained model gets a new map)."""
    from .checkpoint import WEIGHTS_NAME

    h = hashlib.sha256()
    with open(Path(checkpoint_dir) / WEIGHTS_NAME, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def map_key(kind: str, weights: str | None = None, n_neighbors: int = 15, min_dist: float = 0.1,
            seed: int = 0) -> str:
    """The name of one map in ``precomputed.npz``: ``svals|15|0.1|0`` or ``model:<weights sha[:16]>|15|0.1|0``."""
    what = f"model:{weights[:16]}" if kind == "model" else kind
    return f"{what}|{int(n_neighbors)}|{float(min_dist):g}|{int(seed)}"


def _read(folder: Path) -> tuple[dict, dict[str, np.ndarray]]:
    meta_file, data_file = folder / META_NAME, folder / DATA_NAME
    if not (meta_file.is_file() and data_file.is_file()):
        return {}, {}
    try:
        meta = json.loads(meta_file.read_text())
        with np.load(data_file, allow_pickle=False) as z:
            return meta, {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):  # a damaged file is as good as none: all is recomputed
        return {}, {}


def shipped_predictions(coll, checkpoint_dir):
    """`predict_collection`'s table stored beside ``coll`` for these checkpoint weights, or None."""
    import pandas as pd

    meta, arrays = _read(Path(coll.path))
    if meta.get("fingerprint") != coll.fingerprint:
        return None
    sha = weights_sha256(checkpoint_dir)[:16]
    labels = (meta.get("predictions") or {}).get(sha)
    if not labels or any(f"pred:{sha}:{lab}" not in arrays for lab in labels):
        return None
    df = pd.DataFrame({lab: arrays[f"pred:{sha}:{lab}"] for lab in labels})
    if len(df) != len(coll):
        return None
    df.insert(0, "id", coll.table["id"].astype(str).to_numpy())
    return df


def shipped_map(coll, kind: str, checkpoint_dir=None, n_neighbors: int = 15, min_dist: float = 0.1,
                seed: int = 0) -> np.ndarray | None:
    """The map stored beside the packed collection ``coll`` for ``kind`` (``"model"`` with ``checkpoint_dir``), when
    it was written for this very collection (same fingerprint), these weights and these UMAP parameters; else
    None (the caller computes it)."""
    meta, maps = _read(Path(coll.path))
    if meta.get("fingerprint") != coll.fingerprint:
        return None
    weights = weights_sha256(checkpoint_dir) if kind == "model" else None
    xy = maps.get(map_key(kind, weights, n_neighbors, min_dist, seed))
    return xy if xy is not None and xy.shape == (len(coll), 2) else None


def write_precomputed(collection_dir, checkpoints=(), params: dict | None = None, device: str = "cpu",
                      progress=None) -> Path:
    """Compute and store what an explorer shows first for the packed collection at ``collection_dir``: one map per
    invariant feature kind (`INVARIANT_KINDS`); for each checkpoint folder in ``checkpoints`` whose modules are the
    collection's (others are skipped) its embedding's map and its predictions. UMAP ``params``: `DEFAULT_PARAMS`.
    Replaces what was there; each file is written to a temporary file and renamed, so a reader never sees half a
    file. ``progress(text)`` is called per step. Returns the ``precomputed.json`` path."""
    from .checkpoint import load_checkpoint
    from .collection import open_collection
    from .neighbours import embed_collection

    folder = Path(collection_dir)
    coll = open_collection(folder)
    p = {**DEFAULT_PARAMS, **(params or {})}
    say = progress or (lambda _t: None)
    arrays, entries, preds = {}, {}, {}
    for kind in INVARIANT_KINDS:
        say(f"{folder.name}: {kind} features")
        k = map_key(kind, None, **p)
        arrays[k] = umap_2d(collection_features(coll, kind), **p)
        entries[k] = {"kind": kind}
    for ck_dir in checkpoints:
        ck = load_checkpoint(ck_dir, device=device)
        if ck.spec.keys != coll.spec.keys:
            continue
        say(f"{folder.name}: embedding of {ck_dir}")
        sha = weights_sha256(ck_dir)
        k = map_key("model", sha, **p)
        arrays[k] = umap_2d(embed_collection(ck, coll), **p)
        entries[k] = {"kind": "model", "checkpoint": str(ck_dir), "weights_sha256": sha}
        say(f"{folder.name}: predictions of {ck_dir}")
        table = predict_collection(ck, coll)
        preds[sha[:16]] = [str(c) for c in table.columns[1:]]
        for c in preds[sha[:16]]:
            v = table[c].to_numpy()
            arrays[f"pred:{sha[:16]}:{c}"] = v.astype(str) if v.dtype == object else v
    meta = {"fingerprint": coll.fingerprint, "n": len(coll), "params": p, "maps": entries, "predictions": preds,
            "written_by": "lol.precomputed.write_precomputed (lol zoo precompute)"}
    atomic_file(folder / DATA_NAME, lambda f: np.savez_compressed(f, **arrays))
    atomic_file(folder / META_NAME, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return folder / META_NAME
