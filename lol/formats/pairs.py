"""Turning a file's named tensors into `LoRAModule`s: pairing by key name, never by position.

Each format reader classifies every key as the *down* factor ``A`` (r × in, or r × in × kh × kw for a conv LoRA), the
*up* factor ``B`` (out × r, or out × r × 1 × 1) or a scalar ``alpha`` of one module, then calls `build_modules`. In LoL
notation (paper §1) ``U = s · B`` and ``V = Aᵀ`` with the kernel flattened into the input side, so ``ΔW = U Vᵀ``.
"""
from __future__ import annotations

import re
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import LoRAFormatError
from ..lora import LoRAModule
from .safetensors_file import FLOAT_DTYPES, all_finite_bytes

__all__ = ["Pair", "build_modules", "reject_non_lora", "unknown_keys_error", "peft_pattern_value"]

# keys that mark adapters which are not a plain low-rank pair (U, V)
_NOT_PLAIN = (  # (substring that must occur, exact pattern, what it is)
    ("hada_", re.compile(r"(^|[._])hada_"), "LoHa adapter (LyCORIS or PEFT LOHA; hada_*: Hadamard product of two low-rank "
                                                        "pairs)"),
    ("lokr_", re.compile(r"(^|[._])lokr_"), "LoKr adapter (LyCORIS or PEFT LOKR; lokr_*: Kronecker-product factors)"),
    ("magnitude", re.compile(r"lora_magnitude_vector"), "DoRA (a learned magnitude vector rescales W + ΔW)"),
    ("dora_scale", re.compile(r"(^|[._])dora_scale"), "DoRA (a learned magnitude vector rescales W + ΔW)"),
    (".lora_mid.", re.compile(r"\.lora_mid\.weight$"), "LyCORIS LoCon with a Tucker core (lora_mid)"),
    ("oft_", re.compile(r"(^|[._])oft_(blocks|diag|R|r|s)\b"), "OFT / BOFT adapter (a learned orthogonal matrix "
                                                              "multiplies W; no additive low-rank ΔW)"),
    ("boft_", re.compile(r"(^|[._])boft_[RS]\b"), "BOFT adapter (butterfly orthogonal finetuning; no additive "
                                                  "low-rank ΔW)"),
    ("ia3_l", re.compile(r"(^|[._])ia3_l\b"), "PEFT (IA)³ adapter (ia3_l: per-channel scaling vectors)"),
    ("on_input", re.compile(r"\.on_input$"), "LyCORIS (IA)³ adapter (per-channel scaling vectors)"),
    ("vera_lambda", re.compile(r"(^|[._])vera_lambda_[bd]\b"), "VeRA adapter (vera_lambda_*: learned vectors "
                                                               "scaling frozen shared random matrices)"),
    ("lora_E", re.compile(r"\.lora_E(\.|$)"), "AdaLoRA adapter (lora_E: learned singular values); read the PEFT "
                                              "folder with its adapter_config.json (peft_type ADALORA)"),
    (".diff", re.compile(r"\.diff(_b)?$"), "LyCORIS full module (.diff: a dense ΔW stored whole)"),
    (".a1.", re.compile(r"\.a1\.weight$"), "LyCORIS GLoRA adapter (a1/a2/b1/b2: generalized LoRA)"),
    ("_norm", re.compile(r"\.(w|b)_norm$"), "LyCORIS norm module (w_norm / b_norm: finetuned normalization)"),
    (":", re.compile(r"^[^.:]+:\d+:(up|down)$"), "cloneofsimo lora_diffusion file (modules numbered by position, e.g. "
                                                 "'unet:0:up', not named by module; lol pairs modules by name and "
                                                 "cannot place them; convert it to diffusers or kohya format)"),
    ("<", re.compile(r"^<[^>]+>$"), "cloneofsimo lora_diffusion file with textual-inversion embeddings (e.g. "
                                   "'<s1>'), not only a LoRA"),
)


