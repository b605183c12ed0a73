"""A procedural face world standing in for CelebA: identities with exact attributes, drawn as 64×64 RGB images.

An *identity* is a fixed set of traits drawn from its own seed (`Identity.from_seed`): the paper's five CelebA
attributes (``male``, ``young``, ``wearing_lipstick``, ``big_lips``, ``no_beard``) plus ``hair_colour``,
``hair_long``, ``eyeglasses``, ``smiling`` (a tendency), ``skin_tone``, ``eye_colour`` and face geometry.
An *image* of an identity (`render_face`) adds per-image variation drawn from ``(identity seed, image index)``:
head offset, tilt and size, expression (smiling or not), background, lighting and small attribute noise (lipstick
missing in some images, glasses taken off in a few). Each image carries the attributes *as drawn* and a caption built
from them (`caption`), e.g. ``"a photo of a smiling young woman with blond hair wearing lipstick"``.

Everything is deterministic from integer seeds (numpy ``default_rng``); images are drawn at 4× with PIL and
downsampled with a Lanczos filter, so one image costs about a millisecond.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["ATTRIBUTES", "PAPER_ATTRIBUTES", "HAIR_COLOURS", "SKIN_TONES", "Identity", "FaceImage", "render_face",
           "identity_images", "caption", "face_image_id", "VOCABULARY"]

PAPER_ATTRIBUTES = ("male", "young", "wearing_lipstick", "big_lips", "no_beard")
ATTRIBUTES = PAPER_ATTRIBUTES + ("eyeglasses", "smiling", "hair_long")  # binary per-image attributes

HAIR_COLOURS = {  # name -> (base RGB, highlight RGB)
    "black": ((28, 24, 24), (62, 56, 58)),
    "brown": ((92, 58, 34), (140, 96, 60)),
    "blond": ((214, 178, 102), (244, 222, 160)),
    "red": ((160, 62, 30), (206, 104, 58)),
    "gray": ((148, 146, 146), (204, 202, 200)),
}
SKIN_TONES = {
    "pale": (250, 222, 204),
    "fair": (238, 196, 164),
    "tan": (206, 156, 116),
    "brown": (156, 104, 70),
    "dark": (102, 66, 46),
}
EYE_COLOURS = {"brown": (96, 58, 30), "blue": (70, 120, 190), "green": (70, 130, 80), "gray": (110, 116, 124)}
LIPSTICK = [(196, 30, 58), (170, 20, 70), (214, 60, 90), (150, 24, 40)]
CLOTHES = [(40, 60, 110), (120, 30, 40), (40, 100, 70), (80, 80, 90), (210, 190, 160), (60, 40, 90), (30, 30, 34),
           (200, 120, 40)]

# Every word a face caption can contain (used to build the tokenizer).
VOCABULARY = sorted({"a", "photo", "of", "smiling", "young", "old", "man", "woman", "with", "hair", "wearing",
                     "lipstick", "glasses", "and", "big", "lips", "beard", "long", "short"} | set(HAIR_COLOURS))


@dataclass(frozen=True)
class Identity:
    """The fixed traits of one person. Binary traits are the identity's; images may deviate (see `render_face`)."""

    seed: int
    male: bool
    young: bool
    wearing_lipstick: bool
    big_lips: bool
    no_beard: bool
    eyeglasses: bool
    smile_rate: float        # probability that an image of this identity is smiling
    hair_colour: str
    hair_long: bool
    skin_tone: str
    eye_colour: str
    face_width: float        # relative face geometry, ~1
    face_height: float
    clothes: tuple[int, int, int]
    lip_colour: tuple[int, int, int]

    @classmethod
    def from_seed(cls, seed: int) -> "Identity":
        """Draw an identity; marginals roughly follow CelebA (42% male, 77% young, lipstick mostly on women)."""
        rng = np.random.default_rng([int(seed), 0x1D])
        male = bool(rng.random() < 0.42)
        young = bool(rng.random() < 0.75)
        lipstick = bool((not male) and rng.random() < 0.78)
        big_lips = bool(rng.random() < (0.18 if male else 0.32))
        no_beard = bool(male is False or rng.random() < 0.55)
        glasses = bool(rng.random() < (0.10 if young else 0.28))
        if young:
            hair = str(rng.choice(["black", "brown", "blond", "red"], p=[0.32, 0.36, 0.22, 0.10]))
        else:
            hair = str(rng.choice(["black", "brown", "blond", "red", "gray"], p=[0.16, 0.2, 0.1, 0.04, 0.5]))
        hair_long = bool(rng.random() < (0.12 if male else 0.85))
        skin = str(rng.choice(list(SKIN_TONES), p=[0.15, 0.35, 0.22, 0.16, 0.12]))
        eye = str(rng.choice(list(EYE_COLOURS), p=[0.5, 0.25, 0.15, 0.1]))
        return cls(seed=int(seed), male=male, young=young, wearing_lipstick=lipstick, big_lips=big_lips,
                   no_beard=no_beard, eyeglasses=glasses, smile_rate=float(rng.choice([0.15, 0.5, 0.85])),
                   hair_colour=hair, hair_long=hair_long, skin_tone=skin, eye_colour=eye,
                   face_width=float(rng.uniform(0.9, 1.08) * (1.05 if male else 1.0)),
                   face_height=float(rng.uniform(0.94, 1.06)),
                   clothes=tuple(int(c) for c in CLOTHES[int(rng.integers(len(CLOTHES)))]),
                   lip_colour=tuple(int(c) for c in LIPSTICK[int(rng.integers(len(LIPSTICK)))]))

    def attributes(self) -> dict:
        """The identity's own labels (no per-image noise)."""
        return {"male": self.male, "young": self.young, "wearing_lipstick": self.wearing_lipstick,
                "big_lips": self.big_lips, "no_beard": self.no_beard, "eyeglasses": self.eyeglasses,
                "smiling": self.smile_rate > 0.5, "hair_long": self.hair_long, "hair_colour": self.hair_colour,
                "skin_tone": self.skin_tone}

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FaceImage:
    id: str
    image: Image.Image
    attributes: dict          # as drawn in this image: ATTRIBUTES (bool) + hair_colour, skin_tone
    caption: str


