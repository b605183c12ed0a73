"""The face and Fashion-MNIST worlds and the offline CLIP tokenizer (no model weights involved)."""
import numpy as np
import pytest

from lol.errors import LoLError
from lol.zoo import fashion
from lol.zoo.faces import ATTRIBUTES, HAIR_COLOURS, Identity, caption, identity_images, render_face


def _px(f):
    return np.asarray(f.image)


def test_faces_are_deterministic_and_vary_per_image():
    ident = Identity.from_seed(123)
    assert Identity.from_seed(123) == ident
    a, b = render_face(ident, 3), render_face(Identity.from_seed(123), 3)
    assert a.id == b.id and a.caption == b.caption and np.array_equal(_px(a), _px(b))
    assert _px(a).shape == (64, 64, 3) and _px(a).dtype == np.uint8
    other = render_face(ident, 4)
    assert np.abs(_px(other).astype(int) - _px(a)).mean() > 1.0  # pose/background differ per image
    assert render_face(ident, 0, size=32).image.size == (32, 32)


def test_identities_cover_every_attribute_value():
    ids = [Identity.from_seed(s) for s in range(300)]
    for a in ("male", "young", "wearing_lipstick", "big_lips", "no_beard", "eyeglasses", "hair_long"):
        frac = np.mean([getattr(i, a) for i in ids])
        assert 0.05 < frac < 0.95, (a, frac)
    assert {i.hair_colour for i in ids} == set(HAIR_COLOURS)
    # CelebA-like structure: women have no beard, men (almost) never wear lipstick here
    assert all(i.no_beard for i in ids if not i.male)
    assert not any(i.wearing_lipstick for i in ids if i.male)


def test_captions_state_the_drawn_attributes():
    for s in range(40):
        for f in identity_images(Identity.from_seed(s), 3):
            at, words = f.attributes, f.caption.split()
            assert set(ATTRIBUTES) <= set(at)
            assert ("man" in words) == at["male"] and ("woman" in words) == (not at["male"])
            assert ("young" in words) == at["young"] and ("old" in words) == (not at["young"])
            assert ("smiling" in words) == at["smiling"]
            assert ("lipstick" in words) == at["wearing_lipstick"]
            assert ("glasses" in words) == at["eyeglasses"]
            assert ("beard" in words) == (not at["no_beard"])
            assert at["hair_colour"] in words
    assert caption({"smiling": True, "young": True, "male": False, "hair_colour": "blond", "hair_long": True,
                    "no_beard": True, "big_lips": False, "wearing_lipstick": True, "eyeglasses": False}) == \
        "a photo of a smiling young woman with long blond hair wearing lipstick"


def test_per_image_attribute_noise_keeps_the_majority():
    ident = next(i for i in map(Identity.from_seed, range(100)) if i.wearing_lipstick)
    lip = [f.attributes["wearing_lipstick"] for f in identity_images(ident, 30)]
    assert 0 < sum(lip) < 30 and np.mean(lip) > 0.5  # missing in some images, present in most
    assert all(f.attributes["male"] == ident.male for f in identity_images(ident, 5))


def test_attributes_change_the_pixels():
    """A trait that the caption names is visible: lipstick reddens the mouth region."""
    base = next(i for i in map(Identity.from_seed, range(200)) if i.wearing_lipstick and not i.eyeglasses)
    from dataclasses import replace

    plain = replace(base, wearing_lipstick=False)
    with_l = [f for f in identity_images(base, 12) if f.attributes["wearing_lipstick"]][0]
    idx = int(with_l.id.rsplit("-", 1)[1])
    without = render_face(plain, idx)
    diff = np.abs(_px(with_l).astype(int) - _px(without)).sum(-1)
    assert diff.max() > 40 and (diff > 20).mean() < 0.05  # a small, strong local change


