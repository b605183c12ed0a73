"""Packed collections: exact round trip of (U, V, rank, alpha, scale), lazy opening, validation, determinism."""
import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from lol import CollectionError, LoRA, LoRAModule, SpecMismatchError, open_collection, write_collection
from lol.batch import LoRABatch
from lol.synth import random_lora, tiny_spec


def _loras(n=6, ranks=(2, 4), dtype=torch.float32):
    spec = tiny_spec()
    out = []
    for i in range(n):
        lo = random_lora(spec, rank=ranks[i % len(ranks)], alpha=27.0, seed=i, dtype=dtype)
        if i == 1:  # one module of smaller rank than the rest of this LoRA
            m = lo[spec.names[1]]
            lo.modules[m.name] = LoRAModule(m.name, m.U[:, :1], m.V[:, :1], alpha=5.0, scale=5.0)
        out.append(lo)
    return spec, out


def _table(n):
    return pd.DataFrame({"id": [f"l{i}" for i in range(n)], "y": [float(i) for i in range(n)],
                         "cls": [i % 2 for i in range(n)]})


LABELS = {"y": {"kind": "regression", "description": "index", "task": "reg"},
          "cls": {"kind": "binary", "description": "parity", "task": "parity"}}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("as_iterator", [False, True])
def test_round_trip_ranks_alpha_scale_and_delta(tmp_path, dtype, as_iterator):
    spec, loras = _loras()
    src = iter(loras) if as_iterator else loras
    c = write_collection(tmp_path / "c", src, _table(len(loras)), labels=LABELS, base_model="tiny", dtype=dtype)
    assert len(c) == 6 and c.spec == spec and c.base_model == "tiny"
    assert c.tasks == {"reg": ["y"], "parity": ["cls"]}
    assert c.label_columns("parity") == ["cls"] and c.label_columns(["y"]) == ["y"] and c.label_columns() == ["y", "cls"]
    tol = 2e-3 if dtype == torch.float16 else 1e-6
    for i, lo in enumerate(loras):
        back = c.lora(i)
        assert back.metadata["id"] == f"l{i}"
        for m in lo:
            b = back[m.name]
            assert (b.rank, b.alpha) == (m.rank, m.alpha) and abs(b.scale - m.scale) < 1e-6
            d = m.delta().double()
            assert float((b.delta().double() - d).abs().max()) <= tol * float(d.abs().max())
    assert c.ranks.tolist()[:2] == [[2, 2, 2], [4, 1, 4]]
    # a batch equals LoRABatch.from_loras of the stored LoRAs, zero padding included
    b = c.batch([1, 3])
    ref = LoRABatch.from_loras([c.lora(1), c.lora(3)], spec)
    assert torch.equal(b.ranks, ref.ranks)
    for u, v, ur, vr in zip(b.U, b.V, ref.U, ref.V):
        assert torch.equal(u, ur) and torch.equal(v, vr)
    assert b.U[1].shape == (2, 8, 4) and float(b.U[1][0, :, 1:].abs().max()) == 0.0
    assert len(c.batch()) == 6 and c.batch(dtype=torch.float64).dtype == torch.float64