def face_image_id(identity_seed: int, index: int) -> str:
    """Stable id of image ``index`` of identity ``identity_seed``."""
    return f"face-{int(identity_seed):07d}-{int(index):03d}"


def caption(attrs: dict, rng: np.random.Generator | None = None) -> str:
    """A caption that states the drawn attributes: ``"a photo of a smiling young woman with blond hair wearing
    lipstick"``. With ``rng``, optional details (hair length, lips) are sometimes left out, as real captions do."""
    def maybe(p=0.5):
        return rng is None or rng.random() < p

    words = ["a photo of a"]
    if attrs["smiling"]:
        words.append("smiling")
    words.append("young" if attrs["young"] else "old")
    words.append("man" if attrs["male"] else "woman")
    hair = f"{attrs['hair_colour']} hair"
    if maybe(0.3):
        hair = ("long " if attrs["hair_long"] else "short ") + hair
    withs = [hair]
    if not attrs["no_beard"]:
        withs.append("a beard")
    if attrs["big_lips"] and maybe(0.8):
        withs.append("big lips")
    words.append("with " + " and ".join(withs))
    wears = [w for w, on in (("lipstick", attrs["wearing_lipstick"]), ("glasses", attrs["eyeglasses"])) if on]
    if wears:
        words.append("wearing " + " and ".join(wears))
    return " ".join(words)


def _mix(c, d, t):
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(c, d))


def _shade(c, f):
    return tuple(int(np.clip(v * f, 0, 255)) for v in c)


