"""The fast read path (`load_safetensors`: one read, one vectorized NaN/Inf test, one widening pass) and the packing
path of `lol import` give exactly what the per-tensor route gives, and still refuse bad data by key."""
import struct
import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from lol import LoRAFormatError, read_lora
from lol.cli import main
from lol.collection import open_collection, write_collection
from lol.formats import save_diffusers
from lol.formats.safetensors_file import all_finite_bytes, load_safetensors
from lol.synth import random_lora, tiny_spec

Q = "unet.a.to_q"


def _bits(values, dtype):
    return torch.tensor(values, dtype=dtype).view(torch.uint8).numpy().tobytes()


def _read_all(reader, files) -> dict:
    """``{file index: ("stacked" | "alone", LoRA or the error read alone)}`` over one `StackedReader.read` pass."""
    from lol.formats.stacked import StackedLoRAs

    seen = {}
    for j, item in reader.read(files):
        if isinstance(item, StackedLoRAs):
            for k in range(len(item)):
                seen[j + k] = ("stacked", item.lora(k))
        else:
            seen[j] = ("alone", item)
    return seen


@pytest.mark.parametrize("dtype,int_dtype", [(torch.float16, torch.int16), (torch.bfloat16, torch.int16)])
def test_exponent_test_is_exact_on_every_16_bit_pattern(dtype, int_dtype):
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(int_dtype).view(dtype)
    finite = torch.isfinite(every.float())
    assert all_finite_bytes(every[finite].view(torch.uint8).numpy().tobytes(), dtype)
    ok = every[finite][:100]
    for bad in every[~finite]:  # each NaN / ±Inf pattern alone among finite values is caught
        buf = torch.cat([ok, bad.reshape(1), ok]).view(torch.uint8).numpy().tobytes()
        assert not all_finite_bytes(buf, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exponent_test_wide_floats(dtype):
    info = torch.finfo(dtype)
    fine = [0.0, -0.0, info.max, -info.max, info.tiny, info.tiny / 4, 1.5, -3.0]
    assert all_finite_bytes(_bits(fine, dtype), dtype)
    for bad in (float("inf"), float("-inf"), float("nan")):
        assert not all_finite_bytes(_bits(fine + [bad] + fine, dtype), dtype)
    neg_nan = torch.tensor([float("nan")], dtype=dtype).neg()
    assert not all_finite_bytes(neg_nan.view(torch.uint8).numpy().tobytes(), dtype)
    assert all_finite_bytes(b"", dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_widened_read_equals_per_tensor_route(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 6, generator=g).to(dtype), torch.randn(5, 3, generator=g).to(dtype)
    f = tmp_path / "x.safetensors"
    alpha = torch.tensor(28.0, dtype=dtype)  # alpha / r = 28 / 3 is no 16-bit number: the rounding route matters
    save_file({f"{Q}.lora_A.weight": A, f"{Q}.lora_B.weight": B, f"{Q}.alpha": alpha}, str(f))
    s = float(alpha) / 3
    m = read_lora(f)[Q]  # float32 out
    assert m.U.dtype == torch.float32 and torch.equal(m.U, B.float() * s) and torch.equal(m.V, A.float().T)
    m64 = read_lora(f, dtype=torch.float64)[Q]
    assert torch.equal(m64.U, B.double() * s) and torch.equal(m64.V, A.double().T)
    m16 = read_lora(f, dtype=torch.float16)[Q]  # the storage dtype of `lol import`: one rounding of the product
    assert torch.equal(m16.U.view(torch.int16), (B.float() * s).half().view(torch.int16))
    assert torch.equal(m16.V, A.half().T)
    mbf = read_lora(f, dtype=torch.bfloat16)[Q]  # also across float16 ↔ bfloat16: one rounding of the product
    assert torch.equal(mbf.U.view(torch.int16), (B.float() * s).bfloat16().view(torch.int16))
    loaded = load_safetensors(f, widen_to=torch.float32)
    assert loaded.all_finite is True
    assert {t.dtype for t in loaded.tensors.values()} == ({dtype} if dtype == torch.float32 else {torch.float32})


def test_mixed_dtypes_and_gapped_data(tmp_path):
    g = torch.Generator().manual_seed(1)
    A16, B32 = torch.randn(2, 3, generator=g).half(), torch.randn(4, 2, generator=g)
    f = tmp_path / "mixed.safetensors"
    save_file({f"{Q}.lora_A.weight": A16, f"{Q}.lora_B.weight": B32, f"{Q}.alpha": torch.tensor(3.0)}, str(f))
    assert load_safetensors(f).all_finite is True  # several dtypes: each tensor checked in its own width
    m = read_lora(f)[Q]
    assert torch.equal(m.U, B32 * 1.5) and torch.equal(m.V, A16.float().T)
    B32[1, 1] = float("nan")
    save_file({f"{Q}.lora_A.weight": A16, f"{Q}.lora_B.weight": B32}, str(f))
    with pytest.raises(Exception, match=f"{Q}.lora_B.weight.*1 NaN/Inf"):
        read_lora(f)
    # hand-made file: a float16 tensor after a 1-byte gap. The safetensors format requires the byte ranges to tile the
    # data exactly; the library refuses the file, and so do we, with one line naming the file and the tensor
    A, B = torch.randn(2, 3, generator=g).half(), torch.randn(4, 2, generator=g).half()
    a, b = A.numpy().tobytes(), B.numpy().tobytes()
    head = {f"{Q}.lora_A.weight": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, len(a)]},
            f"{Q}.lora_B.weight": {"dtype": "F16", "shape": [4, 2], "data_offsets": [len(a) + 1, len(a) + 1 + len(b)]}}
    raw = json.dumps(head).encode()
    f2 = tmp_path / "gap.safetensors"
    f2.write_bytes(struct.pack("<Q", len(raw)) + raw + a + b"\x00" + b)
    with pytest.raises(LoRAFormatError) as e:
        read_lora(f2)
    assert str(f2) in str(e.value) and "truncated or corrupt" in str(e.value) and "lora_B" in str(e.value)


