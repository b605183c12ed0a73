"""Cached loaders: every heavy object the pages use, loaded once per server (models, pipelines, collections) or
once per input (tables, features, predictions, embeddings). All computation is the library's; this module only
decides what is kept.

* ``st.cache_resource``: collections, LoL checkpoints, the Stable Diffusion pipeline, the CLIP scorer.
* ``st.cache_data``: tables, invariant features, predictions, per-LoRA module summaries.
* UMAP coordinates are also written to ``cache_root()/umap/<key>.npy``, keyed by the data fingerprint and the UMAP
  parameters, so a server restart does not recompute them.

Keys are strings (paths, fingerprints) so Streamlit never hashes tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from . import data as app_data

__all__ = ["collection", "packed", "collection_table", "checkpoint", "predictions", "invariant_features",
           "umap_xy", "pipeline", "clip_scorer", "lora_summary", "path_key", "shipped_bases", "model_embeddings"]


def path_key(path) -> str:
    """A cache key that changes when the folder's top-level files change (mtime and size)."""
    p = Path(path)
    try:
        st_ = p.stat()
        parts = [str(p.resolve()), str(st_.st_mtime_ns)]
        if p.is_dir():
            parts += [f"{c.name}:{c.stat().st_mtime_ns}:{c.stat().st_size}" for c in sorted(p.iterdir())
                      if c.is_file()]
    except OSError:
        parts = [str(p)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- collections

@st.cache_resource(show_spinner="Opening the collection…", max_entries=8)
def collection(path: str, key: str):
    """`lol.collection.open_collection(path)`; ``key`` (see `path_key`) invalidates the cache when files change."""
    from ..collection import open_collection

    return open_collection(path)


@st.cache_resource(show_spinner="Reading and packing the LoRA files…", max_entries=8)
def packed(path: str, key: str) -> tuple[str, list[str]]:
    """A folder of loose LoRA files on the server, packed once into ``cache_root()/packed/<key>`` (see
    `lol.app.sources.pack_loras`); returns the collection folder and notes on files left out."""
    from .sources import pack_loras

    dest = app_data.cache_root() / "packed" / key
    out, notes = pack_loras(path, dest)
    return str(out), notes


@st.cache_data(show_spinner=False, max_entries=16)
def collection_table(path: str, key: str) -> pd.DataFrame:
    """The collection's table (id, group, split, labels, hyperparameters) plus per-LoRA rank summary columns."""
    coll = collection(path, key)
    df = coll.table.copy()
    ranks = np.asarray(coll.ranks)
    if ranks.ndim == 2 and len(ranks) == len(df) and "rank" not in df.columns:
        df["rank"] = ranks.max(axis=1)
    return df


@st.cache_data(show_spinner="Summarising the LoRA…", max_entries=256)
def lora_summary(path: str, key: str, index: int) -> tuple[pd.DataFrame, dict[str, list[float]]]:
    """Per-module table (shape, rank, alpha, scale, ‖ΔW‖_F) and singular values of ΔW for one LoRA of a collection.

    Both are GL(r)-invariant: ‖ΔW‖_F from `LoRAModule.delta_norm` (r×r Gram matrices), σ(ΔW) from
    `lol.features.singular_values` (Gram roots of U and V, then the r×r core), never forming ΔW."""
    lora = collection(path, key).lora(int(index))
    return module_summary(lora)


def module_summary(lora) -> tuple[pd.DataFrame, dict[str, list[float]]]:
    """Rows per module and ``{module: σ(ΔW) descending}`` via `lol.features.singular_values` in float64."""
    from ..features import singular_values

    rows, svals = [], {}
    for m in lora:
        s = singular_values(m.U.double().unsqueeze(0), m.V.double().unsqueeze(0))[0].tolist()
        svals[m.name] = s
        rows.append({"module": m.name, "out × in": f"{m.out_features} × {m.in_features}", "rank r": m.rank,
                     "alpha α": float(m.alpha), "scale s": float(m.scale), "‖ΔW‖_F": m.delta_norm(),
                     "σ₁(ΔW)": float(s[0]) if s else 0.0})
    return pd.DataFrame(rows), svals


# ------------------------------------------------------------------------------------------------------ features

@st.cache_data(show_spinner="Computing invariant features…", max_entries=32)
def invariant_features(path: str, key: str, kind: str = "svals", gl_seed: int | None = None,
                       limit: int | None = None, float64: bool = False) -> np.ndarray:
    """Features of every LoRA of a collection, one row per LoRA.

    ``kind`` is a `lol.features.FEATURIZERS` name (``svals``: singular values of each ΔW; ``canon``: SVD canonical
    factors; both ∏GL(r_ℓ)-invariant) or ``"raw"``: the flattened raw (U, V), zero-padded to the largest rank,
    invariant to nothing. With ``gl_seed``, every module of every LoRA first gets an independent random
    non-orthogonal R ∈ GL(r) (`lol.symmetry.random_gl_like` + `gl_act`): invariant features must not move."""
    import torch

    from ..features import FEATURIZERS
    from ..symmetry import gl_act, random_gl_like

    coll = collection(path, key)
    feat = None if kind == "raw" else FEATURIZERS[kind](coll.spec, rank=_max_rank(coll))
    if feat is not None and float64:
        feat = feat.double()

    def fn(batch, start):
        if gl_seed is not None:
            batch = gl_act(batch, random_gl_like(batch, seed=gl_seed * 100_003 + start))
        if feat is None:
            return torch.cat([t.flatten(1) for t in batch.U + batch.V], dim=1)
        return feat(batch)

    return _batched(coll, fn, limit=limit, dtype=torch.float64 if float64 else torch.float32)


def _max_rank(coll) -> int:
    ranks = np.asarray(coll.ranks)
    return int(ranks.max()) if ranks.size else 1


def _batched(coll, fn, size: int = 128, limit: int | None = None, dtype=None) -> np.ndarray:
    """``fn(batch, start)`` over the collection in chunks (CPU), stacked as float64 numpy."""
    import torch

    n = len(coll) if limit is None else min(limit, len(coll))
    out = []
    with torch.no_grad():
        for start in range(0, n, size):
            idx = list(range(start, min(start + size, n)))
            batch = coll.batch(idx, dtype=dtype or torch.float32, device="cpu")
            out.append(fn(batch, start).double().cpu().numpy())
    return np.concatenate(out, axis=0) if out else np.zeros((0, 0))


def umap_xy(features: np.ndarray, key: str, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0
            ) -> np.ndarray:
    """2-D UMAP of ``features`` (rows = LoRAs), persisted under ``cache_root()/umap`` keyed by ``key`` (the data
    fingerprint and the feature kind) and the parameters; later calls, across restarts, read the file."""
    n = len(features)
    params = dict(n_neighbors=int(min(n_neighbors, max(2, n - 1))), min_dist=float(min_dist), seed=int(seed))
    digest = hashlib.sha1((key + json.dumps(params, sort_keys=True)).encode()).hexdigest()[:20]
    folder = app_data.cache_root() / "umap"
    file = folder / f"{digest}.npy"
    if file.is_file():
        xy = np.load(file, allow_pickle=False)
        if xy.shape == (n, 2):
            return xy
    xy = _umap_mem(digest, features, params["n_neighbors"], params["min_dist"], params["seed"])
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npy.tmp")
    with os.fdopen(fd, "wb") as f:
        np.save(f, xy, allow_pickle=False)
    os.replace(tmp, file)
    return xy


@st.cache_data(show_spinner="Running UMAP (first time only)…", max_entries=32)
def _umap_mem(digest: str, _features: np.ndarray, n_neighbors: int, min_dist: float, seed: int) -> np.ndarray:
    """UMAP in memory, keyed by ``digest`` only (features are never hashed: they can be large)."""
    x = np.asarray(_features, dtype=np.float64)
    if len(x) < 4:  # UMAP needs a few points; tiny sets are laid out on a line in table order
        return np.stack([np.arange(len(x), dtype=float), np.zeros(len(x))], axis=1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    import umap

    import warnings

    reducer = umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed,
                        init="spectral" if len(x) > 50 else "random")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)  # seeded UMAP: one thread
        return np.asarray(reducer.fit_transform(x), dtype=np.float64)


