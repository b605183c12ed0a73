"""Where lol finds its data, and how it writes folders: the one home of both.

``LOL_DATA`` overrides the data folder (default ``<repo>/data``: what ``lol zoo build`` writes and the repository
ships). The library, the CLI (``lol predict --task``) and the app all resolve it here, at call time, so one
environment variable moves every default at once and ``lol predict --task`` works from any working directory.

`atomic_file` is the one atomic-file writer (a temporary file beside it, renamed over it); `atomic_dir` is the one
atomic-folder writer: build into a hidden temporary sibling, rename into place at the end,
remove the temporary folder on any failure. `clean_stale_temp` removes temporary siblings left by killed processes.
Pure path logic: no torch, no pandas.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

__all__ = ["REPO", "data_root", "collections_root", "checkpoints_root", "checkpoint_index_path", "checkpoint_index",
           "shipped_collections", "checkpoint_dirs", "results_dirs", "describe_base", "folder_key", "atomic_dir",
           "replace_dir", "exclusive_lock", "temp_sibling", "clean_stale_temp", "atomic_file", "TEMP_MARK"]

REPO = Path(__file__).resolve().parent.parent
TEMP_MARK = ".lol-tmp-"  # every temporary sibling's name holds it: `clean_stale_temp` removes only these


def data_root() -> Path:
    """``$LOL_DATA`` if set, else ``<repo>/data``."""
    return Path(os.environ.get("LOL_DATA") or REPO / "data").expanduser()


def collections_root(root: Path | None = None) -> Path:
    return Path(root or data_root()) / "collections"


def checkpoints_root(root: Path | None = None) -> Path:
    return Path(root or data_root()) / "checkpoints"


def checkpoint_index_path(root: Path | None = None) -> Path:
    """``DATA/checkpoints/index.json``: ``{label: checkpoint folder relative to it}``."""
    return checkpoints_root(root) / "index.json"


def checkpoint_index(index: Path | None = None) -> dict[str, Path]:
    """The index as ``{label: absolute checkpoint folder}``; ``{}`` when there is none. A malformed index raises
    `ValueError` naming the file. (`lol.checkpoint.default_checkpoint` adds the symmetry check of the default.)"""
    idx = Path(index) if index is not None else checkpoint_index_path()
    if not idx.is_file():
        return {}
    try:
        raw = json.loads(idx.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{idx}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{idx}: expected an object {{label: checkpoint folder}}, got {type(raw).__name__}")
    out = {}
    for label, rel in raw.items():
        if isinstance(rel, dict):  # tolerate {"label": {"path": ...}}
            rel = rel.get("path") or rel.get("dir")
        if isinstance(rel, str):
            out[str(label)] = (idx.parent / rel).resolve()
    return out


def shipped_collections(root: Path | None = None) -> dict[str, Path]:
    """``{name: folder}`` of the packed collections under ``DATA/collections`` (faces, fashion, lm first)."""
    base = collections_root(root)
    if not base.is_dir():
        return {}
    found = {p.name: p for p in sorted(base.iterdir()) if p.is_dir() and not p.name.startswith((".", "_"))
             and any(p.iterdir())}
    order = ["faces", "fashion", "lm"]
    return dict(sorted(found.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def checkpoint_dirs(root: Path | None = None) -> list[Path]:
    """Every checkpoint folder under ``DATA/checkpoints`` (``config.json`` + ``model.safetensors``, as
    `lol.checkpoint.save_checkpoint` writes), whether or not the index names it: the models one can compare."""
    base = checkpoints_root(root)
    if not base.is_dir():
        return []
    dirs = set(checkpoint_index(checkpoint_index_path(root)).values())
    dirs |= {p.parent.resolve() for p in base.rglob("model.safetensors") if (p.parent / "config.json").is_file()}
    return sorted(d for d in dirs if d.is_dir())


def results_dirs(root: Path | None = None) -> list[Path]:
    """Folders where the notebooks write their outputs (results tables and figures), existing ones only."""
    cands = [(root or data_root()) / "results", REPO / "notebooks" / "outputs", REPO / "notebooks" / "results",
             REPO / "results"]
    return list(dict.fromkeys(c.resolve() for c in cands if c.is_dir()))


def describe_base(base) -> str:
    """A collection's base-model record for people: the zoo records ``{"sd": "base/sd", ...}`` as JSON."""
    if not base:
        return ""
    try:
        parsed = json.loads(base)
    except (TypeError, ValueError):
        return str(base)
    return ", ".join(str(v) for v in parsed.values()) if isinstance(parsed, dict) else str(base)


