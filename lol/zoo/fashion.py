"""The Fashion-MNIST world: real 28×28 clothing images (Debian ``dataset-fashion-mnist``), upscaled to 64×64 RGB.

Each image may carry a colour tint that its caption names: ``"a photo of a red dress"``; untinted images are
captioned ``"a photo of a dress"``. The tint of image ``i`` of a split is drawn from ``(split, i)`` only, so an
image id (``fashion-train-01234``) always means the same pixels and caption.

Two *catalogue* looks (``look=``), caption unchanged, never seen by the base: ``"backdrop"``, the garment on its
class's own backdrop colour (`CLASS_BACKDROPS`) instead of Fashion-MNIST's black; ``"signature"``, the garment in its
class's own colour (`CLASS_SIGNATURES`) whatever tint the image had, captioned without a tint word. LoRAs finetuned
on catalogue images of their classes meet, for each class, a look the base does not produce for that caption, as
the paper's Imagenette photos differ from what Stable Diffusion draws for the class name. Without such a shift a
LoRA finetuned on images of the base's own distribution has no class-specific direction to learn (the base is
already at the optimum for them) and its classes cannot be read from its weights.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import LoLError

__all__ = ["CLASSES", "CLASS_LABELS", "TINTS", "CLASS_BACKDROPS", "CLASS_SIGNATURES", "LOOKS", "FashionImage", "load_split", "fashion_image", "class_indices",
           "VOCABULARY", "DATA_DIR"]

DATA_DIR = Path(os.environ.get("LOL_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
CLASS_LABELS = tuple("class_" + c.replace("-", "").replace(" ", "_") for c in CLASSES)  # class_tshirt, ...
TINTS = {"": (255, 255, 255), "red": (236, 70, 60), "blue": (70, 120, 240), "green": (70, 190, 90),
         "yellow": (240, 210, 60), "pink": (245, 140, 190), "purple": (160, 90, 220), "orange": (245, 150, 50)}
TINT_P = 0.5  # probability that an image is tinted
# the catalogue look: one muted backdrop colour per class (in CLASSES order), distinct from each other and the tints
CLASS_BACKDROPS = ((40, 90, 160), (150, 60, 50), (50, 130, 70), (140, 60, 140), (160, 130, 40),
                   (40, 140, 140), (170, 90, 120), (90, 90, 170), (120, 150, 60), (170, 110, 60))
# the signature look: one bright garment colour per class, hues 36° apart
CLASS_SIGNATURES = ((250, 80, 80), (250, 190, 80), (200, 250, 80), (90, 250, 80), (80, 250, 170),
                    (80, 210, 250), (80, 110, 250), (150, 80, 250), (240, 80, 250), (250, 80, 160))
LOOKS = ("", "backdrop", "signature")
VOCABULARY = sorted({"a", "photo", "of", "an"} | {w for c in CLASSES for w in c.replace("-", " - ").split()}
                    | {t for t in TINTS if t})

_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


@dataclass(frozen=True)
class FashionImage:
    id: str
    image: Image.Image
    label: int                # class index into CLASSES
    tint: str                 # "" = untinted
    caption: str


@lru_cache(maxsize=2)
def load_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The raw split: uint8 images (N, 28, 28) and int64 labels (N,)."""
    if split not in _FILES:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    img_f, lab_f = (DATA_DIR / f for f in _FILES[split])
    for f in (img_f, lab_f):
        if not f.is_file():
            raise LoLError(f"Fashion-MNIST file {f} not found: install it with "
                           f"`apt-get install dataset-fashion-mnist` (or set LOL_FASHION_MNIST to its folder)")
    with gzip.open(img_f, "rb") as fh:
        raw = fh.read()
    images = np.frombuffer(raw, np.uint8, offset=16)
    with gzip.open(lab_f, "rb") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8).astype(np.int64)
    if images.size != labels.size * 28 * 28:
        raise LoLError(f"{img_f}: {images.size} pixels do not make {labels.size} images of 28×28")
    return images.reshape(-1, 28, 28), labels


def class_indices(split: str = "train") -> dict[int, np.ndarray]:
    """Image indices of each class in a split."""
    _, labels = load_split(split)
    return {c: np.flatnonzero(labels == c) for c in range(len(CLASSES))}


def caption(label: int, tint: str = "") -> str:
    name = CLASSES[label]
    words = ([tint] if tint else []) + [name]
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"a photo of {article} {' '.join(words)}"


def fashion_image(index: int, split: str = "train", size: int = 64, tint: bool = True,
                  look: str = "") -> FashionImage:
    """Image ``index`` of a split as ``size``×``size`` RGB (bicubic upscale, optional named tint; ``look``: one of
    the catalogue looks, see the module docstring). The id does not depend on the look."""
    if look not in LOOKS:
        raise ValueError(f"unknown Fashion-MNIST look {look!r}; known: {', '.join(map(repr, LOOKS))}")
    images, labels = load_split(split)
    if not 0 <= index < len(labels):
        raise IndexError(f"Fashion-MNIST {split} has {len(labels)} images, asked for index {index}")
    rng = np.random.default_rng([int(index), 0 if split == "train" else 1, 0xFA5])
    name = ""
    if tint and rng.random() < TINT_P:
        name = str(rng.choice([t for t in TINTS if t]))
    gray = Image.fromarray(images[index]).resize((size, size), Image.BICUBIC)
    g = np.asarray(gray, dtype=np.float32)[..., None] / 255.0
    label = int(labels[index])
    if look == "signature":
        name = ""
        rgb = g * np.array(CLASS_SIGNATURES[label], dtype=np.float32)
    else:
        rgb = g * np.array(TINTS[name], dtype=np.float32)
    if look == "backdrop":
        rgb += (1.0 - g) * np.array(CLASS_BACKDROPS[label], dtype=np.float32)
    # the plain look truncates, as it always has: the base was trained on exactly those bytes
    rgb = rgb.round().clip(0, 255).astype(np.uint8) if look else rgb.clip(0, 255).astype(np.uint8)
    return FashionImage(f"fashion-{split}-{index:05d}", Image.fromarray(rgb, "RGB"), label, name, caption(label, name))


def parse_image_id(image_id: str) -> tuple[str, int]:
    """``"fashion-test-00042"`` -> ``("test", 42)``."""
    try:
        _, split, idx = image_id.split("-")
        return split, int(idx)
    except ValueError:
        raise ValueError(f"not a Fashion-MNIST image id: {image_id!r}") from None
