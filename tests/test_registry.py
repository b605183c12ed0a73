"""One home per fact: the model registry (kinds, symmetry vocabulary, rank agnosticism), label kinds, pickle suffixes,
the data root (LOL_DATA) and the atomic folder writer."""
import os
import subprocess
import sys

import pytest

from lol.models import MODELS, gl_invariant, gl_invariant_kinds
from lol.symmetry import GL, INVARIANCES


def test_every_kind_declares_its_symmetry_from_the_vocabulary():
    for kind, cls in MODELS.items():
        assert cls.invariant_to in INVARIANCES, kind
        assert isinstance(cls.rank_agnostic, bool), kind
    assert set(gl_invariant_kinds()) == {k for k, c in MODELS.items() if c.invariant_to == GL}
    assert {"glnet", "dense", "colspace", "colsketch", "svals", "canon_mlp", "canon_transformer"} == set(
        gl_invariant_kinds())
    assert not gl_invariant("oalign") and not gl_invariant("mlp_aug") and not gl_invariant("no_such_kind")
    assert not MODELS["mlp"].rank_agnostic and MODELS["glnet"].rank_agnostic


def test_experiments_and_bench_take_the_registry_lists():
    from bench.bench_models import kinds
    from lol import experiments as X

    assert X.MODEL_KINDS == tuple(MODELS) and set(MODELS) <= set(kinds())
    assert [k for k in MODELS if X.gl_invariant(k)] == list(gl_invariant_kinds())
    assert [k for k in MODELS if X.rank_agnostic(k)] == [k for k, c in MODELS.items() if c.rank_agnostic]


def test_one_label_kind_list_and_inference():
    import pandas as pd

    from lol import collection, labels, targets

    assert collection.LABEL_KINDS is labels.LABEL_KINDS and targets.KINDS is labels.LABEL_KINDS
    assert labels.infer_kind([0, 1, 1, None]) == "binary" and labels.infer_kind([True, False]) == "binary"
    assert labels.infer_kind([0.5, 2.0]) == "regression" and labels.infer_kind(["a", "b"]) == "category"
    assert labels.infer_kind(pd.Series([], dtype=float)) == "regression"  # no values: not called binary


def test_data_root_honours_lol_data(tmp_path, monkeypatch):
    from lol import paths

    monkeypatch.delenv("LOL_DATA", raising=False)
    assert paths.data_root() == paths.REPO / "data"
    monkeypatch.setenv("LOL_DATA", str(tmp_path))
    assert paths.data_root() == tmp_path and paths.checkpoint_index_path() == tmp_path / "checkpoints" / "index.json"
    assert paths.checkpoint_index() == {}
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "index.json").write_text('{"a": "x/y"}')
    assert paths.checkpoint_index() == {"a": (tmp_path / "checkpoints" / "x" / "y").resolve()}
    (tmp_path / "checkpoints" / "index.json").write_text("[1")
    with pytest.raises(ValueError, match="index.json"):
        paths.checkpoint_index()


def test_atomic_dir_commits_or_leaves_nothing(tmp_path):
    from lol.paths import TEMP_MARK, atomic_dir

    dest = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "a").write_text("1")
            raise RuntimeError("boom")
    assert not dest.exists() and not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    assert (dest / "a").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_dir(dest) as tmp:
            (tmp / "a").write_text("2")
    assert (dest / "a").read_text() == "1"
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "a").write_text("3")
    assert (dest / "a").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path):
    from lol.paths import clean_stale_temp, temp_sibling

    dest = tmp_path / "coll"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / temp_sibling(dest).name.replace(f"-{os.getpid()}-", f"-{pid}-")
    stale.mkdir()
    (stale / "junk").write_bytes(b"x" * 100)
    live = temp_sibling(dest)  # this process: a writer still at work
    live.mkdir()
    other = tmp_path / ".unrelated"
    other.mkdir()
    assert clean_stale_temp(dest) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