def test_same_input_gives_byte_identical_collection_and_fingerprint(tmp_path):
    spec, loras = _loras()
    a = write_collection(tmp_path / "a", loras, _table(6), labels=LABELS)
    b = write_collection(tmp_path / "b", iter(loras), _table(6), labels=LABELS)
    for name in ("collection.json", "factors.safetensors", "loras.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a.fingerprint == b.fingerprint
    t = _table(6)
    t.loc[0, "y"] = 99.0
    c = write_collection(tmp_path / "c", loras, t, labels=LABELS)
    assert c.fingerprint != a.fingerprint
    a.verify()


def test_verify_detects_a_changed_factor_byte_with_either_recorded_hash(tmp_path):
    """A collection records a BLAKE3 hash of its factors file; one written before BLAKE3 (the version-1 fixture)
    holds SHA-256. `verify` checks whichever is recorded, and one changed byte fails it, naming the file and hash."""
    import shutil

    from lol.errors import CollectionError

    spec, loras = _loras()
    c = write_collection(tmp_path / "c", loras, _table(6), labels=LABELS)
    field, digest = c.factors_hash
    assert field == "factors_blake3" and "factors_sha256" not in c.meta and len(digest) == 64
    old = tmp_path / "v1"
    shutil.copytree(FIXTURE_V1, old)
    assert open_collection(old).factors_hash[0] == "factors_sha256"
    for folder, name in ((tmp_path / "c", "BLAKE3"), (old, "SHA-256")):
        open_collection(folder).verify()
        f = folder / "factors.safetensors"
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x01                                   # inside the last factor tensor
        f.write_bytes(bytes(data))
        with pytest.raises(CollectionError, match=f"factors.safetensors: contents changed .*{name} mismatch"):
            open_collection(folder).verify()


def test_factors_file_is_standard_safetensors(tmp_path):
    from safetensors.torch import load_file

    spec, loras = _loras()
    write_collection(tmp_path / "c", loras, _table(6))
    t = load_file(str(tmp_path / "c" / "factors.safetensors"))
    name = spec.names[2]  # ranks 2, 4, 2, 4, 2, 4: two buckets of three LoRAs, no padding
    assert t[f"U/{name}/r2"].shape == (3, 12, 2) and t[f"U/{name}/r4"].shape == (3, 12, 4)
    assert t[f"V/{name}/r4"].dtype == torch.float16 and f"U/{name}" not in t
    assert t["rank"].dtype == torch.int32 and t["alpha"].shape == (6, 3) and t["scale"].dtype == torch.float32
    assert sorted(k for k in t if k.startswith(f"U/{spec.names[1]}/")) == [f"U/{spec.names[1]}/r{r}" for r in (1, 2, 4)]


def _mapped_ranges(path):
    """Address ranges of this process that map ``path`` (Linux /proc/self/maps)."""
    out = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5] == str(path):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_open_is_lazy(tmp_path):
    """Opening reads headers, ranks and the table only: the factors are memory-mapped views of the file (no copies),
    so no factor bytes are touched until a batch is taken."""
    spec, loras = _loras(n=4)
    write_collection(tmp_path / "c", loras, _table(4))
    c = open_collection(tmp_path / "c")
    ranges = _mapped_ranges((tmp_path / "c" / "factors.safetensors").resolve())
    assert ranges, "the factors file is not memory-mapped"
    tensors = c._factor_tensors()
    assert len(tensors) == 2 * (2 + 3 + 2)  # U and V of buckets {2, 4}, {1, 2, 4}, {2, 4}
    for t in tensors:
        p = t.data_ptr()
        assert any(lo <= p < hi for lo, hi in ranges), "a factor tensor is a copy, not a view of the mapped file"


def test_validation_errors_name_the_file(tmp_path):
    spec, loras = _loras()
    write_collection(tmp_path / "c", loras, _table(6))
    with pytest.raises(CollectionError, match="no such collection"):
        open_collection(tmp_path / "missing")
    # N mismatch between table and tensors
    t = pd.read_parquet(tmp_path / "c" / "loras.parquet")
    t.iloc[:5].to_parquet(tmp_path / "c" / "loras.parquet")
    with pytest.raises(CollectionError, match=r"factors\.safetensors.*5 rows"):
        open_collection(tmp_path / "c")
    t.to_parquet(tmp_path / "c" / "loras.parquet")
    open_collection(tmp_path / "c")
    # wrong shape vs spec
    meta = json.loads((tmp_path / "c" / "collection.json").read_text())
    meta["spec"]["shapes"][0] = [9, 8]
    (tmp_path / "c" / "collection.json").write_text(json.dumps(meta))
    with pytest.raises(CollectionError, match=r"factors\.safetensors: 'U/unet\.down\.attn1\.to_q/r2'.*expected \(3, 9, 2\)"):
        open_collection(tmp_path / "c")
    for name in ("loras.parquet", "factors.safetensors", "collection.json"):
        (tmp_path / "c" / name).unlink()
        with pytest.raises(CollectionError, match=name.replace(".", r"\.") + ": missing"):
            open_collection(tmp_path / "c")


def test_write_errors(tmp_path):
    spec, loras = _loras()
    with pytest.raises(CollectionError, match="duplicate ids"):
        write_collection(tmp_path / "x", loras, pd.DataFrame({"id": ["a"] * 6}))
    with pytest.raises(CollectionError, match="6 rows but 5 LoRAs"):
        write_collection(tmp_path / "x", iter(loras[:5]), _table(6))
    with pytest.raises(CollectionError, match="kind must be"):
        write_collection(tmp_path / "x", loras, _table(6), labels={"y": {"kind": "weird"}})
    other = LoRA.from_modules([LoRAModule("unet.other", torch.zeros(3, 1), torch.zeros(3, 1), 1.0, 1.0)])
    with pytest.raises(SpecMismatchError, match="LoRA #2"):
        write_collection(tmp_path / "x", iter(loras[:2] + [other] + loras[3:]), _table(6))
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))  # atomic: nothing left behind
    write_collection(tmp_path / "y", loras, _table(6))
    with pytest.raises(CollectionError, match="already exists"):
        write_collection(tmp_path / "y", loras, _table(6))
    assert len(write_collection(tmp_path / "y", loras[:3], _table(3), overwrite=True)) == 3


