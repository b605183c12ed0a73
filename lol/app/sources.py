"""Loose LoRA files as a collection: a folder (or single file) of LoRAs on the server, or uploaded files, packed with
`lol.packing.pack` — the function `lol import` uses — so every page works on one kind of object (a packed
`Collection`) and the same files are kept and left out, with their reasons, on every route.

Folders on the server are a visitor-typed path, so they are off unless the operator allows them:
``LOL_ALLOW_SERVER_FOLDERS=1`` allows folders under the data folder (``LOL_DATA``), ``LOL_FOLDER_ROOTS`` (paths
separated by ``os.pathsep``) names the allowed roots and implies the permission. Every path is resolved (symlinks and
``..`` followed) and must lie inside a root; a scan visits at most ``LOL_FOLDER_MAX_FILES`` entries (default 20,000).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CollectionError, LoLError

__all__ = ["is_packed", "pack_loras", "pack_uploads", "server_roots", "resolve_server_path", "FolderRefused",
           "ALLOW_ENV", "ROOTS_ENV", "MAX_FILES_ENV"]

ALLOW_ENV, ROOTS_ENV, MAX_FILES_ENV = "LOL_ALLOW_SERVER_FOLDERS", "LOL_FOLDER_ROOTS", "LOL_FOLDER_MAX_FILES"
DEFAULT_MAX_FILES = 20_000


class FolderRefused(LoLError, PermissionError):
    """A server path outside the allowed roots, or a scan over its bound."""


def server_roots() -> list[Path]:
    """The folders visitors may open on the server, resolved; empty when the operator has not allowed any."""
    roots = [r for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r.strip()]
    if not roots:
        if os.environ.get(ALLOW_ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
            return []
        from .data import data_root

        roots = [str(data_root())]
    return [Path(r.strip()).expanduser().resolve() for r in roots]


def resolve_server_path(text: str) -> Path:
    """The path a visitor typed, resolved, if it lies inside an allowed root; else `FolderRefused` (one line that
    names the allowed roots, never the disk's contents)."""
    roots = server_roots()
    if not roots:
        raise FolderRefused(f"Folders on the server are off. The operator can allow them with {ALLOW_ENV}=1 "
                            f"(the data folder) or {ROOTS_ENV}=/some/folder.")
    p = Path(str(text).strip()).expanduser()
    if not p.is_absolute():
        p = roots[0] / p
    p = p.resolve()
    if not any(p == r or p.is_relative_to(r) for r in roots):
        raise FolderRefused(f"{text.strip()}: outside the folders this server allows ("
                            + ", ".join(str(r) for r in roots) + ")")
    return p


def max_files() -> int:
    try:
        return max(1, int(os.environ.get(MAX_FILES_ENV, DEFAULT_MAX_FILES)))
    except ValueError:
        return DEFAULT_MAX_FILES


def is_packed(path) -> bool:
    return (Path(path) / "collection.json").is_file()


def pack_loras(src, dest) -> tuple[Path, list[str]]:
    """Pack the LoRAs under ``src`` (a folder on the server, or one LoRA) into ``dest`` with `lol.packing.pack`, the
    same rule as `lol import` (the majority's modules); the scan visits at most `max_files` entries and follows no
    link out of the folder. Returns ``(dest, one note per file left out)``."""
    from ..packing import pack, scan

    src = Path(src)
    paths, _ = scan(src, limit=max_files(), follow_links=False)
    if not paths:
        raise CollectionError(f"{src}: no LoRA files here (looked for .safetensors files and PEFT folders)")
    res = pack(paths, dest, root=src if src.is_dir() else src.parent, dtype=None, overwrite=True,
               provenance={"packed_from": str(src)})
    return res.dest, res.notes()


def pack_uploads(uploaded: list, dest) -> tuple[Path | None, list[str], list[str]]:
    """Pack uploaded LoRAs (`lol.uploads.UploadedLoRA`, judged against the shipped bases) into ``dest``.

    Each file is judged on its own: the largest group of files sharing one base (a shipped base first on a tie) is
    packed with `lol.packing.pack`, recording that base's model folders so Generate finds them; every other file
    gets one line naming the base it fits. Returns ``(dest or None, errors, notes)``."""
    import json

    from ..packing import pack

    groups: dict = {}
    for u in uploaded:
        k = ("base", id(u.base)) if u.base is not None else ("spec", u.lora.spec.keys, u.lora.spec.shapes)
        groups.setdefault(k, []).append(u)
    if not groups:
        return None, [], []
    best = max(groups.values(), key=lambda g: (len(g), g[0].base is not None))
    base = best[0].base
    where = base.name if base is not None else f"the modules of {best[0].name}"
    errors = [f"{u.name}: " + (f"a LoRA for {u.base.name}, not for {where} like the other uploads; upload it on "
                               f"its own" if u.base is not None else
                               f"its modules differ from {where} (the other uploads); upload it on its own")
              for g in groups.values() if g is not best for u in g]
    notes = [] if base is not None else ["The uploads fit none of the shipped base models: they can be inspected, "
                                         "not predicted or generated with."]
    base_model = json.dumps({k: str(p) for k, p in base.models.items()}) if base is not None and base.models \
        else None
    res = pack([(u.name, u.lora) for u in best], dest, spec=base.spec if base is not None else None, dtype=None,
               overwrite=True, base_model=base_model,
               provenance={"uploaded": True, "base_of": list(base.collections) if base is not None else []})
    return res.dest, errors + res.notes(), notes
