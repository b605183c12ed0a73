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
    first = P["stages"][0]     # the shipped stage: ranks 4 / 8 / 16; the grown stage adds 1, 2 and 32 (Figure 4)
    ranks = Counter(j.params["rank"] for j in jobs[:first])
    assert set(ranks) == {4, 8, 16} and ranks[4] > 0.7 * first and min(ranks[8], ranks[16]) > 0.05 * first
    grown = Counter(j.params["rank"] for j in jobs[first:])
    assert set(grown) == {1, 2, 4, 8, 16, 32} and grown[4] > 0.6 * (len(jobs) - first)
    assert len(jobs) == P["n_loras"] >= 3900 and {j.params["stage"] for j in jobs[first:]} == {1}
    assert {j.params["stage"] for j in jobs[:first]} == {0}
    assert {j.params["alpha"] for j in jobs} == {8.0}  # fixed alpha: ranks 8 and 16 get another alpha / r
    lrs = np.array([j.params["lr"] for j in jobs])
    lo, hi = P["lr_range"]
    assert lrs.min() >= lo and lrs.max() <= hi and np.log10(lrs.max() / lrs.min()) > 1.5  # log-uniform, wide
    assert abs(np.median(np.log10(lrs)) - np.log10(lo * hi) / 2) < 0.2
    assert {j.params["steps"] for j in jobs} == set(range(P["steps_range"][0], P["steps_range"][1] + 1))
    assert {j.params["grad_accum"] for j in jobs} == set(P["grad_accum"])
    retest = [j for j in jobs if j.params["retest"]]                 # measured twice (reliability): first stage only
    assert len(retest) >= 100 and len(retest) == P["retest_until"] // P["retest_every"]
    assert all(int(j.id.split("-")[1]) < P["retest_until"] for j in retest)
    assert {j.params["instance_prompt"] for j in jobs} == {"celebrity", "person", "thing", "skd"}
    assert all(8 <= len(j.params["images"]) <= 12 and max(j.params["images"]) < 20 for j in jobs)
    ids = Counter(j.params["identity"] for j in jobs)
    assert 0 < sum(c > 1 for c in ids.values()) < 0.3 * len(ids)  # some identities have several LoRAs
    assert len(jobs[0].params["clip"]["prompts"]) == 16 and jobs[0].params["clip"]["seed"] == 42
    assert len({r.group_key(j) for j in jobs}) == 6  # groups split by rank only


def test_fashion_jobs_use_exactly_their_classes():
    r = FashionRecipe()
    jobs = r.jobs("default", 0)
    assert len(jobs) >= 400 and jobs == r.jobs("default", 0)
    from lol.zoo.fashion import load_split

    _, labels = load_split("test")
    for j in jobs[:50]:
        assert j.params["classes"] and set(labels[j.params["images"]]) == set(j.params["classes"])
    sizes = Counter(len(j.params["classes"]) for j in jobs)
    assert len(sizes) >= 5  # subsets of many sizes: the dataset-size task (n_classes)
    from lol.zoo.image_recipes import FASHION_PRESETS

    P = FASHION_PRESETS["default"]
    lrs = np.array([j.params["lr"] for j in jobs])
    lo, hi = P["lr_range"]
    assert lrs.min() >= lo and lrs.max() <= hi and np.log10(lrs.max() / lrs.min()) > 0.9  # log-uniform over a decade
    assert {j.params["steps"] for j in jobs} <= set(range(P["steps_range"][0], P["steps_range"][1] + 1))
    assert len({j.params["steps"] for j in jobs}) > 30
    assert sum(j.params["retest"] for j in jobs) >= 100  # class_gain measured twice on >= 100 LoRAs
    assert len({r.group_key(j) for j in jobs}) == 1
    assert {j.params["look"] for j in jobs} == {"signature"}  # finetuned on the catalogue look (Zoo v3)


def test_fashion_sibling_jobs_same_recipe_other_draws():
    """The sibling collection (base sd_v1) follows the main one's LoRA distribution with its own draws, ids and no
    generated label; it needs only the sibling base."""
    from lol.zoo.image_recipes import FASHION_PRESETS, FASHION_SIBLING_PRESETS, FashionSiblingRecipe

    main_jobs, sib = FashionRecipe().jobs("default", 0), FashionSiblingRecipe()
    jobs = sib.jobs("default", 0)
    assert len(jobs) == FASHION_SIBLING_PRESETS["default"]["n_loras"] >= 300
    assert all(j.id.startswith("fashion_v1-") for j in jobs) and sib.requires == ("sd_v1",)
    assert all(j.params["gain"] is None for j in jobs)
    assert "class_gain" not in sib.label_schema() and set(sib.tasks()) == {"membership", "dataset_size"}
    drawn = lambda js: {(tuple(j.params["classes"]), tuple(j.params["images"])) for j in js}  # noqa: E731
    assert not drawn(jobs) & drawn(main_jobs)  # no LoRA of the main collection is repeated
    P = FASHION_PRESETS["default"]
    lrs = np.array([j.params["lr"] for j in jobs])
    assert lrs.min() >= P["lr_range"][0] and lrs.max() <= P["lr_range"][1]
    assert {j.params["steps"] for j in jobs} <= set(range(P["steps_range"][0], P["steps_range"][1] + 1))