def test_matching_is_by_module_key_not_position(tmp_path):
    spec, loras = _loras(n=2)
    shuffled = LoRA.from_modules(list(loras[1])[::-1])
    c = write_collection(tmp_path / "c", [loras[0], shuffled], _table(2))
    for m in loras[1]:
        assert torch.allclose(c.lora(1)[m.name].delta(), m.delta(), atol=2e-3)


def test_open_1000_sd_sized_lora_collection_is_fast(tmp_path):
    """A 1,000-LoRA collection with SD-1.x q/v shapes (rank 4, fp16: 797 MB of factors) opens without reading them.
    The file is written sparse (header + zero pages) so the test stays fast; open time is measured in bench_io."""
    from lol.synth import sd15_unet_qv_spec

    spec = sd15_unet_qv_spec()
    n = 1000
    one = random_lora(spec, 4, seed=0)
    write_collection(tmp_path / "c", [one], pd.DataFrame({"id": ["x"]}), spec=spec)
    # grow it to N LoRAs by rewriting only the header and the small tensors; factors stay zero (sparse file)
    from lol.collection import _safetensors_header

    L = len(spec)
    entries = [("rank", "I32", (n, L), n * L * 4), ("alpha", "F32", (n, L), n * L * 4),
               ("scale", "F32", (n, L), n * L * 4)]
    for name, (o, i) in zip(spec.names, spec.shapes):
        entries += [(f"U/{name}/r4", "F16", (n, o, 4), n * o * 8), (f"V/{name}/r4", "F16", (n, i, 4), n * i * 8)]
    head, off = _safetensors_header(entries, {"format": "pt"})
    f = tmp_path / "c" / "factors.safetensors"
    with open(f, "wb") as fh:
        fh.write(head)
        fh.write(torch.full((n, L), 4, dtype=torch.int32).numpy().tobytes())
        fh.write(torch.ones(2 * n * L, dtype=torch.float32).numpy().tobytes())
        fh.truncate(len(head) + sum(e[3] for e in entries))
    pd.DataFrame({"id": [str(i) for i in range(n)]}).to_parquet(tmp_path / "c" / "loras.parquet")
    meta = json.loads((tmp_path / "c" / "collection.json").read_text())
    (tmp_path / "c" / "collection.json").write_text(json.dumps({**meta, "n": n}))
    t0 = time.perf_counter()
    c = open_collection(tmp_path / "c")
    elapsed = time.perf_counter() - t0
    assert len(c) == n and c.ranks.shape == (n, L) and c._buckets[0][4][0].shape == (n, 320, 4)
    assert f.stat().st_size > 790e6
    print(f"opened a {f.stat().st_size / 1e6:.0f} MB collection in {elapsed * 1e3:.1f} ms")


# ------------------------------------------------------------------------------------------- layouts (rank buckets)

def _same_batch(a: LoRABatch, b: LoRABatch) -> None:
    assert torch.equal(a.ranks, b.ranks)
    for u, v, ur, vr in zip(a.U, a.V, b.U, b.V):
        assert u.dtype == ur.dtype and torch.equal(u, ur) and torch.equal(v, vr)
        # both in the rank-major layout (`lol.batch`): each LoRA's r columns stored as r contiguous rows
        assert all(t.mT.is_contiguous() for t in (u, v, ur, vr)), [t.stride() for t in (u, v, ur, vr)]


def test_rank_buckets_store_no_padding(tmp_path):
    """The factors file holds exactly Σ (out + in)·rank values per LoRA module (fp16: 2 bytes each) plus the header and
    the (N, L) rank/alpha/scale tensors; the padded layout of the same LoRAs holds N·(out + in)·rmax per module."""
    from safetensors import safe_open

    spec, loras = _loras(n=8, ranks=(1, 2, 8, 3))
    c = write_collection(tmp_path / "b", loras, _table(8))
    p = write_collection(tmp_path / "p", loras, _table(8), layout="padded")
    assert (c.layout, c.meta["version"], p.layout, p.meta["version"]) == ("rank_buckets", 2, "padded", 1)
    ranks = c.ranks
    want = sum(int(ranks[j, ell]) * (o + i) * 2 for j in range(8) for ell, (o, i) in enumerate(spec.shapes))
    padded = sum(8 * int(ranks[:, ell].max()) * (o + i) * 2 for ell, (o, i) in enumerate(spec.shapes))
    for folder, factor_bytes in (("b", want), ("p", padded)):
        f = tmp_path / folder / "factors.safetensors"
        with safe_open(str(f), framework="pt") as st:
            header_len = int.from_bytes(f.read_bytes()[:8], "little")
            keys = list(st.keys())
        assert f.stat().st_size == 8 + header_len + 3 * 8 * 3 * 4 + factor_bytes, (folder, keys)
    assert want < padded / 2