# -------------------------------------------------------------------------------------------------------- models

@st.cache_resource(show_spinner="Loading the LoL model…", max_entries=8)
def checkpoint(path: str, device: str):
    """`lol.checkpoint.load_checkpoint(path, device)`: model, targets, spec and config of a trained model."""
    from ..checkpoint import load_checkpoint

    return load_checkpoint(path, device=device)


@st.cache_data(show_spinner="Predicting…", max_entries=32)
def predictions(ckpt_path: str, device: str, coll_path: str, coll_key: str) -> pd.DataFrame:
    """``Checkpoint.predict_batch`` over every LoRA of a collection (in chunks): ``id`` plus one column per label
    (regression in its units, binary as probability, category as class), in table order."""

    ck = checkpoint(ckpt_path, device)
    coll = collection(coll_path, coll_key)
    if ck.spec.keys != coll.spec.keys:
        from ..errors import SpecMismatchError

        ck.spec.check(coll.lora(0), what=f"checkpoint {ckpt_path}")  # names the differences
        raise SpecMismatchError(f"checkpoint {ckpt_path}: modules are in another order than the collection's")
    dtype = next(ck.model.parameters()).dtype
    parts: dict[str, list] = {name: [] for name in ck.labels}
    for s in range(0, len(coll), 256):
        out = ck.predict_batch(coll.batch(list(range(s, min(s + 256, len(coll)))), dtype=dtype))
        for name in ck.labels:
            parts[name].append(np.asarray(out[name]))
    df = pd.DataFrame({name: np.concatenate(v) for name, v in parts.items()})
    df.insert(0, "id", coll.table["id"].astype(str).to_numpy())
    return df


