"""Every page × every shipped collection × every option of every select box and radio, under streamlit's AppTest, on
the data the repository ships (``data/``: the zoo's collections and the trained checkpoints, as `make app` shows
them). Any exception or error element fails the test and names the page, collection, widget and option.

One AppTest per collection is reused across its pages and options (each selection is one rerun). Select boxes whose
options are LoRA ids (hundreds) are walked at their first, second, middle and last option: every other option runs
the same code on other data. Widgets that appear only after another choice are walked too (one level)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_app_pages import run_app

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("LOL_DATA") or REPO / "data")
PAGES = ("collection", "predict", "embeddings", "generate", "membership", "language_models", "models")
SKIP = {"collection_choice"}  # walked by the outer loop (one AppTest per collection)
MAX_OPTIONS = 12


def _shipped() -> list[str]:
    from lol.paths import shipped_collections

    return list(shipped_collections(DATA))


def _options(n: int) -> list[int]:
    return list(range(n)) if n <= MAX_OPTIONS else sorted({0, 1, n // 2, n - 1})


def _choosers(at) -> list[tuple[str, str]]:
    out = []
    for kind in ("selectbox", "radio"):
        for w in getattr(at, kind):
            assert w.key, f"{kind} {w.label!r} has no key: give every select box a key so it can be walked"
            if w.key not in SKIP:
                out.append((kind, w.key))
    return out


def _check(at, where: str) -> None:
    assert not at.exception, f"{where}: exception {[e.value for e in at.exception]}"
    assert not at.error, f"{where}: error element {[e.value for e in at.error]}"


def _choose(at, kind: str, key: str, index: int) -> None:
    w = getattr(at, kind)(key=key)
    if kind == "selectbox":
        w.select_index(index)
    else:
        w.set_value(w.options[index])
    at.run()


def walk_page(at, where: str) -> int:
    """Select every option of every select box / radio on the page, one box at a time, then restore it; returns
    the number of reruns."""
    done: set[tuple[str, str]] = set()
    runs = 0
    while True:
        todo = [c for c in _choosers(at) if c not in done]
        if not todo:
            return runs
        kind, key = todo[0]
        done.add((kind, key))
        w = getattr(at, kind)(key=key)
        label, original, n = w.label, w.index, len(w.options)
        for i in _options(n):
            if (kind, key) not in _choosers(at):  # an earlier option removed it (e.g. the model list changed)
                break
            option = getattr(at, kind)(key=key).options[i]
            _choose(at, kind, key, i)
            runs += 1
            _check(at, f"{where}: {label!r} = {option!r}")
        if (kind, key) in _choosers(at) and original is not None and original < len(getattr(at, kind)(key=key).options):
            _choose(at, kind, key, original)
            runs += 1
            _check(at, f"{where}: {label!r} restored")


@pytest.mark.skipif(not _shipped(), reason=f"no shipped collections under {DATA / 'collections'}")
@pytest.mark.parametrize("collection", _shipped() or ["none"])
def test_every_option_of_every_page(collection, tmp_path, monkeypatch):
    monkeypatch.setenv("LOL_DATA", str(DATA))
    monkeypatch.setenv("LOL_APP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LOL_APP_WARMUP", "0")
    at = run_app()
    at.selectbox(key="collection_choice").select(f"{collection} (shipped)").run()
    _check(at, f"{collection}: opening it")
    runs = 0
    for page in PAGES:
        at.switch_page(f"app_pages/{page}.py")
        at.run()
        where = f"{collection} · {page}"
        _check(at, where)
        runs += walk_page(at, where)
    assert runs >= len(PAGES)  # at least the sidebar's device box was walked on every page
