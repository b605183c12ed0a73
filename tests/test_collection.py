"""Packed collections: exact round trip of (U, V, rank, alpha, scale), lazy opening, validation, determinism."""
import json
import os
import time

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


def test_factors_file_is_standard_safetensors(tmp_path):
    from safetensors.torch import load_file

    spec, loras = _loras()
    write_collection(tmp_path / "c", loras, _table(6))
    t = load_file(str(tmp_path / "c" / "factors.safetensors"))
    name = spec.names[2]
    assert t[f"U/{name}"].shape == (6, 12, 4) and t[f"U/{name}"].dtype == torch.float16
    assert t["rank"].dtype == torch.int32 and t["alpha"].shape == (6, 3) and t["scale"].dtype == torch.float32


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
    for t in [*c._U, *c._V]:
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
    with pytest.raises(CollectionError, match=r"factors\.safetensors.*U/unet\.down\.attn1\.to_q.*expected \(6, 9"):
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
        entries += [(f"U/{name}", "F16", (n, o, 4), n * o * 8), (f"V/{name}", "F16", (n, i, 4), n * i * 8)]
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
    assert len(c) == n and c.ranks.shape == (n, L) and c._U[0].shape == (n, 320, 4)
    assert f.stat().st_size > 790e6
    print(f"opened a {f.stat().st_size / 1e6:.0f} MB collection in {elapsed * 1e3:.1f} ms")
