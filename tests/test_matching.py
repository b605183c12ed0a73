"""Module-name matching (`lol.lora.match_names`, `ModuleSpec.match` / `align`): exact key first, then the key without
a pipeline component prefix on both sides; one to one or a `SpecMismatchError` that names the modules."""
import pytest
import torch

from lol import LoRA, LoRAModule, ModuleSpec, SpecMismatchError
from lol.batch import LoRABatch
from lol.collection import write_collection
from lol.lora import match_names, split_component


def _lora(names, shape=(6, 5), r=2, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return LoRA.from_modules([LoRAModule(n, torch.randn(shape[0], r, generator=g, dtype=torch.float64),
                                         torch.randn(shape[1], r, generator=g, dtype=torch.float64), 1.0, 1.0)
                              for n in names], **kw)


UNET = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
BARE = [n.removeprefix("unet.") for n in UNET]


def test_split_component_uses_the_dotted_name():
    assert split_component("unet.down_blocks.0.attn1.to_q") == ("unet", "down_blocks_0_attn1_to_q")
    assert split_component("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj")[0] == "text_encoder_2"
    assert split_component("base_model.model.down_blocks.0.to_q") == (None, "down_blocks_0_to_q")
    # a Flux/DiT module whose first segment merely starts with "transformer" keeps it
    assert split_component("transformer_blocks.0.attn.to_q") == (None, "transformer_blocks_0_attn_to_q")
    # T5's own encoder./decoder. are not pipeline components: never removed
    assert split_component("decoder.block.0.layer.0.SelfAttention.q")[0] is None


def test_prefixed_and_bare_names_match_in_spec_order_both_ways():
    spec_prefixed = _lora(UNET).spec
    bare = _lora(BARE[::-1], seed=1)  # other order, no component
    got = spec_prefixed.match(bare)
    assert [m.name for m in got] == BARE  # spec order, by name
    back = _lora(UNET[::-1], seed=2)
    assert [m.name for m in bare.spec.match(back)] == UNET[::-1]
    b1 = LoRABatch.from_loras([bare, _lora(UNET, seed=3)], spec_prefixed, dtype=torch.float64)
    for ell, name in enumerate(BARE):
        assert torch.equal(b1.U[ell][0], bare[name].U) and torch.equal(b1.V[ell][0], bare[name].V)
    # PEFT's wrapper prefix and a kohya-style key (underscores) match too
    wrapped = _lora(["base_model.model." + n for n in BARE])
    assert len(spec_prefixed.match(wrapped)) == 3
    assert spec_prefixed.align(wrapped.spec) == [0, 1, 2]


def test_exact_match_wins_and_a_mixed_file_matches_per_module():
    spec = _lora(UNET + ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]).spec
    mixed = _lora(BARE[:2] + UNET[2:] + ["text_model.encoder.layers.0.self_attn.q_proj"])
    assert [m.name for m in spec.match(mixed)] == mixed.names


def test_sdxl_text_encoders_with_equal_inner_names_are_refused_not_guessed():
    inner = "text_model.encoder.layers.0.self_attn.q_proj"
    sdxl = _lora([f"text_encoder.{inner}", f"text_encoder_2.{inner}"], source="sdxl.safetensors")
    bare_spec = _lora([inner]).spec
    with pytest.raises(SpecMismatchError) as e:
        bare_spec.match(sdxl)
    msg = str(e.value)
    assert "sdxl.safetensors" in msg and "ambiguous" in msg
    assert f"text_encoder.{inner}" in msg and f"text_encoder_2.{inner}" in msg
    assert "unexpected" not in msg  # the two candidates are reported as the ambiguity, not as extras
    # the other way round: a bare LoRA module against a spec with both encoders
    with pytest.raises(SpecMismatchError, match="ambiguous.*could be any of"):
        sdxl.spec.match(_lora([inner, "unet.x"]))
    # with the components on both sides everything matches exactly
    assert [m.name for m in sdxl.spec.match(sdxl)] == sdxl.names
    with pytest.raises(SpecMismatchError, match="ambiguous"):
        LoRABatch.from_loras([sdxl], bare_spec)


def test_keys_that_collide_within_one_side_are_ambiguous():
    # "a.to_q" and "a_to_q" have the same key: which one is meant is unknowable
    lora = _lora(["a.to_q", "a_to_q"])
    with pytest.raises(SpecMismatchError, match=r"ambiguous.*'a.to_q' could be any of 'a.to_q', 'a_to_q'"):
        ModuleSpec(("a.to_q",), ((6, 5),)).match(lora)


def test_different_components_never_match_and_shapes_still_checked():
    spec = _lora(["unet.blocks.0.to_q"]).spec
    with pytest.raises(SpecMismatchError, match=r"missing \(e.g. unet.blocks.0.to_q\); 1 unexpected module\(s\) "
                                                r"\(e.g. transformer.blocks.0.to_q\)"):
        spec.match(_lora(["transformer.blocks.0.to_q"]))
    with pytest.raises(SpecMismatchError, match="blocks.0.to_q is 7×5, expected 6×5"):
        spec.match(_lora(["blocks.0.to_q"], shape=(7, 5)))
    with pytest.raises(SpecMismatchError, match="unexpected.*blocks.1.to_q"):
        spec.match(_lora(["blocks.0.to_q", "blocks.1.to_q"]))
    with pytest.raises(SpecMismatchError, match="does not match this spec.*missing"):
        _lora(["unet.a", "unet.b"]).spec.align(_lora(["a"]).spec)


def test_match_names_reports_index_missing_extra():
    m = match_names(["unet.a", "unet.b", "c"], ["b", "unet.c", "d"])
    assert m.index == (None, 0, 1) and m.missing == ["unet.a"] and m.extra == ["d"] and not m.ok
    assert match_names(["x.y"], ["x_y"]).ok  # the key treats . and _ alike (kohya vs diffusers)


def test_collection_packs_a_bare_lora_against_a_prefixed_spec(tmp_path):
    import pandas as pd

    a, b = _lora(UNET, seed=4), _lora(BARE[::-1], seed=5)
    c = write_collection(tmp_path / "c", [a, b], pd.DataFrame({"id": ["a", "b"]}), dtype=torch.float64)
    assert c.spec.names == tuple(UNET)
    for name in BARE:
        assert torch.equal(c.lora(1, dtype=torch.float64)["unet." + name].delta(), b[name].delta())
