"""FacesRecipe / FashionRecipe on the ci preset: job plans, labels, batched == alone, and diffusers reproduces the
exported LoRAs. Trains a few steps on the ci bases (built once, cached by source hash)."""
from collections import Counter

import numpy as np
import pytest
import torch

from lol.zoo.faces import Identity, render_face
from lol.zoo.fashion import CLASS_LABELS, fashion_image
from lol.zoo.image_recipes import (CLIP_SCORE_PROMPTS, FACES_PRESETS, FacesRecipe, FashionRecipe,
                                   ImageLoRATrainer, load_adapters)
from lol.zoo.recipe import CollectionRecipe
from zoo_image_support import ci_bases

PAPER = ("male", "young", "wearing_lipstick", "big_lips", "no_beard")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bases():
    return ci_bases()


@pytest.fixture(scope="module")
def faces_results(bases):
    r = FacesRecipe()
    jobs = [j for j in r.jobs("ci", 0) if j.params["rank"] == 4][:2]
    return jobs, r.run_group(jobs, bases, "cpu")


def test_recipes_follow_the_contract():
    for r in (FacesRecipe(), FashionRecipe()):
        assert isinstance(r, CollectionRecipe)
        schema, tasks = r.label_schema(), r.tasks()
        assert all(lab in schema for labs in tasks.values() for lab in labs)
        assert all(schema[lab]["task"] in tasks for lab in schema)
    assert FacesRecipe().tasks()["attributes"] == list(PAPER)
    assert FashionRecipe().tasks()["membership"] == list(CLASS_LABELS)


def test_faces_jobs_sample_the_paper_grids():
    r = FacesRecipe()
    jobs = r.jobs("default", 0)
    assert jobs == r.jobs("default", 0) and jobs != r.jobs("default", 1)
    assert len(jobs) >= 600 and len({j.id for j in jobs}) == len(jobs)
    P = FACES_PRESETS["default"]
    ranks = Counter(j.params["rank"] for j in jobs)
    assert set(ranks) == {4, 8, 16} and ranks[4] > 0.7 * len(jobs) and min(ranks[8], ranks[16]) > 0.05 * len(jobs)
    assert {j.params["alpha"] for j in jobs} == {8.0}  # fixed alpha: ranks 8 and 16 get another alpha / r
    for key in ("lr", "steps", "grad_accum"):
        assert {j.params[key] for j in jobs} == set(P[key])
    assert {j.params["instance_prompt"] for j in jobs} == {"celebrity", "person", "thing", "skd"}
    assert all(8 <= len(j.params["images"]) <= 12 and max(j.params["images"]) < 20 for j in jobs)
    ids = Counter(j.params["identity"] for j in jobs)
    assert 0 < sum(c > 1 for c in ids.values()) < 0.3 * len(ids)  # some identities have several LoRAs
    assert len(jobs[0].params["clip"]["prompts"]) == 16 and jobs[0].params["clip"]["seed"] == 42
    assert len({r.group_key(j) for j in jobs}) == 3  # groups split by rank only


def test_fashion_jobs_use_exactly_their_classes():
    r = FashionRecipe()
    jobs = r.jobs("default", 0)
    assert len(jobs) >= 400 and jobs == r.jobs("default", 0)
    from lol.zoo.fashion import load_split

    _, labels = load_split("test")
    for j in jobs[:50]:
        assert j.params["classes"] and set(labels[j.params["images"]]) == set(j.params["classes"])
    sizes = Counter(len(j.params["classes"]) for j in jobs)
    assert len(sizes) >= 5  # subsets of many sizes


