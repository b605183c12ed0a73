"""CLIPBase / SDBase on the ci preset (built once, cached by source hash) and the CLIP score formula."""
import json

import numpy as np
import pytest
import torch

from zoo_image_support import ci_bases


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bases():
    return ci_bases()


def _tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from lol.zoo.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    return CLIPModel(cfg).eval(), proc


def test_clip_score_matches_torchmetrics_and_clamps(tmp_path):
    from torchmetrics.functional.multimodal import clip_score

    from lol.zoo.clipscore import CLIPScorer

    model, proc = _tiny_clip(tmp_path)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8)
    texts = ["a photo of a red dress", "a photo of a young man", "a photo of a bag", "a photo of a smiling woman",
             "a photo of a sneaker", "a photo of an old man with gray hair"]
    scorer = CLIPScorer.from_model(model, proc, backbone="tiny")
    ours = scorer.score(imgs, texts)
    class TensorFeatures(torch.nn.Module):
        """transformers 5 returns output objects from get_*_features; torchmetrics 1.9 expects tensors."""

        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, *a, **k):
            return self.m.get_image_features(*a, **k).pooler_output

        def get_text_features(self, *a, **k):
            return self.m.get_text_features(*a, **k).pooler_output

    wrapped = TensorFeatures(model)
    for i in range(len(texts)):  # torchmetrics on a single pair = the clamped score of that pair
        ref = clip_score(imgs[i], texts[i], model_name_or_path=lambda: (wrapped, proc))
        assert float(ours[i]) == pytest.approx(float(ref), abs=1e-3)
    # the formula: 100 * cos of the projected embeddings, clamped at 0
    ie = model.get_image_features(**proc(images=list(imgs.permute(0, 2, 3, 1).numpy()), return_tensors="pt"))
    ie = ie if isinstance(ie, torch.Tensor) else ie.pooler_output
    te = model.get_text_features(**proc(text=texts, return_tensors="pt", padding=True))
    te = te if isinstance(te, torch.Tensor) else te.pooler_output
    cos = torch.nn.functional.cosine_similarity(ie, te)
    assert torch.allclose(ours, (100 * cos).clamp(min=0), atol=1e-3)
    # negating the text projection negates every cosine: positive scores become 0 and vice versa
    with torch.no_grad():
        model.text_projection.weight.neg_()
    flipped = scorer.score(imgs, texts)
    assert torch.allclose(flipped, (-100 * cos).clamp(min=0), atol=1e-3)
    assert bool(((ours == 0) | (flipped == 0)).all()) and float(ours.max() + flipped.max()) > 0
    # float images in [0, 1] give the same score as their uint8 form; out-of-range floats are refused
    assert torch.allclose(scorer.score(imgs.float() / 255, texts), flipped, atol=1e-3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer.score(imgs.float(), texts)
    with pytest.raises(ValueError, match="one text per image"):
        scorer.score(imgs, texts[:2])


def test_clip_base_is_a_real_clip_with_quality_record(bases):
    from transformers import CLIPModel, CLIPProcessor

    from lol.zoo.clipscore import CLIPScorer

    rec = json.loads((bases["clip"] / "record.json").read_text())
    for k in ("train_seconds", "steps", "final_loss", "quality", "seed"):
        assert k in rec
    q = rec["quality"]
    assert {"faces_image_to_text_top1", "fashion_text_to_image_top1", "probe_accuracy"} <= set(q)
    assert set(q["probe_accuracy"]) >= {"male", "young", "wearing_lipstick", "big_lips", "no_beard", "fashion_class"}
    model = CLIPModel.from_pretrained(str(bases["clip"]))
    assert model.config.vision_config.image_size == 64 and model.config.vision_config.patch_size == 8
    CLIPProcessor.from_pretrained(str(bases["clip"]))
    s = CLIPScorer(bases["clip"], device="cpu").score(np.zeros((2, 64, 64, 3), np.uint8) + 128,
                                                       ["a photo of a dress", "a photo of a man"])
    assert s.shape == (2,) and bool(((s >= 0) & (s <= 100)).all())


def test_sd_base_is_a_real_pipeline_that_generates(bases):
    from transformers import CLIPModel

    from lol.zoo.image_bases import load_sd_pipeline

    rec = json.loads((bases["sd"] / "record.json").read_text())
    for k in ("decoder_seconds", "unet_seconds", "quality", "latent_scaling_factor", "text_encoder", "parent"):
        assert k in rec
    # two stages, as SD-1.4 -> SD-1.5: the parent (kept as the sibling base) was trained from scratch ...
    assert rec["stage"] == 2 and rec["parent"] == "base/sd_v1"
    parent_dir = bases["root"] / rec["parent"]
    prec = json.loads((parent_dir / "record.json").read_text())
    assert "vae_seconds" in prec and prec["preset"] == "ci1"
    # ... and records name folders relative to the build root, never the build machine's paths
    root = str(bases["root"].resolve())
    assert root not in json.dumps(rec) and rec["quality"]["eval"]["scorer"] == "base/clip"
    # stage 2 finetuned the VAE decoder only: the encoder (hence every latent) is the parent's, the decoder moved
    from diffusers import AutoencoderKL, UNet2DConditionModel

    child_vae, parent_vae = (AutoencoderKL.from_pretrained(str(d / "vae")) for d in (bases["sd"], parent_dir))
    enc = [(a, b) for (n, a), (_, b) in zip(child_vae.state_dict().items(), parent_vae.state_dict().items())
           if n.startswith(("encoder.", "quant_conv."))]
    dec = [(a, b) for (n, a), (_, b) in zip(child_vae.state_dict().items(), parent_vae.state_dict().items())
           if n.startswith("decoder.")]
    assert enc and all(torch.equal(a, b) for a, b in enc)
    assert dec and not all(torch.equal(a, b) for a, b in dec)
    cu, pu = (UNet2DConditionModel.from_pretrained(str(d / "unet")).state_dict() for d in (bases["sd"], parent_dir))
    assert not all(torch.equal(cu[k], pu[k]) for k in cu)  # the UNet continued training
    assert {"clip_score_own_prompt", "clip_score_mismatched_prompt", "generated_attribute_accuracy"} <= \
        set(rec["quality"])
    assert (bases["root"] / "samples" / "sd_base.png").is_file()
    pipe = load_sd_pipeline(bases["sd"], "cpu")
    assert pipe.safety_checker is None
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    # VAE: 64x64x3 -> 16x16x4 (three blocks, factor 4)
    z = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 16, 16) and pipe.vae_scale_factor == 4
    # several transformer blocks, each with attn1 (self) and attn2 (cross) to_q / to_v
    names = [n for n, m in pipe.unet.named_modules() if n.endswith((".to_q", ".to_v"))]
    blocks = {n.rsplit(".", 2)[0] for n in names}
    assert len(blocks) >= 5 and len(names) == 4 * len(blocks)  # attn1 + attn2, to_q + to_v in each block
    assert any(".attn2." in n for n in names) and any(".attn1." in n for n in names)
    # the text encoder is the CLIP scorer's text tower (frozen copy)
    clip = CLIPModel.from_pretrained(str(bases["clip"]))
    te = pipe.text_encoder
    src = clip.text_model.state_dict()
    dst = getattr(te, "text_model", te).state_dict()
    assert all(torch.equal(src[k], dst[k]) for k in src)
    out = pipe("a photo of a smiling young woman with blond hair", num_inference_steps=2, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    again = pipe("a photo of a smiling young woman with blond hair", num_inference_steps=2, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.allclose(out, again)


def test_sd_needs_clip_first_and_accepts_a_pretrained_folder(bases, tmp_path):
    from lol.zoo.image_bases import SDBase, load_sd_pipeline, resolve_base

    with pytest.raises(FileNotFoundError, match="build 'clip' before 'sd'"):
        SDBase().build("ci", tmp_path / "base" / "sd", "cpu", 0)
    rec = SDBase(pretrained=bases["sd"]).build("ci", tmp_path / "linked" / "sd", "cpu", 0)
    assert rec["pretrained"] == str(bases["sd"].resolve())
    assert resolve_base(tmp_path / "linked" / "sd") == bases["sd"].resolve()
    pipe = load_sd_pipeline(tmp_path / "linked" / "sd", "cpu")
    assert pipe.unet.config.sample_size == 16
    with pytest.raises(ValueError, match="unknown preset"):
        SDBase(clip_dir=bases["clip"]).build("huge", tmp_path / "x", "cpu", 0)
