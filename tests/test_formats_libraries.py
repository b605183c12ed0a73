"""Readers against files written by the real libraries, and our writers against the real loaders.

The reference ΔW is always what the library itself applies: the merged/fused weight minus the base weight of a tiny
real model (UNet2DConditionModel, CLIPTextModel, GPT-2) built from a config.
"""

import pytest
import torch

from fixtures.tiny_sd import applied_deltas, fused_deltas, tiny_pipeline, tiny_unet, weights
from lol import read_lora, save_diffusers, save_peft
from lol.lora import LoRA, LoRAModule

pytest.importorskip("peft")
pytest.importorskip("diffusers")


def _flat(name):
    """transformers >= 5 flattened CLIPTextModel: `text_model.encoder...` is now `encoder...`."""
    return name.replace("text_model.", "")


def _assert_matches(lora, deltas, transpose=False, prefix=""):
    """Every module's U Vᵀ equals the library's weight change, and every changed weight is one of our modules."""
    deltas = {_flat(k): v for k, v in deltas.items()}
    assert sorted(_flat(prefix + m.name) for m in lora) == sorted(deltas), (sorted(m.name for m in lora)[:3],
                                                                           sorted(deltas)[:3])
    for m in lora:
        ref = deltas[_flat(prefix + m.name)]
        ref = ref.T if transpose else ref.reshape(ref.shape[0], -1)
        ours = m.delta().double()
        assert ours.shape == ref.shape, m.name
        err = float((ours - ref).abs().max())
        assert err <= 1e-5 * float(ref.abs().max()) + 1e-7, (m.name, err)
        assert float(ref.abs().max()) > 1e-3  # a real change was compared


def _unet_peft_config(**kw):
    from peft import LoraConfig

    args = dict(r=4, lora_alpha=27, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False,
                rank_pattern={"attn2.to_v": 2}, alpha_pattern={"attn1.to_q": 3, "down_blocks.0.resnets.0.conv1": 5})
    args.update(kw)
    return LoraConfig(**args)