def test_faces_run_group_labels_and_loras(faces_results):
    jobs, results = faces_results
    assert [r.job_id for r in results] == [j.id for j in jobs]
    for j, res in zip(jobs, results):
        ident = Identity.from_seed(j.params["identity"])
        expect_ids = [render_face(ident, i).id for i in j.params["images"]]
        assert res.extras["image_ids"] == expect_ids
        faces = [render_face(ident, i) for i in j.params["images"]]
        for a in PAPER + ("eyeglasses", "smiling"):
            votes = [f.attributes[a] for f in faces]
            assert res.row[a] == int(sum(votes) > len(votes) / 2) or sum(votes) * 2 == len(votes)
        assert res.row["group"] == f"identity-{j.params['identity']:06d}"
        assert res.row["hair_colour"] == ident.hair_colour
        for k in ("lr", "steps", "grad_accum", "instance_prompt", "rank", "alpha"):
            assert res.row[k] == j.params[k]
        scores = res.extras["clip_scores"]
        assert len(scores) == FACES_PRESETS["ci"]["clip_prompts"]
        assert 0 <= res.row["clip_score"] <= 100 and res.row["clip_score"] == pytest.approx(np.mean(scores), abs=1e-3)
        s = res.extras["clip_settings"]
        assert s["prompts"] == CLIP_SCORE_PROMPTS[:len(scores)] and s["seed"] == 42 and s["resolution"] == 64
        lora = res.lora
        assert len(lora) == 28 and all(n.startswith("unet.") and n.endswith((".to_q", ".to_v")) for n in lora.names)
        assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q" in lora.names
        assert set(lora.ranks) == {4} and all(m.scale == 2.0 and m.alpha == 8.0 for m in lora)
        assert all(float(m.U.abs().max()) > 0 for m in lora)  # B left zero init: trained
    n0 = results[0].lora.names[0]
    assert not torch.equal(results[0].lora[n0].V, results[1].lora[n0].V)  # own seeds, own A init


def test_exported_lora_loads_in_diffusers_with_the_same_effect(faces_results, bases, tmp_path):
    """save_diffusers -> pipe.load_lora_weights gives the UNet output of the multilora adapter it came from."""
    pytest.importorskip("peft")
    from lol.formats.diffusers import save_diffusers

    lora = faces_results[1][0].lora
    path = save_diffusers(lora, tmp_path)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([500, 20])
    tr = ImageLoRATrainer(bases["sd"], "cpu")
    ctx = tr.encode_prompts(["a photo of a celebrity", "a photo of a red dress"])
    with torch.no_grad():
        base = tr.unet(z, t, encoder_hidden_states=ctx).sample
        ml = load_adapters(tr.unet, [lora])
        ml.set_index(torch.zeros(2, dtype=torch.long))
        ours = tr.unet(z, t, encoder_hidden_states=ctx).sample
        ml.remove()
        pipe = ImageLoRATrainer(bases["sd"], "cpu").pipe
        pipe.load_lora_weights(str(path))
        theirs = pipe.unet(z, t, encoder_hidden_states=ctx).sample
    err = float((ours - theirs).abs().max())
    effect = float((ours - base).abs().max())
    assert err < 1e-4 and effect > 50 * max(err, 1e-7), (err, effect)


def test_fashion_batched_equals_alone_and_labels(bases):
    r = FashionRecipe()
    jobs = r.jobs("ci", 0)[:2]
    together = r.run_group(jobs, bases, "cpu")
    alone = r.run_group(jobs[1:], bases, "cpu")
    a, b = together[1].lora, alone[0].lora
    for n in a.names:
        assert torch.allclose(a[n].U.float(), b[n].U.float(), rtol=1e-2, atol=1e-5)
        assert torch.allclose(a[n].V.float(), b[n].V.float(), rtol=1e-2, atol=1e-5)
    # sensitivity: another job's LoRA is far from it
    other = together[0].lora
    assert max(float((other[n].U.float() - a[n].U.float()).abs().max()) for n in a.names) > \
        100 * max(float((b[n].U.float() - a[n].U.float()).abs().max()) for n in a.names) + 1e-6
    for j, res in zip(jobs, together):
        assert [res.row[lab] for lab in CLASS_LABELS] == [int(c in j.params["classes"]) for c in range(10)]
        assert res.extras["image_ids"] == [fashion_image(i, "test").id for i in j.params["images"]]
        assert res.row["group"] == "cls-" + "".join(str(res.row[lab]) for lab in CLASS_LABELS)
        assert res.row["n_images"] == len(j.params["images"])
