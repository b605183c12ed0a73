"""Private helpers for the model tests: tiny random LoRAs and a synthetic GL-invariant task (no files needed)."""
from __future__ import annotations

import torch

from lol.batch import LoRABatch
from lol.lora import LoRA, LoRAModule, ModuleSpec
from lol.symmetry import gl_act, random_gl_like

SPEC = ModuleSpec(("down.attn1.to_q", "down.attn1.to_v", "mid.attn2.to_q", "mid.attn2.to_v"),
                  ((12, 10), (12, 10), (16, 12), (16, 9)))


def random_lora(spec=SPEC, rank=3, seed=0, dtype=torch.float64, source=None) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    ranks = [rank] * len(spec) if isinstance(rank, int) else list(rank)
    mods = [LoRAModule(n, torch.randn(o, r, generator=g, dtype=dtype), torch.randn(i, r, generator=g, dtype=dtype),
                       alpha=float(r), scale=1.0) for n, (o, i), r in zip(spec.names, spec.shapes, ranks)]
    return LoRA.from_modules(mods, format="synthetic", source=source)


def random_batch(n=5, spec=SPEC, rank=3, seed=0, dtype=torch.float64, mixed=False) -> LoRABatch:
    """``mixed``: every module of every LoRA gets a random rank in 1..rank (zero-padded batch)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    loras = []
    for b in range(n):
        r = torch.randint(1, rank + 1, (len(spec),), generator=g).tolist() if mixed else rank
        loras.append(random_lora(spec, r, seed=seed * 1000 + b, dtype=dtype))
    if mixed:  # make sure the padded width is `rank` everywhere
        loras[0] = random_lora(spec, rank, seed=seed * 1000, dtype=dtype)
    return LoRABatch.from_loras(loras, spec, dtype=dtype)


def synthetic_task(n=600, spec=SPEC, rank=4, seed=0, latent=3):
    """LoRAs driven by a few hidden factors (like finetunes of one base model), with two GL-invariant labels.

    Per module, U = U₀ + ½ Σ_k z_k U_k and V = V₀ + 0.1·noise with fixed (U₀, V₀, U_k) and per-LoRA z ~ N(0, I_latent).
    * ``energy``: log ‖ΔW_0‖_F + log σ₁(ΔW_2) (a function of singular values);
    * ``probe``: aᵀ ΔW_1 b for fixed directions a, b (direction-dependent, not a function of singular values).
    Each LoRA is then stored as a random GL(r) transform of its factors (cond 8), so a model reading raw
    coordinates sees a symmetry-scrambled input while every label depends on ΔW only.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent, 1, 1, generator=g, dtype=torch.float64)
    Us, Vs = [], []
    for o, i in spec.shapes:
        U0 = torch.randn(o, rank, generator=g, dtype=torch.float64)
        Uk = torch.randn(latent, o, rank, generator=g, dtype=torch.float64)
        V0 = torch.randn(i, rank, generator=g, dtype=torch.float64)
        Us.append((U0 + 0.5 * (z * Uk).sum(1)) / o ** 0.5)
        Vs.append((V0 + 0.1 * torch.randn(n, i, rank, generator=g, dtype=torch.float64)) / i ** 0.5)
    batch = LoRABatch(spec, Us, Vs, torch.full((n, len(spec)), rank, dtype=torch.long))
    a = torch.randn(spec.shapes[1][0], generator=g, dtype=torch.float64)
    bb = torch.randn(spec.shapes[1][1], generator=g, dtype=torch.float64)
    d0 = torch.linalg.matrix_norm(Us[0] @ Vs[0].mT)
    s2 = torch.linalg.matrix_norm(Us[2] @ Vs[2].mT, ord=2)
    energy = torch.log(d0) + torch.log(s2)
    probe = torch.einsum("o,bor,bir,i->b", a, Us[1], Vs[1], bb)
    batch = gl_act(batch, random_gl_like(batch, seed + 7, cond=8.0))
    return batch.to(dtype=torch.float32), {"energy": energy.float().numpy(), "probe": probe.float().numpy()}


def synth_grid(d, synth, task: str, kinds=("svals", "dense", "glnet", "mlp"), seeds=(0, 1), epochs: int = 4):
    """``synth`` (a `lol.synth.SynthSet`) written to ``d / "synth"`` and ``kinds`` trained on its ``task`` by
    `lol.experiments.run_grid` (width 16, ``epochs`` epochs, checkpoints under ``d / "runs"``). → (collection, grid)."""
    from lol import experiments as X
    from lol.collection import open_collection
    from lol.train import TrainConfig

    synth.write(d / "synth")
    coll = open_collection(d / "synth")
    grid = X.run_grid({"synth": coll}, [X.TaskRef("synth", task)], models=kinds, seeds=seeds,
                      config=TrainConfig(epochs=epochs, patience=epochs, progress=False, width=16),
                      runs_dir=d / "runs", log=None)
    return coll, grid
