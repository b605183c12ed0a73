"""Synthetic LoRAs with exactly known, GL-invariant ground-truth labels, over the module specs of real base models.

`random_lora` draws U = s·B, V = Aᵀ per module with a per-LoRA overall scale (log-uniform), a per-LoRA spectral
decay (component k scaled by k^-γ) and a planted direction: the first rank-1 component of every module is aligned
with fixed probe vectors (u_ℓ, v_ℓ) to a per-LoRA degree t ∈ [-1, 1]. Every label of `synth_collection` is a
function of the ΔW_ℓ = U_ℓ V_ℓᵀ alone, hence invariant to (U, V) ↦ (U R, V R⁻ᵀ) for every R ∈ GL(r):

* ``sv_energy`` (regression): mean over modules of log Σ_i σ_i(ΔW_ℓ) (log nuclear norm), singular values computed in
  O((n + m) r²) without forming ΔW (`lol.features.singular_values`);
* ``sv_high`` (binary): ``sv_energy`` above the collection's median (the threshold is in the label's description);
* ``probe`` (regression): mean over modules of u_ℓᵀ ΔW_ℓ v_ℓ / ‖ΔW_ℓ‖_F — depends on the *direction* of ΔW, which
  singular values alone do not see;
* ``probe_positive`` (binary): ``probe > 0``.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator, Sequence

import torch

from .features import singular_values
from .lora import LoRA, LoRAModule, ModuleSpec, lora_scale

__all__ = ["sd15_unet_qv_spec", "sd15_unet_attn_spec", "qwen2_1_5b_qv_spec",
           "sd15_cross_v_spec", "tiny_spec", "random_lora", "random_lora_batch",
           "synth_collection", "SynthSet", "singular_values", "probe_vectors", "spec_by_name", "SPECS"]

SD15_CROSS_DIM = 768


def sd15_unet_qv_spec() -> ModuleSpec:
    """Stable Diffusion 1.x UNet ``to_q`` / ``to_v`` of every transformer block (the paper's CelebA-LoRA layer set):
    16 blocks × {attn1, attn2} × {q, v} = 64 modules, in forward order. ``to_q`` maps dim → dim; ``attn1.to_v``
    dim → dim and ``attn2.to_v`` (cross-attention) 768 → dim, with dim 320 / 640 / 1280 by block."""
    blocks = []
    for i, d in enumerate((320, 640, 1280)):
        blocks += [(f"down_blocks.{i}.attentions.{j}", d) for j in range(2)]
    blocks.append(("mid_block.attentions.0", 1280))
    for i, d in zip((1, 2, 3), (1280, 640, 320)):
        blocks += [(f"up_blocks.{i}.attentions.{j}", d) for j in range(3)]
    names, shapes = [], []
    for block, d in blocks:
        for attn, v_in in (("attn1", d), ("attn2", SD15_CROSS_DIM)):
            base = f"unet.{block}.transformer_blocks.0.{attn}"
            names += [f"{base}.to_q", f"{base}.to_v"]
            shapes += [(d, d), (d, v_in)]
    return ModuleSpec(tuple(names), tuple(shapes))


def sd15_cross_v_spec() -> ModuleSpec:
    """The 16 cross-attention ``attn2.to_v`` modules of `sd15_unet_qv_spec` (768 → 320 / 640 / 1280), in forward
    order: an SD-1.x-shaped spec a quarter the size of the q/v one (Σ(n+m) = 24,768 against 99,648), for collections
    of 100k LoRAs that must fit a small disk (`bench scale`)."""
    full = sd15_unet_qv_spec()
    keep = [i for i, n in enumerate(full.names) if n.endswith("attn2.to_v")]
    return ModuleSpec(tuple(full.names[i] for i in keep), tuple(full.shapes[i] for i in keep))


def sd15_unet_attn_spec() -> ModuleSpec:
    """Every attention projection of the SD 1.x UNet's transformer blocks: ``to_q``, ``to_k``, ``to_v`` and
    ``to_out.0`` of ``attn1`` and ``attn2``, 16 blocks × 2 × 4 = 128 modules in forward order. Cross-attention
    ``to_k`` / ``to_v`` read the 768-wide text states (768 → dim); every other projection is dim → dim."""
    qv = sd15_unet_qv_spec()
    names, shapes = [], []
    for name, (d, _) in zip(qv.names[::4], qv.shapes[::4]):   # one attn1.to_q per block gives its dim
        block = name.rsplit(".attn1.", 1)[0]
        for attn, kv_in in (("attn1", d), ("attn2", SD15_CROSS_DIM)):
            for t in ("to_q", "to_k", "to_v", "to_out.0"):
                names.append(f"{block}.{attn}.{t}")
                shapes.append((d, kv_in if t in ("to_k", "to_v") else d))
    return ModuleSpec(tuple(names), tuple(shapes))


def qwen2_1_5b_qv_spec() -> ModuleSpec:
    """Qwen2-1.5B ``q_proj`` / ``v_proj`` of its 28 decoder layers (the paper's Qwen2-ARC layer set, 56 modules):
    ``q_proj`` 1536 → 1536, ``v_proj`` 1536 → 256 (2 key-value heads × head dim 128)."""
    names, shapes = [], []
    for i in range(28):
        names += [f"model.layers.{i}.self_attn.q_proj", f"model.layers.{i}.self_attn.v_proj"]
        shapes += [(1536, 1536), (256, 1536)]
    return ModuleSpec(tuple(names), tuple(shapes))


def tiny_spec() -> ModuleSpec:
    """Three small modules of different shapes (self-attention q, cross-attention v, a wider q) for fast tests."""
    return ModuleSpec(("unet.down.attn1.to_q", "unet.down.attn2.to_v", "unet.up.attn1.to_q"),
                      ((8, 8), (8, 6), (12, 12)))


SPECS = {"sd15": sd15_unet_qv_spec, "sd15_cross_v": sd15_cross_v_spec, "sd15_attn": sd15_unet_attn_spec,
         "qwen2_1_5b": qwen2_1_5b_qv_spec, "tiny": tiny_spec}


def spec_by_name(name: str) -> ModuleSpec:
    if name not in SPECS:
        raise ValueError(f"unknown spec {name!r}; choose from {', '.join(SPECS)}")
    return SPECS[name]()


@lru_cache(maxsize=8)
def probe_vectors(spec: ModuleSpec, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed unit probes (u_ℓ ∈ R^out, v_ℓ ∈ R^in) per module, float64, from ``seed`` and the module name only."""
    out = []
    for name, (o, i) in zip(spec.names, spec.shapes):
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        u, v = torch.randn(o, generator=g, dtype=torch.float64), torch.randn(i, generator=g, dtype=torch.float64)
        out.append((u / u.norm(), v / v.norm()))
    return out


def random_lora(spec: ModuleSpec, rank: int = 4, alpha: float | None = None, seed: int = 0,
                dtype: torch.dtype = torch.float32, log_scale: float | None = None, decay: float | None = None,
                probe_t: float | None = None, probe_seed: int = 1234) -> LoRA:
    """A random LoRA over ``spec`` (rank ``rank`` everywhere, ``alpha`` default = rank so scale 1).

    ``log_scale`` (overall log-magnitude, default U[-1.5, 1.5]), ``decay`` (γ, default U[0, 2]) and ``probe_t``
    (alignment of the first component with the probes, default U[-1, 1]) are drawn from ``seed`` unless given;
    they are stored in ``metadata``. Generation is float64 and cast to ``dtype``.
    """
    g = torch.Generator().manual_seed(int(seed))
    draw = torch.rand(3, generator=g, dtype=torch.float64)
    log_scale = float(3 * draw[0] - 1.5) if log_scale is None else float(log_scale)
    decay = float(2 * draw[1]) if decay is None else float(decay)
    probe_t = float(2 * draw[2] - 1) if probe_t is None else float(probe_t)
    alpha = float(rank) if alpha is None else float(alpha)
    s = lora_scale(alpha, rank)
    comp = torch.arange(1, rank + 1, dtype=torch.float64) ** (-decay)
    mods = []
    for (name, (o, i)), (u, v) in zip(zip(spec.names, spec.shapes), probe_vectors(spec, probe_seed)):
        A = torch.randn(rank, i, generator=g, dtype=torch.float64) / math.sqrt(i)
        B = torch.randn(o, rank, generator=g, dtype=torch.float64) / math.sqrt(o)
        # plant the direction: component 0 is |B0| (t u + sqrt(1 - t²) b⊥) ⊗ |A0| v
        b_perp = B[:, 0] - (B[:, 0] @ u) * u
        b_perp = b_perp / b_perp.norm()
        B[:, 0] = probe_t * u + math.sqrt(max(0.0, 1 - probe_t ** 2)) * b_perp
        A[0] = v
        module_scale = math.exp(log_scale + 0.25 * float(torch.randn(1, generator=g, dtype=torch.float64)))
        B = B * comp * module_scale / s  # so that U = s B carries the intended magnitude
        U = (s * B).to(dtype)
        mods.append(LoRAModule(name, U=U, V=A.T.contiguous().to(dtype), alpha=alpha, scale=s))
    meta = {"log_scale": f"{log_scale:.6f}", "decay": f"{decay:.6f}", "probe_t": f"{probe_t:.6f}", "seed": str(seed)}
    return LoRA.from_modules(mods, format="synthetic", metadata=meta, source=f"synthetic:{seed}")


def random_lora_batch(spec: ModuleSpec, n: int, rank: int = 4, seed: int = 0, dtype: torch.dtype = torch.float16,
                      probe_seed: int = 1234, labels: bool = True):
    """``n`` random LoRAs at once and their labels: `random_lora`'s distribution (overall log-scale U[-1.5, 1.5],
    spectral decay U[0, 2], probe alignment U[-1, 1], planted first component), drawn in float32 for the whole batch
    from one generator seeded with ``seed`` (so not `random_lora`'s draws, and deterministic for a given ``(n, seed)``).
    Thousands of LoRAs per second where `random_lora` makes tens: for collections of 10⁵ LoRAs.

    Returns ``(batch, table)``: a `LoRABatch` (factors rounded to ``dtype``) and a dict of numpy arrays with the
    generation parameters (``log_scale``, ``decay``, ``probe_t``) and the GL-invariant labels ``sv_energy`` and
    ``probe`` of `lora_labels`, computed in float64 from the factors *as rounded*, so they are exact for what is
    stored (``labels=False`` skips them: the same factors, faster). The batch holds U with the scale folded in
    (`LoRABatch.lora` gives alpha = rank, scale 1)."""
    from .batch import LoRABatch, rank_major

    g = torch.Generator().manual_seed(int(seed))
    draw = torch.rand(n, 3, generator=g, dtype=torch.float64)
    log_scale, decay, probe_t = 3 * draw[:, 0] - 1.5, 2 * draw[:, 1], 2 * draw[:, 2] - 1
    comp = torch.arange(1, rank + 1, dtype=torch.float64)[None, :] ** (-decay[:, None])  # (n, r)
    Us, Vs, nuclear, probe = [], [], [], []
    for (o, i), (u, v) in zip(spec.shapes, probe_vectors(spec, probe_seed)):
        A = torch.randn(n, i, rank, generator=g) / math.sqrt(i)          # V = Aᵀ directly: (n, in, r)
        B = torch.randn(n, o, rank, generator=g) / math.sqrt(o)
        u32, v32 = u.float(), v.float()
        b0 = B[:, :, 0]
        b_perp = b0 - (b0 @ u32)[:, None] * u32
        b_perp = b_perp / b_perp.norm(dim=1, keepdim=True)
        t = probe_t.float()[:, None]
        B[:, :, 0] = t * u32 + torch.sqrt(torch.clamp(1 - t * t, min=0.0)) * b_perp
        A[:, :, 0] = v32
        module_scale = torch.exp(log_scale + 0.25 * torch.randn(n, generator=g, dtype=torch.float64))
        B = B * (comp * module_scale[:, None]).float()[:, None, :]      # U (scale folded in, as `random_lora`)
        U, V = B.to(dtype), A.to(dtype)
        Us.append(U)
        Vs.append(V)
        if not labels:
            continue
        Ud, Vd = U.double(), V.double()
        nuclear.append(torch.log(singular_values(Ud, Vd, method="gram").sum(-1)))
        fro = torch.sqrt(torch.clamp(((Ud.mT @ Ud) * (Vd.mT @ Vd)).sum((-1, -2)), min=0.0))
        probe.append(((u @ Ud) * (v @ Vd)).sum(-1) / fro)
    ranks = torch.full((n, len(spec)), int(rank), dtype=torch.long)
    table = {"log_scale": log_scale.numpy(), "decay": decay.numpy(), "probe_t": probe_t.numpy()}
    if labels:
        table |= {"sv_energy": torch.stack(nuclear, 1).mean(1).numpy(), "probe": torch.stack(probe, 1).mean(1).numpy()}
    return LoRABatch(spec, [rank_major(U) for U in Us], [rank_major(V) for V in Vs], ranks), table


def lora_labels(lora: LoRA, spec: ModuleSpec, probes=None) -> dict[str, float]:
    """``sv_energy`` and ``probe`` of one LoRA (both functions of its ΔW only)."""
    probes = probes or probe_vectors(spec)
    nuclear, probe = [], []
    for m, (u, v) in zip(spec.match(lora, what="the label probes"), probes):
        U, V = m.U.double(), m.V.double()
        nuclear.append(math.log(float(singular_values(U, V).sum())))
        probe.append(float((u @ U) @ (V.T @ v)) / m.delta_norm())
    return {"sv_energy": sum(nuclear) / len(nuclear), "probe": sum(probe) / len(probe)}


LABELS = {
    "sv_energy": {"kind": "regression", "task": "spectrum",
                  "description": "mean over modules of log Σσᵢ(ΔW) (log nuclear norm); GL-invariant"},
    "sv_high": {"kind": "binary", "task": "spectrum", "description": "sv_energy > {thr:.4f} (the collection median)"},
    "probe": {"kind": "regression", "task": "direction",
              "description": "mean over modules of uᵀ ΔW v / ‖ΔW‖_F for fixed random unit probes u, v; GL-invariant"},
    "probe_positive": {"kind": "binary", "task": "direction", "description": "probe > 0"},
}


@dataclass
class SynthSet:
    """A synthetic collection, described by its seeds: ``table`` holds ids, generation parameters and labels;
    `loras` regenerates the LoRAs on demand (deterministic), `write` packs them."""

    spec: ModuleSpec
    table: "object"  # pandas.DataFrame
    labels: dict
    tasks: dict
    seeds: list[int]
    ranks: list[int]
    alpha: float | None
    label: str = "sv_energy"
    dtype: torch.dtype = torch.float32
    provenance: dict = field(default_factory=dict)

    def lora(self, i: int) -> LoRA:
        return random_lora(self.spec, self.ranks[i], self.alpha, self.seeds[i], dtype=self.dtype)

    def loras(self) -> Iterator[LoRA]:
        for i in range(len(self.seeds)):
            yield self.lora(i)

    def write(self, dest, dtype: torch.dtype = torch.float16, base_model: str | None = None, **kwargs):
        from .collection import write_collection

        return write_collection(dest, self.loras(), self.table, labels=self.labels, tasks=self.tasks,
                                base_model=base_model or "synthetic", dtype=dtype, spec=self.spec,
                                provenance=self.provenance, ranks=[[r] * len(self.spec) for r in self.ranks],
                                **kwargs)


def synth_collection(spec: ModuleSpec, n: int, ranks: Sequence[int] = (4,), seed: int = 0, label: str = "sv_energy",
                     alpha: float | None = None) -> SynthSet:
    """``n`` random LoRAs (rank drawn from ``ranks`` per LoRA) with their labels. ``label`` names the primary label
    (recorded in provenance; its task is listed first)."""
    import pandas as pd

    if label not in LABELS:
        raise ValueError(f"unknown label {label!r}; choose from {', '.join(LABELS)}")
    if n < 1:
        raise ValueError("n must be positive")
    g = torch.Generator().manual_seed(int(seed))
    seeds = torch.randint(0, 2**31 - 1, (n,), generator=g).tolist()
    rank_list = [int(ranks[j]) for j in torch.randint(0, len(ranks), (n,), generator=g).tolist()]
    probes = probe_vectors(spec)
    rows = []
    for i, (sd, r) in enumerate(zip(seeds, rank_list)):
        lora = random_lora(spec, r, alpha, sd)
        rows.append({"id": f"synth-{i:05d}", "source": f"synthetic:{sd}", "format": "synthetic", "rank": r,
                     "split": ("train", "train", "train", "train", "train", "train", "train", "train", "val",
                               "test")[zlib.crc32(f"{seed}:{i}".encode()) % 10],
                     **{k: float(v) for k, v in lora.metadata.items() if k != "seed"},
                     **lora_labels(lora, spec, probes)})
    table = pd.DataFrame(rows)
    thr = float(table["sv_energy"].median())
    table["sv_high"] = (table["sv_energy"] > thr).astype(int)
    table["probe_positive"] = (table["probe"] > 0).astype(int)
    labels = {k: dict(v) for k, v in LABELS.items()}
    labels["sv_high"]["description"] = labels["sv_high"]["description"].format(thr=thr)
    tasks = {"spectrum": ["sv_energy", "sv_high"], "direction": ["probe", "probe_positive"]}
    if LABELS[label]["task"] == "direction":
        tasks = {"direction": tasks["direction"], "spectrum": tasks["spectrum"]}
    prov = {"generator": "lol.synth.synth_collection", "seed": seed, "n": n, "ranks": list(ranks),
            "alpha": alpha, "primary_label": label, "sv_high_threshold": thr}
    return SynthSet(spec, table, labels, tasks, seeds, rank_list, alpha, label, provenance=prov)
