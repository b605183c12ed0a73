"""Formats in, one representation out: every supported LoRA file or folder becomes a `lol.LoRA`.

``read_lora(path)`` detects the format (`detect_format`) and pairs tensors by key name, never by position:

* ``"peft"``: a folder with ``adapter_config.json`` + ``adapter_model.safetensors`` (or legacy ``.bin``) — `peft`;
* ``"diffusers"``: one ``.safetensors`` with ``unet.`` / ``text_encoder.`` / ``transformer.`` keys — `diffusers`;
* ``"kohya"``: one ``.safetensors`` with ``lora_unet_`` / ``lora_te*_`` keys — `kohya`.

A folder holding a single LoRA file (as diffusers' ``save_lora_weights`` writes) is read as that file. A packed
collection folder is detected as ``"collection"`` (open it with `lol.collection.open_collection`).
Writers: `save_peft` and `save_diffusers`. Nothing here imports diffusers or peft.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..errors import LoRAFormatError
from ..lora import LoRA
from .diffusers import looks_like_diffusers, read_diffusers, save_diffusers
from .kohya import kohya_to_module, looks_like_kohya, module_to_kohya, read_kohya
from .peft import CONFIG_NAME as PEFT_CONFIG_NAME, read_peft, save_peft
from .safetensors_file import load_safetensors, read_safetensors_header

__all__ = ["read_lora", "detect_format", "save_peft", "save_diffusers", "read_peft", "read_diffusers", "read_kohya",
           "kohya_to_module", "module_to_kohya", "lora_files", "scan_tree", "FORMATS", "PICKLE_SUFFIXES"]

FORMATS = ("peft", "diffusers", "kohya")
# the one list of pickled-file suffixes: never unpickled (`_reject_pickle`), listed as skipped by `lol import`
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _single_file(folder: Path) -> Path:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix == ".safetensors")
    if len(files) == 1:
        return files[0]
    if not any(folder.iterdir()):
        raise LoRAFormatError(folder, "empty folder")
    if not files:
        raise LoRAFormatError(folder, f"no LoRA here: no {PEFT_CONFIG_NAME}, no .safetensors file")
    raise LoRAFormatError(folder, f"holds {len(files)} .safetensors files; read them one at a time or pack them with "
                                  f"`lol import`")


def _reject_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise LoRAFormatError(path, f"pickled {path.suffix} files are not read (unpickling runs code); use "
                                    f".safetensors, or a PEFT folder with adapter_model.bin")


def _detect_keys(path: Path, keys: list[str]) -> str:
    """The format of a single safetensors file from its tensor names."""
    if not keys:
        raise LoRAFormatError(path, "safetensors file holds no tensors")
    from .pairs import reject_non_lora
    reject_non_lora(path, keys)
    if looks_like_kohya(keys):
        return "kohya"
    if all(k.startswith("base_model.model.") for k in keys):
        raise LoRAFormatError(path, f"PEFT weights without their {PEFT_CONFIG_NAME}: the scale alpha / r is unknown; "
                                    f"read the folder that holds both")
    if looks_like_diffusers(keys):
        return "diffusers"
    odd = [k for k in keys if not (k.startswith("lora_") or k.split(".", 1)[0] in ("unet", "text_encoder",
                                                                                   "text_encoder_2", "transformer"))]
    from .pairs import unknown_keys_error
    raise unknown_keys_error(path, odd or keys, "PEFT, diffusers or kohya")


def _detect_file(path: Path) -> str:
    _reject_pickle(path)
    header, _ = read_safetensors_header(path)
    return _detect_keys(path, list(header))


def detect_format(path) -> str:
    """``"peft"``, ``"diffusers"``, ``"kohya"`` or ``"collection"``; `LoRAFormatError` if it is none of them."""
    path = Path(path)
    if not path.exists():
        raise LoRAFormatError(path, "no such file or folder")
    if path.is_dir():
        if (path / PEFT_CONFIG_NAME).is_file():
            return "peft"
        if (path / "collection.json").is_file():
            return "collection"
        return _detect_file(_single_file(path))
    return _detect_file(path)


def read_lora(path, dtype: torch.dtype | None = None, shapes_only: bool = False) -> LoRA:
    """Read one LoRA (file or folder) of any supported format. Factors are float32 (float64 if stored so) unless
    ``dtype`` is given. Errors are `LoRAFormatError`s that name the file and the problem.

    ``shapes_only=True`` reads only headers: names, shapes, ranks and keys are checked, and U, V are empty
    ``meta``-device tensors (alpha and scale are then not meaningful). Used to find a collection's spec cheaply."""
    path = Path(path)
    if not path.exists():
        raise LoRAFormatError(path, "no such file or folder")
    if path.is_dir():
        if (path / PEFT_CONFIG_NAME).is_file():
            return read_peft(path, dtype, shapes_only)
        if (path / "collection.json").is_file():
            raise LoRAFormatError(path, "is a packed collection of many LoRAs; open it with lol.open_collection")
        path = _single_file(path)
    return _read_file(path, dtype, shapes_only)