def render_face(identity: Identity, index: int, size: int = 64) -> FaceImage:
    """Image ``index`` of ``identity``: per-image pose, expression, background, lighting and attribute noise are
    drawn from ``(identity.seed, index)`` only, so the same call always returns the same pixels."""
    rng = np.random.default_rng([identity.seed, int(index), 0xFACE])
    S = 4 * size
    u = S / 256.0  # drawing unit: coordinates below are for a 256-pixel canvas

    # per-image attributes (small noise on the identity's traits)
    # (every draw is made whatever the traits, so changing one trait leaves all other per-image draws unchanged)
    u_smile, u_lip, u_glasses, u_frame = rng.random(4)
    smiling = bool(u_smile < identity.smile_rate)
    lipstick = identity.wearing_lipstick and u_lip >= 0.2      # missing in ~20% of images
    glasses = identity.eyeglasses and u_glasses >= 0.12        # taken off in ~12% of images
    attrs = {"male": identity.male, "young": identity.young, "wearing_lipstick": bool(lipstick),
             "big_lips": identity.big_lips, "no_beard": identity.no_beard, "eyeglasses": bool(glasses),
             "smiling": smiling, "hair_long": identity.hair_long, "hair_colour": identity.hair_colour,
             "skin_tone": identity.skin_tone}

    # background: a vertical gradient between two soft colours
    hue = rng.uniform(0, 1, size=2)
    top = tuple(int(v) for v in 150 + 90 * np.abs(np.sin(np.pi * (hue[0] + np.array([0, 1 / 3, 2 / 3])))))
    bot = _shade(tuple(int(v) for v in 120 + 100 * np.abs(np.sin(np.pi * (hue[1] + np.array([0, 1 / 3, 2 / 3]))))),
                 rng.uniform(0.7, 1.0))
    grad = np.linspace(0, 1, S)[:, None, None]
    bg = (np.array(top)[None, None] * (1 - grad) + np.array(bot)[None, None] * grad).repeat(S, axis=1)
    background = Image.fromarray(bg.astype(np.uint8), "RGB")
    img = Image.new("RGBA", (S, S), (0, 0, 0, 0))  # the person, composited onto the background after tilting
    d = ImageDraw.Draw(img)

    light = rng.uniform(0.88, 1.08)
    skin = _shade(SKIN_TONES[identity.skin_tone], light)
    skin_dark = _shade(skin, 0.82)
    hair_c, hair_hi = (_shade(c, light) for c in HAIR_COLOURS[identity.hair_colour])
    scale = rng.uniform(0.92, 1.06)
    cx = 128 + rng.uniform(-12, 12)
    cy = 118 + rng.uniform(-8, 8)
    fw = 48 * identity.face_width * scale      # half width of the face
    fh = 60 * identity.face_height * scale     # half height

    def P(x, y):  # face coordinates (relative to the face centre, in 256-canvas units) -> canvas pixels
        return ((cx + x) * u, (cy + y) * u)

    def box(x0, y0, x1, y1):
        (a, b), (c, e) = P(x0, y0), P(x1, y1)
        return [min(a, c), min(b, e), max(a, c), max(b, e)]

    # long hair behind the head, ending on the shoulders
    if identity.hair_long:
        d.rounded_rectangle(box(-fw - 16, -fh - 8, fw + 16, fh + 40), radius=36 * u, fill=_shade(hair_c, 0.9))
    # shoulders and neck
    d.ellipse(box(-120, fh + 22, 120, fh + 170), fill=identity.clothes)
    d.rectangle(box(-21, fh - 24, 21, fh + 34), fill=skin_dark)
    d.chord(box(-24, fh + 10, 24, fh + 50), 0, 180, fill=skin_dark)
    # ears
    for s in (-1, 1):
        d.ellipse(box(s * (fw - 4), -10, s * (fw + 11), 20), fill=skin_dark)
    # face
    jaw = 0.92 if identity.male else 0.8
    d.ellipse(box(-fw, -fh, fw, fh), fill=skin)
    d.ellipse(box(-fw * jaw, -fh * 0.2, fw * jaw, fh * 1.04), fill=skin)
    # hair on the head: a cap of hair, then the forehead cut out of it (a curved hairline)
    part = rng.uniform(-0.25, 0.25) * fw
    d.ellipse(box(-fw - 5, -fh - 11, fw + 5, fh * (0.35 if identity.hair_long else 0.1)), fill=hair_c)
    d.chord(box(-fw * 0.7 + part * 0.5, -fh - 8, fw * 0.35 + part, -fh * 0.2), 180, 360, fill=hair_hi)
    if identity.hair_long or not identity.male:
        d.ellipse(box(-fw * 0.78 + part, -fh * 0.58, fw * 0.78 + part, fh * 0.9), fill=skin)
    else:
        d.ellipse(box(-fw * 0.86, -fh * 0.66, fw * 0.86, fh * 0.9), fill=skin)
    d.ellipse(box(-fw * jaw, -fh * 0.2, fw * jaw, fh * 1.04), fill=skin)
    # beard
    if not identity.no_beard:
        beard = _mix(hair_c, skin, 0.15)
        d.chord(box(-fw * 0.95, -fh * 0.25, fw * 0.95, fh * 1.08), 10, 170, fill=beard)
        d.ellipse(box(-16, fh * 0.36, 16, fh * 0.58), fill=skin)  # skin around the mouth
    # eyebrows
    brow_w = 5 if identity.male else 3
    raise_ = -2 if smiling else 0
    for s in (-1, 1):
        d.line([P(s * 12, -fh * 0.28 + raise_), P(s * 32, -fh * 0.31 + raise_)], fill=_shade(hair_c, 0.8),
               width=int(brow_w * u))
    # eyes
    eye = EYE_COLOURS[identity.eye_colour]
    for s in (-1, 1):
        ex, ey = s * 22, -fh * 0.12
        d.ellipse(box(ex - 10, ey - 6, ex + 10, ey + 6), fill=(250, 250, 248))
        d.ellipse(box(ex - 5, ey - 5, ex + 5, ey + 5), fill=eye)
        d.ellipse(box(ex - 2.5, ey - 2.5, ex + 2.5, ey + 2.5), fill=(16, 12, 12))
        if not identity.male:
            d.line([P(ex - 11, ey - 5), P(ex + 11, ey - 5)], fill=(30, 22, 22), width=int(2 * u))
        if not identity.young:
            d.arc(box(ex - 9, ey + 2, ex + 9, ey + 12), 20, 160, fill=skin_dark, width=int(2 * u))
    # wrinkles on the forehead of older people
    if not identity.young:
        for k in range(2):
            y = -fh * 0.52 + 7 * k
            d.arc(box(-26, y, 26, y + 12), 200, 340, fill=_shade(skin, 0.75), width=int(2 * u))
    # nose
    d.line([P(0, -fh * 0.05), P(-5, fh * 0.22), P(3, fh * 0.25)], fill=skin_dark, width=int(3 * u))
    # mouth
    lip = identity.lip_colour if lipstick else _mix(skin, (170, 80, 80), 0.45)
    th = 9 if identity.big_lips else 5
    mw = 22 if identity.big_lips else 18
    my = fh * 0.46
    if smiling:
        d.chord(box(-mw - 2, my - 14, mw + 2, my + 12 + th * 0.4), 0, 180, fill=lip)
        d.chord(box(-mw + 4, my - 10, mw - 4, my + 7), 0, 180, fill=(250, 248, 244))
    else:
        d.ellipse(box(-mw, my - th * 0.6, mw, my + th * 0.6), fill=lip)
        d.line([P(-mw + 3, my), P(mw - 3, my)], fill=_shade(lip, 0.6), width=int(2 * u))
    # glasses
    if glasses:
        frame = (24, 24, 30) if u_frame < 0.7 else (120, 70, 30)
        for s in (-1, 1):
            ex, ey = s * 22, -fh * 0.12
            d.rounded_rectangle(box(ex - 15, ey - 11, ex + 15, ey + 11), radius=6 * u, outline=frame,
                                width=int(4 * u))
        d.line([P(-7, -fh * 0.12), P(7, -fh * 0.12)], fill=frame, width=int(4 * u))

    tilt = rng.uniform(-7, 7)
    img = img.rotate(tilt, resample=Image.BICUBIC, center=P(0, fh * 0.6))
    img = Image.alpha_composite(background.convert("RGBA"), img).convert("RGB")
    img = img.filter(ImageFilter.GaussianBlur(0.6 * u)).resize((size, size), Image.LANCZOS)
    return FaceImage(face_image_id(identity.seed, index), img, attrs, caption(attrs, rng))


def identity_images(identity: Identity, n: int, size: int = 64) -> list[FaceImage]:
    """Images 0..n-1 of ``identity``."""
    return [render_face(identity, i, size) for i in range(n)]


def to_array(images) -> np.ndarray:
    """PIL images -> float32 array (N, 3, H, W) in [-1, 1] (the diffusers / VAE convention)."""
    a = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return (a / 127.5 - 1.0).transpose(0, 3, 1, 2)
