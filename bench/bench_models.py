"""Inference throughput and peak memory of every LoL model on SD-1.x-shaped rank-4 LoRAs, side by side, plus this
machine's fp32 matmul rate measured in the same run (``python -m bench models``; options after ``--``).

Setup: the 64 UNet ``to_q``/``to_v`` modules of SD 1.x (dims 320/640/1280, cross-attention ``to_v`` in = 768), random
rank-4 factors, float32, inference (``torch.no_grad``), on CUDA when present else CPU. Each model runs in its own
subprocess so its peak memory (CPU: process max RSS; CUDA: max allocated) is its own.

GL-net is also stated against the FLOP ceiling: its first equivariant layer costs ``2·h·Σ(n+m)·r`` FLOP per LoRA
(51 MFLOP at h = 64), so ``ceiling = matmul GFLOP/s / first-layer FLOP`` LoRAs/s. Goals (from the issue): GL-net
≥ 35 % of that ceiling and ≥ 50× the dense-ΔW model. ``glnet`` has the paper's flat head (L·h² products into the MLP,
whose first Linear alone costs 2·L·h²·width FLOP, 34 MFLOP at h = width = 64); ``glnet_sketch`` is the same network
with the invariant sketch head (``head_channels``, default 16: L·s² products). ``glnet_loop`` is GL-net with its first
layer run as a naive loop over modules and its head on the materialized products, for reference; its outputs are
checked to match.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

WIDE = ("dense", "colspace")   # Σ n·m (dense ΔW) or Σ n² (column-space projectors) inputs: --dense-width/-batch
VARIANTS = ("glnet_sketch", "glnet_loop")  # GL-net timing variants of this bench, beside the registry's kinds


def kinds() -> tuple[str, ...]:
    """Every kind of the model registry (the one list), then this bench's GL-net variants."""
    from lol.models import MODELS

    return (*MODELS, *VARIANTS)


def _spec():
    from lol.synth import sd15_unet_qv_spec
    return sd15_unet_qv_spec()


def _batch(spec, n, rank, seed, device):
    import torch
    from lol.batch import LoRABatch
    g = torch.Generator().manual_seed(seed)
    U = [torch.randn(n, o, rank, generator=g) * 0.01 for o, _ in spec.shapes]
    V = [torch.randn(n, i, rank, generator=g) / i ** 0.5 for _, i in spec.shapes]
    return LoRABatch(spec, U, V, torch.full((n, len(spec)), rank, dtype=torch.long)).to(device=device)


def matmul_gflops(device, n=2048, seconds=1.0) -> float:
    """fp32 GFLOP/s of an n×n @ n×n matmul on ``device`` (best of repeated timings)."""
    import torch
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    _sync(device)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def _sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def glnet_loop_forward(model, batch):
    """GL-net with the first layer as a plain per-module loop and the head on the materialized (B, L·h²) products
    (reference for the grouped first layer and the chunked head)."""
    import torch
    inp = model.input
    phi = {ell: inp.phi[g][k] for g, (_, idx) in enumerate(inp.u_groups) for k, ell in enumerate(idx)}
    psi = {ell: inp.psi[g][k] for g, (_, idx) in enumerate(inp.v_groups) for k, ell in enumerate(idx)}
    HU = torch.stack([torch.matmul(phi[ell], U).mT for ell, U in enumerate(batch.U)])   # (L, B, r, h)
    HV = torch.stack([torch.matmul(psi[ell], V).mT for ell, V in enumerate(batch.V)])
    for layer in model.hidden:
        HU, HV = layer(*model.gate(HU, HV))
    if model.sketch is not None:
        HU, HV = model.sketch(HU, HV)
    return model.head(model.trunk(model.inv(HU, HV)))