def test_peft_save_pretrained_unet_with_patterns_and_conv(tmp_path):
    from peft import get_peft_model

    base = weights(tiny_unet())
    model = get_peft_model(tiny_unet(), _unet_peft_config())
    model.save_pretrained(tmp_path / "a")
    lora = read_lora(tmp_path / "a")
    assert lora.format == "peft" and lora.config["r"] == 4
    by = {m.name: m for m in lora}
    assert by["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"].rank == 2
    assert by["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].scale == 3 / 4
    assert by["down_blocks.0.resnets.0.conv1"].kernel_shape == (3, 3)
    merged = weights(model.merge_and_unload())
    _assert_matches(lora, applied_deltas(base, merged))

    # our writer: PeftModel.from_pretrained applies the same ΔW
    from peft import PeftModel

    save_peft(lora, tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(tiny_unet(), tmp_path / "ours")
    _assert_matches(lora, applied_deltas(base, weights(reloaded.merge_and_unload())))


def test_peft_gpt2_fan_in_fan_out_rslora_and_legacy_bin(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).eval()

    base = weights(gpt2())
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, use_rslora=True,
                     init_lora_weights=False)
    model = get_peft_model(gpt2(), cfg)
    model.save_pretrained(tmp_path / "st")
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    lora = read_lora(tmp_path / "st")
    assert all(m.scale == 8 / 2 for m in lora)  # alpha / sqrt(r)
    # Conv1D stores its weight as (in, out): peft adds (s B A)ᵀ to it
    _assert_matches(lora, applied_deltas(base, weights(model.merge_and_unload())), transpose=True)
    legacy = read_lora(tmp_path / "bin")
    for m in lora:
        assert torch.equal(legacy[m.name].U, m.U) and torch.equal(legacy[m.name].V, m.V)


def test_diffusers_save_lora_weights_with_metadata(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    unet.add_adapter(_unet_peft_config())
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    lora = read_lora(tmp_path)
    assert lora.format == "diffusers" and "lora_adapter_metadata" in lora.metadata
    assert {m.scale for m in lora} == {27 / 4, 27 / 2, 3 / 4, 5 / 4}
    _assert_matches(lora, fused_deltas(tiny_pipeline(), tmp_path / "pytorch_lora_weights.safetensors"))


def _mods(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, (o, i, r, alpha, kernel) in shapes.items():
        s = alpha / r
        fan_in = i * (kernel[0] * kernel[1] if kernel else 1)
        out.append(LoRAModule(name, s * torch.randn(o, r, generator=g) * 0.3, torch.randn(fan_in, r, generator=g) * 0.3,
                              alpha, s, kernel_shape=kernel))
    return out


SHAPES = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8, 4, 27.0, None),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": (8, 32, 2, 3.0, None),
    "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q": (8, 8, 3, 27.0, None),
    "unet.down_blocks.0.resnets.0.conv1": (8, 8, 2, 1.0, (3, 3)),
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (32, 32, 4, 8.0, None),
    # diffusers' kohya text-encoder conversion only recognises a state dict that includes an out_proj
    "text_encoder.text_model.encoder.layers.1.self_attn.out_proj": (32, 32, 2, 2.0, None),
}


def test_save_diffusers_loads_in_pipeline_with_identical_effect(tmp_path):
    lora = LoRA.from_modules(_mods(SHAPES))
    f = save_diffusers(lora, tmp_path / "ours.safetensors")
    _assert_matches(lora, fused_deltas(tiny_pipeline(), f))
    _assert_matches(read_lora(f), fused_deltas(tiny_pipeline(), f))


def test_kohya_file_matches_what_diffusers_applies(tmp_path):
    from safetensors.torch import save_file

    from lol.formats.peft import factor_tensors

    # one alpha for every module, as sd-scripts writes by default: diffusers 0.42 does not apply per-module kohya
    # alphas that differ (its alpha_pattern keys keep a `.lora.down.weight` suffix and match no module), so a mixed
    # file has no library reference; lol's kohya rule for mixed and missing alphas is tested in test_formats.py
    mods = [LoRAModule(m.name, m.U / m.scale * (8.0 / m.rank), m.V, 8.0, 8.0 / m.rank, m.kernel_shape)
            for m in _mods(SHAPES, seed=1)]
    tensors = {}
    kohya_names = {  # written by hand, per the format, not by our converter
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v":
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v",
        "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q":
            "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q",
        "unet.down_blocks.0.resnets.0.conv1": "lora_unet_down_blocks_0_resnets_0_conv1",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "text_encoder.text_model.encoder.layers.1.self_attn.out_proj":
            "lora_te_text_model_encoder_layers_1_self_attn_out_proj",
    }
    for m in mods:
        A, B = factor_tensors(m, torch.float16)
        k = kohya_names[m.name]
        tensors[f"{k}.lora_down.weight"], tensors[f"{k}.lora_up.weight"] = A, B
        tensors[f"{k}.alpha"] = torch.tensor(m.alpha, dtype=torch.float16)
    f = tmp_path / "kohya.safetensors"
    save_file(tensors, str(f), metadata={"ss_network_alpha": "mixed"})
    lora = read_lora(f)
    assert lora.format == "kohya" and sorted(lora.names) == sorted(SHAPES)
    _assert_matches(lora, fused_deltas(tiny_pipeline(), f))


def test_legacy_diffusers_keys_match_what_diffusers_applies(tmp_path):
    from safetensors.torch import save_file

    from lol.formats.peft import factor_tensors

    mods = [m for m in _mods(SHAPES, seed=2) if m.name.startswith("unet.") and m.kernel_shape is None]
    mods = [LoRAModule(m.name, m.U / m.scale, m.V, float(m.rank), 1.0) for m in mods]  # legacy files bake alpha in
    tensors = {}
    for m in mods:
        A, B = factor_tensors(m)
        tensors[f"{m.name}.lora.down.weight"], tensors[f"{m.name}.lora.up.weight"] = A, B
    f = tmp_path / "legacy.safetensors"
    save_file(tensors, str(f))
    _assert_matches(read_lora(f), fused_deltas(tiny_pipeline(), f))


def test_peft_and_diffusers_files_of_one_unet_adapter_batch_identically(tmp_path):
    """One adapter, written by peft (names without ``unet.``) and by diffusers' training-script path (``unet.``
    names): both files match one spec, in either naming, and give the same batch (`ModuleSpec.match`)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    from lol.batch import LoRABatch

    unet = tiny_unet()
    torch.manual_seed(1)
    unet.add_adapter(_unet_peft_config())
    sd = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "diffusers",
                                              unet_lora_layers=convert_state_dict_to_diffusers(sd),
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    model = get_peft_model(tiny_unet(), _unet_peft_config())
    loaded = set_peft_model_state_dict(model, {f"base_model.model.{k}": v for k, v in sd.items()})
    assert not loaded.unexpected_keys
    model.save_pretrained(tmp_path / "peft")

    p, d = read_lora(tmp_path / "peft"), read_lora(tmp_path / "diffusers")
    assert (p.format, d.format) == ("peft", "diffusers")
    assert not set(p.spec.keys) & set(d.spec.keys)  # no name agrees exactly: only the prefix rule can match them
    assert sorted("unet." + n for n in p.names) == sorted(d.names)
    for spec in (p.spec, d.spec):
        batch = LoRABatch.from_loras([p, d], spec, dtype=torch.float64)
        assert batch.spec == spec and batch.ranks[0].tolist() == batch.ranks[1].tolist()
        assert sorted(set(batch.ranks[0].tolist())) == [2, 4]
        for t in batch.U + batch.V:
            assert torch.equal(t[0], t[1]) and float(t[0].abs().max()) > 0
    # the diffusers file's scales come from its adapter metadata, the peft folder's from adapter_config.json
    assert [m.scale for m in p.spec.match(d)] == [m.scale for m in p]
