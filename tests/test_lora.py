import math

import pytest
import torch

from lol import LoRA, LoRAModule, ModuleSpec, SpecMismatchError, lora_scale, module_key
from lol.batch import LoRABatch


def _module(name, out_f=6, in_f=5, r=2, alpha=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, in_f, generator=g, dtype=torch.float64)
    B = torch.randn(out_f, r, generator=g, dtype=torch.float64)
    s = lora_scale(alpha, r)
    return LoRAModule(name, U=s * B, V=A.T, alpha=alpha, scale=s), A, B, s


def test_scale_rules():
    assert lora_scale(27, 4) == 27 / 4
    assert lora_scale(16, 4, rslora=True) == 16 / math.sqrt(4)
    with pytest.raises(ValueError):
        lora_scale(1, 0)


def test_delta_is_scale_times_BA_and_norm_matches_dense():
    m, A, B, s = _module("unet.attn1.to_q", alpha=27.0, r=4)
    assert torch.allclose(m.delta(), s * B @ A)
    assert torch.allclose(m.B, B) and torch.allclose(m.A, A)
    assert math.isclose(m.delta_norm(), float(torch.linalg.norm(m.delta())), rel_tol=1e-10)


def test_module_key_matches_kohya_and_diffusers_names():
    assert module_key("lora_unet_down_blocks_0_attn1_to_q"[len("lora_"):]) == module_key(
        "unet.down_blocks.0.attn1.to_q")


def test_rank_mismatch_is_an_error():
    with pytest.raises(ValueError, match="rank"):
        LoRAModule("x", torch.zeros(3, 2), torch.zeros(4, 3), alpha=1, scale=1)


def test_spec_check_names_missing_and_wrong_shapes():
    a, *_ = _module("a.to_q")
    b, *_ = _module("b.to_v", out_f=7)
    lora = LoRA.from_modules([a, b], source="x.safetensors")
    spec = ModuleSpec(("a.to_q", "c.to_v"), ((6, 5), (6, 5)))
    with pytest.raises(SpecMismatchError, match=r"x.safetensors.*missing.*c.to_v.*unexpected.*b.to_v"):
        spec.check(lora)
    spec2 = ModuleSpec(("a.to_q", "b.to_v"), ((6, 5), (6, 5)))
    with pytest.raises(SpecMismatchError, match="b.to_v is 7×5, expected 6×5"):
        spec2.check(lora)


def test_batch_pads_mixed_ranks_and_round_trips():
    l1 = LoRA.from_modules([_module("a", r=2)[0], _module("b", r=4, seed=1)[0]])
    l2 = LoRA.from_modules([_module("b", r=1, seed=2)[0], _module("a", r=3, seed=3)[0]])  # other order
    batch = LoRABatch.from_loras([l1, l2], dtype=torch.float64)
    assert batch.ranks.tolist() == [[2, 4], [3, 1]]
    assert batch.U[0].shape == (2, 6, 3) and batch.uniform_rank is None
    back = batch.lora(1)
    for name in ("a", "b"):
        assert torch.allclose(back[name].delta(), l2[name].delta())