def child(args) -> dict:
    import torch
    from lol.models import build_model
    device = torch.device(args.device)
    spec = _spec()
    kind = "glnet" if args.kind.startswith("glnet") else args.kind
    hp = {"width": args.width}
    if kind in WIDE:
        hp["width"] = args.dense_width
    if kind == "glnet":
        hp.update(channels=args.channels, depth=args.depth)
    if args.kind == "glnet_sketch":
        hp.update(head_channels=args.head_channels)
    torch.manual_seed(0)
    model = build_model(kind, spec, 1, **hp)
    n = args.dense_batch if kind in WIDE else args.batch
    with torch.no_grad():
        model.fit(_batch(spec, 8, args.rank, 1, "cpu"))
    model.to(device).eval()
    x = _batch(spec, n, args.rank, 2, device)
    fwd = (lambda b: glnet_loop_forward(model, b)) if args.kind == "glnet_loop" else model
    with torch.no_grad():
        y = fwd(x)
        if args.kind == "glnet_loop":
            err = float((y - model(x)).abs().max() / y.abs().max())
            assert err < 1e-4, f"glnet_loop disagrees with glnet: {err}"
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, t_end = [], time.perf_counter() + args.seconds
        while time.perf_counter() < t_end or len(times) < 2:
            t = time.perf_counter()
            fwd(x)
            _sync(device)
            times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    params = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    best = min(times)
    out = {"kind": args.kind, "batch": n, "loras_per_s": n / best, "ms_per_batch": best * 1e3,
           "peak_mem_mb": peak / 2**20, "weights_mb": params / 2**20, "hparams": model.config()}
    if kind == "glnet":
        out["first_layer_flop_per_lora"] = model.input.flops_per_lora(spec, args.rank)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench models")
    p.add_argument("--kinds", default=",".join(kinds()))
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=64, help="LoRAs per forward pass")
    p.add_argument("--dense-batch", type=int, default=4,
                   help="LoRAs per pass for the dense and colspace models (187 MB of features each)")
    p.add_argument("--dense-width", type=int, default=4,
                   help="MLP width of the dense and colspace models (first layer: ~47M × width weights)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--head-channels", type=int, default=16, help="sketch width s of glnet_sketch")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--seconds", type=float, default=2.0, help="timing budget per model")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the matmul ceiling and every model (default: torch's choice); "
                        "1 is steadier on a shared machine, where a parallel op waits for a busy core")
    p.add_argument("--child", dest="kind", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    from lol.devices import default_device

    args.device = default_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kind:
        print(json.dumps(child(args)))
        return 0

    spec = _spec()
    gflops = matmul_gflops(args.device)
    print(f"device {args.device} ({torch.get_num_threads()} threads); SD-1.x q/v spec: {len(spec)} modules, "
          f"Σ(n+m) = {spec.total_out_plus_in}, Σ n·m = {spec.total_dense}; rank {args.rank}")
    print(f"fp32 matmul (2048²): {gflops:.1f} GFLOP/s")
    rows = []
    passthrough = ["--device", args.device, "--batch", str(args.batch), "--dense-batch", str(args.dense_batch),
                   "--dense-width", str(args.dense_width), "--width", str(args.width), "--channels",
                   str(args.channels), "--depth", str(args.depth), "--head-channels", str(args.head_channels),
                   "--rank", str(args.rank), "--threads", str(torch.get_num_threads()), "--seconds",
                   str(args.seconds)]
    for kind in args.kinds.split(","):
        r = subprocess.run([sys.executable, "-m", "bench.bench_models", *passthrough, "--child", kind],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            print(f"{kind:18s} FAILED: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        x = rows[-1]
        print(f"{kind:18s} {x['loras_per_s']:10.1f} LoRAs/s  batch {x['batch']:3d}  {x['ms_per_batch']:9.1f} ms/batch"
              f"  peak mem {x['peak_mem_mb']:8.0f} MB  weights {x['weights_mb']:7.1f} MB", flush=True)
    by = {x["kind"]: x for x in rows}
    for name in ("glnet", "glnet_sketch"):
        if name not in by:
            continue
        g = by[name]
        ceiling = gflops * 1e9 / g["first_layer_flop_per_lora"]
        print(f"{name}: first layer {g['first_layer_flop_per_lora'] / 1e6:.1f} MFLOP/LoRA → ceiling {ceiling:.0f} "
              f"LoRAs/s; reaches {g['loras_per_s']:.0f} = {100 * g['loras_per_s'] / ceiling:.0f}% of it (goal ≥ 35%)")
        if "dense" in by:
            print(f"{name} / dense-ΔW model: {g['loras_per_s'] / by['dense']['loras_per_s']:.0f}× (goal ≥ 50×)")
    if "glnet" in by and "glnet_loop" in by:
        print(f"glnet / per-module loop: {by['glnet']['loras_per_s'] / by['glnet_loop']['loras_per_s']:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
