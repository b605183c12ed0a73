"""Streaming over a collection (`lol.stream`), the collection's page release, and `bench scale`'s quick mode."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import lol.collection as C
from lol.collection import open_collection, write_collection
from lol.stream import CollectionStream, predict_stream, stream_loader, train_stream
from lol.synth import random_lora, random_lora_batch, synth_collection, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    return synth_collection(tiny_spec(), 90, ranks=(2, 4, 8), seed=0).write(tmp_path_factory.mktemp("s") / "c")


def test_stream_in_order_equals_batches(coll):
    s = CollectionStream(coll, batch_size=8, chunk=24)
    seen = []
    for idx, b in s:
        ref = coll.batch(idx)
        assert torch.equal(b.ranks, ref.ranks)
        for u, ru, v, rv in zip(b.U, ref.U, b.V, ref.V):  # trimmed to the minibatch's own widths: identical
            assert torch.equal(u, ru) and torch.equal(v, rv)
            assert u.mT.is_contiguous() and v.mT.is_contiguous()     # and in the same (rank-major) layout
        seen += idx.tolist()
    assert seen == list(range(len(coll))) and len(s) == sum(1 for _ in s)
    coll.release()  # maps afresh: the same values
    assert torch.equal(coll.batch([3, 70]).U[1], open_collection(coll.path).batch([3, 70]).U[1])


def test_shuffled_epochs_cover_the_selection_once(coll):
    sel = np.arange(0, 90, 2)
    s = CollectionStream(coll.path, sel, batch_size=4, shuffle=True, seed=1, chunk=12, release_mb=0.001)
    orders = []
    for epoch in (1, 2):
        s.set_epoch(epoch)
        got = torch.cat([i for i, _ in stream_loader(s)]).tolist()
        assert sorted(got) == sel.tolist()
        orders.append(got)
    assert orders[0] != orders[1]
    s.set_epoch(1)
    with_worker = torch.cat([i for i, _ in stream_loader(s, num_workers=1)]).tolist()
    assert with_worker == orders[0]  # a DataLoader worker reopens the collection by path: the same stream


def test_train_and_predict_streamed(coll, tmp_path):
    res = train_stream(coll, ["sv_energy", "probe"], "glnet", epochs=2, batch_size=16, seed=0)
    assert [h["loras"] for h in res.history] == [res.n_train] * 2
    assert set(res.metrics["val"]) == {"sv_energy", "probe"}
    ck = res.save(tmp_path / "ck")
    df = predict_stream(ck, coll.path, batch_size=32)
    assert list(df.columns) == ["id", "sv_energy", "probe"] and list(df["id"]) == coll.ids
    from lol.checkpoint import load_checkpoint

    ref = load_checkpoint(ck).predict_batch(coll.batch())
    np.testing.assert_allclose(df["sv_energy"], ref["sv_energy"], rtol=1e-5, atol=1e-6)


def test_write_releasing_pages_gives_the_same_file(tmp_path, monkeypatch):
    """The large-file path of `write_collection` (no MAP_POPULATE, written pages released every window, the hash
    taken a window at a time) writes the same bytes as the small-file path."""
    spec = tiny_spec()
    loras = [random_lora(spec, r, seed=i, dtype=torch.float16) for i, r in enumerate([2, 4, 8] * 10)]
    table = pd.DataFrame({"id": [f"x{i}" for i in range(len(loras))]})
    a = write_collection(tmp_path / "a", loras, table)
    monkeypatch.setattr(C, "_POPULATE_MAX", 0)
    monkeypatch.setattr(C, "_RELEASE_BYTES", 4096)
    b = write_collection(tmp_path / "b", loras, table)
    assert (tmp_path / "a" / C.FACTORS_NAME).read_bytes() == (tmp_path / "b" / C.FACTORS_NAME).read_bytes()
    assert a.factors_hash == b.factors_hash
    b.verify()


def test_random_lora_batch_labels_match_lora_labels():
    from lol.synth import lora_labels, sd15_cross_v_spec

    spec = sd15_cross_v_spec()
    assert len(spec) == 16 and all(i == 768 for _, i in spec.shapes)
    b, tab = random_lora_batch(spec, 3, seed=5)
    for k in range(3):
        want = lora_labels(b.lora(k), spec)
        assert abs(want["sv_energy"] - tab["sv_energy"][k]) < 1e-9 and abs(want["probe"] - tab["probe"][k]) < 1e-9
    fast, _ = random_lora_batch(spec, 3, seed=5, labels=False)  # the same draws without the labels
    assert all(torch.equal(x, y) for x, y in zip(fast.U + fast.V, b.U + b.V))


def test_bench_scale_quick(tmp_path):
    """`python -m bench scale -- --quick` end to end, at one tiny size on the tiny spec (3 step subprocesses)."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "bench", "scale", "--", "--quick", "--spec", "tiny", "--sizes", "64",
                        "--threads", "1", "--out", str(out), "--dir", str(tmp_path / "work")],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    df = pd.read_csv(out / "scale.csv")
    assert list(df.step) == ["write", "train", "predict"] and (df.n == 64).all()
    assert (df.peak_mb > 0).all() and (df.cpu_seconds > 0).all()
    md = (out / "scale.md").read_text()
    assert "| 64 | train |" in md and "spec `tiny`" in md and (out / "scale.png").is_file()
    assert not (tmp_path / "work" / "n64").exists()  # collections are deleted after their size
