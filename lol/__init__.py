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

__version__ = "0.1.0"

__all__ = [
    "LoRA", "LoRAModule", "ModuleSpec", "lora_scale", "module_key",
    "LoLError", "LoRAFormatError", "SpecMismatchError", "CollectionError",
    "read_lora", "save_peft", "save_diffusers", "detect_format", "open_collection", "write_collection", "Collection",
]
