"""Background warm-up, so that no page's first visit stalls a talk. Started once per server process (app.py calls
`start` at the top of every run; only the first call starts the thread), it fills the same caches the pages read,
with the same keys, most-visited first:

1. for every shipped collection (the sidebar's default first): the collection and its table, every fitting
   checkpoint's predictions, and the maps the Embeddings page draws by default: read from the collection when
   shipped with it (`lol zoo precompute`), else computed and persisted under the app cache;
2. the Stable Diffusion pipeline and CLIP scorer of the first image collection and the language model of the first
   language collection (after the first collection), so the first Generate click does not load them;
3. UMAP's numba compilation (10–20 s on its first fit in a process), for maps drawn with other settings.

``LOL_APP_WARMUP=0`` turns it off (the tests do). Failures are logged and skipped: warming is an optimisation,
and the page that needs the object reports the problem itself.
"""
from __future__ import annotations

import logging
import os
import threading
import time

__all__ = ["start", "timings"]

_lock = threading.Lock()
_thread: threading.Thread | None = None
_timings: dict[str, float] = {}
log = logging.getLogger("lol.app")

UMAP_DEFAULTS = dict(n_neighbors=15, min_dist=0.1)  # the Embeddings page's default sliders


def start() -> None:
    global _thread
    if os.environ.get("LOL_APP_WARMUP", "1") == "0":
        return
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_warm, name="lol-app-warmup", daemon=True)
            _thread.start()


def timings() -> dict[str, float]:
    """Seconds each warm-up step took (for the server log and the tests)."""
    return dict(_timings)


def _step(name: str, fn, *args) -> object:
    t = time.perf_counter()
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 — an optimisation only: the page reports the problem when it needs it
        log.warning("warm-up step %s failed: %s", name, e)
        return None
    finally:
        _timings[name] = time.perf_counter() - t


def _collection(name: str, path, device: str, models: list) -> None:
    from . import cache

    p, key = str(path), cache.path_key(path)
    coll = cache.collection(p, key)
    cache.collection_table(p, key)
    fp = getattr(coll, "fingerprint", key)
    fitting = [m.path for m in models if m.fits(coll.spec)]  # in the sidebar's order: its default model first
    # what the pages show first: the sidebar's default model (the first fitting one) on Predict and as the
    # Embeddings page's default map; then the invariant maps; then the other models. A map shipped with the
    # collection (`lol zoo precompute`) is read, not computed.
    def map_of(kind, ck, features, *args):
        if _step(f"{name}: shipped {kind} map {ck or ''}", cache.shipped_map, p, key, kind, ck,
                 *UMAP_DEFAULTS.values()) is None:
            feats = _step(f"{name}: {kind} features {ck or ''}".strip(), features, *args)
            if feats is not None:
                _step(f"{name}: {kind} map{' ' + ck if ck else ''}", cache.umap_xy, feats, f"{fp}:{kind}:{ck or ''}",
                      *UMAP_DEFAULTS.values())

    for i, ck in enumerate(fitting):
        _step(f"{name}: predictions {ck}", cache.predictions, ck, device, p, key)
        map_of("model", ck, cache.model_embeddings, ck, device, p, key)
        if i == 0:
            for kind in ("svals", "canon"):
                map_of(kind, None, cache.invariant_features, p, key, kind)
    if not fitting:
        for kind in ("svals", "canon"):
            map_of(kind, None, cache.invariant_features, p, key, kind)


def _generation(device: str) -> None:
    """The first image collection's SD pipeline and CLIP scorer, and the first language collection's LM."""
    from .. import catalog
    from ..paths import data_root, shipped_collections
    from . import cache

    todo = {"sd": cache.pipeline, "clip": cache.clip_scorer, "lm": cache.language_model}
    for path in shipped_collections().values():
        coll = cache.collection(str(path), cache.path_key(path))
        for name in list(todo):
            folder = catalog.model_folder(coll, name, cache.shipped_bases(), data_root())
            if folder is not None:
                _step(f"{name} base", todo.pop(name), str(folder), device)


def _warm() -> None:
    import numpy as np

    from ..catalog import checkpoints
    from ..devices import default_device
    from ..paths import shipped_collections
    from ..precomputed import umap_2d

    device = default_device()
    models = [c for c in checkpoints() if c.spec is not None]
    shipped = list(shipped_collections().items())
    for i, (name, path) in enumerate(shipped):  # the landing collection first, then the pipelines, then the others
        _step(name, _collection, name, path, device, models)
        if i == 0:
            _step("generation", _generation, device)
    # UMAP's numba compilation, for maps drawn with other settings (shipped maps need no UMAP)
    _step("umap compile", umap_2d, np.random.default_rng(0).normal(size=(32, 8)))
    log.warning("warm-up done: %s", {k: round(v, 1) for k, v in _timings.items()})
