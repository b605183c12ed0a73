"""Cost as the work grows: write, train and predict on synthetic SD-1.x-shaped collections of 10³, 10⁴ and 10⁵ LoRAs,
streamed from the memory-mapped collection (``python -m bench scale -- [--sizes 1000 10000 100000] [--quick]``).

What is measured, per size N, each step in its own subprocess (so its peak memory is its own, read from the kernel's
``VmHWM``: every page it had resident at once, the factors file's mapped pages included):

* **write**: N random LoRAs (`lol.synth.random_lora_batch`, 256 at a time) packed into a collection
  (`write_collection`, rank buckets, float16). Labels need every LoRA before the table is written, so the LoRAs are
  drawn twice from the same seeds: once for the labels ("label s"), once to pack ("pack s", drawing included);
* **train**: GL-net (the default kind, default hyperparameters) for a fixed number of epochs over the training split
  (the collection's ``split`` column: 80 / 10 / 10), minibatches of 64 from a streaming ``DataLoader``
  (`lol.stream.CollectionStream`: chunks of ~128 MB of consecutive LoRAs, shuffled by chunk and within a chunk,
  mapped pages released every 256 MB of file spanned), then the validation metrics;
* **predict**: the trained checkpoint on all N LoRAs, streamed in minibatches of 256; predictions to Parquet.

Before train and predict the factors file's pages are dropped from the OS page cache (``posix_fadvise DONTNEED``
on that file only), so every step starts cold, reading from disk as a collection larger than RAM would.

**Honest shapes.** The paper's SD-1.x LoRAs adapt the 64 UNet ``to_q`` / ``to_v`` modules at rank 4: 797 kB per LoRA
in float16, 80 GB for 10⁵, more than this machine's disk holds. The default here is the 16 cross-attention
``attn2.to_v`` modules of the same UNet (`lol.synth.sd15_cross_v_spec`: 768 → 320 / 640 / 1280), rank 4, float16:
198 kB per LoRA, 19.8 GB for 10⁵, a quarter of the q/v spec's bytes and FLOPs per LoRA (``--spec sd15`` measures the
full q/v spec where the disk allows). The table and the Markdown say which spec and rank were used.

**Labels** are GL-invariant functions of the factors (`lol.synth`): ``sv_energy`` (mean log nuclear norm of ΔW) and
``probe`` (alignment of ΔW with fixed directions), both learnable, so the training is real (validation R² is
reported; it grows with N at a fixed number of epochs because more data means more steps).

Outputs (``--out``, default ``results/``): ``scale.csv`` (one row per size and step), ``scale.md`` (the table, the
log-log slopes of time against N, and what was measured), ``scale.png`` (log-log time against N per step, and
peak memory against N). Collections are written under ``--dir`` (default a temporary folder) and deleted after each
size unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SIZES = (1000, 10000, 100000)
QUICK_SIZES = (96, 192)
LABELS = ["sv_energy", "probe"]
GEN_CHUNK = 256


# ------------------------------------------------------------------------------------------------ one step (child)

def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is missing), MB."""
    kb = _status_kb("VmHWM") if Path("/proc/self/status").is_file() else 0
    if not kb:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def _drop_cache(path: Path) -> None:
    """Evict this file's clean pages from the page cache (only this file: nothing else on the machine is touched)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _spec(name: str):
    from lol.synth import spec_by_name

    return spec_by_name(name)


def _chunks(n: int, seed: int):
    for k, s in enumerate(range(0, n, GEN_CHUNK)):
        yield k, min(GEN_CHUNK, n - s), seed * 1_000_003 + k


def step_write(a) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from lol.collection import write_collection
    from lol.synth import LABELS as SYNTH_LABELS, random_lora_batch

    spec = _spec(a.spec)
    t0 = time.perf_counter()
    parts = []
    for _, m, sd in _chunks(a.n, a.seed):  # pass 1: the labels (the table must exist before packing)
        _, tab = random_lora_batch(spec, m, rank=a.rank, seed=sd)
        parts.append(pd.DataFrame(tab))
    table = pd.concat(parts, ignore_index=True)
    ids = [f"s{i:06d}" for i in range(a.n)]
    split = np.array(["train"] * 8 + ["val", "test"], dtype=object)[
        np.random.default_rng(a.seed).integers(0, 10, a.n)]
    table.insert(0, "id", ids)
    table.insert(1, "split", split)
    t_label = time.perf_counter() - t0

    def loras():  # pass 2: the same draws, packed as they come
        for _, m, sd in _chunks(a.n, a.seed):
            b, _ = random_lora_batch(spec, m, rank=a.rank, seed=sd, dtype=torch.float16, labels=False)
            for j in range(m):
                yield b.lora(j, format="synthetic", source="synthetic")

    labels = {k: dict(SYNTH_LABELS[k]) for k in LABELS}
    t1 = time.perf_counter()
    write_collection(a.dir / "coll", loras(), table, labels=labels, tasks={"synthetic": LABELS},
                     base_model=f"synthetic ({a.spec} spec, rank {a.rank})", dtype=torch.float16, spec=spec,
                     ranks=[[a.rank] * len(spec)] * a.n, overwrite=True,
                     provenance={"generator": "lol.synth.random_lora_batch", "seed": a.seed, "bench": "scale"})
    t_pack = time.perf_counter() - t1
    size = sum(p.stat().st_size for p in (a.dir / "coll").iterdir())
    return {"seconds": t_label + t_pack, "label_seconds": t_label, "pack_seconds": t_pack, "bytes": size}


def step_train(a) -> dict:
    from lol.stream import train_stream

    coll = a.dir / "coll"
    _drop_cache(coll / "factors.safetensors")
    t0 = time.perf_counter()
    res = train_stream(coll, LABELS, a.model, epochs=a.epochs, batch_size=a.batch_size, seed=a.seed)
    seconds = time.perf_counter() - t0
    res.save(a.dir / "ckpt")
    val = res.metrics["val"]
    return {"seconds": seconds, "epochs": a.epochs, "n_train": res.n_train, "n_val": res.n_val,
            "epoch_seconds": [round(h["seconds"], 3) for h in res.history],
            **{f"val_r2_{k}": float(val[k]["r2"]) for k in LABELS}}


def step_predict(a) -> dict:
    import numpy as np

    from lol.collection import open_collection
    from lol.metrics import regression_metrics
    from lol.stream import predict_stream

    coll = a.dir / "coll"
    _drop_cache(coll / "factors.safetensors")
    t0 = time.perf_counter()
    df = predict_stream(a.dir / "ckpt", coll, batch_size=256)
    seconds = time.perf_counter() - t0
    df.to_parquet(a.dir / "predictions.parquet", index=False)
    c = open_collection(coll)
    test = (c.table["split"] == "test").to_numpy()
    r2 = {f"test_r2_{k}": float(regression_metrics(c.table[k].to_numpy()[test], df[k].to_numpy()[test])["r2"])
          for k in LABELS}
    assert len(df) == len(c) and np.all(df["id"].to_numpy() == c.table["id"].to_numpy())
    return {"seconds": seconds, **r2}


STEPS = {"write": step_write, "train": step_train, "predict": step_predict}


def child(a) -> int:
    import torch

    torch.set_num_threads(a.threads)
    import lol.collection  # noqa: F401 -- the imports' memory is the baseline, not the step's
    import lol.stream  # noqa: F401
    base = _status_kb("VmRSS") / 1024
    cpu = time.process_time()
    out = STEPS[a.step](a)
    out.update(step=a.step, n=a.n, cpu_seconds=time.process_time() - cpu, baseline_mb=base, peak_mb=_peak_mb(),
               load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    print("RESULT " + json.dumps(out), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------- driver

def run_step(step: str, n: int, folder: Path, a) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_scale", "--step", step, "--n", str(n), "--dir", str(folder),
           "--spec", a.spec, "--rank", str(a.rank), "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
           "--threads", str(a.threads), "--seed", str(a.seed), "--model", a.model]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise RuntimeError(f"bench scale: step {step} at N={n} failed (exit {proc.returncode})")
    out = json.loads(line[len("RESULT "):])
    out["process_seconds"] = wall
    return out


def _slope(x, y) -> float:
    import numpy as np

    x, y = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 else float("nan")


def _ends(g, col: str) -> str:
    g = g.sort_values("n")
    return f"{g[col].iloc[0]:,.0f} → {g[col].iloc[-1]:,.0f}"


def _marginal(g) -> list[str]:
    g = g.sort_values("n")
    n, t = g.n.tolist(), g.cpu_seconds.tolist()
    return [f"{n[k]:,}→{n[k + 1]:,}: {(t[k + 1] - t[k]) / (n[k + 1] - n[k]) * 1e6:,.0f}" for k in range(len(n) - 1)]


def report(df, a, out: Path) -> None:
    import numpy as np

    from lol.figures import _plt, save
    from lol.synth import spec_by_name

    spec = spec_by_name(a.spec)
    per_lora = sum(o + i for o, i in spec.shapes) * a.rank * 2
    df = df.copy()
    df["us_per_lora"] = df.seconds / df.n * 1e6
    df["cpu_us_per_lora"] = df.cpu_seconds / df.n * 1e6
    df.to_csv(out / "scale.csv", index=False)
    steps = [s for s in ("write", "train", "predict") if s in set(df.step)]
    slopes = {s: _slope(df[df.step == s].n, df[df.step == s].seconds) for s in steps}
    cpu_slopes = {s: _slope(df[df.step == s].n, df[df.step == s].cpu_seconds) for s in steps}
    cores = os.cpu_count() or 1

    lines = ["# Cost as the work grows", "",
             f"Generated by `python -m bench scale{' -- ' + ' '.join(a.argv) if a.argv else ''}` (bench/bench_scale.py; its "
             "docstring says what is measured).", "",
             f"**Collections**: synthetic, SD-1.x-shaped: spec `{a.spec}` ({len(spec)} modules, Σ(n+m) = "
             f"{sum(o + i for o, i in spec.shapes):,}), rank {a.rank}, float16 factors: {per_lora / 1e3:,.0f} kB of "
             f"factors per LoRA." + (" The paper's 64 q/v modules would be 797 kB per LoRA, 80 GB at 10⁵ LoRAs, "
                                     "more than this machine's disk: the 16 cross-attention `to_v` modules of the same "
                                     "UNet stand in (a quarter of the bytes and FLOPs per LoRA)."
                                     if a.spec == "sd15_cross_v" else ""),
             f"**Work**: write = draw + label + pack; train = {a.model}, {a.epochs} epochs over the 80 % training "
             f"split, minibatches of {a.batch_size}, streamed (`lol.stream`), then validation; predict = every LoRA, "
             f"streamed. Each step in its own process, {a.threads} torch thread(s); the factors file's pages are "
             f"evicted from the page cache before train and predict (cold start).",
             "**Time**: wall seconds of the step (after the process's imports) and the CPU seconds the process used "
             "(all its threads): on a shared machine wall time also counts the neighbours, CPU time only this work. "
             f"Load average (1 min, {cores} cores) at the end of the steps: {df.load_avg.min():.1f}–"
             f"{df.load_avg.max():.1f}" + (" — a loaded machine: wall times are inflated, compare CPU times."
                                           if df.load_avg.max() > 1.5 * cores else "."),
             "**Memory**: peak resident memory of the step's process (VmHWM, mapped file pages included); "
             "'baseline' is the same process after its imports, before the work.", "",
             "| N | step | wall s | CPU s | µs per LoRA (wall) | µs per LoRA (CPU) | peak MB | baseline MB | "
             "collection GB | notes |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for _, r in df.iterrows():
        notes = []
        if r.step == "write":
            notes.append(f"label {r.label_seconds:.1f} s + pack {r.pack_seconds:.1f} s")
        if r.step == "train":
            notes.append(f"val R² sv_energy {r.val_r2_sv_energy:.3f}, probe {r.val_r2_probe:.3f}")
        if r.step == "predict":
            notes.append(f"test R² sv_energy {r.test_r2_sv_energy:.3f}, probe {r.test_r2_probe:.3f}")
        gb = f"{r.bytes / 1e9:.2f}" if r.step == "write" else ""
        lines.append(f"| {int(r.n):,} | {r.step} | {r.seconds:,.1f} | {r.cpu_seconds:,.1f} | {r.us_per_lora:,.0f} | "
                     f"{r.cpu_us_per_lora:,.0f} | {r.peak_mb:,.0f} | {r.baseline_mb:,.0f} | {gb} | "
                     f"{'; '.join(notes)} |")
    lines += ["", "**Growth** (log-log slope of seconds against N over the sizes measured; 1 = linear, below 1 where "
              "fixed costs — model fit, validation, warm-up — weigh at the small sizes): wall "
              + ", ".join(f"{s} {slopes[s]:.2f}" for s in steps) + "; CPU "
              + ", ".join(f"{s} {cpu_slopes[s]:.2f}" for s in steps) + ".",
              "**Marginal cost** (CPU µs per added LoRA between consecutive sizes, Δ CPU s / Δ N; constant = linear "
              "growth): " + "; ".join(f"{s} " + ", ".join(_marginal(df[df.step == s])) for s in steps) + ".",
              f"**Peak memory** over all sizes: {df.peak_mb.min():,.0f}–{df.peak_mb.max():,.0f} MB "
              f"(limit set by the issue: 4,096 MB); per step from the smallest to the largest N: "
              + ", ".join(f"{s} {_ends(df[df.step == s], 'peak_mb')}" for s in steps)
              + f" MB, for {df.n.max() / df.n.min():,.0f}× more LoRAs (held whole, growing with N: the table and "
              f"the per-LoRA index arrays — ranks, bucket rows, alpha, scale; the factors are only ever held a chunk "
              f"at a time, and the mapped pages between two releases vary by a few hundred MB).", ""]
    (out / "scale.md").write_text("\n".join(lines))

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for k, s in enumerate(steps):
        g = df[df.step == s].sort_values("n")
        ax.plot(g.n, g.seconds, marker="o", color=f"C{k}", label=f"{s}, wall (slope {slopes[s]:.2f})")
        ax.plot(g.n, g.cpu_seconds, marker="x", ls="--", color=f"C{k}", label=f"{s}, CPU (slope {cpu_slopes[s]:.2f})")
    ns = np.array(sorted(set(df.n)), float)
    if len(ns):
        ref = df[df.step == steps[0]].sort_values("n").seconds.iloc[0]
        ax.plot(ns, ref * ns / ns[0], "k:", lw=0.8, label="linear")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("LoRAs in the collection")
    ax.set_ylabel("seconds")
    ax.set_title(f"time ({a.spec}, rank {a.rank}, {a.model} {a.epochs} epochs)", fontsize=10)
    ax.legend(fontsize=7)
    ax = axes[1]
    for s in steps:
        g = df[df.step == s].sort_values("n")
        ax.plot(g.n, g.peak_mb, marker="o", label=s)
    ax.axhline(4096, color="r", ls="--", lw=0.8, label="4 GB")
    ax.set_xscale("log")
    ax.set_ylim(0, max(4500, float(df.peak_mb.max()) * 1.1))
    ax.set_xlabel("LoRAs in the collection")
    ax.set_ylabel("peak resident MB")
    ax.set_title("peak memory per step", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out, "scale")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench scale")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help=f"collection sizes (default {DEFAULT_SIZES})")
    ap.add_argument("--quick", action="store_true", help=f"tiny sizes {QUICK_SIZES}, 1 epoch (for a test)")
    ap.add_argument("--spec", default="sd15_cross_v", help="synthetic spec (lol.synth.SPECS; default sd15_cross_v)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 3; 1 with --quick)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--model", default="glnet")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per step (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where collections are written (default: a temporary folder)")
    ap.add_argument("--out", default="results", help="folder for scale.csv, scale.md, scale.png (default results/)")
    ap.add_argument("--keep", action="store_true", help="keep each collection (default: deleted after its size)")
    ap.add_argument("--report-only", action="store_true", help="rewrite scale.md / scale.png from OUT/scale.csv")
    ap.add_argument("--step", choices=tuple(STEPS), help=argparse.SUPPRESS)  # internal: run one step
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    a = ap.parse_args(argv)
    if a.step:
        a.dir = Path(a.dir)
        a.epochs = a.epochs or 3
        return child(a)

    import pandas as pd

    a.argv = [x for x in argv if x != "--report-only"]
    sizes = a.sizes or (QUICK_SIZES if a.quick else DEFAULT_SIZES)
    a.epochs = a.epochs or (1 if a.quick else 3)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        report(pd.read_csv(out / "scale.csv"), a, out)
        return []
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="lol-bench-scale-"))
    rows = []
    try:
        for n in sizes:
            folder = root / f"n{n}"
            folder.mkdir(parents=True, exist_ok=True)
            for step in STEPS:
                r = run_step(step, n, folder, a)
                rows.append(r)
                extra = {k: v for k, v in r.items() if k.startswith(("val_r2", "test_r2"))}
                print(f"N={n:>7,} {step:<8} {r['seconds']:9.1f} s  {r['seconds'] / n * 1e6:9.0f} µs/LoRA  peak "
                      f"{r['peak_mb']:7.0f} MB (baseline {r['baseline_mb']:.0f})"
                      + (f"  {json.dumps({k: round(v, 3) for k, v in extra.items()})}" if extra else ""), flush=True)
                pd.DataFrame(rows).to_csv(out / "scale.csv", index=False)  # what is done survives a kill
            if not a.keep:
                shutil.rmtree(folder, ignore_errors=True)
            report(pd.DataFrame(rows), a, out)  # after every size: a run cut short still leaves its report
        print(f"wrote {out / 'scale.md'}, {out / 'scale.csv'}, {out / 'scale.png'}")
    finally:
        if not a.dir and not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    r = main()
    sys.exit(r if isinstance(r, int) else 0)
