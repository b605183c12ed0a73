"""Readers and writers on files assembled per each format's key layout (no diffusers/peft needed here).

Every check compares ΔW = U Vᵀ from `read_lora` with ``scale · B A`` computed directly from the tensors written,
so a wrong pairing, a lost alpha or a transposed factor fails.
"""
import json
import math
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lol import LoRA, LoRAFormatError, LoRAModule, detect_format, read_lora, save_diffusers, save_peft
from lol.formats import kohya_to_module, module_to_kohya
from lol.formats.pairs import peft_pattern_value


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _delta(A, B, s):
    return s * (B.double().reshape(B.shape[0], -1) @ A.double().reshape(A.shape[0], -1))


def _close(a, b, tol=1e-6):
    a, b = a.double(), b.double()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# ---------------------------------------------------------------------------------------------------------- kohya

KOHYA_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
KOHYA_FF = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj"
KOHYA_CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
KOHYA_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _kohya_file(path, with_alpha=True):
    t = {
        f"{KOHYA_Q}.lora_down.weight": _rand(4, 8, seed=1, dtype=torch.float16),
        f"{KOHYA_Q}.lora_up.weight": _rand(8, 4, seed=2, dtype=torch.float16),
        f"{KOHYA_FF}.lora_down.weight": _rand(2, 8, seed=3),
        f"{KOHYA_FF}.lora_up.weight": _rand(32, 2, seed=4),
        f"{KOHYA_CONV}.lora_down.weight": _rand(3, 4, 3, 3, seed=5),
        f"{KOHYA_CONV}.lora_up.weight": _rand(8, 3, 1, 1, seed=6),
        f"{KOHYA_TE}.lora_down.weight": _rand(4, 16, seed=7),
        f"{KOHYA_TE}.lora_up.weight": _rand(16, 4, seed=8),
    }
    if with_alpha:
        t[f"{KOHYA_Q}.alpha"] = torch.tensor(27.0, dtype=torch.float16)
        t[f"{KOHYA_CONV}.alpha"] = torch.tensor(1.0)
        t[f"{KOHYA_TE}.alpha"] = torch.tensor(8.0)
    save_file(t, str(path), metadata={"ss_network_dim": "4", "modelspec.title": "test"})
    return t


