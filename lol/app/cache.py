"""Cached loaders: every heavy object the pages use, loaded once per server (models, pipelines, collections) or
once per input (tables, features, predictions, embeddings). All computation is the library's; this module only
decides what is kept, and where: ``LOL_APP_CACHE`` (default ``<repo>/.cache/app``, git-ignored) on disk.

* ``st.cache_resource``: collections, LoL checkpoints, the Stable Diffusion pipeline, the CLIP scorer, the LM.
* ``st.cache_data``: tables, invariant features, predictions, embeddings, per-LoRA module summaries.
* UMAP maps: first the ones shipped with the collection (`lol.precomputed`, `lol zoo precompute`); others are
  computed once and written to ``cache_root()/umap/<key>.npy``, keyed by the data fingerprint and the UMAP
  parameters, so a server restart does not recompute them.

Keys are strings (paths, fingerprints) so Streamlit never hashes tensors.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from ..paths import REPO, data_root, shipped_collections
from ..paths import folder_key as path_key  # the cache key of a folder: changes when its files change

__all__ = ["cache_root", "path_key", "collection", "packed", "collection_table", "lora_summary",
           "invariant_features", "gl_check", "shipped_map", "umap_xy", "checkpoint", "predictions",
           "model_embeddings", "shipped_bases", "pipeline", "language_model", "clip_scorer"]


def cache_root() -> Path:
    return Path(os.environ.get("LOL_APP_CACHE") or REPO / ".cache" / "app").expanduser()


# ---------------------------------------------------------------------------------------------------- collections

@st.cache_resource(show_spinner="Opening the collection…", max_entries=8)
def collection(path: str, key: str):
    """`lol.collection.open_collection(path)`; ``key`` (`path_key`) invalidates the cache when files change."""
    from ..collection import open_collection

    return open_collection(path)


@st.cache_resource(show_spinner="Reading and packing the LoRA files…", max_entries=8)
def packed(path: str, key: str) -> tuple[str, list[str]]:
    """A folder of loose LoRA files packed once into ``cache_root()/packed/<key>`` (`lol.uploads.pack_folder`)."""
    from ..uploads import pack_folder

    out, notes = pack_folder(path, cache_root() / "packed" / key)
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


@st.cache_data(show_spinner=False, max_entries=16)
def label_reliability(path: str, key: str) -> dict:
    """`lol.reliability.label_reliability` of the collection's labels: for a label measured twice, its test–retest r
    (the ceiling on any model's R²) with a bootstrap interval."""
    from ..reliability import label_reliability as reliability

    coll = collection(path, key)
    return reliability(coll.table, getattr(coll, "labels", None) or {})


@st.cache_data(show_spinner="Summarising the LoRA…", max_entries=256)
def lora_summary(path: str, key: str, index: int) -> tuple[pd.DataFrame, dict[str, list[float]]]:
    """`lol.showcase.module_table` of one LoRA of a collection: its per-module table and spectra."""
    from ..showcase import module_table

    return module_table(collection(path, key).lora(int(index)))


# ------------------------------------------------------------------------------------------------------ features

@st.cache_data(show_spinner="Computing invariant features…", max_entries=32)
def invariant_features(path: str, key: str, kind: str = "svals") -> np.ndarray:
    """`lol.precomputed.collection_features` of a collection (``svals``: singular values, ``canon``: SVD canonical)."""
    from ..precomputed import collection_features

    return collection_features(collection(path, key), kind)


@st.cache_data(show_spinner="Moving every LoRA by a random GL(r) transform…", max_entries=8)
def gl_check(path: str, key: str, limit: int, seed: int):
    """`lol.precomputed.gl_check` of a collection: raw and invariant features before and after a GL move."""
    from ..precomputed import gl_check as check

    return check(collection(path, key), limit, seed)


@st.cache_data(show_spinner=False, max_entries=64)
def shipped_map(path: str, key: str, kind: str, ckpt_path: str | None, n_neighbors: int, min_dist: float
                ) -> np.ndarray | None:
    """The map shipped with the collection for these weights and parameters (`lol.precomputed.shipped_map`)."""
    from ..precomputed import shipped_map as stored

    return stored(collection(path, key), kind, ckpt_path, n_neighbors, min_dist)


def umap_xy(features: np.ndarray, key: str, n_neighbors: int = 15, min_dist: float = 0.1, seed: int = 0
            ) -> np.ndarray:
    """2-D UMAP of ``features`` kept under ``cache_root()/umap`` (`lol.precomputed.cached_umap`) by ``key``."""
    from ..precomputed import cached_umap

    with st.spinner("Running UMAP (first time only)…"):  # shown only when it takes a moment
        return cached_umap(features, key, cache_root() / "umap", n_neighbors, min_dist, seed)


# -------------------------------------------------------------------------------------------------------- models

@st.cache_resource(show_spinner="Loading the LoL model…", max_entries=8)
def checkpoint(path: str, device: str):
    """`lol.checkpoint.load_checkpoint(path, device)`: model, targets, spec and config of a trained model."""
    from ..checkpoint import load_checkpoint

    return load_checkpoint(path, device=device)


@st.cache_data(show_spinner="Predicting…", max_entries=32)
def predictions(ckpt_path: str, device: str, coll_path: str, coll_key: str):
    """`lol.predict.CollectionPredictions` of a checkpoint for a collection: the ones shipped with it for these
    weights (`lol.precomputed.shipped_predictions`), else computed."""
    from ..precomputed import shipped_predictions
    from ..predict import CollectionPredictions

    coll = collection(coll_path, coll_key)
    shipped = shipped_predictions(coll, ckpt_path)
    return CollectionPredictions.of(checkpoint(ckpt_path, "cpu" if shipped is not None else device), coll, shipped)


@st.cache_data(show_spinner="Embedding the collection with the LoL model…", max_entries=16)
def model_embeddings(ckpt_path: str, device: str, coll_path: str, coll_key: str) -> np.ndarray:
    """The model's ``embed`` of every LoRA of a collection (`lol.neighbours.embed_collection`), in table order."""
    from ..neighbours import embed_collection

    return embed_collection(checkpoint(ckpt_path, device), collection(coll_path, coll_key))


@st.cache_resource(show_spinner=False, ttl=60)
def _bases(key: str) -> list:
    from ..catalog import bases

    return bases(shipped_collections())


def shipped_bases() -> list:
    """`lol.catalog.bases` of the shipped collections, re-read when the collections folder changes."""
    return _bases(path_key(data_root() / "collections"))


@st.cache_resource(show_spinner="Loading Stable Diffusion…", max_entries=2)
def pipeline(sd_dir: str, device: str):
    """The base model as a diffusers `StableDiffusionPipeline` (`lol.zoo.image_bases.load_sd_pipeline`)."""
    import torch

    from ..zoo.image_bases import load_sd_pipeline

    return load_sd_pipeline(sd_dir, device, dtype=torch.float16 if device == "cuda" else torch.float32)


@st.cache_resource(show_spinner="Loading the language model…", max_entries=2)
def language_model(lm_dir: str, device: str):
    """(model, tokenizer) of a causal-LM base folder (`lol.showcase.load_lm`)."""
    from ..showcase import load_lm

    return load_lm(lm_dir, device)


@st.cache_resource(show_spinner="Loading the CLIP scorer…", max_entries=2)
def clip_scorer(clip_dir: str, device: str):
    """The zoo's CLIP scorer (`lol.zoo.clipscore.CLIPScorer`, torchmetrics' CLIP-score definition)."""
    from ..zoo.clipscore import CLIPScorer
    from ..zoo.image_bases import resolve_base

    return CLIPScorer(resolve_base(clip_dir), device=device)
