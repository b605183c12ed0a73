"""Loose LoRA files as a collection: a folder (or single file) of LoRAs is read with `lol.formats` and packed with
`lol.collection.write_collection`, so every page works on one kind of object (a packed `Collection`).

LoRAs whose modules do not match the first readable one (another base model or layer set) are left out and named
in the returned notes; unreadable files likewise. Nothing is silently dropped.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import CollectionError, LoLError

__all__ = ["is_packed", "pack_loras"]


def is_packed(path) -> bool:
    return (Path(path) / "collection.json").is_file()


def pack_loras(src, dest) -> tuple[Path, list[str]]:
    """Read every LoRA under ``src`` (PEFT folders and ``.safetensors`` files; or ``src`` itself if it is one LoRA)
    and pack those sharing the first one's modules into the collection folder ``dest`` (replaced if present).
    Returns ``(dest, notes)``; raises `CollectionError` when no LoRA could be read."""
    import pandas as pd

    from ..collection import write_collection
    from ..formats import lora_files, read_lora

    src, dest = Path(src), Path(dest)
    if src.is_file() or (src.is_dir() and (src / "adapter_config.json").is_file()):
        files, root = [src], src.parent
    else:
        files, root = lora_files(src), src
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
