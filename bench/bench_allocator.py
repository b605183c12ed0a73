"""glibc's malloc with and without `lol.allocator.keep_freed_memory`, side by side in one run, on the CPU work this
project does most (``python -m bench allocator [-- --loras 8 --epochs 3]``).

Workloads, each run twice in a fresh subprocess with one torch thread — once with glibc's defaults
(``LOL_MALLOC=system``, no ``MALLOC_*_`` variables), once with freed memory kept — in alternating order, ``--repeats``
times:

* ``measure``: the faces CLIP-score label of ``--loras`` rank-4 LoRAs of the shipped collection, measured with the
  build's protocol and noise seed 9042 (`lol.zoo.measure`'s own function; a UNet, a VAE and CLIP on the CPU);
* ``train``: GL-net trained on the shipped faces collection's ``clip_score`` for ``--epochs`` epochs (`lol.train`).

Only the work is timed, after its setup (loading the
pipeline, CLIP and the adapters; opening the collection). Reports each run's CPU seconds (user and system: the page faults show as system time), minor page faults, wall
seconds and peak resident memory, the ratio of the medians (defaults / kept), and whether both settings computed the
same numbers (they must: the allocator changes where tensors live, not what is computed). Writes ``allocator.csv`` and
``allocator.md`` to ``--out`` (default ``results/``; ``''`` writes nothing). Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ("measure", "train")
MODES = ("defaults", "kept")


def _usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user": r.ru_utime, "sys": r.ru_stime, "minflt": r.ru_minflt}


def _measure(loras: int):
    """Setup (collection, pipeline, CLIP, adapters) here; returns the timed work: one batched measurement."""
    import numpy as np
    import torch

    from lol.collection import open_collection
    from lol.paths import data_root
    from lol.zoo.clipscore import CLIPScorer
    from lol.zoo.image_recipes import ImageLoRATrainer, load_adapters
    from lol.zoo.measure import _bases, _measure_chunk, label_protocol

    coll = open_collection(data_root() / "collections" / "faces")
    idx = [int(i) for i in np.flatnonzero(coll.table["rank"].to_numpy() == 4)[:loras]]
    bases = _bases(coll, None)
    trainer = ImageLoRATrainer(bases["sd"], "cpu")
    scorer = CLIPScorer(bases["clip"], device=trainer.device)
    ml = load_adapters(trainer.unet, [coll.lora(i) for i in idx])
    protocol = label_protocol(coll)

    def work():
        with torch.no_grad():
            return _measure_chunk("clip_score", trainer, scorer, ml, coll, idx, protocol, 9042, None)
    return work


def _train(epochs: int):
    """Setup (the collection opened) here; returns the timed work: loading its factors and training."""
    from lol.collection import open_collection
    from lol.paths import data_root
    from lol.train import train

    coll = open_collection(data_root() / "collections" / "faces")

    def work():
        res = train(coll, "clip_score", "glnet", epochs=epochs, patience=epochs, progress=False, device="cpu")
        return [float(res.metrics["test"]["clip_score"]["r2"])]
    return work


def child(workload: str, loras: int, epochs: int) -> dict:
    import torch

    from lol.allocator import keep_freed_memory

    torch.set_num_threads(1)
    kept = keep_freed_memory(environ=False)
    work = _measure(loras) if workload == "measure" else _train(epochs)
    before, t = _usage(), time.perf_counter()
    values = work()
    wall, after = time.perf_counter() - t, _usage()
    from bench.bench_scale import _peak_mb
    return {"workload": workload, "mode": "kept" if kept else "defaults",
            "wall_s": wall, "user_s": after["user"] - before["user"], "sys_s": after["sys"] - before["sys"],
            "minor_faults": after["minflt"] - before["minflt"], "peak_mb": _peak_mb(), "values": values}


def _run_child(workload: str, mode: str, a) -> dict:
    from lol.allocator import OPT_OUT, SETTINGS

    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and k != OPT_OUT}
    if mode == "defaults":
        env[OPT_OUT] = "system"
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "bench.bench_allocator", "--child", workload, "--loras", str(a.loras),
                          "--epochs", str(a.epochs)], capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode != 0:
        raise SystemExit(f"bench allocator: the {workload} run ({mode}) failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if row["mode"] != mode:
        raise SystemExit(f"bench allocator: the {mode} run of {workload} ran with {row['mode']}")
    return row


def report(rows: list[dict], a) -> str:
    from bench.bench_models import _cpu_name

    lines = ["# glibc malloc: defaults vs freed memory kept (`lol.allocator`)", "",
             f"Generated by `python -m bench allocator -- --loras {a.loras} --epochs {a.epochs} --repeats {a.repeats}` "
             f"(bench/bench_allocator.py; its docstring says what is measured). Machine: {_cpu_name()}, "
             f"{os.cpu_count()} CPUs; one torch thread per run; each run a fresh process.", "",
             "| workload | setting | runs | CPU s (median) | of which system | minor page faults | wall s | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        med = {}
        for m in MODES:
            rs = [r for r in rows if r["workload"] == w and r["mode"] == m]
            cpu = statistics.median(r["user_s"] + r["sys_s"] for r in rs)
            med[m] = cpu
            lines.append(f"| {w} | {m} | {len(rs)} | {cpu:.1f} | {statistics.median(r['sys_s'] for r in rs):.1f} | "
                         f"{statistics.median(r['minor_faults'] for r in rs):,.0f} | "
                         f"{statistics.median(r['wall_s'] for r in rs):.1f} | {max(r['peak_mb'] for r in rs):,.0f} |")
        same = len({json.dumps(r["values"]) for r in rows if r["workload"] == w}) == 1
        summary.append(f"- **{w}**: CPU time with glibc's defaults / with freed memory kept = "
                       f"**{med['defaults'] / med['kept']:.2f}×**; the same numbers under both settings: "
                       f"{'yes' if same else 'NO'}")
    what = {"measure": f"the faces CLIP-score label of {a.loras} rank-4 LoRAs (build protocol, noise seed 9042)",
            "train": f"GL-net on faces clip_score, {a.epochs} epochs"}
    return "\n".join(lines + [""] + summary + [""] + [f"- {w}: {what[w]}" for w in dict.fromkeys(
        r["workload"] for r in rows)]) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench allocator", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {WORKLOADS}")
    ap.add_argument("--loras", type=int, default=8, help="LoRAs of the measure workload (default 8)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the train workload (default 3)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per workload and setting (default 2)")
    ap.add_argument("--out", default=str(REPO / "results"), help="folder for allocator.csv / .md ('' writes nothing)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.loras, a.epochs)))
        return
    from lol.allocator import _glibc
    from lol.paths import data_root

    if _glibc() is None:
        print("bench allocator: this C library is not glibc (the settings apply to glibc only); skipped")
        return
    if not (data_root() / "collections" / "faces" / "collection.json").is_file():
        print(f"bench allocator: no shipped faces collection under {data_root()}; skipped")
        return
    rows = []
    for w in [w for w in a.workloads.split(",") if w]:
        if w not in WORKLOADS:
            raise SystemExit(f"bench allocator: unknown workload {w!r}; have {WORKLOADS}")
        for k in range(a.repeats):
            for m in (MODES if k % 2 == 0 else MODES[::-1]):        # alternate which setting runs first
                r = _run_child(w, m, a)
                rows.append(r)
                print(f"{w:8s} {m:9s} CPU {r['user_s'] + r['sys_s']:6.1f} s (system {r['sys_s']:5.1f})  "
                      f"faults {r['minor_faults']:>10,}  wall {r['wall_s']:6.1f} s  peak {r['peak_mb']:,.0f} MB",
                      flush=True)
    text = report(rows, a)
    print(text)
    if a.out:
        import pandas as pd

        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([{k: v for k, v in r.items() if k != "values"} for r in rows]).to_csv(out / "allocator.csv",
                                                                                          index=False)
        (out / "allocator.md").write_text(text)
        print(f"wrote {out / 'allocator.csv'}, {out / 'allocator.md'}")


if __name__ == "__main__":
    main()
