"""Background warm-up: UMAP's first fit in a process spends 10–20 s compiling (numba JIT). After the first page has
been drawn, one daemon thread per server process imports umap and fits a tiny random set, so the Embeddings page is
quick on its first visit too. ``LOL_APP_WARMUP=0`` turns it off."""
from __future__ import annotations

import logging
import os
import threading

__all__ = ["start", "done"]

_lock = threading.Lock()
_thread: threading.Thread | None = None
_done = threading.Event()
log = logging.getLogger("lol.app")


def start() -> None:
    global _thread
    if os.environ.get("LOL_APP_WARMUP", "1") == "0":
        return
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_warm, name="lol-app-warmup", daemon=True)
            _thread.start()


def done() -> bool:
    return _done.is_set()


def _warm() -> None:
    try:
        import warnings

        import numpy as np
        import umap

        x = np.random.default_rng(0).normal(size=(32, 8))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            umap.UMAP(n_neighbors=5, init="random", random_state=0).fit_transform(x)
    except Exception as e:  # noqa: BLE001 — warm-up is an optimisation only
        log.warning("UMAP warm-up failed: %s", e)
    finally:
        _done.set()