def test_shapes_only_read_agrees_with_full_read(tmp_path):
    lora = random_lora(tiny_spec(), 3, alpha=6.0, seed=2)
    f = save_diffusers(lora, tmp_path / "l.safetensors", dtype=torch.float16)
    full, head = read_lora(f), read_lora(f, shapes_only=True)
    assert head.names == full.names and head.ranks == full.ranks
    assert [(m.out_features, m.in_features) for m in head] == [(m.out_features, m.in_features) for m in full]
    assert all(m.U.is_meta and m.V.is_meta for m in head)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_whole_file_read_equals_memory_mapped_read(tmp_path, monkeypatch, dtype):
    """Files up to WHOLE_READ_MAX are read in one piece (`deserialize`), larger ones tensor by tensor (`safe_open`):
    the same tensors, metadata and NaN/Inf verdict either way, and a NaN is still named by key."""
    from lol.formats import safetensors_file as sf

    lora = random_lora(tiny_spec(), 3, alpha=6.0, seed=4)
    f = save_diffusers(lora, tmp_path / "l.safetensors", dtype=dtype)
    whole = load_safetensors(f)
    monkeypatch.setattr(sf, "WHOLE_READ_MAX", 0)
    mapped = load_safetensors(f)
    assert list(whole.tensors) == list(mapped.tensors) and whole.metadata == mapped.metadata
    assert all(torch.equal(whole.tensors[k], mapped.tensors[k]) for k in whole.tensors)
    assert whole.all_finite is mapped.all_finite is True
    monkeypatch.setattr(sf, "WHOLE_READ_MAX", 1 << 30)
    t = load_file(str(f))
    key = sorted(k for k in t if k.endswith("lora_B.weight"))[0]
    t[key][0, 0] = float("inf")
    save_file(t, str(f), metadata={"format": "pt"})
    assert load_safetensors(f).all_finite is False
    with pytest.raises(LoRAFormatError, match=f"{key}.*1 NaN/Inf"):
        read_lora(f)


