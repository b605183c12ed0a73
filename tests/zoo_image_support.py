"""Shared by tests/test_zoo_image*.py: the ci-preset image bases, built once per version of their source code.

The build is deterministic, so it is cached under the temp folder keyed by a hash of the modules that define it;
concurrent builders are safe (each writes a temporary folder renamed into place).
"""
from __future__ import annotations

import hashlib
import tempfile
from functools import lru_cache
from pathlib import Path

import lol.zoo as zoo

_SOURCES = ("faces.py", "fashion.py", "tokenizer.py", "image_bases.py", "clipscore.py")


@lru_cache(maxsize=1)
def ci_bases() -> dict[str, Path]:
    import diffusers
    import torch
    import transformers

    h = hashlib.sha256()
    for name in _SOURCES:
        h.update((Path(zoo.__file__).parent / name).read_bytes())
    h.update(f"{torch.__version__} {diffusers.__version__} {transformers.__version__}".encode())
    root = Path(tempfile.gettempdir()) / f"lol-test-image-bases-{h.hexdigest()[:16]}"
    from lol.zoo.image_bases import main

    main(["--preset", "ci", "--out", str(root), "--device", "cpu"])
    return {"clip": root / "base" / "clip", "sd": root / "base" / "sd", "root": root}


def shipped_retested(dest: Path, collection: str = "faces", label: str = "clip_score", n: int = 2):
    """``n`` LoRAs of the shipped ``collection`` at its most common rank that its build measured twice (a finite
    ``<label>_retest``), packed again at ``dest`` (fp16 factors, rows, schema and provenance as shipped); returns
    (collection table rows, bases) or skips when data/ lacks the collection or its bases."""
    import numpy as np
    import pytest

    from lol.collection import open_collection, write_collection

    data = Path(__file__).resolve().parent.parent / "data"
    if not (data / "base" / "sd" / "record.json").is_file() or not (data / "collections" / collection).is_dir():
        pytest.skip(f"the shipped {collection} collection and its bases are not in data/")
    shipped = open_collection(data / "collections" / collection)
    t = shipped.table
    rank = int(t["rank"].mode().iloc[0])
    idx = [i for i in np.nonzero(np.isfinite(t[f"{label}_retest"].to_numpy(float)))[0] if t["rank"].iloc[i] == rank][:n]
    rows = t.iloc[idx].reset_index(drop=True)
    write_collection(dest, [shipped.lora(i) for i in idx], rows, labels=shipped.labels, tasks=shipped.tasks,
                     base_model=shipped.meta.get("base_model"), provenance=shipped.meta["provenance"])
    return rows, {"sd": data / "base" / "sd", "clip": data / "base" / "clip"}