def test_kohya_names_scales_conv_and_metadata(tmp_path):
    f = tmp_path / "k.safetensors"
    t = _kohya_file(f)
    assert detect_format(f) == "kohya"
    lora = read_lora(f)
    assert lora.format == "kohya" and lora.metadata["ss_network_dim"] == "4"
    assert set(lora.names) == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "unet.down_blocks.0.resnets.0.conv1",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
    }
    q = lora["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert (q.rank, q.alpha, q.scale) == (4, 27.0, 27.0 / 4)
    assert _close(q.delta(), _delta(t[f"{KOHYA_Q}.lora_down.weight"], t[f"{KOHYA_Q}.lora_up.weight"], 27 / 4))
    ff = lora["unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"]
    assert (ff.alpha, ff.scale) == (2.0, 1.0)  # missing alpha means alpha = rank
    conv = lora["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.kernel_shape == (3, 3) and (conv.out_features, conv.in_features, conv.rank) == (8, 36, 3)
    assert _close(conv.delta(), _delta(t[f"{KOHYA_CONV}.lora_down.weight"], t[f"{KOHYA_CONV}.lora_up.weight"], 1 / 3))
    te = lora["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    assert te.scale == 2.0


def test_kohya_name_rule_round_trips():
    for name in ["unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0",
                 "unet.up_blocks.3.resnets.2.conv_shortcut", "unet.mid_block.resnets.0.time_emb_proj",
                 "text_encoder.text_model.encoder.layers.11.mlp.fc2",
                 "text_encoder_2.text_model.encoder.layers.3.self_attn.out_proj"]:
        assert kohya_to_module(module_to_kohya(name)) == name
    assert kohya_to_module("lora_te1_text_model_encoder_layers_0_self_attn_k_proj") == \
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"


# ---------------------------------------------------------------------------------------------------------- diffusers

def test_diffusers_legacy_alpha_and_processor_layouts(tmp_path):
    A1, B1 = _rand(4, 8, seed=1), _rand(8, 4, seed=2)
    A2, B2 = _rand(2, 32, seed=3), _rand(8, 2, seed=4)
    A3, B3 = _rand(2, 8, seed=5), _rand(8, 2, seed=6)
    f = tmp_path / "legacy.safetensors"
    save_file({"unet.down_blocks.0.attn1.to_q.lora.down.weight": A1, "unet.down_blocks.0.attn1.to_q.lora.up.weight": B1,
               "unet.down_blocks.0.attn1.to_q.alpha": torch.tensor(8.0),
               "unet.down_blocks.0.attn2.to_v.lora_A.weight": A2, "unet.down_blocks.0.attn2.to_v.lora_B.weight": B2,
               "down_blocks.1.attn1.processor.to_out_lora.down.weight": A3,
               "down_blocks.1.attn1.processor.to_out_lora.up.weight": B3}, str(f))
    assert detect_format(f) == "diffusers"
    lora = read_lora(f)
    assert _close(lora["unet.down_blocks.0.attn1.to_q"].delta(), _delta(A1, B1, 2.0))
    assert lora["unet.down_blocks.0.attn1.to_q"].alpha == 8.0
    assert _close(lora["unet.down_blocks.0.attn2.to_v"].delta(), _delta(A2, B2, 1.0))
    assert _close(lora["unet.down_blocks.1.attn1.to_out.0"].delta(), _delta(A3, B3, 1.0))


def _lora(seed=0, dtype=torch.float32, conv=True):
    g = torch.Generator().manual_seed(seed)
    mods = []
    for name, (o, i, r, alpha) in {"unet.a.to_q": (8, 8, 4, 27.0), "unet.a.to_v": (8, 6, 2, 3.0),
                                   "unet.b.proj": (12, 10, 4, 27.0)}.items():
        s = alpha / r
        mods.append(LoRAModule(name, (s * torch.randn(o, r, generator=g, dtype=torch.float64)).to(dtype),
                               torch.randn(i, r, generator=g, dtype=torch.float64).to(dtype), alpha, s))
    if conv:
        s = 2.0 / 3
        mods.append(LoRAModule("unet.c.conv1", (s * torch.randn(5, 3, generator=g, dtype=torch.float64)).to(dtype),
                               torch.randn(4 * 9, 3, generator=g, dtype=torch.float64).to(dtype), 2.0, s,
                               kernel_shape=(3, 3)))
    return LoRA.from_modules(mods, format="synthetic", metadata={"note": "x"})


@pytest.mark.parametrize("writer", ["peft", "diffusers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_write_read_round_trip_is_exact(tmp_path, writer, dtype):
    lora = _lora(dtype=dtype)
    out = save_peft(lora, tmp_path / "p") if writer == "peft" else save_diffusers(lora, tmp_path / "d.safetensors")
    back = read_lora(out)
    assert back.format == writer and back.metadata.get("note") == "x"
    tol = 1e-15 if dtype == torch.float64 else 1e-6
    for m in lora:
        b = back[m.name]
        assert (b.rank, b.alpha, b.scale, b.kernel_shape) == (m.rank, m.alpha, m.scale, m.kernel_shape)
        assert b.U.dtype == dtype
        assert _close(b.delta(), m.delta(), tol)


def test_writers_preserve_rslora_scale(tmp_path):
    lora = _lora(conv=False).map(lambda m: LoRAModule(m.name, m.U, m.V, m.alpha, m.alpha / math.sqrt(m.rank)))
    cfg = json.loads((save_peft(lora, tmp_path / "p") / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True
    for out in (tmp_path / "p", save_diffusers(lora, tmp_path / "d.safetensors")):
        back = read_lora(out)
        for m in lora:
            assert math.isclose(back[m.name].scale, m.scale, rel_tol=1e-12)
            assert _close(back[m.name].delta(), m.delta())


# ---------------------------------------------------------------------------------------------------------- PEFT

def _peft_folder(path, cfg, tensors):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_peft_rank_alpha_patterns_and_rslora(tmp_path):
    t = {}
    for name, r in (("model.layers.0.q_proj", 4), ("model.layers.0.v_proj", 2), ("model.layers.1.q_proj", 4)):
        t[f"base_model.model.{name}.lora_A.weight"] = _rand(r, 6, seed=r)
        t[f"base_model.model.{name}.lora_B.weight"] = _rand(6, r, seed=r + 10)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2},
           "alpha_pattern": {"layers.1.q_proj": 16}}
    lora = read_lora(_peft_folder(tmp_path / "a", cfg, t))
    assert lora.config["alpha_pattern"] == {"layers.1.q_proj": 16}
    scales = {m.name: (m.rank, m.alpha, m.scale) for m in lora}
    assert scales == {"model.layers.0.q_proj": (4, 8.0, 2.0), "model.layers.0.v_proj": (2, 8.0, 4.0),
                      "model.layers.1.q_proj": (4, 16.0, 4.0)}
    A, B = t["base_model.model.model.layers.0.v_proj.lora_A.weight"], t["base_model.model.model.layers.0.v_proj.lora_B.weight"]
    assert _close(lora["model.layers.0.v_proj"].delta(), _delta(A, B, 4.0))
    rs = read_lora(_peft_folder(tmp_path / "b", {**cfg, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {},
                                                "use_rslora": True}, t))
    assert math.isclose(rs["model.layers.0.v_proj"].scale, 8 / math.sqrt(2))


def test_peft_pattern_rule_matches_peft():
    pats = {"q_proj": 1, "layers.1.v_proj": 2}
    assert peft_pattern_value(pats, "model.layers.0.q_proj", 0) == 1
    assert peft_pattern_value(pats, "model.layers.1.v_proj", 0) == 2
    assert peft_pattern_value(pats, "model.layers.0.v_proj", 0) == 0
    assert peft_pattern_value(pats, "model.layers.0.xq_proj", 0) == 0  # must match a whole name component


def test_peft_legacy_bin_is_read_with_weights_only(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    A, B = _rand(2, 5), _rand(7, 2, seed=1)
    torch.save({"base_model.model.fc.lora_A.weight": A, "base_model.model.fc.lora_B.weight": B}, d / "adapter_model.bin")
    assert _close(read_lora(d)["fc"].delta(), _delta(A, B, 2.0))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, d / "adapter_model.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(LoRAFormatError, match="weights_only"):
        read_lora(d)


# ---------------------------------------------------------------------------------------------------------- errors

def _err(path, *fragments):
    with pytest.raises(LoRAFormatError) as e:
        read_lora(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_errors_missing_empty_and_corrupt_files(tmp_path):
    _err(tmp_path / "nope.safetensors", "no such file")
    (tmp_path / "empty").mkdir()
    _err(tmp_path / "empty", "empty folder")
    good = tmp_path / "good.safetensors"
    _kohya_file(good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 100])
    _err(trunc, "truncated")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    _err(huge, "header length 1000000000000 exceeds the file size")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 10)
    _err(junk, "corrupt safetensors header")
    (tmp_path / "x.ckpt").write_bytes(b"1")
    _err(tmp_path / "x.ckpt", "pickled")


def test_errors_bad_tensors(tmp_path):
    q = "unet.a.to_q"

    def write(name, t):
        p = tmp_path / name
        save_file(t, str(p))
        return p

    _err(write("int.safetensors", {f"{q}.lora_A.weight": torch.ones(2, 3, dtype=torch.int32),
                                   f"{q}.lora_B.weight": torch.ones(4, 2)}), "int32", f"{q}.lora_A.weight")
    A = _rand(2, 3)
    A[1, 1] = float("nan")
    _err(write("nan.safetensors", {f"{q}.lora_A.weight": A, f"{q}.lora_B.weight": _rand(4, 2)}),
         "NaN/Inf", f"{q}.lora_A.weight")
    for dt in (torch.float16, torch.bfloat16):  # 16-bit files take a bit-level fast path
        A16 = _rand(2, 3, dtype=dt)
        A16[0, 2] = float("-inf")
        _err(write(f"inf_{str(dt)[6:]}.safetensors", {f"{q}.lora_A.weight": A16, f"{q}.lora_B.weight": _rand(4, 2, dtype=dt)}),
             "1 NaN/Inf", f"{q}.lora_A.weight")
        big = _rand(2, 3, dtype=dt) * 1000  # large finite values are not flagged
        read_lora(write(f"big_{str(dt)[6:]}.safetensors", {f"{q}.lora_A.weight": big, f"{q}.lora_B.weight": _rand(4, 2, dtype=dt)}))
    B = _rand(4, 2)
    B[0, 0] = float("inf")
    _err(write("inf.safetensors", {f"{q}.lora_A.weight": _rand(2, 3), f"{q}.lora_B.weight": B}),
         "NaN/Inf", f"{q}.lora_B.weight")
    _err(write("shape.safetensors", {f"{q}.lora_A.weight": _rand(2, 3), f"{q}.lora_B.weight": _rand(4, 3)}),
         "rank mismatch", f"{q}.lora_A.weight")
    _err(write("lonely.safetensors", {f"{q}.lora_A.weight": _rand(2, 3)}), "no B (up) factor", f"{q}.lora_A.weight")
    _err(write("unknown.safetensors", {f"{q}.lora_A.weight": _rand(2, 3), f"{q}.lora_B.weight": _rand(4, 2),
                                       "unet.a.to_q.weird": _rand(2), "unet.mystery": _rand(1)}),
         "not understood", "unet.a.to_q.weird")
    _err(write("loha.safetensors", {"lora_unet_a_to_q.hada_w1_a": _rand(2, 3), "lora_unet_a_to_q.hada_w1_b": _rand(3, 2)}),
         "LoHa", "not a plain low-rank")
    _err(write("lokr.safetensors", {"lora_unet_a_to_q.lokr_w1": _rand(2, 3)}), "LoKr")
    _err(write("dora.safetensors", {f"{q}.lora_A.weight": _rand(2, 3), f"{q}.lora_B.weight": _rand(4, 2),
                                    f"{q}.lora_magnitude_vector": _rand(4)}), "DoRA")
    _err(write("other.safetensors", {"model.weight": _rand(3, 3)}), "not understood", "model.weight")


def test_errors_peft_config(tmp_path):
    t = {"base_model.model.fc.lora_A.weight": _rand(2, 5), "base_model.model.fc.lora_B.weight": _rand(7, 2)}
    _err(_peft_folder(tmp_path / "dora", {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "use_dora": True}, t), "DoRA")
    _err(_peft_folder(tmp_path / "rank", {"peft_type": "LORA", "r": 4, "lora_alpha": 2}, t), "'fc'", "rank 2", "r=4")
    lone = tmp_path / "lone"
    lone.mkdir()
    save_file(t, str(lone / "adapter_model.safetensors"))
    _err(lone / "adapter_model.safetensors", "without their adapter_config.json")


def test_light_imports():
    code = ("import sys, lol, lol.formats, lol.collection, lol.synth, lol.cli.files; "
            "heavy = [m for m in ('diffusers', 'peft', 'transformers', 'streamlit', 'umap') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
