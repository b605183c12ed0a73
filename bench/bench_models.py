"""Inference throughput and peak memory of every LoL model on SD-1.x-shaped rank-4 LoRAs, side by side, plus this
machine's fp32 matmul rate measured in the same run (``python -m bench models``; options after ``--``).

Setup: the 64 UNet ``to_q``/``to_v`` modules of SD 1.x (dims 320/640/1280, cross-attention ``to_v`` in = 768), random
rank-4 factors, float32, inference (``torch.no_grad``), batches of 128, on CUDA when present else CPU, at each thread
count of ``--threads`` (default 1 and 2 on a CPU; GL-net and colsketch run one slice of the batch per thread,
`lol.models.parallel`). Each model runs in its own subprocess so its peak memory (CPU: process max
RSS; CUDA: max allocated) is its own.

Memory ceiling. Every model reads each LoRA's factors once, Σ(n+m)·r·4 bytes in float32 (1.6 MB per LoRA at SD-1.x q/v,
rank 4), so the rate at which this machine streams memory (measured in the same run: ``read GB/s``) bounds it too:
``memory ceiling = read GB/s / factor bytes per LoRA``; the roofline is the lower of the two ceilings.

FLOP ceiling. Models that count their FLOP (``flops_per_lora``: GL-net, its sketch-head variant, colsketch) are stated
against the ceiling of their **whole** forward pass — every matmul of every layer and the head, exactly as
`torch.utils.flop_counter.FlopCounterMode` counts them (checked in the tests), plus the small elementwise work —
``ceiling = matmul GFLOP/s of this run at this thread count / whole-pass FLOP per LoRA``. At h = width = 64 GL-net's
whole pass is ~91 MFLOP per LoRA: 51 in the first equivariant layer (2·h·Σ(n+m)·r), 34 in the flat head's first
Linear (2·L·h²·width), 4 in the hidden layer, 2 in the products. Goals (issue 10): GL-net ≥ 2,000 LoRAs/s on 2 threads
and ≥ 55 % of its whole-pass ceiling; colsketch at least GL-net's throughput. They are checked for both GL-nets
(`GOAL_MODELS`): ``glnet``, the paper's gated GL-net at h = width = 64, depth 2 (~91 MFLOP per LoRA; on a machine
whose 2-thread matmul rate is ~190 GFLOP/s its ceiling is ~2,100 LoRAs/s, so its two goals exclude each other), and
``glnet_default``, the shipped GL-net (the registry's defaults, what ``lol train --model glnet`` builds: h = 32,
width 64, depth 1, scale features; ~35 MFLOP per LoRA). ``glnet_sketch`` is GL-net with the invariant sketch head
(``head_channels``, default 16: L·s² products, ~59 MFLOP per LoRA); ``glnet_loop`` is GL-net with its first layer run
as a naive loop over modules and its head on the materialized products, for reference (its outputs are checked to
match).

Outputs: a table per thread count, and ``bench_models.csv`` / ``bench_models.md`` in ``--out`` (default ``results/``
on a CPU, ``results/gpu/`` on CUDA; ``--out ''`` writes nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WIDE = ("dense", "colspace")   # Σ n·m (dense ΔW) or Σ n² (column-space projectors) inputs: --dense-width/-batch
VARIANTS = ("glnet_sketch", "glnet_default", "glnet_loop")  # GL-net variants of this bench, beside the registry's


def kinds() -> tuple[str, ...]:
    """Every kind of the model registry (the one list), then this bench's GL-net variants."""
    from lol.models import MODELS

    return (*MODELS, *VARIANTS)


def _spec(name: str = "sd15"):
    from lol.synth import spec_by_name
    return spec_by_name(name)


def _batch(spec, n, rank, seed, device):
    import torch
    from lol.batch import LoRABatch, rank_major
    g = torch.Generator().manual_seed(seed)
    U = [torch.randn(n, o, rank, generator=g) * 0.01 for o, _ in spec.shapes]
    V = [torch.randn(n, i, rank, generator=g) / i ** 0.5 for _, i in spec.shapes]
    # in the layout `Collection.batch` gives the models (rank-major, `lol.batch`): what a user's batches look like
    return LoRABatch(spec, [rank_major(u) for u in U], [rank_major(v) for v in V],
                     torch.full((n, len(spec)), rank, dtype=torch.long)).to(device=device)


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


