"""kohya-ss (sd-scripts) LoRAs, the format of most community files.

Keys: ``lora_unet_<module>.lora_down.weight`` (r × in, or r × in × kh × kw for a conv LoRA),
``.lora_up.weight`` (out × r, or out × r × 1 × 1) and an optional scalar ``.alpha``; a missing alpha means
alpha = r, so scale = alpha / r. Text encoders use ``lora_te_`` (``lora_te1_`` / ``lora_te2_`` for SDXL's two).
String metadata (``ss_*``, ``modelspec.*``) is kept on the LoRA.

Names: kohya writes a module path with every ``.`` replaced by ``_``. `kohya_to_module` undoes this with one rule:
the prefix becomes the component (``lora_unet_`` → ``unet.``, ``lora_te_``/``lora_te1_`` → ``text_encoder.``,
``lora_te2_`` → ``text_encoder_2.``), the rest is split at ``_`` and re-joined with ``.``, except that known compound
tokens of diffusers/transformers module names (`COMPOUND_TOKENS`, e.g. ``down_blocks``, ``to_q``, ``self_attn``,
``q_proj``) are kept whole, longest first. So ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``
→ ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``. A name with an unknown compound token comes out
with an extra dot; modules are matched everywhere by `lol.lora.module_key`, which treats ``.`` and ``_`` alike.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import LoRAFormatError
from ..lora import LoRA
from .pairs import Pair, build_modules, reject_non_lora, unknown_keys_error
from .safetensors_file import Loaded, load_safetensors

__all__ = ["read_kohya", "kohya_to_module", "module_to_kohya", "COMPOUND_TOKENS", "KOHYA_PREFIXES",
           "looks_like_kohya"]

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}
COMPONENT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
                    "text_encoder_3": "lora_te3_"}

COMPOUND_TOKENS = tuple(sorted({
    # diffusers UNet / transformer
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "single_transformer_blocks", "proj_in",
    "proj_out", "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding", "linear_1",
    "linear_2", "add_embedding", "ff_context", "proj_mlp", "norm1_context", "norm_out", "x_embedder",
    "context_embedder", "time_text_embed", "timestep_embedder", "guidance_embedder", "text_embedder",
    "pos_embed", "caption_projection",
    # original (SGM) SD UNet names
    "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "time_embed", "label_emb",
    # transformers text encoders (CLIP, T5)
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm", "layer_norm1",
    "layer_norm2", "token_embedding", "position_embedding", "text_projection", "relative_attention_bias",
}, key=lambda t: (-t.count("_"), t)))
_COMPOUND = [tuple(t.split("_")) for t in COMPOUND_TOKENS]
_KEY = re.compile(r"^(?P<module>lora_[a-z0-9]+_.+?)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha)$")


def looks_like_kohya(keys) -> bool:
    return bool(keys) and all(any(k.startswith(p) for p in KOHYA_PREFIXES) for k in keys)


@lru_cache(maxsize=1 << 16)  # names repeat across the files of one base model
def kohya_to_module(name: str) -> str:
    """``lora_unet_down_blocks_0_..._to_q`` → ``unet.down_blocks.0.....to_q`` (see the module docstring)."""
    for prefix in sorted(KOHYA_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix):
            component, rest = KOHYA_PREFIXES[prefix], name[len(prefix):]
            break
    else:
        raise ValueError(f"{name!r} has no kohya prefix ({', '.join(KOHYA_PREFIXES)})")
    tokens, out, i = rest.split("_"), [], 0
    while i < len(tokens):
        for comp in _COMPOUND:
            if tuple(tokens[i:i + len(comp)]) == comp:
                out.append("_".join(comp))
                i += len(comp)
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join([component, *out])


def module_to_kohya(name: str) -> str:
    """The inverse: ``unet.down_blocks.0...to_q`` → ``lora_unet_down_blocks_0_..._to_q``."""
    component, _, rest = name.partition(".")
    if component not in COMPONENT_PREFIX:
        component, rest = "unet", name
    return COMPONENT_PREFIX[component] + rest.replace(".", "_")


def read_kohya(path, dtype: torch.dtype | None = None, shapes_only: bool = False, loaded: Loaded | None = None,
               plan: list | None = None) -> LoRA:
    """A kohya file as a LoRA (see the module docstring); ``loaded``: the file already read by `read_lora`;
    ``plan``: see `build_modules`."""
    path = Path(path)
    loaded = loaded or load_safetensors(path, shapes_only, widen_to=dtype or torch.float32)
    tensors, meta = loaded.tensors, loaded.metadata
    reject_non_lora(path, tensors)
    pairs: dict[str, Pair] = {}
    unknown = []
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m or not any(m["module"].startswith(p) for p in KOHYA_PREFIXES):
            unknown.append(key)
            continue
        role = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}[m["role"]]
        pairs.setdefault(m["module"], Pair()).set(role, key, t, path)
    if unknown:
        raise unknown_keys_error(path, unknown, "kohya")
    if not pairs:
        raise LoRAFormatError(path, "no lora_down / lora_up tensors found")

    def scale_of(name, rank, file_alpha):
        alpha = float(rank) if file_alpha is None else file_alpha
        return alpha, alpha / rank

    modules = build_modules(path, pairs, scale_of, dtype, all_finite=loaded.all_finite, plan=plan)
    from dataclasses import replace

    modules = [replace(m, name=kohya_to_module(m.name)) for m in modules]
    return LoRA.from_modules(modules, format="kohya", metadata=meta, source=str(path))
