"""Where the explorer finds things on the server: `lol.paths` (shipped collections, checkpoints, notebook outputs,
``LOL_DATA``), `lol.devices`, and its own on-disk cache: ``LOL_APP_CACHE`` (default ``<repo>/.cache/app``,
git-ignored)."""
from __future__ import annotations

import os
from pathlib import Path

from ..devices import default_device, devices
from ..paths import (REPO, checkpoint_dirs, checkpoint_index, data_root, describe_base, results_dirs,
                     shipped_collections)

__all__ = ["REPO", "data_root", "cache_root", "shipped_collections", "checkpoint_index", "checkpoint_dirs",
           "results_dirs", "default_device", "devices", "describe_base"]


def cache_root() -> Path:
    return Path(os.environ.get("LOL_APP_CACHE") or REPO / ".cache" / "app").expanduser()