def folder_key(path) -> str:
    """A short key (16 hex digits) that changes when ``path`` or the files directly in it change (name, mtime, size):
    what a cache of something read from disk (a collection, a folder of LoRAs) is keyed by."""
    import hashlib

    p = Path(path)
    try:
        parts = [str(p.resolve()), str(p.stat().st_mtime_ns)]
        if p.is_dir():
            parts += [f"{c.name}:{c.stat().st_mtime_ns}:{c.stat().st_size}" for c in sorted(p.iterdir()) if c.is_file()]
    except OSError:
        parts = [str(p)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def temp_sibling(dest: Path, what: str = "tmp") -> Path:
    """A fresh, unique hidden sibling of ``dest`` (not created): ``.<name>.lol-tmp-<what>-<pid>-<random>``."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}{TEMP_MARK}{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp(dest: Path) -> list[Path]:
    """Remove the temporary siblings of ``dest`` whose writing process no longer runs (killed, crashed); returns
    what was removed. Siblings of live processes (a concurrent writer) are left alone."""
    dest = Path(dest)
    removed = []
    if not dest.parent.is_dir():
        return removed
    prefix = f".{dest.name}{TEMP_MARK}"
    for p in dest.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        try:
            pid = int(p.name[len(prefix):].split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_dir(dest, overwrite: bool = False) -> Iterator[Path]:
    """``with atomic_dir(dest) as tmp:`` write into ``tmp``; on success ``tmp`` replaces ``dest`` (renames only, so
    readers see the old folder or the new one, never a mix); on any exception ``tmp`` is removed and ``dest`` is
    untouched. Without ``overwrite`` an existing non-empty ``dest`` is refused with `FileExistsError`, also when it
    appears while writing (a concurrent writer finished first)."""
    dest = Path(dest)
    clean_stale_temp(dest)
    tmp = temp_sibling(dest)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, dest: Path, overwrite: bool = False) -> None:
    """Rename the finished folder ``tmp`` to ``dest`` (renames only: readers see the old folder or the new one).
    An existing non-empty ``dest`` is replaced only with ``overwrite``, else `FileExistsError`, also when it
    appears between the check and the rename (a concurrent writer finished first)."""
    tmp, dest = Path(tmp), Path(dest)
    _fsync_dir(tmp)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        if not overwrite:
            raise FileExistsError(errno.EEXIST, "already exists", str(dest))
        old = temp_sibling(dest, "old")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if dest.is_dir():
            dest.rmdir()
        try:
            tmp.rename(dest)
        except OSError as e:  # a concurrent writer renamed its folder into place first
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(e.errno, "already exists (written meanwhile by another process)",
                                      str(dest)) from None
            raise
    _fsync_dir(dest.parent)


@contextlib.contextmanager
def exclusive_lock(dest, what: str = "writing") -> Iterator[Path]:
    """Hold an exclusive advisory lock for writing ``dest`` (``flock`` on the hidden sibling ``.<name>.lock``, which is
    left in place: removing a lock file races with its next user). A second holder is refused at once with
    `BlockingIOError` naming ``dest``; the lock ends with the process, so a killed writer never blocks the next."""
    import fcntl

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = dest.parent / f".{dest.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(errno.EWOULDBLOCK, f"another process is {what} it now (lock {lock.name} held); "
                                                     f"nothing was changed", str(dest)) from None
        yield lock
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_file(path, write) -> Path:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temporary file (binary) beside it, which is renamed
    over ``path`` (readable like its neighbours: mkstemp makes it private); removed on any failure. A reader never
    sees half a file."""
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
