"""diffusers single-file LoRAs (``pytorch_lora_weights.safetensors``).

Keys, all paired by module name (``<component>.<module>``, component ∈ unet, text_encoder, text_encoder_2,
transformer; a key without a component prefix belongs to the UNet):

* current: ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight``;
* legacy: ``.lora.down.weight`` / ``.lora.up.weight`` and ``.lora_linear_layer.down.weight`` / ``.up.weight``;
* oldest attention-processor layout: ``<block>.processor.to_q_lora.down.weight`` → module ``<block>.to_q``
  (``to_out_lora`` → ``to_out.0``).

Scale: a ``<module>.alpha`` key gives ``alpha / r``; otherwise diffusers' adapter metadata (``lora_adapter_metadata``
in the safetensors header, a peft LoraConfig per component) gives it by peft's rule; otherwise alpha = r (scale 1),
which is what diffusers applies.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import LoRAFormatError
from ..lora import LoRA
from .pairs import Pair, build_modules, reject_non_lora, unknown_keys_error
from .peft import config_scale_rule, factor_tensors, peft_config_for
from .safetensors_file import Loaded, load_safetensors

__all__ = ["read_diffusers", "save_diffusers", "COMPONENTS", "WEIGHT_NAME", "looks_like_diffusers"]

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?:(?P<new>lora_A|lora_B)\.weight|(?:lora|lora_linear_layer)\."
                     r"(?P<old>down|up)\.weight|(?P<alpha>alpha))$")
_PROCESSOR = re.compile(r"^(?P<block>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$")


# the suffixes of `_SUFFIX`, tested with str.endswith (no two can end the same key, so the result is the regex's)
_ENDINGS = ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora.down.weight", "A"), (".lora.up.weight", "B"),
            (".lora_linear_layer.down.weight", "A"), (".lora_linear_layer.up.weight", "B"), (".alpha", "alpha"))


@lru_cache(maxsize=1 << 16)  # keys repeat across the files of one base model
def parse_key(key: str) -> tuple[str, str] | None:
    """``(module name with component, role)`` of one diffusers key, role ∈ A, B, alpha; None if not a LoRA key."""
    if ".processor." in key and (m := _PROCESSOR.match(key)):
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return _with_component(f"{m['block']}.{proj}"), "A" if m["role"] == "down" else "B"
    for ending, role in _ENDINGS:
        if key.endswith(ending) and len(key) > len(ending):
            return _with_component(key[: -len(ending)]), role
    return None


def looks_like_diffusers(keys) -> bool:
    return any(k.split(".", 1)[0] in COMPONENTS or ".processor." in k for k in keys) and all(
        parse_key(k) is not None for k in keys)


def _with_component(module: str) -> str:
    return module if module.split(".", 1)[0] in COMPONENTS else f"unet.{module}"


def _metadata_configs(path, meta: dict) -> dict[str, dict]:
    raw = meta.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoRAFormatError(path, f"__metadata__[{METADATA_KEY!r}] is not valid JSON ({e})") from None
    out: dict[str, dict] = defaultdict(dict)
    for k, v in flat.items():
        comp, _, field = k.partition(".")
        if comp in COMPONENTS and field:
            out[comp][field] = v
    return {c: cfg for c, cfg in out.items() if "r" in cfg and "lora_alpha" in cfg}


def read_diffusers(path, dtype: torch.dtype | None = None, shapes_only: bool = False,
                   loaded: Loaded | None = None, plan: list | None = None) -> LoRA:
    """A diffusers file as a LoRA (see the module docstring); ``loaded``: the file already read by `read_lora`;
    ``plan``: see `build_modules`."""
    path = Path(path)
    loaded = loaded or load_safetensors(path, shapes_only, widen_to=dtype or torch.float32)
    tensors, meta = loaded.tensors, loaded.metadata
    reject_non_lora(path, tensors)
    pairs: dict[str, Pair] = {}
    unknown = []
    for key, t in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        name, role = parsed
        pairs.setdefault(name, Pair()).set(role, key, t, path)
    if unknown:
        hint = "; this looks like kohya format (lora_unet_…)" if any(k.startswith("lora_") for k in unknown) else ""
        err = unknown_keys_error(path, unknown, "diffusers")
        raise LoRAFormatError(path, err.problem + hint)
    if not pairs:
        raise LoRAFormatError(path, "no LoRA factors found")
    configs = _metadata_configs(path, meta)
    rules = {c: config_scale_rule(cfg, path) for c, cfg in configs.items()}

    def scale_of(name, rank, file_alpha):
        if file_alpha is not None:
            return file_alpha, file_alpha / rank
        comp, _, inner = name.partition(".")
        if comp in rules:
            return rules[comp](inner, rank, None)
        return float(rank), 1.0

    modules = build_modules(path, pairs, scale_of, dtype, all_finite=loaded.all_finite, plan=plan)
    return LoRA.from_modules(modules, format="diffusers", metadata=meta, source=str(path))


def save_diffusers(lora: LoRA, file, prefix: str = "unet", dtype: torch.dtype | None = None) -> Path:
    """Write one ``.safetensors`` file with current ``<component>.<module>.lora_A.weight`` / ``lora_B`` keys.

    Module names that do not start with a component get ``prefix``. Alpha is written faithfully as diffusers' own
    adapter metadata (per component: ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``), so
    `read_diffusers` and ``pipe.load_lora_weights`` both apply exactly ``ΔW = U Vᵀ``. A folder path gets
    ``pytorch_lora_weights.safetensors`` inside it.
    """
    from safetensors.torch import save_file

    file = Path(file)
    if file.is_dir() or not file.suffix:
        file = file / WEIGHT_NAME
    if prefix not in COMPONENTS:
        raise ValueError(f"prefix must be one of {COMPONENTS}, got {prefix!r}")
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    by_comp: dict[str, list] = defaultdict(list)
    for m in lora:
        full = m.name if m.name.split(".", 1)[0] in COMPONENTS else f"{prefix}.{m.name}"
        comp, _, inner = full.partition(".")
        A, B = factor_tensors(m, dtype)
        tensors[f"{full}.lora_A.weight"] = A
        tensors[f"{full}.lora_B.weight"] = B
        # pattern keys must be suffixes of the loaded model's module names; transformers >= 5 flattened
        # CLIPTextModel (no `text_model.`), and a name without it is a suffix of the old layout's names too
        if comp.startswith("text_encoder"):
            inner = inner.removeprefix("text_model.")
        by_comp[comp].append(replace(m, name=inner))
    flat = {}
    for comp, mods in by_comp.items():
        cfg = peft_config_for(LoRA.from_modules(mods))
        for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules"):
            flat[f"{comp}.{k}"] = cfg[k]
    meta = {k: v for k, v in (lora.metadata or {}).items() if isinstance(v, str) and k != METADATA_KEY}
    meta.update({"format": "pt", METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True)})
    save_file(tensors, str(file), metadata=meta)
    return file
