"""PEFT adapters: a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or legacy pickled
``adapter_model.bin``, read only with ``torch.load(weights_only=True)``).

Keys are ``base_model.model.<module>.lora_A.weight`` (r × in) and ``.lora_B.weight`` (out × r); the module name is the
key with the ``base_model.model.`` prefix and the factor suffix removed. Scale per module: ``alpha / r`` or, with
``use_rslora``, ``alpha / sqrt(r)``, where r and alpha come from ``rank_pattern`` / ``alpha_pattern`` by peft's own
matching rule (`peft_pattern_value`), else from ``r`` / ``lora_alpha``.

``fan_in_fan_out`` (GPT-2 ``Conv1D``) and embedding LoRAs: the factors themselves are stored as for ``nn.Linear``
(A: r × in, B: out × r), so ``U Vᵀ`` is the change of the layer's linear map; only the base *weight tensor* is stored
transposed (peft adds ``(B A)ᵀ`` to it). The reader keeps the factors as they are and the config says which layers.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from ..errors import LoRAFormatError
from ..lora import LoRA
from .pairs import Pair, build_modules, peft_pattern_value, reject_non_lora, unknown_keys_error
from .safetensors_file import load_safetensors

__all__ = ["read_peft", "save_peft", "peft_config_for", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+?)\.(?P<role>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                  r"(?:\.(?P<adapter>[A-Za-z0-9_-]+))?(?:\.weight)?$")


# what each other PEFT adapter type is, for the one-line refusal
PEFT_TYPES = {
    "IA3": "(IA)³: learned per-channel scaling vectors, no low-rank ΔW",
    "LOHA": "LoHa: ΔW is the Hadamard product of two low-rank products, not U Vᵀ",
    "LOKR": "LoKr: ΔW is a Kronecker product of factors, not U Vᵀ",
    "OFT": "OFT: W is multiplied by a learned orthogonal matrix, not changed by an additive low-rank ΔW",
    "BOFT": "BOFT: W is multiplied by a butterfly-factored orthogonal matrix, not changed by an additive low-rank ΔW",
    "VERA": "VeRA: frozen random matrices shared by all layers, scaled by learned vectors; the shared matrices are "
            "not in the adapter's weights",
    "VBLORA": "VB-LoRA: factors mixed from a shared vector bank",
    "PROMPT_TUNING": "soft prompt: learned virtual-token embeddings, no weight change",
    "PREFIX_TUNING": "prefix tuning: learned key/value prefixes, no weight change",
    "P_TUNING": "p-tuning: learned virtual-token embeddings from a prompt encoder, no weight change",
    "MULTITASK_PROMPT_TUNING": "multitask soft prompt, no weight change",
    "ADAPTION_PROMPT": "LLaMA-Adapter: learned adaption prompts with gated attention, no weight change",
    "LN_TUNING": "LayerNorm tuning: finetuned normalization weights, no low-rank ΔW",
    "FOURIERFT": "FourierFT: ΔW from learned spectral coefficients, not U Vᵀ",
    "HRA": "HRA: W multiplied by learned Householder reflections",
    "BONE": "Bone: block-affine weight change, not U Vᵀ",
    "MISS": "MiSS: shard-shared weight change, not U Vᵀ",
    "XLORA": "X-LoRA: a learned router mixing several LoRAs per token",
    "POLY": "Poly: a router over a LoRA inventory",
    "C3A": "C³A: circular-convolution weight change, not U Vᵀ",
    "RANDLORA": "RandLoRA: learned scalings of shared random full-rank bases",
    "SHIRA": "SHiRA: a sparse high-rank weight change",
    "TRAINABLE_TOKENS": "trainable tokens: new embedding rows, no low-rank ΔW",
}


def _read_config(folder: Path) -> dict:
    cfg_path = folder / CONFIG_NAME
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise LoRAFormatError(cfg_path, f"not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LoRAFormatError(cfg_path, "adapter config is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type not in ("LORA", "ADALORA"):
        what = PEFT_TYPES.get(peft_type, "an adapter type lol does not know")
        raise LoRAFormatError(cfg_path, f"this is a PEFT {peft_type} adapter ({what}), not a LoRA; lol reads "
                                        f"low-rank (lora_A, lora_B) adapters only (PEFT LORA and ADALORA)")
    if cfg.get("use_dora"):
        raise LoRAFormatError(cfg_path, "use_dora is true: DoRA rescales W + ΔW by a learned magnitude vector, so it "
                                        "is not a plain low-rank (lora_A, lora_B) adapter")
    for k in ("r", "lora_alpha"):
        if k not in cfg:
            raise LoRAFormatError(cfg_path, f"missing {k!r}")
    return cfg


def config_scale_rule(cfg: dict, path):
    """``scale_of(name, rank, file_alpha)`` for a peft LoraConfig dict (also used for diffusers' adapter metadata)."""
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}

    def scale_of(name: str, rank: int, file_alpha):
        r_cfg = int(peft_pattern_value(rank_pattern, name, cfg["r"]))
        if r_cfg != rank:
            raise LoRAFormatError(path, f"module {name!r} has rank {rank} in the weights but the config gives r="
                                        f"{r_cfg} (r / rank_pattern)")
        alpha = float(peft_pattern_value(alpha_pattern, name, cfg["lora_alpha"]))
        return alpha, alpha / (math.sqrt(rank) if rslora else rank)

    return scale_of


