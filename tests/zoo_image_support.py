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