@st.cache_data(show_spinner="Embedding the collection with the LoL model…", max_entries=16)
def model_embeddings(ckpt_path: str, device: str, coll_path: str, coll_key: str) -> np.ndarray:
    """The model's ``embed`` of every LoRA of a collection (`lol.neighbours.embed_collection`), in table order."""
    from ..neighbours import embed_collection

    return embed_collection(checkpoint(ckpt_path, device), collection(coll_path, coll_key))


@st.cache_resource(show_spinner=False, ttl=60)
def _bases(key: str) -> list:
    from ..catalog import bases

    return bases(app_data.shipped_collections())


def shipped_bases() -> list:
    """`lol.catalog.bases` of the shipped collections (one per module spec, with the base-model folders they
    record), re-read when the collections folder changes."""
    return _bases(path_key(app_data.data_root() / "collections"))


@st.cache_resource(show_spinner="Loading Stable Diffusion…", max_entries=2)
def pipeline(sd_dir: str, device: str):
    """The base model as a diffusers `StableDiffusionPipeline` (`lol.zoo.image_bases.load_sd_pipeline`:
    ``from_pretrained``, offline; a zoo ``record.json`` pointing at a real SD-1.x folder is followed)."""
    import torch

    from ..zoo.image_bases import load_sd_pipeline

    return load_sd_pipeline(sd_dir, device, dtype=torch.float16 if device == "cuda" else torch.float32)


@st.cache_resource(show_spinner="Loading the CLIP scorer…", max_entries=2)
def clip_scorer(clip_dir: str, device: str):
    """The zoo's CLIP scorer (`lol.zoo.clipscore.CLIPScorer`, torchmetrics' CLIP-score definition)."""
    from ..zoo.clipscore import CLIPScorer
    from ..zoo.image_bases import resolve_base

    return CLIPScorer(resolve_base(clip_dir), device=device)
