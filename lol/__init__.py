"""lol — Learning on LoRAs.

Models whose input is a LoRA's weights: given the low-rank factors (U, V) of every adapted layer, predict properties
of the finetuned model without running it. Good LoL models respect the symmetry ``(U, V) ↦ (U R, V R⁻ᵀ)``,
R ∈ GL(r), which leaves every ΔW = U Vᵀ unchanged.

The layout follows the data: formats (files → `LoRA`), collections (many LoRAs, packed), symmetry (GL action and
its tests), features and models (invariant learning), zoo (building datasets), app and notebooks (showing).
"""
from .errors import CollectionError, LoLError, LoRAFormatError, SpecMismatchError
from .lora import LoRA, LoRAModule, ModuleSpec, lora_scale, module_key
from .formats import detect_format, read_lora, save_diffusers, save_peft
from .collection import Collection, open_collection, write_collection
from .symmetry import assert_gl_equivariant, assert_gl_invariant, gl_act, random_gl, random_gl_like
from .models import MODELS, build_model

# (`lol.train.train` and `lol.predict.predict` keep their module paths: their names are also submodule names)
_LAZY = {"TrainConfig": "train", "TrainResult": "train", "load_checkpoint": "checkpoint"}


def __getattr__(name):  # training and prediction pull in pandas/scipy: import them on first use
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lol' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "LoRA", "LoRAModule", "ModuleSpec", "lora_scale", "module_key",
    "LoLError", "LoRAFormatError", "SpecMismatchError", "CollectionError",
    "read_lora", "save_peft", "save_diffusers", "detect_format", "open_collection", "write_collection", "Collection",
    "random_gl", "random_gl_like", "gl_act", "assert_gl_invariant", "assert_gl_equivariant", "MODELS", "build_model",
    "TrainConfig", "TrainResult", "load_checkpoint",
]
