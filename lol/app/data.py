"""Where the explorer finds things on the server: shipped collections, trained checkpoints, base models, notebook
outputs, and its own on-disk cache. Pure path logic, no Streamlit, no heavy imports.

``LOL_DATA`` overrides the data folder (default ``<repo>/data``: what ``lol zoo build`` writes) and
``LOL_APP_CACHE`` the cache folder (default ``<repo>/.cache/app``, git-ignored).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["REPO", "data_root", "cache_root", "shipped_collections", "checkpoint_index", "checkpoint_dirs",
           "base_model_dir", "results_dirs", "default_device", "devices", "describe_base"]

REPO = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    return Path(os.environ.get("LOL_DATA") or REPO / "data").expanduser()


def cache_root() -> Path:
    p = Path(os.environ.get("LOL_APP_CACHE") or REPO / ".cache" / "app").expanduser()
    return p


def shipped_collections(root: Path | None = None) -> dict[str, Path]:
    """``{name: folder}`` of the packed collections under ``DATA/collections`` (faces, fashion, lm first)."""
    base = (root or data_root()) / "collections"
    if not base.is_dir():
        return {}
    found = {p.name: p for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith((".", "_"))
             and any(p.iterdir())}
    order = ["faces", "fashion", "lm"]
    return dict(sorted(found.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def checkpoint_index(root: Path | None = None) -> dict[str, Path]:
    """``DATA/checkpoints/index.json`` as ``{label: checkpoint folder}`` (the shipped model for each label);
    empty when there is none. A malformed index raises ValueError naming the file (`lol.paths.checkpoint_index`)."""
    from ..paths import checkpoint_index as read_index

    return read_index((root or data_root()) / "checkpoints" / "index.json")


def checkpoint_dirs(root: Path | None = None) -> list[Path]:
    """Every checkpoint folder under ``DATA/checkpoints`` (``config.json`` + ``model.safetensors``, as
    `lol.checkpoint.save_checkpoint` writes), whether or not the index names it: these are the models one can
    compare."""
    base = (root or data_root()) / "checkpoints"
    if not base.is_dir():
        return []
    dirs = set(checkpoint_index(root).values())
    for p in base.rglob("model.safetensors"):
        if (p.parent / "config.json").is_file():
            dirs.add(p.parent.resolve())
    return sorted(d for d in dirs if d.is_dir())


def base_model_dir(name: str, root: Path | None = None) -> Path | None:
    """``DATA/base/<name>`` (``sd``, ``clip``, ``lm``) when it exists."""
    p = (root or data_root()) / "base" / name
    return p if p.is_dir() and any(p.iterdir()) else None


def results_dirs(root: Path | None = None) -> list[Path]:
    """Folders where the notebooks write their outputs (results tables and figures), existing ones only."""
    root = root or data_root()
    cands = [root / "results", REPO / "notebooks" / "outputs", REPO / "notebooks" / "results", REPO / "results"]
    seen, out = set(), []
    for c in cands:
        c = c.resolve()
        if c.is_dir() and c not in seen:
            seen.add(c)
            out.append(c)
    return out


def devices() -> list[str]:
    """Devices the app can run models on here: ``cuda`` when a GPU is visible, then ``cpu``."""
    import torch

    return (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]


def default_device() -> str:
    return devices()[0]


def describe_base(base) -> str:
    """A collection's base-model description for people: the zoo records ``{"sd": "base/sd", ...}`` as JSON."""
    if not base:
        return ""
    try:
        parsed = json.loads(base)
    except (TypeError, ValueError):
        return str(base)
    if isinstance(parsed, dict):
        return ", ".join(str(v) for v in parsed.values())
    return str(base)