@pytest.mark.parametrize("as_iterator", [False, True])
def test_both_layouts_give_the_same_batches_and_loras(tmp_path, as_iterator):
    spec, loras = _loras(n=9, ranks=(1, 4, 2))
    b = write_collection(tmp_path / "b", iter(loras) if as_iterator else loras, _table(9))
    p = write_collection(tmp_path / "p", iter(loras) if as_iterator else loras, _table(9), layout="padded")
    for idx in (None, [4, 0, 4, -1], [2], [0, 3, 6], []):
        for dtype in (torch.float32, torch.float64, torch.float16):
            _same_batch(b.batch(idx, dtype=dtype), p.batch(idx, dtype=dtype))
    sel = [5, 1, 8, 1]
    _same_batch(b.batch(sel), LoRABatch.from_loras([b.lora(i) for i in sel], spec))  # padding as from_loras pads
    one = b.batch([0, 3, 6])  # one rank selected: width is that rank, nothing padded
    assert [u.shape[-1] for u in one.U] == [1, 1, 1]
    mixed = b.batch([0, 1])  # ranks 1 and 4 (module 1 of LoRA 1 has rank 1): width 4, zeros past rank 1
    assert mixed.U[0].shape == (2, 8, 4) and float(mixed.U[0][0, :, 1:].abs().max()) == 0.0
    assert mixed.V[1].shape == (2, 6, 1)
    for i in range(9):
        for mb, mp in zip(b.lora(i), p.lora(i)):
            assert (mb.name, mb.rank, mb.alpha, mb.scale) == (mp.name, mp.rank, mp.alpha, mp.scale)
            assert torch.equal(mb.U, mp.U) and torch.equal(mb.V, mp.V)


def test_float16_factors_are_stored_bitwise(tmp_path):
    spec, loras = _loras(n=5, ranks=(3, 1), dtype=torch.float16)
    c = write_collection(tmp_path / "c", loras, _table(5))
    assert c.dtype == torch.float16
    for i, lo in enumerate(loras):
        for m in lo:
            b = c.lora(i, dtype=torch.float16)[m.name]
            assert torch.equal(b.U.view(torch.int16), m.U.view(torch.int16))
            assert torch.equal(b.V.view(torch.int16), m.V.view(torch.int16))


def test_given_ranks_stream_without_a_spool_and_are_checked(tmp_path, monkeypatch):
    import lol.collection as coll

    spec, loras = _loras(n=6)
    ranks = [[m.rank for m in spec.match(lo)] for lo in loras]

    def no_spool(*a, **k):
        raise AssertionError("spooled although the ranks were given")

    monkeypatch.setattr(coll._Spool, "__init__", no_spool)
    c = write_collection(tmp_path / "c", iter(loras), _table(6), ranks=ranks)
    write_collection(tmp_path / "ref", loras, _table(6))
    assert (tmp_path / "c" / "factors.safetensors").read_bytes() == (tmp_path / "ref" / "factors.safetensors").read_bytes()
    assert c.ranks.tolist() == ranks
    wrong = [list(r) for r in ranks]
    wrong[3][2] = 1
    with pytest.raises(CollectionError, match=r"LoRA #3 module 'unet\.up\.attn1\.to_q' has rank 4 but the given ranks say 1"):
        write_collection(tmp_path / "x", iter(loras), _table(6), ranks=wrong)
    with pytest.raises(CollectionError, match="6 rows but ranks were given for 5"):
        write_collection(tmp_path / "x", iter(loras), _table(6), ranks=ranks[:5])
    monkeypatch.undo()
    with pytest.raises(CollectionError, match=r"LoRA #1 module 'unet\.down\.attn1\.to_q' has rank 4 > rmax 3"):
        write_collection(tmp_path / "x", iter(loras), _table(6), rmax=[3, 4, 4])
    with pytest.raises(CollectionError, match="layout must be one of"):
        write_collection(tmp_path / "x", loras, _table(6), layout="sparse")
    assert not (tmp_path / "x").exists()


