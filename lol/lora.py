"""One LoRA representation: an ordered set of adapted modules, each with factors U, V such that ΔW = U Vᵀ.

A LoRA file stores, per adapted linear layer, ``A`` (r × in), ``B`` (out × r) and a scale ``s`` (``alpha / r``, or
``alpha / sqrt(r)`` for rsLoRA). In LoL notation (paper §1)::

    U = s · B   ∈ R^{out × r}        V = Aᵀ ∈ R^{in × r}        ΔW = U Vᵀ

The scale is folded into exactly one factor (U). For a conv LoRA the kernel is flattened into the input side, so
``in_features = in_channels · kh · kw`` and ``kernel_shape`` remembers ``(kh, kw)``.

The symmetry: for any invertible R ∈ GL(r), ``(U, V) ↦ (U R, V R⁻ᵀ)`` leaves ΔW unchanged; a LoRA over L modules
carries one independent GL(r_ℓ) per module (see `lol.symmetry`).

Module names are matched to a `ModuleSpec` in one place, `match_names` (`ModuleSpec.match` / `align`): the exact key
first, then the key without a pipeline component prefix (``unet.``, ...), one to one, ambiguity refused.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Iterable, Iterator, Mapping

import torch

__all__ = ["LoRAModule", "LoRA", "ModuleSpec", "lora_scale", "module_key", "match_names", "split_component",
           "NameMatch", "COMPONENTS"]


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor a LoRA applies to ``B A``: ``alpha / r`` (PEFT default) or ``alpha / sqrt(r)`` (rsLoRA)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


@lru_cache(maxsize=1 << 16)  # names repeat across the LoRAs of one base model
def module_key(name: str) -> str:
    """Format-independent identity of a module name: dots and underscores are the same separator.

    kohya writes ``lora_unet_down_blocks_0_..._to_q`` where diffusers writes ``unet.down_blocks.0....to_q``;
    both give the same key. Modules are matched by name, never by position: see `match_names`.
    """
    return re.sub(r"[._]+", "_", name).strip("_").lower()


@dataclass(frozen=True)
class LoRAModule:
    """One adapted layer: ``ΔW = U Vᵀ`` with U (out × r, scale folded in) and V (in × r)."""

    name: str
    U: torch.Tensor
    V: torch.Tensor
    alpha: float
    scale: float
    kernel_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.U.ndim != 2 or self.V.ndim != 2:
            raise ValueError(f"module {self.name!r}: U and V must be 2-D, got {tuple(self.U.shape)} and "
                             f"{tuple(self.V.shape)}")
        if self.U.shape[1] != self.V.shape[1]:
            raise ValueError(f"module {self.name!r}: U {tuple(self.U.shape)} and V {tuple(self.V.shape)} "
                             f"disagree on the rank")

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.U.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.V.shape[0])

    @property
    def key(self) -> str:
        return module_key(self.name)

    @property
    def B(self) -> torch.Tensor:
        """The file's up factor (out × r), scale taken back out."""
        return self.U / self.scale

    @property
    def A(self) -> torch.Tensor:
        """The file's down factor (r × in)."""
        return self.V.T

    def delta(self) -> torch.Tensor:
        """The dense weight change ΔW = U Vᵀ (out × in). Costs O(out · in); features avoid it."""
        return self.U @ self.V.T

    def delta_norm(self) -> float:
        """‖U Vᵀ‖_F computed in O((out + in) r²) from the r × r Gram matrices, never forming ΔW."""
        U, V = self.U.double(), self.V.double()
        return float(torch.sqrt(torch.clamp(((U.T @ U) * (V.T @ V)).sum(), min=0.0)))

    def with_factors(self, U: torch.Tensor, V: torch.Tensor) -> "LoRAModule":
        return replace(self, U=U, V=V)

    def to(self, *args, **kwargs) -> "LoRAModule":
        return replace(self, U=self.U.to(*args, **kwargs), V=self.V.to(*args, **kwargs))