def reject_non_lora(path, keys) -> None:
    """Raise a `LoRAFormatError` that says what the file is if its keys belong to an adapter type whose ΔW is not a
    named ``U Vᵀ`` (LyCORIS, DoRA, OFT/BOFT, (IA)³, VeRA, AdaLoRA without its config, cloneofsimo files)."""
    found = _non_lora(tuple(keys))
    if found:
        what, hit = found
        article = "an" if what[:1].lower() in "aeiou" else "a"
        raise LoRAFormatError(path, f"this is {article} {what}, not a plain low-rank (lora_A, lora_B) adapter; "
                                    f"found e.g. {hit!r}. lol reads plain LoRA only")


@lru_cache(maxsize=256)  # the files of one base model share their key set: scanned once
def _non_lora(keys: tuple[str, ...]) -> tuple[str, str] | None:
    joined = "\n".join(keys)
    for needle, pattern, what in _NOT_PLAIN:
        if needle not in joined:  # a plain substring scan first; keys are only matched one by one on a hit
            continue
        hits = [k for k in keys if pattern.search(k)]
        if hits:
            return what, hits[0]
    return None


def unknown_keys_error(path, keys, fmt: str) -> LoRAFormatError:
    keys = sorted(keys)
    more = f" (and {len(keys) - 3} more)" if len(keys) > 3 else ""
    return LoRAFormatError(path, f"{len(keys)} key(s) not understood as {fmt} LoRA keys: "
                                 f"{', '.join(map(repr, keys[:3]))}{more}")