def test_fashion_mnist_is_real_and_captioned():
    images, labels = fashion.load_split("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10))
    f = fashion.fashion_image(7, "test")
    assert f.image.size == (64, 64) and f.id == "fashion-test-00007"
    assert fashion.CLASSES[f.label] in f.caption
    assert (f.tint in f.caption) if f.tint else f.caption.startswith("a photo of")
    g = fashion.fashion_image(7, "test")
    assert np.array_equal(np.asarray(f.image), np.asarray(g.image)) and f.caption == g.caption
    tints = {fashion.fashion_image(i).tint for i in range(60)}
    assert "" in tints and len(tints) > 3
    assert fashion.parse_image_id(f.id) == ("test", 7)


def test_fashion_catalogue_looks_shift_each_class_its_own_way():
    """The catalogue looks keep the image's id, class and garment shape: ``backdrop`` fills Fashion-MNIST's black
    background with the class's backdrop colour (caption unchanged); ``signature`` paints the garment in the class's
    own colour and drops the tint word from the caption. The plain look is the base's own data, untouched."""
    _, labels = fashion.load_split("test")
    tinted = next(i for i in range(50) if fashion.fashion_image(i, "test").tint)
    for i in (0, 1, tinted):
        plain = fashion.fashion_image(i, "test")
        g = np.asarray(plain.image).astype(float).max(-1)        # garment mask: bright where the garment is
        bd, sig = fashion.fashion_image(i, "test", look="backdrop"), fashion.fashion_image(i, "test", look="signature")
        assert bd.id == sig.id == plain.id and bd.label == sig.label == plain.label == labels[i]
        assert bd.caption == plain.caption and bd.tint == plain.tint
        assert sig.tint == "" and sig.caption == f"a photo of {'an' if fashion.CLASSES[sig.label][0] in 'aeiou' else 'a'} " \
                                                   f"{fashion.CLASSES[sig.label]}"
        corner = np.asarray(bd.image)[:4, :4].reshape(-1, 3).mean(0)   # background pixels
        assert np.abs(corner - fashion.CLASS_BACKDROPS[plain.label]).max() < 8
        s = np.asarray(sig.image).astype(float)[g > 200]            # garment pixels: the class colour's hue
        want = np.array(fashion.CLASS_SIGNATURES[plain.label], float)
        cos = (s @ want) / (np.linalg.norm(s, axis=1) * np.linalg.norm(want))
        assert cos.mean() > 0.99
        assert np.array_equal(np.asarray(fashion.fashion_image(i, "test", look="").image), np.asarray(plain.image))
    assert len(set(fashion.CLASS_SIGNATURES)) == len(set(fashion.CLASS_BACKDROPS)) == len(fashion.CLASSES)
    with pytest.raises(ValueError, match="unknown Fashion-MNIST look 'sepia'"):
        fashion.fashion_image(0, "test", look="sepia")


def test_fashion_missing_dataset_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion, "DATA_DIR", tmp_path)
    with pytest.raises(LoLError, match="apt-get install dataset-fashion-mnist"):
        fashion.load_split.__wrapped__("train")


def test_clip_tokenizer_round_trips_captions(tmp_path):
    from transformers import CLIPTokenizer

    from lol.zoo.tokenizer import build_clip_tokenizer, caption_vocabulary

    build_clip_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").read_text().startswith("#version")
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == len(tok) - 1  # CLIP pools at the highest id (legacy argmax rule still works)
    for w in caption_vocabulary():  # every caption word is one token
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    caps = [f.caption for f in identity_images(Identity.from_seed(9), 4)]
    caps += [fashion.fashion_image(i).caption for i in range(10)] + ["a photo of a zebra, 42 times!"]
    for c in caps:
        ids = tok(c).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        text = tok.decode(ids, skip_special_tokens=True)
        assert tok(text).input_ids == ids  # decode -> encode is the identity on ids
        if "-" not in c and "," not in c and "!" not in c:
            assert text == c
    assert len(tok(caps[0]).input_ids) <= tok.model_max_length