@dataclass(frozen=True)
class ModuleSpec:
    """The weight space a LoRA lives in: module names and (out, in) shapes, in order. Ranks are not part of it."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]

    def __post_init__(self):
        if len(self.names) != len(self.shapes):
            raise ValueError("ModuleSpec: names and shapes differ in length")

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(module_key(n) for n in self.names)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def total_out_plus_in(self) -> int:
        """Σ(n + m): the size of one rank-1 slice of the factors."""
        return sum(o + i for o, i in self.shapes)

    @property
    def total_dense(self) -> int:
        """Σ n·m: the number of entries of all ΔW."""
        return sum(o * i for o, i in self.shapes)

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_json(cls, d: Mapping) -> "ModuleSpec":
        return cls(tuple(d["names"]), tuple((int(o), int(i)) for o, i in d["shapes"]))

    def match(self, lora: "LoRA", what: str = "the model") -> list[LoRAModule]:
        """The LoRA's modules in this spec's order, matched by name (never by position; see `match_names`).

        Raises `SpecMismatchError` naming the missing, unexpected, ambiguous or mis-shaped modules."""
        from .errors import SpecMismatchError

        mods = list(lora)
        if tuple(m.name for m in mods) == self.names and all(
                (m.out_features, m.in_features) == s for m, s in zip(mods, self.shapes)):
            return mods  # the same names in the same order: nothing to match
        found = match_names(self.names, [m.name for m in mods])
        wrong = []
        for i, j in enumerate(found.index):
            if j is not None:
                m, (o, n) = mods[j], self.shapes[i]
                if (m.out_features, m.in_features) != (o, n):
                    wrong.append(f"{m.name} is {m.out_features}×{m.in_features}, expected {o}×{n}")
        if found.ok and not wrong:
            return [mods[j] for j in found.index]
        src = f"{lora.source}: " if lora.source else ""
        raise SpecMismatchError(f"{src}LoRA does not match the base model of {what}: "
                                + "; ".join(found.problems() + (["shape mismatch: " + "; ".join(wrong[:3])]
                                                                if wrong else [])))

    def check(self, lora: "LoRA", what: str = "the model") -> None:
        """Raise `SpecMismatchError` naming the differences between this spec and a LoRA's modules (`match`)."""
        self.match(lora, what)

    def align(self, other: "ModuleSpec", what: str = "the other spec") -> list[int]:
        """``index[i]``: the position in ``other`` of this spec's module ``i`` (same matching rule as `match`).

        Raises `SpecMismatchError` when the module sets differ, are ambiguous, or a matched shape differs."""
        from .errors import SpecMismatchError

        found = match_names(self.names, other.names)
        wrong = [f"{other.names[j]} is {other.shapes[j][0]}×{other.shapes[j][1]}, expected {s[0]}×{s[1]}"
                 for j, s in zip(found.index, self.shapes) if j is not None and tuple(other.shapes[j]) != tuple(s)]
        if found.ok and not wrong:
            return list(found.index)
        raise SpecMismatchError(f"{what} does not match this spec: "
                                + "; ".join(found.problems() + (["shape mismatch: " + "; ".join(wrong[:3])]
                                                                if wrong else [])))


# ------------------------------------------------------------------------------------------ matching module names

# A leading name segment that says which model of a pipeline a module belongs to. PEFT adapters saved from the
# component itself omit it ("down_blocks.0....to_q"); diffusers and kohya files carry it ("unet.down_blocks...").
# Only pipeline component names: a model's own top-level segments (T5's ``encoder.`` / ``decoder.``) are never removed.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
# PEFT's wrapper prefix: says nothing about the component
WRAPPERS = ("base_model.model.",)


@lru_cache(maxsize=1 << 16)
def split_component(name: str) -> tuple[str | None, str]:
    """``(component or None, key of the rest)``: ``"unet.down_blocks.0.attn1.to_q"`` → ``("unet",
    "down_blocks_0_attn1_to_q")``; ``"base_model.model.x"`` → ``(None, "x")``. Split on the dotted name (not the
    key), so a module such as ``transformer_blocks.0...`` keeps its first segment."""
    for w in WRAPPERS:
        if name.startswith(w):
            name = name[len(w):]
    head, dot, rest = name.partition(".")
    if dot and head in COMPONENTS:
        return head, module_key(rest)
    return None, module_key(name)


@dataclass(frozen=True)
class NameMatch:
    """The result of `match_names`: ``index[i]`` is the position in ``have`` of ``want[i]``, or None.

    ``ambiguous`` holds one ``(name, candidates)`` per name that had two or more candidates on the other side;
    those names are neither matched nor counted as missing / unexpected."""

    want: tuple[str, ...]
    have: tuple[str, ...]
    index: tuple[int | None, ...]
    ambiguous: tuple[tuple[str, tuple[str, ...]], ...] = ()
    involved: frozenset = frozenset()  # ("want", i) / ("have", j) of every name in an ambiguity

    @property
    def missing(self) -> list[str]:
        return [w for i, (w, j) in enumerate(zip(self.want, self.index))
                if j is None and ("want", i) not in self.involved]

    @property
    def extra(self) -> list[str]:
        used = set(self.index)
        return [h for j, h in enumerate(self.have) if j not in used and ("have", j) not in self.involved]

    @property
    def ok(self) -> bool:
        return all(j is not None for j in self.index) and len(self.have) == len(self.want) and not self.ambiguous

    def problems(self) -> list[str]:
        parts = []
        missing, extra = self.missing, self.extra
        if missing:
            parts.append(f"{len(missing)} module(s) missing (e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} unexpected module(s) (e.g. {', '.join(extra[:3])})")
        if self.ambiguous:
            lines = [f"{n!r} could be any of {', '.join(map(repr, c))}" for n, c in self.ambiguous[:3]]
            parts.append(f"{len(self.ambiguous)} ambiguous module name(s), not guessed: {'; '.join(lines)}")
        return parts