def peft_pattern_value(patterns: dict, name: str, default):
    """``rank_pattern`` / ``alpha_pattern`` lookup with peft's own rule: a pattern key matches a module name when
    ``re.match(rf"(.*\\.)?({key})$", name)`` succeeds; the first matching key in the dict's order wins."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


@dataclass
class Pair:
    """The tensors of one module as found in a file, with the keys they came from (for error messages)."""

    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    alpha: float | None = None
    keys: dict[str, str] = field(default_factory=dict)  # role -> key

    def set(self, role: str, key: str, value, path) -> None:
        if role in self.keys:
            raise LoRAFormatError(path, f"two keys give the same {role} factor: {self.keys[role]!r} and {key!r}")
        self.keys[role] = key
        if role == "alpha" and value.is_meta:  # shapes-only read: the value is not needed
            self.alpha = 1.0
        elif role == "alpha":
            if value.numel() != 1:
                raise LoRAFormatError(path, f"{key!r}: alpha must be a scalar, got shape {tuple(value.shape)}")
            alpha = float(value.reshape(()).double())
            if not torch.isfinite(torch.tensor(alpha)):
                raise LoRAFormatError(path, f"{key!r}: alpha is {alpha}")
            self.alpha = alpha
        else:
            setattr(self, role, value)


def _check_factor(path, key: str, t: torch.Tensor, finite_known: bool = False) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise LoRAFormatError(path, f"{key!r} has dtype {str(t.dtype).replace('torch.', '')}; LoRA factors must be "
                                    f"floating point (float16/bfloat16/float32/float64)")
    if t.is_meta or finite_known:
        return
    if not bool(torch.isfinite(t).all()):
        n = int((~torch.isfinite(t)).sum())
        raise LoRAFormatError(path, f"{key!r} contains {n} NaN/Inf value(s)")


def _all_finite(pairs) -> bool:
    """One vectorized NaN/Inf test over all factors of a file (per dtype), for tensors not read by
    `load_safetensors` (which tests the whole file in one pass)."""
    by_dtype: dict = {}
    for p in pairs.values():
        for t in (p.A, p.B):
            if t is not None and not t.is_meta and t.dtype in FLOAT_DTYPES:
                by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    for dtype, ts in by_dtype.items():
        flat = torch.cat(ts)
        if not all_finite_bytes(flat.detach().view(torch.uint8).numpy(), dtype):
            return False
    return True


def _fold_scale(B: torch.Tensor, scale: float, out_dtype: torch.dtype) -> torch.Tensor:
    """``U = scale · B`` in ``out_dtype``, computed in float32 or wider and rounded once."""
    if scale == 1.0:
        return B.to(out_dtype)
    if out_dtype == torch.float64:
        return B.double() * scale
    if B.dtype == out_dtype:  # torch computes 16-bit products in float32 and rounds once
        return B * scale
    if out_dtype.itemsize > B.dtype.itemsize:  # widening is exact; then one rounding of the product
        return B.to(out_dtype).mul_(scale)
    wide = torch.float64 if B.dtype == torch.float64 else torch.float32
    return (B.to(wide) * scale).to(out_dtype)  # narrowing (or float16 ↔ bfloat16): the product, then one rounding


def build_modules(path, pairs: dict[str, Pair], scale_of: Callable[[str, int, float | None], tuple[float, float]],
                  dtype: torch.dtype | None = None, all_finite: bool | None = None,
                  plan: list | None = None) -> list[LoRAModule]:
    """Check and convert every pair. ``scale_of(name, rank, file_alpha) -> (alpha, scale)`` is the format's rule.

    Factors are returned in float32 (float64 if the file is float64) unless ``dtype`` is given; the scale is folded
    into U only, computed in float32 or wider and rounded once to the output dtype. ``all_finite``: the result of a
    NaN/Inf test already done on all the tensors (`load_safetensors`), else it is done here; when False the per-key
    check names the culprit. ``plan``: a list that receives ``(A key, B key, alpha key or None)`` per module, in the
    order returned (`lol.formats.stacked` reads later files of the same layout with it).
    """
    modules = []
    if all_finite is None:
        all_finite = _all_finite(pairs)
    for name, p in pairs.items():
        if p.A is None or p.B is None:
            have, missing = ("A (down)", "B (up)") if p.B is None else ("B (up)", "A (down)")
            found = next(iter(p.keys.values()))
            raise LoRAFormatError(path, f"module {name!r}: found the {have} factor {found!r} but no {missing} factor")
        ka, kb = p.keys["A"], p.keys["B"]
        _check_factor(path, ka, p.A, all_finite)
        _check_factor(path, kb, p.B, all_finite)
        A, B = p.A, p.B
        kernel = None
        if A.ndim == 4 and B.ndim == 4:
            if tuple(B.shape[2:]) != (1, 1):
                raise LoRAFormatError(path, f"conv LoRA {kb!r} has shape {tuple(B.shape)}; expected (out, r, 1, 1)")
            kernel = tuple(int(k) for k in A.shape[2:])
            A2, B2 = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])
        elif A.ndim == 2 and B.ndim == 2:
            A2, B2 = A, B
        else:
            raise LoRAFormatError(path, f"module {name!r}: {ka!r} {tuple(A.shape)} and {kb!r} {tuple(B.shape)} are "
                                        f"not a (r × in, out × r) linear or (r × in × kh × kw, out × r × 1 × 1) conv pair")
        r = int(A2.shape[0])
        if int(B2.shape[1]) != r:
            raise LoRAFormatError(path, f"module {name!r}: rank mismatch, {ka!r} has shape {tuple(A.shape)} (rank "
                                        f"{r}) but {kb!r} has shape {tuple(B.shape)} (rank {int(B2.shape[1])})")
        if r == 0:
            raise LoRAFormatError(path, f"module {name!r}: rank 0")
        alpha, scale = scale_of(name, r, p.alpha)
        out_dtype = dtype or (torch.float64 if A.dtype == torch.float64 or B.dtype == torch.float64 else torch.float32)
        if B2.is_meta:  # shapes only: names, shapes and ranks are what counts
            U, V = B2, A2.T
        else:
            U, V = _fold_scale(B2, scale, out_dtype), A2.to(out_dtype).T
        modules.append(LoRAModule(name, U=U, V=V, alpha=float(alpha), scale=float(scale), kernel_shape=kernel))
        if plan is not None:
            plan.append((ka, kb, p.keys.get("alpha")))
    return modules