def test_shapes_only_reads_of_one_header_are_paired_once_but_name_their_file(tmp_path):
    """`lol import` scans every header first; files with the same header share one pairing, each keeps its source,
    and a file whose header differs (another rank) gets its own."""
    spec = tiny_spec()
    a = save_diffusers(random_lora(spec, 3, alpha=6.0, seed=1), tmp_path / "a.safetensors", dtype=torch.float16)
    b = save_diffusers(random_lora(spec, 3, alpha=6.0, seed=2), tmp_path / "b.safetensors", dtype=torch.float16)
    c = save_diffusers(random_lora(spec, 5, alpha=6.0, seed=3), tmp_path / "c.safetensors", dtype=torch.float16)
    ha, hb, hc = (read_lora(p, shapes_only=True) for p in (a, b, c))
    assert (ha.source, hb.source, hc.source) == (str(a), str(b), str(c))
    assert ha.modules is not hb.modules and ha.names == hb.names and ha.ranks == hb.ranks
    assert set(hc.ranks) == {5} and set(ha.ranks) == {3}
    for p, h in ((a, ha), (c, hc)):
        full = read_lora(p)
        assert h.names == full.names and h.ranks == full.ranks and h.format == full.format


def test_import_packs_the_same_bytes_as_the_float32_route(tmp_path, capsys):
    """`lol import` reads each file at the storage dtype; the packed factors equal packing the float32 reads."""
    spec = tiny_spec()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):  # scale 27.3/4 is not a float16 number, so U = s·B is rounded: the route matters
        save_diffusers(random_lora(spec, 4, alpha=27.3, seed=i), src / f"f16_{i}.safetensors", dtype=torch.float16)
    save_diffusers(random_lora(spec, 4, alpha=5.0, seed=9), src / "f32_0.safetensors", dtype=torch.float32)
    assert main(["import", str(src), str(tmp_path / "c")]) == 0
    capsys.readouterr()
    files = sorted(src.glob("*.safetensors"))
    ref = write_collection(tmp_path / "ref", [read_lora(p) for p in files],
                           pd.DataFrame({"id": [p.name for p in files]}), dtype=torch.float16)
    got, want = load_file(str(tmp_path / "c" / "factors.safetensors")), load_file(str(ref.path / "factors.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    assert open_collection(tmp_path / "c").factors_hash == ref.factors_hash


@pytest.mark.parametrize("store,src_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float64, torch.float64)])
def test_packing_same_dtype_bitwise_and_converting_paths(tmp_path, store, src_dtype):
    spec = tiny_spec()
    loras = [random_lora(spec, r, seed=i, dtype=src_dtype) for i, r in enumerate((2, 3, 1))]  # 3×3: odd (N, L)
    c = write_collection(tmp_path / "c", loras, pd.DataFrame({"id": list("abc")}), dtype=store)
    for i, lo in enumerate(loras):
        back = c.lora(i, dtype=store)
        for m in lo:
            assert torch.equal(back[m.name].U, m.U.to(store)) and torch.equal(back[m.name].V, m.V.to(store))
    assert np.array_equal(c.ranks.numpy(), np.array([[2] * 3, [3] * 3, [1] * 3]))


# ------------------------------------------------------------------------ many files of one layout (lol.formats.stacked)

def _per_file_collection(path, files, store):
    """The per-file route: `read_lora` at the storage dtype, one LoRA at a time, into `write_collection`."""
    return write_collection(path, [read_lora(p, dtype=store) for p in files],
                            pd.DataFrame({"id": [p.name for p in files]}), dtype=store)


def _same_factors(a, b):
    got, want = load_file(str(a / "factors.safetensors")), load_file(str(b / "factors.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k


def _conv_lora(seed, rank=3, alpha=5.0, dtype=torch.float32):
    """A LoRA with a 3×3 conv module beside a linear one (A stored r × in × 3 × 3, B out × r × 1 × 1)."""
    from lol.lora import LoRA, LoRAModule

    g = torch.Generator().manual_seed(seed)
    s = alpha / rank
    mods = [LoRAModule("unet.conv_in", torch.randn(8, rank, generator=g) * s, torch.randn(4 * 9, rank, generator=g),
                       alpha, s, kernel_shape=(3, 3)),
            LoRAModule("unet.a.to_q", torch.randn(6, rank, generator=g) * s, torch.randn(5, rank, generator=g),
                       alpha, s)]
    return LoRA.from_modules([m.to(dtype) for m in mods], format="diffusers", metadata={"seed": str(seed)})


@pytest.mark.parametrize("src_dtype,store", [(torch.float16, torch.float16), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float16), (torch.float32, torch.float16),
                                             (torch.float32, torch.bfloat16), (torch.float64, torch.float32),
                                             (torch.float16, torch.float64)])
@pytest.mark.parametrize("alpha", [27.3, None])  # scale 27.3/4 rounds U; alpha None: scale 1
def test_import_of_many_files_of_one_layout_equals_the_per_file_route(tmp_path, capsys, src_dtype, store, alpha):
    """`lol import` reads files of one tensor table many at a time (`StackedReader`); the packed bytes equal reading
    each file with `read_lora` and packing those, for every source and storage dtype. The files' metadata differ
    (as real files' do), so their headers differ in more than their padding."""
    spec = tiny_spec()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(7):
        save_diffusers(random_lora(spec, 4, alpha=alpha, seed=i), src / f"f_{i}.safetensors", dtype=src_dtype)
    if store == torch.float64:  # not a `lol import` choice: the packing function behind it
        from lol.packing import pack, scan

        pack(scan(src)[0], tmp_path / "c", root=src, dtype=store)
    else:
        assert main(["import", str(src), str(tmp_path / "c"), "--dtype", str(store).replace("torch.", "")]) == 0
        capsys.readouterr()
    ref = _per_file_collection(tmp_path / "ref", sorted(src.glob("*.safetensors")), store)
    _same_factors(tmp_path / "c", ref.path)
    assert open_collection(tmp_path / "c").factors_hash == ref.factors_hash


def test_stacked_reader_reads_stacks_and_sends_odd_files_the_per_file_way(tmp_path, monkeypatch):
    """Files of one layout come as stacks; a NaN file, a file rewritten since the scan and a file of another layout
    come alone, as `read_lora` gives them (the NaN one as its error, naming the key); conv modules stack too."""
    from lol.formats import stacked
    from lol.formats.stacked import StackedReader

    monkeypatch.setattr(stacked, "CHUNK_FILES", 3)
    files = [save_diffusers(_conv_lora(i), tmp_path / f"f_{i}.safetensors", dtype=torch.float16) for i in range(9)]
    other = save_diffusers(_conv_lora(20, rank=2), tmp_path / "f_4.safetensors", dtype=torch.float16)  # 2nd layout
    t = load_file(str(files[6]))
    key = sorted(t)[1]
    t[key][0, 0] = float("nan")
    save_file(t, str(files[6]), metadata={"format": "pt"})
    reader = StackedReader(torch.float16)
    for p in files:
        reader.header(p)
    save_diffusers(_conv_lora(30), files[2], dtype=torch.float16)  # rewritten after the scan: same layout, new bytes
    save_diffusers(_conv_lora(31, rank=5), files[7], dtype=torch.float16)  # rewritten: another layout
    seen = _read_all(reader, files)
    assert sorted(seen) == list(range(9))
    kinds = [seen[j][0] for j in range(9)]
    assert kinds[2] == kinds[6] == kinds[7] == "alone"
    assert kinds[0] == kinds[1] == kinds[3] == kinds[4] == kinds[5] == kinds[8] == "stacked"  # 4: a plan of its own
    assert isinstance(seen[6][1], LoRAFormatError) and "NaN" in str(seen[6][1]) and key in str(seen[6][1])
    assert other == files[4] and seen[4][1].ranks == [2, 2] and seen[7][1].ranks == [5, 5]
    for j in (0, 1, 2, 3, 4, 5, 7, 8):
        want, got = read_lora(files[j], dtype=torch.float16), seen[j][1]
        assert got.names == want.names and got.source == str(files[j])
        for m in want:
            assert m.kernel_shape == got[m.name].kernel_shape and (m.alpha, m.scale) == (got[m.name].alpha,
                                                                                       got[m.name].scale)
            assert torch.equal(m.U.view(torch.int16), got[m.name].U.view(torch.int16))
            assert torch.equal(m.V.view(torch.int16), got[m.name].V.view(torch.int16))


def test_stacks_pack_into_every_layout_and_through_the_spool(tmp_path):
    """`write_collection` takes `StackedLoRAs` items: with ranks given, streamed (rank buckets or padded), and without
    them, through its scratch spool; each gives the bytes of the per-file route."""
    from lol.formats.stacked import StackedReader

    files = [save_diffusers(_conv_lora(i, rank=2 + i % 2), tmp_path / f"f_{i}.safetensors", dtype=torch.float16)
             for i in range(6)]  # two layouts (rank 2, rank 3), interleaved
    table = pd.DataFrame({"id": [p.name for p in files]})
    for layout in ("rank_buckets", "padded"):
        ref = write_collection(tmp_path / f"ref_{layout}", [read_lora(p, dtype=torch.float16) for p in files], table,
                               layout=layout, rmax=[3, 3])
        for how in ("ranks", "spool"):
            reader = StackedReader(torch.float16)
            heads = [reader.header(p) for p in files]
            items = (item for _, item in reader.read(files))
            kw = {"ranks": [h.ranks for h in heads]} if how == "ranks" else {}
            if layout == "padded" and how == "spool":
                kw = {}
            c = write_collection(tmp_path / f"{layout}_{how}", items, table, layout=layout, rmax=[3, 3], **kw)
            _same_factors(c.path, ref.path)


# ------------------------------------------------------- kohya files with per-module alpha tensors (lol.formats.stacked)

KOHYA_SD = {  # kohya name: (out, in, kernel or None), SD-1.x shapes, as sd-scripts names them
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (320, 320, None),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v": (320, 768, None),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (64, 40, None),
    "lora_unet_down_blocks_0_resnets_0_conv1": (12, 8, (3, 3)),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (48, 48, None),
}


def _kohya_alpha_file(path, i, dtype, rank=4, nan_alpha=False):
    """A kohya file as sd-scripts writes it (`save_file`, every tensor in the save dtype, a 0-dim ``.alpha`` per
    module, ``ss_*`` metadata). Alphas differ per file and per module: alpha ≠ rank, alpha = rank, a value that is no
    16-bit number's exact quotient; the conv module's alpha is the same in every file; the ff module has none
    (alpha = r)."""
    g = torch.Generator().manual_seed(100 + i)
    alphas = {"attn1_to_q": [1.0, 4.0, 27.3, 0.5, 8.0, 3.0, 16.0][i % 7], "attn2_to_v": 1.0 + 0.37 * i,
              "conv1": 2.0, "q_proj": [4.0, 0.25, 7.0][i % 3]}
    t = {}
    for name, (o, n, kernel) in KOHYA_SD.items():
        kh, kw = kernel or (1, 1)
        down = torch.randn(rank, n, kh, kw, generator=g) if kernel else torch.randn(rank, n, generator=g)
        up = torch.randn(o, rank, 1, 1, generator=g) if kernel else torch.randn(o, rank, generator=g)
        t[f"{name}.lora_down.weight"] = (down * 0.1).to(dtype)
        t[f"{name}.lora_up.weight"] = (up * 0.01).to(dtype)
        alpha = next((a for k, a in alphas.items() if name.endswith(k)), None)
        if alpha is not None:
            t[f"{name}.alpha"] = torch.tensor(float("nan") if nan_alpha and name.endswith("attn1_to_q") else alpha).to(dtype)
    save_file(t, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                                      "ss_output_name": f"lora_{i}", "ss_seed": str(1000 + i)})
    return path


def _count_routes(monkeypatch):
    """{"stacked": files read as stacks, "alone": files read by `read_lora` one at a time} during the import."""
    from lol.formats.stacked import StackedReader

    seen = {"stacked": 0, "alone": 0}
    stack, one = StackedReader._stack, StackedReader._read_one

    def counted_stack(plan, data, sources):
        seen["stacked"] += len(sources)
        return stack(plan, data, sources)

    def counted_one(self, path):
        seen["alone"] += 1
        return one(self, path)

    monkeypatch.setattr(StackedReader, "_stack", staticmethod(counted_stack))
    monkeypatch.setattr(StackedReader, "_read_one", counted_one)
    return seen


@pytest.mark.parametrize("src_dtype,store", [(torch.float16, torch.float16), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.float64)])
@pytest.mark.parametrize("chunk", [64, 3])  # 3: stacks where every file has one alpha, and stacks where they differ
def test_import_of_kohya_files_with_alpha_tensors_equals_the_per_file_route(tmp_path, capsys, monkeypatch, src_dtype,
                                                                            store, chunk):
    """kohya files with per-module ``alpha`` tensors, alpha differing per file and per module, are read as stacks
    (none by `read_lora` alone) and pack to the per-file route's bytes: factors with the files' own scales folded
    in, and the rank / alpha / scale columns."""
    from lol.formats import stacked

    monkeypatch.setattr(stacked, "CHUNK_FILES", chunk)
    src = tmp_path / "src"
    src.mkdir()
    files = [_kohya_alpha_file(src / f"k_{i:02d}.safetensors", i, src_dtype) for i in range(8)]
    routes = _count_routes(monkeypatch)
    threads = torch.get_num_threads()
    if store == torch.float64:  # not a `lol import` choice: the packing function behind it
        from lol.packing import pack, scan

        pack(scan(src)[0], tmp_path / "c", root=src, dtype=store)
    else:
        assert main(["import", str(src), str(tmp_path / "c"), "--dtype", str(store).replace("torch.", "")]) == 0
        capsys.readouterr()
    assert routes == {"stacked": len(files), "alone": 0}
    assert torch.get_num_threads() == threads  # packing runs on one torch thread and gives the count back
    ref = _per_file_collection(tmp_path / "ref", files, store)
    _same_factors(tmp_path / "c", ref.path)  # every tensor of factors.safetensors: factors, rank, alpha, scale
    got = open_collection(tmp_path / "c")
    assert got.factors_hash == ref.factors_hash
    for col in ("ranks", "alpha", "scale"):
        assert torch.equal(getattr(got, col), getattr(ref, col)), col
    # the case is the one asked for: alphas differ across files and modules, alpha ≠ rank, and some scale ≠ 1
    q = ref.spec.names.index("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    ff = ref.spec.names.index("unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj")
    assert len(set(ref.alpha[:, q].tolist())) == 7 and (ref.alpha != ref.ranks.float()).any()
    assert set(ref.alpha[:, ff].tolist()) == {4.0} and set(ref.scale[:, ff].tolist()) == {1.0}
    assert len(set(ref.scale[:, q].tolist())) == 7 and len({tuple(r) for r in ref.alpha.tolist()}) == len(files)


def test_stacked_kohya_loras_and_bad_alpha_files(tmp_path, monkeypatch):
    """Each LoRA of a kohya stack is `read_lora`'s (alpha, scale, U, V); a file whose alpha is NaN comes alone, with
    the per-file error naming the key; a file whose alpha is no scalar has no plan and gets the per-file error."""
    from lol.formats import stacked
    from lol.formats.stacked import StackedReader

    monkeypatch.setattr(stacked, "CHUNK_FILES", 4)
    files = [_kohya_alpha_file(tmp_path / f"k_{i}.safetensors", i, torch.float16) for i in range(7)]
    _kohya_alpha_file(files[5], 5, torch.float16, nan_alpha=True)
    t = load_file(str(files[1]))
    key = next(k for k in sorted(t) if k.endswith(".alpha"))
    t[key] = torch.tensor([2.0, 3.0], dtype=torch.float16)  # another table: no plan; the reader refuses it
    save_file(t, str(files[1]))
    reader = StackedReader(torch.float16)
    for p in files:
        reader.header(p)
    seen = _read_all(reader, files)
    assert [seen[j][0] for j in range(7)] == ["stacked", "alone", "stacked", "stacked", "stacked", "alone", "stacked"]
    for j, what in ((1, f"{key}': alpha must be a scalar, got shape (2,)"), (5, "attn1_to_q.alpha': alpha is nan")):
        with pytest.raises(LoRAFormatError) as e:
            read_lora(files[j], dtype=torch.float16)
        assert isinstance(seen[j][1], LoRAFormatError) and str(seen[j][1]) == str(e.value) and what in str(e.value)
    for j in (0, 2, 3, 4, 6):
        want, got = read_lora(files[j], dtype=torch.float16), seen[j][1]
        assert got.names == want.names and got.source == str(files[j]) and got.format == "kohya"
        for m in want:
            g_ = got[m.name]
            assert (m.rank, m.alpha, m.scale, m.kernel_shape) == (g_.rank, g_.alpha, g_.scale, g_.kernel_shape)
            assert torch.equal(m.U.view(torch.int16), g_.U.view(torch.int16))
            assert torch.equal(m.V.view(torch.int16), g_.V.view(torch.int16))