def _read_file(path: Path, dtype: torch.dtype | None = None, shapes_only: bool = False,
               plan: list | None = None) -> LoRA:
    """`read_lora` of one safetensors file. ``plan``: a list that receives, per module in order, the keys of its
    ``(A, B, alpha or None)`` tensors (`lol.formats.stacked` reads later files of the same layout with it)."""
    _reject_pickle(path)
    loaded = load_safetensors(path, shapes_only, widen_to=dtype or torch.float32)  # the file is read once
    if shapes_only and plan is None:  # files of one base model and trainer share their header: paired once
        sig = (tuple((k, t.dtype, tuple(t.shape)) for k, t in loaded.tensors.items()),
               tuple(sorted(loaded.metadata.items())))
        hit = _HEADER_MEMO.get(sig)
        if hit is not None:
            return replace(hit, modules=dict(hit.modules), metadata=dict(hit.metadata), source=str(path))
    fmt = _detect_keys(path, list(loaded.tensors))
    lora = (read_kohya if fmt == "kohya" else read_diffusers)(path, dtype, shapes_only, loaded=loaded, plan=plan)
    if shapes_only and plan is None:
        if len(_HEADER_MEMO) >= 64:
            _HEADER_MEMO.clear()
        _HEADER_MEMO[sig] = lora
    return lora


# (tensor names, dtypes, shapes; metadata) → the shapes-only LoRA read from such a header (no data, no file state)
_HEADER_MEMO: dict[tuple, LoRA] = {}


def lora_files(root) -> list[Path]:
    """Every LoRA under ``root`` in sorted order: PEFT folders (not descended into) and ``.safetensors`` files."""
    return scan_tree(root)[0]


def scan_tree(root, limit: int | None = None, follow_links: bool = True) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(LoRAs, skipped)`` under ``root``: the LoRAs of `lora_files`, and every other file with the reason it is not
    a LoRA (pickles by name, never opened). Files inside a PEFT folder belong to it and are not listed. ``limit``:
    visit at most that many entries (a larger tree is refused with `LoRAFormatError`); ``follow_links=False``: do
    not descend into symlinked folders (a server confining visitors to some folders)."""
    root = Path(root)
    if not root.is_dir():
        raise LoRAFormatError(root, "not a folder")
    found: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    visited = [0]

    def walk(d: Path):
        if (d / PEFT_CONFIG_NAME).is_file():
            found.append(d)
            return
        entries = sorted(d.iterdir(), key=lambda p: p.name)
        visited[0] += len(entries)
        if limit is not None and visited[0] > limit:
            raise LoRAFormatError(root, f"more than {limit:,} files and folders to look through; choose a smaller "
                                        f"folder")
        for p in entries:
            if p.is_symlink() and not p.exists():
                skipped.append((p, "broken symbolic link"))
            elif p.is_dir():
                if follow_links or not p.is_symlink():
                    walk(p)
                else:
                    skipped.append((p, "a link to a folder, not followed here"))
            elif p.suffix == ".safetensors":
                found.append(p)
            elif p.suffix in PICKLE_SUFFIXES:
                skipped.append((p, f"pickled {p.suffix} file, not read (unpickling runs code); convert it to "
                                   f".safetensors"))
            else:
                skipped.append((p, "not a LoRA file (only .safetensors files and PEFT folders are imported)"))

    walk(root)
    return found, skipped
