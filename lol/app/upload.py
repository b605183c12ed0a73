"""Uploaded LoRA files: written only into a per-session temporary folder, read with the library's own reader.

Accepted: single-file LoRAs (``.safetensors``: diffusers, kohya, PEFT weights) and a PEFT adapter as the pair
``adapter_model.safetensors`` + ``adapter_config.json``. Pickled files (``.bin``, ``.pt``, ``.ckpt``) are refused:
unpickling an untrusted upload can run code. Every problem becomes one plain message naming the file; nothing is
raised to the page.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

from ..errors import LoLError

__all__ = ["UploadedLoRA", "UploadResult", "new_upload_dir", "stage_uploads", "read_uploads", "remove_upload_dir",
           "ACCEPTED_TYPES", "MAX_FILES"]

ACCEPTED_TYPES = ["safetensors", "json"]
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
MAX_FILES = 64
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]+")


class UploadedFileLike(Protocol):
    name: str

    def getvalue(self) -> bytes: ...


@dataclass
class UploadedLoRA:
    name: str            # the uploaded file name (or the PEFT pair's name)
    path: Path           # where it was staged (inside the temporary folder)
    lora: object         # lol.lora.LoRA


@dataclass
class UploadResult:
    loras: list[UploadedLoRA] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    folder: Path | None = None  # the temporary folder the files were staged in

    @property
    def ok(self) -> bool:
        return bool(self.loras) and not self.errors


def new_upload_dir() -> Path:
    """A fresh private temporary folder (mode 0700) for one session's uploads."""
    return Path(tempfile.mkdtemp(prefix="lol-upload-"))


def _safe_name(name: str) -> str:
    base = Path(str(name).replace("\\", "/")).name  # never a path: no folders, no '..'
    base = _SAFE_NAME.sub("_", base).lstrip(".") or "upload"
    return base[:120]


def stage_uploads(files: Iterable[UploadedFileLike], dest: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Write uploads under ``dest`` (which must be a temporary folder) and return ``[(display name, path)]`` of the
    LoRAs to read, plus error messages for files refused before reading. A PEFT pair becomes one folder."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    files = list(files)
    errors: list[str] = []
    if len(files) > MAX_FILES:
        errors.append(f"{len(files)} files uploaded; at most {MAX_FILES} are read at once (the rest are ignored)")
        files = files[:MAX_FILES]
    names = [_safe_name(f.name) for f in files]
    peft_pair = "adapter_config.json" in names and "adapter_model.safetensors" in names
    staged: list[tuple[str, Path]] = []
    if peft_pair:
        folder = dest / "peft_adapter"
        folder.mkdir(exist_ok=True)
    for f, name in zip(files, names):
        suffix = Path(name).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            errors.append(f"{f.name}: pickled checkpoints are not read (unpickling an uploaded file can run code); "
                          f"upload a .safetensors file instead")
            continue
        if peft_pair and name in ("adapter_config.json", "adapter_model.safetensors"):
            (folder / name).write_bytes(f.getvalue())
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
        path.write_bytes(f.getvalue())
        staged.append((f.name, path))
    if peft_pair:
        staged.insert(0, ("adapter_model.safetensors + adapter_config.json", folder))
    return staged, errors


def read_uploads(files: Iterable[UploadedFileLike], dest: Path, spec=None, what: str = "the chosen collection"
                 ) -> UploadResult:
    """Stage and read uploads with `lol.formats.read_lora`; with a ``spec``, also check each LoRA matches that base
    model's modules (`ModuleSpec.check`). Unreadable or mismatched files become messages in ``.errors``."""
    from ..formats import read_lora

    staged, errors = stage_uploads(files, dest)
    result = UploadResult(errors=errors, folder=Path(dest))
    for name, path in staged:
        try:
            lora = read_lora(path)
            if spec is not None:
                spec.check(lora, what=what)
        except LoLError as e:
            result.errors.append(_plain(name, path, e))
            _discard(path)
            continue
        except (ValueError, KeyError, OSError, RuntimeError) as e:  # e.g. a corrupt header that safetensors rejects
            result.errors.append(f"{name}: not a readable LoRA file ({type(e).__name__}: {_first_line(e)})")
            _discard(path)
            continue
        result.loras.append(UploadedLoRA(name, path, lora))
    return result


def _discard(path: Path) -> None:
    """Remove a refused upload from the staging folder, so opening the folder sees only readable LoRAs."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _plain(name: str, path: Path, e: Exception) -> str:
    """The error with the temporary path replaced by the name the user uploaded."""
    msg = _first_line(e).replace(str(path), name)
    return msg if name in msg else f"{name}: {msg}"


def remove_upload_dir(path: Path) -> None:
    """Delete a session's upload folder (only ever a ``lol-upload-*`` folder under the system temp dir)."""
    path = Path(path)
    if path.name.startswith("lol-upload-") and path.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(path, ignore_errors=True)
