"""Synthetic LoRAs: real module specs, GL-invariant labels (checked with random non-orthogonal R), spread, determinism."""
import math

import pytest
import torch

from lol import LoRAModule
from lol.synth import (lora_labels, random_lora, sd15_unet_qv_spec, singular_values, spec_by_name, synth_collection,
                       tiny_spec)


def test_sd15_spec_matches_the_paper():
    spec = sd15_unet_qv_spec()
    assert len(spec) == 64
    assert spec.total_out_plus_in == 99_648
    assert spec.total_dense == 46_755_840
    shapes = dict(zip(spec.names, spec.shapes))
    assert shapes["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == (320, 320)
    assert shapes["unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v"] == (640, 768)
    assert shapes["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q"] == (1280, 1280)
    assert shapes["unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"] == (320, 768)
    assert spec_by_name("tiny") == tiny_spec()


def _gl(r, seed):
    """A well-conditioned, non-orthogonal R = Q1 diag(s) Q2 with s in [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    s = 0.5 + 1.5 * torch.rand(r, generator=g, dtype=torch.float64)
    return q1 @ torch.diag(s) @ q2


def _act(lora, seed, break_it=False):
    """Apply an independent R_ℓ ∈ GL(r) per module: (U, V) ↦ (U R, V R⁻ᵀ). With break_it, V is multiplied by R
    instead, which changes ΔW (the sensitivity check)."""
    mods = []
    for ell, m in enumerate(lora):
        R = _gl(m.rank, seed + ell)
        V = m.V @ R if break_it else m.V @ torch.linalg.inv(R).T
        mods.append(LoRAModule(m.name, m.U @ R, V, m.alpha, m.scale))
    return type(lora).from_modules(mods)


def test_labels_are_gl_invariant_and_detect_a_non_invariant_change():
    spec = tiny_spec()
    lora = random_lora(spec, rank=4, seed=3, dtype=torch.float64)
    base = lora_labels(lora, spec)
    R = _gl(4, 0)
    assert float(torch.linalg.cond(R)) > 1.5 and not torch.allclose(R @ R.T, torch.eye(4, dtype=torch.float64))
    for seed in range(3):
        moved = lora_labels(_act(lora, 10 * seed), spec)
        for k in base:
            assert math.isclose(moved[k], base[k], rel_tol=1e-10, abs_tol=1e-12), k
    broken = lora_labels(_act(lora, 0, break_it=True), spec)
    assert all(abs(broken[k] - base[k]) > 1e-3 for k in base)


def test_singular_values_without_delta_equal_dense_svd():
    g = torch.Generator().manual_seed(0)
    U, V = torch.randn(30, 3, generator=g, dtype=torch.float64), torch.randn(20, 3, generator=g, dtype=torch.float64)
    dense = torch.linalg.svdvals(U @ V.T)[:3]
    assert torch.allclose(singular_values(U, V), dense, rtol=1e-10)


def test_collection_labels_spread_and_are_learnable_signals():
    ss = synth_collection(tiny_spec(), 200, ranks=(2, 4), seed=0)
    t = ss.table
    assert len(t) == 200 and t["id"].is_unique and set(t["rank"]) == {2, 4}
    assert t["sv_energy"].std() > 0.5  # spectra vary from LoRA to LoRA
    assert 0.4 < t["sv_high"].mean() < 0.6 and 0.3 < t["probe_positive"].mean() < 0.7
    # the direction label follows the planted alignment t; the spectral label follows the overall scale
    assert t["probe"].corr(t["probe_t"]) > 0.7
    assert t["sv_energy"].corr(t["log_scale"]) > 0.9
    assert abs(t["probe"].corr(t["sv_energy"])) < 0.3  # the two tasks are different signals
    assert set(t["split"]) == {"train", "val", "test"}


def test_deterministic_and_regenerated_loras_match_the_table():
    a, b = synth_collection(tiny_spec(), 5, seed=7), synth_collection(tiny_spec(), 5, seed=7)
    assert a.table.equals(b.table)
    for i in range(5):
        labels = lora_labels(a.lora(i), a.spec)
        assert math.isclose(labels["sv_energy"], a.table["sv_energy"][i], rel_tol=1e-9)
    assert not synth_collection(tiny_spec(), 5, seed=8).table["sv_energy"].equals(a.table["sv_energy"])


def test_alpha_is_kept_and_delta_does_not_depend_on_it():
    spec = tiny_spec()
    a = random_lora(spec, rank=4, alpha=27.0, seed=1, dtype=torch.float64)
    b = random_lora(spec, rank=4, seed=1, dtype=torch.float64)
    assert {m.alpha for m in a} == {27.0} and {m.scale for m in a} == {27 / 4}
    for m in a:
        assert torch.allclose(m.delta(), b[m.name].delta(), rtol=1e-12)


def test_write_packed(tmp_path):
    ss = synth_collection(tiny_spec(), 10, ranks=(2, 4), seed=1)
    c = ss.write(tmp_path / "c")
    assert len(c) == 10 and c.label_columns("spectrum") == ["sv_energy", "sv_high"]
    assert c.labels["sv_high"]["kind"] == "binary" and "median" in c.labels["sv_high"]["description"]
    assert c.ranks[:, 0].tolist() == ss.ranks
    with pytest.raises(ValueError, match="unknown label"):
        synth_collection(tiny_spec(), 3, label="nope")