def test_bucket_validation_errors_name_the_file_and_key(tmp_path):
    from safetensors.torch import load_file, save_file

    spec, loras = _loras(n=4)
    write_collection(tmp_path / "c", loras, _table(4))
    f = tmp_path / "c" / "factors.safetensors"
    good = load_file(str(f))
    name = spec.names[0]

    def broken(tensors, pattern):
        save_file(tensors, str(f), metadata={"format": "pt"})
        with pytest.raises(CollectionError, match=pattern):
            open_collection(tmp_path / "c")

    broken({k: v for k, v in good.items() if k != f"V/{name}/r4"},
           rf"factors\.safetensors: missing tensor 'V/{name}/r4' for the 2 LoRA\(s\) whose module '{name}' has rank 4")
    broken({**good, f"U/{name}/r2": good[f"U/{name}/r2"][:1]},
           rf"factors\.safetensors: 'U/{name}/r2' has shape \(1, 8, 2\), expected \(2, 8, 2\)")
    broken({**good, f"U/{name}/r3": torch.zeros(1, 8, 3, dtype=torch.float16)},
           rf"factors\.safetensors: unexpected tensor\(s\) \['U/{name}/r3'\]")
    save_file(good, str(f), metadata={"format": "pt"})
    open_collection(tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "collection.json").read_text())
    (tmp_path / "c" / "collection.json").write_text(json.dumps({**meta, "layout": "padded"}))
    with pytest.raises(CollectionError, match=r"collection\.json: layout 'padded' does not match format version 2"):
        open_collection(tmp_path / "c")
    (tmp_path / "c" / "collection.json").write_text(json.dumps({**meta, "version": 3}))
    with pytest.raises(CollectionError, match=r"collection\.json: format version 3 is newer"):
        open_collection(tmp_path / "c")


FIXTURE_V1 = Path(__file__).parent / "fixtures" / "collection_v1"


def test_reads_collections_written_by_format_version_1(tmp_path):
    """tests/fixtures/collection_v1 was written by the padded writer of format version 1 (commit ba5377b, before rank
    buckets): 5 LoRAs of tiny_spec, ranks 2/4/3 by seed, LoRA 1's second module cut to rank 1 (alpha 5), fp16."""
    import shutil

    from lol.synth import random_lora

    spec = tiny_spec()
    c = open_collection(FIXTURE_V1)
    assert (c.layout, c.meta["version"], len(c), c.dtype) == ("padded", 1, 5, torch.float16)
    c.verify()
    assert c.ranks.tolist() == [[2, 2, 2], [4, 1, 4], [3, 3, 3], [2, 2, 2], [4, 4, 4]]
    assert c.labels["y"]["kind"] == "regression" and c.table["y"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    for i in range(5):
        lo = random_lora(spec, rank=(2, 4, 3)[i % 3], alpha=27.0, seed=i)
        back = c.lora(i)
        for m in lo:
            b = back[m.name]
            if i == 1 and m.name == spec.names[1]:
                assert (b.rank, b.alpha, b.scale) == (1, 5.0, 5.0)
                assert torch.allclose(b.U, m.U[:, :1], rtol=1e-3, atol=1e-4)
                continue
            assert (b.rank, b.alpha) == (m.rank, m.alpha)
            assert torch.allclose(b.U, m.U, rtol=1e-3, atol=1e-4) and torch.allclose(b.V, m.V, rtol=1e-3, atol=1e-4)
    _same_batch(c.batch([1, 3, 4, 1], dtype=torch.float64),
                LoRABatch.from_loras([c.lora(i) for i in (1, 3, 4, 1)], spec, dtype=torch.float64))
    # repacking it gives the rank-bucket layout with the same LoRAs
    shutil.copytree(FIXTURE_V1, tmp_path / "v1")
    new = write_collection(tmp_path / "v2", open_collection(tmp_path / "v1").loras(dtype=torch.float16), c.table,
                           labels=c.labels, tasks=c.tasks, base_model=c.base_model)
    assert new.layout == "rank_buckets"
    def data_bytes(f):  # past the header (for LoRAs this small the header's longer key list outweighs the padding)
        return f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little")

    assert data_bytes(tmp_path / "v2" / "factors.safetensors") < data_bytes(FIXTURE_V1 / "factors.safetensors")
    _same_batch(new.batch(dtype=torch.float32), c.batch(dtype=torch.float32))