def read_gbps(device, mb: int = 512, repeats: int = 3) -> float:
    """GB/s at which this machine streams a ``mb`` MB fp32 tensor from memory (best of ``repeats`` full sums, far
    larger than any cache): the rate that bounds a model whose every input byte is read once."""
    import torch
    x = torch.ones(mb * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


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
    y = model.trunk(model.inv(HU, HV))
    if model.mix is not None:  # the default GL-net's scale features join after the trunk
        y = model.mix(torch.cat([y, model.inv.scale_features(HU, HV)], 1))
    return model.head(y)


def child(args) -> dict:
    import torch

    from bench.bench_scale import _peak_mb
    from lol.models import build_model
    device = torch.device(args.device)
    spec = _spec(args.spec)
    kind = "glnet" if args.kind.startswith("glnet") else args.kind
    hp = {"width": args.width}
    if kind in WIDE:
        hp["width"] = args.dense_width
    if kind == "glnet":
        hp.update(channels=args.channels, depth=args.depth)
    if args.kind == "glnet_sketch":
        hp.update(head_channels=args.head_channels)
    if args.kind == "glnet_default":
        hp = {}                     # the registry's defaults: what `lol train --model glnet` builds
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
    # CPU: the child's own VmHWM (ru_maxrss would also count the parent's peak before the fork: it survives exec)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_mb() * 2**20
    params = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    best = min(times)
    out = {"kind": args.kind, "threads": torch.get_num_threads(), "batch": n, "loras_per_s": n / best,
           "factor_bytes_per_lora": 4 * spec.total_out_plus_in * args.rank,   # U and V in float32, read once
           "ms_per_batch": best * 1e3, "peak_mem_mb": peak / 2**20, "weights_mb": params / 2**20,
           "hparams": model.config()}
    if hasattr(model, "flops_per_lora"):
        f = model.flops_per_lora(args.rank, batch=n) if kind == "colsketch" else model.flops_per_lora(args.rank)
        out["flop_per_lora"] = float(f["total"])
        out["matmul_flop_per_lora"] = float(f["matmul"])
    if kind == "glnet":
        out["first_layer_flop_per_lora"] = model.input.flops_per_lora(spec, args.rank)
    return out


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def _table(rows: list[dict]) -> list[str]:
    lines = ["| model | threads | batch | LoRAs/s | ms/batch | whole-pass MFLOP/LoRA | matmul GFLOP/s | ceiling LoRAs/s "
             "| % of ceiling | read GB/s | memory ceiling LoRAs/s | % of roofline | peak mem MB | weights MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        fl = x.get("flop_per_lora")
        lines.append(f"| {x['kind']} | {x['threads']} | {x['batch']} | {x['loras_per_s']:.1f} | {x['ms_per_batch']:.1f} "
                     f"| {fl / 1e6:.1f} | {x['matmul_gflops']:.1f} | {x['ceiling']:.0f} | {x['pct_of_ceiling']:.0f} %"
                     if fl else
                     f"| {x['kind']} | {x['threads']} | {x['batch']} | {x['loras_per_s']:.1f} | {x['ms_per_batch']:.1f} "
                     f"| | {x['matmul_gflops']:.1f} | | ")
        lines[-1] += f" | {x['read_gbps']:.1f} | {x['memory_ceiling']:.0f} | " + \
            (f"{x['pct_of_roofline']:.0f} %" if fl else "") + f" | {x['peak_mem_mb']:.0f} | {x['weights_mb']:.1f} |"
    return lines


GOAL_MODELS = {"glnet": "paper's GL-net (h = 64, depth 2, gated)",
               "glnet_default": "shipped GL-net (`lol train --model glnet`: h = 32, depth 1, scale features)"}


def _goals(rows: list[dict]) -> list[str]:
    """The issue's goals (≥ 2,000 LoRAs/s on 2 threads, ≥ 55 % of the whole-pass ceiling, colsketch at least GL-net's
    throughput), checked on this run's rows for both GL-nets of `GOAL_MODELS`."""
    out = []
    by = {(x["kind"], x["threads"]): x for x in rows}
    for t in sorted({x["threads"] for x in rows}):
        th = f"{t} thread{'s' if t > 1 else ''}"
        c = by.get(("colsketch", t))
        for name, what in GOAL_MODELS.items():
            g = by.get((name, t))
            if not g:
                continue
            line = f"- {name} ({what}), {th}: {g['loras_per_s']:.0f} LoRAs/s, {g['pct_of_ceiling']:.0f} % of its " \
                   f"whole-pass ceiling {g['ceiling']:.0f}/s (goal ≥ 55 %: {'met' if g['pct_of_ceiling'] >= 55 else 'not met'})"
            if t == 2:
                line += (f"; goal ≥ 2,000 LoRAs/s: {'met' if g['loras_per_s'] >= 2000 else 'not met'} (2,000 is "
                         f"{200000 / g['ceiling']:.0f} % of its ceiling)")
            line += (f"; {g['pct_of_roofline']:.0f} % of its roofline (memory ceiling {g['memory_ceiling']:.0f}/s: "
                     f"{g['factor_bytes_per_lora'] / 1e6:.2f} MB of factors per LoRA at {g['read_gbps']:.1f} GB/s)")
            out.append(line)
            if c:
                out.append(f"- colsketch / {name}, {th}: {c['loras_per_s'] / g['loras_per_s']:.2f}× (goal ≥ 1: "
                           f"{'met' if c['loras_per_s'] >= g['loras_per_s'] else 'not met'})")
        s = by.get(("glnet_sketch", t))
        if s:
            out.append(f"- glnet_sketch, {th}: {s['loras_per_s']:.0f} LoRAs/s, {s['pct_of_ceiling']:.0f} % of its "
                       f"whole-pass ceiling ({s['ceiling']:.0f} LoRAs/s)")
    return out


def write_results(out_dir, rows: list[dict], meta: dict) -> None:
    """``bench_models.csv`` (one row per model and thread count) and ``bench_models.md`` (the table, the goals)."""
    import csv
    from pathlib import Path
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = ["kind", "threads", "batch", "loras_per_s", "ms_per_batch", "flop_per_lora", "matmul_flop_per_lora",
            "matmul_gflops", "ceiling", "pct_of_ceiling", "factor_bytes_per_lora", "read_gbps", "memory_ceiling",
            "pct_of_roofline", "peak_mem_mb", "weights_mb", "hparams"]
    with open(out / "bench_models.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        for x in rows:
            w.writerow({**x, "hparams": json.dumps(x.get("hparams", {}), sort_keys=True)})
    md = [f"# LoL model throughput on SD-1.x q/v shapes ({meta['spec']}: {meta['modules']} modules, rank "
          f"{meta['rank']}, fp32, inference)", "",
          f"Machine: {meta['machine']}; torch {meta['torch']}; device {meta['device']}. Command: `{meta['command']}`.",
          "", "Whole-pass FLOP per LoRA: every matmul of every layer and the head (2 per multiply-add, as "
          "`torch.utils.flop_counter.FlopCounterMode` counts them) plus the small elementwise work, from each model's "
          "`flops_per_lora`; ceiling = this run's fp32 matmul rate (2048² GEMM) at that thread count / that FLOP. "
          "Memory ceiling = this run's rate of streaming a 512 MB fp32 tensor from memory / the bytes of the LoRA's "
          "fp32 factors (Σ(n+m)·r·4, each read once); roofline = the lower of the two ceilings. "
          "Models without a FLOP count (featurizer-based MLPs) show throughput only.", "", *_table(rows), "",
          "## Goals (issue 10)", "", *_goals(rows), ""]
    (out / "bench_models.md").write_text("\n".join(md))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench models")
    p.add_argument("--kinds", default=",".join(kinds()))
    p.add_argument("--device", default=None)
    p.add_argument("--spec", default="sd15", help="module spec (lol.synth.SPECS; default sd15: SD-1.x q/v)")
    p.add_argument("--batch", type=int, default=128,
                   help="LoRAs per forward pass (128: on 2 threads GL-net and colsketch give each thread 64, where "
                        "one thread is most efficient; 32 per thread loses ~10 %%)")
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
    p.add_argument("--threads", default=None,
                   help="torch intra-op thread counts, comma-separated, each a full pass over the models with its "
                        "own matmul ceiling (default: 1,2 on a CPU, torch's choice on CUDA)")
    p.add_argument("--out", default=None, help="folder for bench_models.csv/.md (default results/, or results/gpu/ "
                                               "on CUDA; '' writes nothing)")
    p.add_argument("--child", dest="kind", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    from lol.devices import default_device

    args.device = default_device(args.device)
    if args.kind:
        if args.threads:
            torch.set_num_threads(int(args.threads))
        print(json.dumps(child(args)))
        return 0

    cuda = str(args.device).startswith("cuda")
    threads = ([int(t) for t in str(args.threads).split(",")] if args.threads else
               [torch.get_num_threads()] if cuda else [1, min(2, os.cpu_count() or 1)])
    threads = list(dict.fromkeys(threads))
    spec = _spec(args.spec)
    print(f"device {args.device}; spec {args.spec}: {len(spec)} modules, Σ(n+m) = {spec.total_out_plus_in}, "
          f"Σ n·m = {spec.total_dense}; rank {args.rank}; threads {threads}")
    rows = []
    for nt in threads:
        torch.set_num_threads(nt)
        gflops = matmul_gflops(args.device)
        gbps = read_gbps(args.device)
        print(f"\n-- {nt} thread{'s' if nt > 1 else ''}: fp32 matmul (2048²) {gflops:.1f} GFLOP/s; memory read "
              f"{gbps:.1f} GB/s")
        passthrough = ["--device", args.device, "--spec", args.spec, "--batch", str(args.batch), "--dense-batch",
                       str(args.dense_batch), "--dense-width", str(args.dense_width), "--width", str(args.width),
                       "--channels", str(args.channels), "--depth", str(args.depth), "--head-channels",
                       str(args.head_channels), "--rank", str(args.rank), "--threads", str(nt), "--seconds",
                       str(args.seconds)]
        for kind in args.kinds.split(","):
            r = subprocess.run([sys.executable, "-m", "bench.bench_models", *passthrough, "--child", kind],
                               capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if r.returncode != 0:
                print(f"{kind:18s} FAILED: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            x = json.loads(r.stdout.strip().splitlines()[-1])
            x["matmul_gflops"], x["read_gbps"] = gflops, gbps
            x["memory_ceiling"] = gbps * 1e9 / x["factor_bytes_per_lora"]
            if x.get("flop_per_lora"):
                x["ceiling"] = gflops * 1e9 / x["flop_per_lora"]
                x["pct_of_ceiling"] = 100 * x["loras_per_s"] / x["ceiling"]
                x["pct_of_roofline"] = 100 * x["loras_per_s"] / min(x["ceiling"], x["memory_ceiling"])
            rows.append(x)
            extra = (f"  {x['flop_per_lora'] / 1e6:6.1f} MFLOP/LoRA → {x['pct_of_ceiling']:3.0f}% of ceiling "
                     f"{x['ceiling']:.0f}/s" if x.get("flop_per_lora") else "")
            print(f"{kind:18s} {x['loras_per_s']:10.1f} LoRAs/s  batch {x['batch']:3d}  {x['ms_per_batch']:9.1f} "
                  f"ms/batch  peak mem {x['peak_mem_mb']:8.0f} MB  weights {x['weights_mb']:7.1f} MB{extra}",
                  flush=True)
        by = {x["kind"]: x for x in rows if x["threads"] == nt}
        if "glnet" in by and "dense" in by:
            print(f"glnet / dense-ΔW model: {by['glnet']['loras_per_s'] / by['dense']['loras_per_s']:.0f}×")
        if "glnet" in by and "glnet_loop" in by:
            print(f"glnet / per-module loop: {by['glnet']['loras_per_s'] / by['glnet_loop']['loras_per_s']:.2f}×")
    print("")
    for line in _goals(rows):
        print(line)
    out = args.out if args.out is not None else ("results/gpu" if cuda else "results")
    if out and rows:
        meta = {"spec": args.spec, "modules": len(spec), "rank": args.rank, "device": str(args.device),
                "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
                "command": "python -m bench models -- " + " ".join(argv if argv is not None else sys.argv[1:])}
        write_results(out, rows, meta)
        print(f"wrote {out}/bench_models.csv, {out}/bench_models.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