def _load_weights(folder: Path, shapes_only: bool = False, widen_to: torch.dtype | None = None):
    """``(tensors, metadata, path, all_finite)`` of the adapter weights (``all_finite`` None when not yet checked)."""
    st, legacy = folder / WEIGHTS_NAME, folder / LEGACY_WEIGHTS_NAME
    if st.is_file():
        tensors, meta, finite = load_safetensors(st, shapes_only, widen_to=widen_to)
        return tensors, meta, st, finite
    if legacy.is_file():
        try:
            sd = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- the unpickler's errors are many; all mean "not a plain tensor dict"
            raise LoRAFormatError(legacy, f"cannot be read as a plain tensor dict with torch.load(weights_only=True) "
                                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise LoRAFormatError(legacy, "does not hold a dict of tensors")
        return dict(sd), {}, legacy, None
    raise LoRAFormatError(folder, f"PEFT folder has {CONFIG_NAME} but neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")


def read_peft(folder, dtype: torch.dtype | None = None, shapes_only: bool = False) -> LoRA:
    folder = Path(folder)
    cfg = _read_config(folder)
    tensors, meta, wpath, finite = _load_weights(folder, shapes_only, widen_to=dtype or torch.float32)
    adalora = str(cfg.get("peft_type", "LORA")).upper() == "ADALORA"
    reject_non_lora(wpath, [k for k in tensors if not (adalora and _ADALORA_E.match(k))])
    pairs: dict[str, Pair] = {}
    singular: dict[str, torch.Tensor] = {}  # AdaLoRA's lora_E per module
    unknown, full = [], []
    for key, t in tensors.items():
        if adalora and (e := _ADALORA_E.match(key)):
            singular[_strip(e["module"])] = t
            continue
        m = _KEY.match(key)
        if not m:
            (full if is_full_weight_key(key) else unknown).append(key)
            continue
        role = "A" if m["role"].endswith("A") else "B"
        pairs.setdefault(_strip(m["module"]), Pair()).set(role, key, t, wpath)
    if unknown:
        raise unknown_keys_error(wpath, unknown, "PEFT")
    if not pairs:
        what = f"; it holds only full-weight tensors ({', '.join(map(repr, full[:3]))})" if full else ""
        raise LoRAFormatError(wpath, f"no lora_A / lora_B tensors found{what}")
    scale_rule = config_scale_rule(cfg, folder / CONFIG_NAME)
    if adalora:
        pairs, scale_rule = _adalora_pairs(wpath, pairs, singular, cfg, shapes_only)
    modules = build_modules(wpath, pairs, scale_rule, dtype, all_finite=finite)
    full_weights = tuple((_strip(k), tuple(int(d) for d in tensors[k].shape)) for k in full)
    return LoRA.from_modules(modules, format="peft", metadata=meta, config=cfg, source=str(folder),
                             full_weight_modules=full_weights)


def _strip(name: str) -> str:
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def is_full_weight_key(key: str) -> bool:
    """A tensor PEFT saves whole beside the LoRA pairs: ``modules_to_save`` copies (classifier / ``score`` heads,
    ``lm_head``, embeddings), biases trained with ``bias="all"|"lora_only"`` (``…base_layer.bias``), trainable-token
    deltas. Such keys have no segment that names a LoRA factor (``lora_*``)."""
    return not any(part.startswith("lora_") for part in key.split("."))


_ADALORA_E = re.compile(r"^(?P<module>.+?)\.lora_E(?:\.(?P<adapter>[A-Za-z0-9_-]+))?(?:\.weight)?$")


def _adalora_pairs(path, pairs: dict[str, Pair], singular: dict[str, torch.Tensor], cfg: dict, shapes_only: bool):
    """AdaLoRA stores ΔW in SVD-like form, ``ΔW = B · (A ⊙ E) · scaling / (ranknum + 1e-5)`` (peft's
    ``AdaLoraLayer.get_delta_weight``), with E (r × 1) the learned singular values, ``scaling = lora_alpha`` (or r when
    lora_alpha ≤ 0) and ``ranknum`` the module's rank as float32 (peft does not save it: always float(r)). That is
    exactly a LoRA with ``A' = A ⊙ E`` and scale ``scaling / (float32(r) + 1e-5)``."""
    for name, p in pairs.items():
        E = singular.pop(name, None)
        if E is None:
            raise LoRAFormatError(path, f"AdaLoRA module {name!r}: found {p.keys.get('A') or p.keys.get('B')!r} but "
                                        f"no lora_E (the singular values)")
        if p.A is not None and tuple(E.shape) != (int(p.A.shape[0]), 1):
            raise LoRAFormatError(path, f"AdaLoRA module {name!r}: lora_E has shape {tuple(E.shape)}, expected "
                                        f"({int(p.A.shape[0])}, 1) from lora_A {tuple(p.A.shape)}")
        if p.A is not None and not shapes_only:
            p.A = p.A * E.to(p.A.dtype)
    if singular:
        raise LoRAFormatError(path, f"AdaLoRA lora_E without lora_A / lora_B for module(s) {sorted(singular)[:3]}")
    alpha = float(cfg["lora_alpha"])

    def scale_of(name, rank, file_alpha):
        a = alpha if alpha > 0 else float(rank)
        ranknum = float(torch.tensor(float(rank), dtype=torch.float32) + 1e-5)  # float32, as peft computes it
        return a, a / ranknum

    return pairs, scale_of


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def peft_config_for(lora: LoRA) -> dict:
    """A LoraConfig dict that reproduces every module's rank and scale exactly.

    The common rank and alpha go to ``r`` / ``lora_alpha``; the others to ``rank_pattern`` / ``alpha_pattern`` keyed
    by full module names. If a module's scale is neither ``alpha / r`` (or ``alpha / sqrt(r)`` for all, rsLoRA), alpha
    is rewritten as ``scale · r`` so that ΔW stays exact.
    """
    mods = list(lora)
    rslora = all(math.isclose(m.scale, m.alpha / math.sqrt(m.rank), rel_tol=1e-6) for m in mods) and not all(
        math.isclose(m.scale, m.alpha / m.rank, rel_tol=1e-6) for m in mods)

    def alpha_of(m):
        want = m.scale * (math.sqrt(m.rank) if rslora else m.rank)
        return m.alpha if math.isclose(want, m.alpha, rel_tol=1e-6) else want

    ranks = {m.name: m.rank for m in mods}
    alphas = {m.name: alpha_of(m) for m in mods}
    r, a = _most_common(ranks.values()), _most_common(alphas.values())
    src = lora.config or {}
    return {
        "peft_type": "LORA",
        "task_type": src.get("task_type"),
        "base_model_name_or_path": src.get("base_model_name_or_path"),
        "r": r,
        "lora_alpha": a,
        "use_rslora": rslora,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != a},
        "target_modules": sorted(ranks),
        "fan_in_fan_out": bool(src.get("fan_in_fan_out", False)),
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }


def factor_tensors(m, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The file factors (A, B) of one module, conv kernels restored; ``B = U / scale`` computed in float64."""
    dtype = dtype or m.U.dtype
    A = m.V.T.to(dtype)
    B = (m.U.double() / m.scale).to(dtype) if m.scale != 1.0 else m.U.to(dtype)
    if m.kernel_shape is not None:
        A = A.reshape(m.rank, -1, *m.kernel_shape)
        B = B.reshape(m.out_features, m.rank, 1, 1)
    return A.contiguous(), B.contiguous()


def save_peft(lora: LoRA, folder, dtype: torch.dtype | None = None) -> Path:
    """Write a PEFT adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``) that `read_peft` and
    ``PeftModel.from_pretrained`` load with the same ΔW. Module names are written under ``base_model.model.``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m in lora:
        A, B = factor_tensors(m, dtype)
        tensors[f"{PREFIX}{m.name}.lora_A.weight"] = A
        tensors[f"{PREFIX}{m.name}.lora_B.weight"] = B
    meta = {k: v for k, v in (lora.metadata or {}).items() if isinstance(v, str)}
    meta["format"] = "pt"
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata=meta)
    (folder / CONFIG_NAME).write_text(json.dumps(peft_config_for(lora), indent=2, sort_keys=True))
    return folder