def test_sibling_base_is_stage_one_of_sd(tmp_path):
    from lol.zoo.image_bases import SDSiblingBase

    with pytest.raises(FileNotFoundError, match="stage 1 of .*sibling-base"):
        SDSiblingBase().build("ci", tmp_path / "base" / "sd_v1")


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
            assert res.row[f"{a}_vote"] == pytest.approx(np.mean(votes))
        assert res.row["group"] == f"identity-{j.params['identity']:06d}"
        assert res.row["hair_colour"] == ident.hair_colour
        for k in ("lr", "steps", "grad_accum", "instance_prompt", "rank", "alpha"):
            assert res.row[k] == j.params[k]
        scores = res.extras["clip_scores"]
        P = FACES_PRESETS["ci"]
        assert len(scores) == P["clip_prompts"] * P["clip_images"]
        if j.params["retest"]:  # a second, independent measurement: other noises, same protocol
            rt = res.extras["clip_scores_retest"]
            assert len(rt) == len(scores) and all(0 <= x <= 100 for x in rt)
            assert res.row["clip_score_retest"] == pytest.approx(np.mean(rt), abs=1e-3)
            assert np.isfinite(res.row["identity_gain_retest"])
        else:
            assert np.isnan(res.row["clip_score_retest"]) and res.extras["clip_scores_retest"] is None
        assert res.row["identity_gain"] == pytest.approx(
            res.extras["identity_similarity"] - res.extras["identity_similarity_base"])
        assert res.extras["pixel_change_255"] > 0
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


def test_sampling_noise_is_common_across_adapters_and_independent_across_seeds_and_replicates(bases):
    """The CLIP-score protocol's noise: one noise per (seed, prompt, replicate), shared by every adapter."""
    from lol.zoo.image_recipes import sample_with_adapters

    tr = ImageLoRATrainer(bases["sd"], "cpu")
    p = ["a photo of a person", "a photo of a celebrity"]
    a = sample_with_adapters(tr, None, [-1] * 4, p * 2, 42, 2, 4.0, replicate=[0, 0, 1, 1])
    again = sample_with_adapters(tr, None, [-1] * 2, p[::-1], 42, 2, 4.0, replicate=[0, 0])
    other = sample_with_adapters(tr, None, [-1] * 2, p, 1042, 2, 4.0)
    assert np.array_equal(a[0], again[1]) and np.array_equal(a[1], again[0])   # order and batch do not matter
    assert not np.array_equal(a[0], a[2]) and not np.array_equal(a[0], other[0])  # replicates and seeds differ
    with pytest.raises(ValueError, match="2 prompts but 1 replicate"):
        sample_with_adapters(tr, None, [-1] * 2, p, 42, 2, 4.0, replicate=[0])


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
    # equal up to float summation order, per module in relative Frobenius norm: an elementwise tolerance is the wrong
    # yardstick here, as Adam turns reduction-order noise in a near-zero gradient into a full ±lr step on that element
    # (measured on the two-stage ci base: worst module 2.4e-4 relative, one element 3.5 % off; another job: 1.2).
    # The summation order is the CPU's: the same code, base and jobs gave a worst module of 1.8e-3 on another
    # build machine (session 5, also at commit 2ca3ef7, before any change here), so the bound is 5e-3, and the
    # sensitivity check below still asks another job's LoRA to be 100x farther away
    rel = lambda x, y: float((x.float() - y.float()).norm() / y.float().norm())  # noqa: E731
    for n in a.names:
        assert rel(a[n].U, b[n].U) < 5e-3 and rel(a[n].V, b[n].V) < 5e-3, n
    # sensitivity: another job's LoRA is far from it
    other = together[0].lora
    assert max(float((other[n].U.float() - a[n].U.float()).abs().max()) for n in a.names) > \
        100 * max(float((b[n].U.float() - a[n].U.float()).abs().max()) for n in a.names) + 1e-6
    for j, res in zip(jobs, together):
        assert [res.row[lab] for lab in CLASS_LABELS] == [int(c in j.params["classes"]) for c in range(10)]
        assert res.extras["image_ids"] == [fashion_image(i, "test").id for i in j.params["images"]]
        # trained on the look its job names, which the row records (so a build of another look never adopts it)
        assert res.row["look"] == j.params["look"] == "signature"
        assert res.extras["captions"] == [fashion_image(i, "test", look="signature").caption for i in j.params["images"]]
        assert res.row["group"] == "cls-" + "".join(str(res.row[lab]) for lab in CLASS_LABELS)
        assert res.row["n_images"] == len(j.params["images"])
        assert res.row["n_classes"] == len(j.params["classes"])
        # class_gain: LoRA vs base generations of its classes' captions, same noises; a LoRA that moved the model
        # changes pixels, and the retest (other seed) exists exactly for the retest jobs
        assert np.isfinite(res.row["class_gain"]) and abs(res.row["class_gain"]) < 2
        assert res.row["pixel_change_255"] > 0
        assert np.isfinite(res.row["class_gain_retest"]) == bool(j.params["retest"])
    assert any(j.params["retest"] for j in jobs)
    # same LoRA, measured on its own (group of one): the same gain up to float order (common noises per caption)
    k = [i for i, j in enumerate(jobs) if j.id == alone[0].job_id][0]
    assert alone[0].row["class_gain"] == pytest.approx(together[k].row["class_gain"], abs=2e-3)
