"""Loose LoRA files as a collection: a folder (or single file) of LoRAs is read with `lol.formats` and packed with
`lol.collection.write_collection`, so every page works on one kind of object (a packed `Collection`).

LoRAs whose modules do not match the first readable one (another base model or layer set) are left out and named
in the returned notes; unreadable files likewise. Nothing is silently dropped.

Folders on the server are a visitor-typed path, so they are off unless the operator allows them:
``LOL_ALLOW_SERVER_FOLDERS=1`` allows folders under the data folder (``LOL_DATA``), ``LOL_FOLDER_ROOTS`` (paths
separated by ``os.pathsep``) names the allowed roots and implies the permission. Every path is resolved (symlinks and
``..`` followed) and must lie inside a root; a scan visits at most ``LOL_FOLDER_MAX_FILES`` entries (default 20,000).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CollectionError, LoLError

__all__ = ["is_packed", "pack_loras", "pack_uploads", "server_roots", "resolve_server_path", "find_lora_files", "FolderRefused",
           "ALLOW_ENV", "ROOTS_ENV", "MAX_FILES_ENV"]

ALLOW_ENV, ROOTS_ENV, MAX_FILES_ENV = "LOL_ALLOW_SERVER_FOLDERS", "LOL_FOLDER_ROOTS", "LOL_FOLDER_MAX_FILES"
DEFAULT_MAX_FILES = 20_000
PEFT_CONFIG = "adapter_config.json"


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


def find_lora_files(root, limit: int | None = None) -> list[Path]:
    """Every LoRA under ``root`` in sorted order: PEFT folders (not descended into) and ``.safetensors`` files, as
    `lol.formats.lora_files` finds them, but visiting at most ``limit`` entries (`max_files`); a larger tree raises
    `FolderRefused`. Symlinked folders are not followed."""
    root = Path(root)
    if not root.is_dir():
        raise CollectionError(f"{root}: not a folder")
    limit = max_files() if limit is None else limit
    found: list[Path] = []
    visited = 0
    stack = [root]
    while stack:
        d = stack.pop()
        if (d / PEFT_CONFIG).is_file():
            found.append(d)
            continue
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            raise CollectionError(f"{d}: cannot list the folder ({e.strerror})") from None
        visited += len(entries)
        if visited > limit:
            raise FolderRefused(f"{root}: more than {limit:,} files and folders to look through; choose a smaller "
                                f"folder (the bound is {MAX_FILES_ENV})")
        sub = []
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                sub.append(Path(e.path))
            elif e.name.endswith(".safetensors"):
                found.append(Path(e.path))
        stack.extend(reversed(sub))
    return sorted(found)


def is_packed(path) -> bool:
    return (Path(path) / "collection.json").is_file()


def pack_loras(src, dest) -> tuple[Path, list[str]]:
    """Read every LoRA under ``src`` (PEFT folders and ``.safetensors`` files; or ``src`` itself if it is one LoRA)
    and pack those sharing the first one's modules into the collection folder ``dest`` (replaced if present).
    Returns ``(dest, notes)``; raises `CollectionError` when no LoRA could be read."""
    import pandas as pd

    from ..collection import write_collection
    from ..formats import read_lora

    src, dest = Path(src), Path(dest)
    if src.is_file() or (src.is_dir() and (src / "adapter_config.json").is_file()):
        files, root = [src], src.parent
    else:
        files, root = find_lora_files(src), src
    if not files:
        raise CollectionError(f"{src}: no LoRA files here (looked for .safetensors files and PEFT folders)")
    notes: list[str] = []
    loras, rows = [], []
    spec = None
    for f in files:
        rel = str(f.relative_to(root)) if f.is_relative_to(root) else f.name
        try:
            lora = read_lora(f)
            if spec is None:
                spec = lora.spec
            else:
                spec.check(lora, what=f"the first LoRA ({rows[0]['id']})")
        except LoLError as e:
            notes.append(str(e).replace(str(f), rel).splitlines()[0])
            continue
        loras.append(lora)
        rows.append({"id": rel, "source": rel, "format": lora.format, "modules": len(lora)})
    if not loras:
        raise CollectionError(f"{src}: none of the {len(files)} file(s) could be read as a LoRA"
                              + (f" ({notes[0]})" if notes else ""))
    write_collection(dest, loras, pd.DataFrame(rows), spec=spec, dtype=_storage_dtype(loras), overwrite=True,
                     provenance={"packed_from": str(src)})
    return dest, notes


def _storage_dtype(loras):
    import torch

    return torch.float64 if any(m.U.dtype == torch.float64 for lo in loras for m in lo) else torch.float32


def pack_uploads(uploaded: list, dest) -> tuple[Path | None, list[str], list[str]]:
    """Pack uploaded LoRAs (`lol.app.upload.UploadedLoRA`, judged against the shipped bases) into ``dest``.

    Each file is judged on its own: the largest group of files sharing one base (a shipped base first on a tie) is
    packed, and records that base's model folders so Generate finds them; every other file gets one line naming the
    base it fits. Returns ``(dest or None, errors, notes)``."""
    import json

    import pandas as pd

    from ..collection import write_collection

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
    rows = [{"id": u.name, "format": u.lora.format, "modules": len(u.lora)} for u in best]
    loras = [u.lora for u in best]
    base_model = json.dumps({k: str(p) for k, p in base.models.items()}) if base is not None and base.models \
        else None
    write_collection(Path(dest), loras, pd.DataFrame(rows), spec=base.spec if base is not None else loras[0].spec,
                     dtype=_storage_dtype(loras), overwrite=True, base_model=base_model,
                     provenance={"uploaded": True, "base_of": list(base.collections) if base is not None else []})
    return Path(dest), errors, notes