def match_names(want: Iterable[str], have: Iterable[str]) -> NameMatch:
    """Match module names one to one; the single home of name matching (used by `ModuleSpec.match` / `align`).

    1. exact: equal `module_key` (``.`` and ``_`` alike, so kohya and diffusers names agree);
    2. for what is left: equal key once a leading component (`COMPONENTS`: ``unet.``, ``transformer.``,
       ``text_encoder.``, ...) and PEFT's ``base_model.model.`` are removed on both sides, where the components
       agree or one side has none. A pair is accepted only when each name has exactly one candidate on the other
       side; a name with two or more candidates (SDXL's ``text_encoder.X`` and ``text_encoder_2.X`` against a bare
       ``X``) is reported as ambiguous and never guessed. Positions and shapes are never used to decide.
    """
    want, have = tuple(want), tuple(have)
    index: list[int | None] = [None] * len(want)
    ambiguous: list[tuple[str, tuple[str, ...]]] = []
    involved: set[tuple[str, int]] = set()

    def group(keys: dict[int, str]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, k in keys.items():
            out.setdefault(k, []).append(i)
        return out

    def settle(w_cands: dict[int, list[int]], h_cands: dict[int, list[int]]) -> None:
        """Accept the pairs that are each other's only candidate; record every name with several."""
        for i, c in w_cands.items():
            if len(c) == 1 and len(h_cands[c[0]]) == 1:
                index[i] = c[0]
            elif len(c) > 1:
                ambiguous.append((want[i], tuple(have[j] for j in c)))
                involved.update([("want", i)] + [("have", j) for j in c])
        for j, c in h_cands.items():
            if len(c) > 1:
                ambiguous.append((have[j], tuple(want[i] for i in c)))
                involved.update([("have", j)] + [("want", i) for i in c])

    # 1. exact keys
    wk = {i: module_key(n) for i, n in enumerate(want)}
    hk = {j: module_key(n) for j, n in enumerate(have)}
    w_by, h_by = group(wk), group(hk)
    settle({i: h_by.get(k, []) for i, k in wk.items()}, {j: w_by.get(k, []) for j, k in hk.items()})
    # 2. component prefix removed on both sides, for the names that found no exact key at all
    left_w = [i for i in wk if wk[i] not in h_by]
    left_h = [j for j in hk if hk[j] not in w_by]
    if left_w and left_h:
        ws = {i: split_component(want[i]) for i in left_w}
        hs = {j: split_component(have[j]) for j in left_h}
        w_in, h_in = group({i: ws[i][1] for i in left_w}), group({j: hs[j][1] for j in left_h})

        def fits(a: str | None, b: str | None) -> bool:
            return a == b or a is None or b is None

        settle({i: [j for j in h_in.get(ws[i][1], []) if fits(ws[i][0], hs[j][0])] for i in left_w},
               {j: [i for i in w_in.get(hs[j][1], []) if fits(ws[i][0], hs[j][0])] for j in left_h})
    return NameMatch(want, have, tuple(index), tuple(ambiguous), frozenset(involved))


@dataclass
class LoRA:
    """An ordered set of adapted modules plus where it came from.

    ``format`` is the source format (``"peft"``, ``"diffusers"``, ``"kohya"``, ``"synthetic"``, ...);
    ``metadata`` holds the file's string metadata (safetensors ``__metadata__``); ``config`` the PEFT config, if any.
    ``full_weight_modules``: ``(name, shape)`` of every tensor the file holds whole beside the LoRA pairs (PEFT
    ``modules_to_save`` such as classifier / ``score`` heads, ``lm_head``, embeddings; trained biases). They are
    listed, not read: a LoL model sees the low-rank modules only.
    """

    modules: dict[str, LoRAModule]
    format: str = "unknown"
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    source: str | None = None
    full_weight_modules: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @classmethod
    def from_modules(cls, modules: Iterable[LoRAModule], **kwargs) -> "LoRA":
        mods: dict[str, LoRAModule] = {}
        for m in modules:
            if m.name in mods:
                raise ValueError(f"duplicate module {m.name!r}")
            mods[m.name] = m
        return cls(mods, **kwargs)

    def __iter__(self) -> Iterator[LoRAModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, name: str) -> LoRAModule:
        return self.modules[name]

    @property
    def names(self) -> list[str]:
        return list(self.modules)

    @property
    def ranks(self) -> list[int]:
        return [m.rank for m in self]

    @property
    def spec(self) -> ModuleSpec:
        return ModuleSpec(tuple(self.modules), tuple((m.out_features, m.in_features) for m in self))

    def map(self, fn) -> "LoRA":
        """A new LoRA with ``fn(module) -> module`` applied to every module; provenance is kept."""
        return replace(self, modules={n: fn(m) for n, m in self.modules.items()})

    def to(self, *args, **kwargs) -> "LoRA":
        return self.map(lambda m: m.to(*args, **kwargs))

    def deltas(self) -> dict[str, torch.Tensor]:
        return {n: m.delta() for n, m in self.modules.items()}

    def num_parameters(self) -> int:
        return sum(m.U.numel() + m.V.numel() for m in self)

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks))
        full = f", full_weight_modules={len(self.full_weight_modules)}" if self.full_weight_modules else ""
        return (f"LoRA(format={self.format!r}, modules={len(self)}, ranks={ranks}{full}, "
                f"source={self.source!r})")
