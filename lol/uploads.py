"""LoRA files a visitor hands to a server (e.g. the explorer): uploaded files and folders on the server.

Uploads are streamed into a private temporary folder, read with the library's own reader, judged one by one against
the known base models (`lol.catalog`), and the folder removed again before the caller goes on (`read_uploads`); the
largest group fitting one base can then be packed as a collection (`pack_uploads`).

Accepted: single-file LoRAs (``.safetensors``: diffusers, kohya, PEFT weights) and a PEFT adapter as the pair
``adapter_model.safetensors`` + ``adapter_config.json``. Pickled files (``.bin``, ``.pt``, ``.ckpt`` …) are taken
by the uploader only so the page can say in words why they are not read (unpickling an upload can run code). Files
over the size limit (``max_mb``; default ``LOL_UPLOAD_MAX_MB``, else 2 GB) are refused with their size. Every problem
is one plain line naming the file.

Folders on the server are a visitor-typed path, so they are off unless the operator allows them:
``LOL_ALLOW_SERVER_FOLDERS=1`` allows folders under the data folder (``LOL_DATA``), ``LOL_FOLDER_ROOTS`` (paths
separated by ``os.pathsep``) names the allowed roots and implies the permission. Every path is resolved (symlinks and
``..`` followed) and must lie inside a root (`resolve_server_path`); a scan visits at most ``LOL_FOLDER_MAX_FILES``
entries (default 20,000) and follows no link out of the folder (`pack_folder`). Both routes pack with
`lol.packing.pack`, the function `lol import` uses, so the same files are kept and left out, with their reasons.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from .errors import LoLError

__all__ = ["UploadedLoRA", "UploadResult", "read_uploads", "staging_dir", "default_max_mb", "PICKLE_SUFFIXES",
           "MAX_FILES", "ACCEPTED_TYPES", "limits_text", "pack_uploads", "FolderRefused", "server_roots",
           "resolve_server_path", "pack_folder", "ALLOW_ENV", "ROOTS_ENV", "MAX_FILES_ENV"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ACCEPTED_TYPES = ["safetensors", "json"] + [s[1:] for s in PICKLE_SUFFIXES]  # pickles only to explain why not
MAX_FILES = 64
ALLOW_ENV, ROOTS_ENV, MAX_FILES_ENV = "LOL_ALLOW_SERVER_FOLDERS", "LOL_FOLDER_ROOTS", "LOL_FOLDER_MAX_FILES"
DEFAULT_FOLDER_FILES = 20_000
CHUNK = 16 << 20
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]+")
PREFIX = "lol-upload-"


class UploadedFileLike(Protocol):
    name: str
    size: int

    def getvalue(self) -> bytes: ...


@dataclass
class UploadedLoRA:
    name: str            # the uploaded file name (or the PEFT pair's name)
    lora: object         # lol.lora.LoRA (its tensors no longer need the staged file)
    base: object = None  # lol.catalog.Base it fits, when bases were given
    note: str = ""       # one line: which base it fits


@dataclass
class UploadResult:
    loras: list[UploadedLoRA] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def by_base(self) -> list[tuple[object, list[tuple[str, object]]]]:
        """``[(base, [(name, LoRA)])]``: the LoRAs grouped by the base they fit, in upload order."""
        groups: dict[int, tuple] = {}
        for u in self.loras:
            groups.setdefault(id(u.base), (u.base, []))[1].append((u.name, u.lora))
        return list(groups.values())


def default_max_mb() -> int:
    """``LOL_UPLOAD_MAX_MB`` when set, else 2048 (2 GB: real SD-1.5 LoRAs at rank 128 and SDXL LoRAs fit)."""
    env = os.environ.get("LOL_UPLOAD_MAX_MB", "").strip()
    return int(env) if env.isdigit() else 2048


def limits_text(max_mb: int) -> str:
    """What an uploader takes, in words: the size limit, the formats read and why pickles are not."""
    size = f"{max_mb / 1024:g} GB" if max_mb >= 1024 else f"{max_mb} MB"
    return (f"Up to {size} per file, {MAX_FILES} files at once. Read: .safetensors LoRAs (diffusers, kohya, PEFT); a "
            f"PEFT adapter as adapter_model.safetensors + adapter_config.json. Pickled .bin / .pt / .ckpt files are "
            f"not read: unpickling an uploaded file can run code (convert them to .safetensors first). The files are "
            f"deleted from the server as soon as they are read.")


@contextlib.contextmanager
def staging_dir() -> Iterator[Path]:
    """A fresh private temporary folder (mode 0700), removed on exit whatever happens."""
    path = Path(tempfile.mkdtemp(prefix=PREFIX))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _safe_name(name: str) -> str:
    base = Path(str(name).replace("\\", "/")).name  # never a path: no folders, no '..'
    base = _SAFE_NAME.sub("_", base).lstrip(".") or "upload"
    return base[:120]


def _size(f) -> int | None:
    s = getattr(f, "size", None)
    return int(s) if isinstance(s, int) else None


def _write(f, path: Path) -> None:
    """Stream the upload to ``path`` in chunks (streamlit keeps the upload in memory once; no second copy)."""
    if hasattr(f, "seek") and hasattr(f, "read"):
        f.seek(0)
        with open(path, "wb") as out:
            shutil.copyfileobj(f, out, CHUNK)
    else:
        path.write_bytes(f.getvalue())


def _fmt_mb(n: int) -> str:
    return f"{n / (1 << 30):.1f} GB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MB"


def _stage(files: list, dest: Path, max_mb: int) -> tuple[list[tuple[str, Path]], list[str]]:
    """Write the readable uploads under ``dest``; ``[(display name, path)]`` plus one message per refused file."""
    errors: list[str] = []
    if len(files) > MAX_FILES:
        errors.append(f"{len(files)} files uploaded; at most {MAX_FILES} are read at once (the rest are ignored)")
        files = files[:MAX_FILES]
    limit = max_mb << 20
    names = [_safe_name(f.name) for f in files]
    peft_pair = "adapter_config.json" in names and "adapter_model.safetensors" in names
    folder = dest / "peft_adapter"
    staged: list[tuple[str, Path]] = []
    for f, name in zip(files, names):
        suffix = Path(name).suffix.lower()
        size = _size(f)
        if suffix in PICKLE_SUFFIXES:
            errors.append(f"{f.name}: a pickled checkpoint ({suffix}) is not read, because unpickling an uploaded "
                          f"file can run code on the server; save the LoRA as .safetensors and upload that")
            continue
        if size is not None and size > limit:
            errors.append(f"{f.name}: {_fmt_mb(size)} is over this server's limit of {_fmt_mb(limit)} per file")
            continue
        if peft_pair and name in ("adapter_config.json", "adapter_model.safetensors"):
            folder.mkdir(exist_ok=True)
            _write(f, folder / name)
            continue
        if suffix == ".json":
            errors.append(f"{f.name}: a .json file is read only as adapter_config.json uploaded together with "
                          f"adapter_model.safetensors (a PEFT adapter)")
            continue
        if suffix != ".safetensors":
            errors.append(f"{f.name}: unsupported file type {suffix or '(none)'}; LoRAs are read from .safetensors "
                          f"files (diffusers, kohya or PEFT)")
            continue
        path = dest / name
        i = 1
        while path.exists():
            path = dest / f"{Path(name).stem}-{i}{suffix}"
            i += 1
        _write(f, path)
        staged.append((f.name, path))
    if peft_pair and folder.is_dir():
        staged.insert(0, ("adapter_model.safetensors + adapter_config.json", folder))
    return staged, errors


def read_uploads(files: Iterable[UploadedFileLike], bases=None, want=None, require_base: bool = True,
                 max_mb: int | None = None) -> UploadResult:
    """Stage, read (`lol.formats.read_lora`) and judge every upload on its own; the staging folder is gone when this
    returns. With ``bases`` (`lol.catalog.bases`), each LoRA is matched to the base it fits: one that fits none is an
    error naming the file (kept, with ``base=None``, when not ``require_base``); with ``want`` (the base the page
    is on), one for another known base is an error too."""
    from .catalog import judge
    from .formats import read_lora

    result = UploadResult()
    with staging_dir() as dest:
        staged, result.errors = _stage(list(files), dest, default_max_mb() if max_mb is None else max_mb)
        for name, path in staged:
            try:
                lora = read_lora(path)
            except LoLError as e:
                result.errors.append(_plain(name, path, e))
                continue
            except (ValueError, KeyError, OSError, RuntimeError) as e:  # e.g. a header safetensors itself rejects
                result.errors.append(f"{name}: not a readable LoRA file ({type(e).__name__}: {_first_line(e)})")
                continue
            if bases is None:
                result.loras.append(UploadedLoRA(name, lora))
                continue
            fit = judge(name, lora, bases, want)
            if (fit.base is None and require_base) or (fit.base is not None and want is not None
                                                       and fit.base is not want):
                result.errors.append(fit.message)
            else:
                result.loras.append(UploadedLoRA(name, lora, fit.base, fit.message))
    return result


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _plain(name: str, path: Path, e: Exception) -> str:
    """The error with the temporary path replaced by the name the user uploaded."""
    msg = _first_line(e).replace(str(path), name)
    return msg if name in msg else f"{name}: {msg}"


def pack_uploads(uploaded: list[UploadedLoRA], dest, keep: int | None = None
                 ) -> tuple[Path | None, list[str], list[str]]:
    """Pack uploaded LoRAs (judged against the known bases by `read_uploads`) into the collection folder ``dest``.

    The largest group of files sharing one base (a known base first on a tie) is packed with `lol.packing.pack`,
    recording that base's model folders so an image or text generator finds them; every other file gets one line
    naming the base it fits. With ``keep``, only the ``keep`` newest folders beside ``dest`` are kept (a server
    packs each visitor's uploads into one folder: older sessions' go). Returns ``(dest or None when nothing was
    uploaded, errors, notes)``."""
    import json

    from .packing import pack

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
    if keep is not None:
        older = sorted((p for p in Path(dest).parent.glob("*/") if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for p in older[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return res.dest, errors + res.notes(), notes


# ------------------------------------------------------------------------------------------- folders on the server

class FolderRefused(LoLError, PermissionError):
    """A server path outside the allowed roots, or a scan over its bound."""


def server_roots() -> list[Path]:
    """The folders visitors may open on the server, resolved; empty when the operator has not allowed any."""
    roots = [r for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r.strip()]
    if not roots:
        if os.environ.get(ALLOW_ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
            return []
        from .paths import data_root

        roots = [str(data_root())]
    return [Path(r.strip()).expanduser().resolve() for r in roots]


def resolve_server_path(text: str) -> Path:
    """The path a visitor typed, resolved, if it lies inside an allowed root (a relative path is taken under the
    first); else `FolderRefused`, one line that names the allowed roots, never the disk's contents."""
    roots = server_roots()
    if not roots:
        raise FolderRefused(f"Folders on the server are off. The operator can allow them with {ALLOW_ENV}=1 "
                            f"(the data folder) or {ROOTS_ENV}=/some/folder.")
    p = Path(str(text).strip()).expanduser()
    p = (p if p.is_absolute() else roots[0] / p).resolve()
    if not any(p == r or p.is_relative_to(r) for r in roots):
        raise FolderRefused(f"{text.strip()}: outside the folders this server allows ("
                            + ", ".join(str(r) for r in roots) + ")")
    return p


def pack_folder(src, dest) -> tuple[Path, list[str]]:
    """Pack the LoRAs under ``src`` (a folder on the server, or one LoRA) into ``dest`` with `lol.packing.pack`, the
    rule of `lol import` (the majority's modules); the scan visits at most ``LOL_FOLDER_MAX_FILES`` entries and
    follows no link out of the folder. Returns ``(dest, one note per file left out)``."""
    from .errors import CollectionError
    from .packing import pack, scan

    try:
        limit = max(1, int(os.environ.get(MAX_FILES_ENV, DEFAULT_FOLDER_FILES)))
    except ValueError:
        limit = DEFAULT_FOLDER_FILES
    src = Path(src)
    paths, _ = scan(src, limit=limit, follow_links=False)
    if not paths:
        raise CollectionError(f"{src}: no LoRA files here (looked for .safetensors files and PEFT folders)")
    res = pack(paths, dest, root=src if src.is_dir() else src.parent, dtype=None, overwrite=True,
               provenance={"packed_from": str(src)})
    return res.dest, res.notes()
