"""Both cores at work: the zoo builder with two workers (Ray's local cluster, one torch thread per task) against one
worker (the local executor, one torch thread), on the same groups of the same recipe, side by side in one run
(``python -m bench workers [-- --collection lm --groups 4 --group-size 4]``).

The groups are the first ``--groups`` of the collection's build plan (`lol.zoo.jobs.make_manifest` at
``--group-size``, in `run_order`), trained on the shipped bases (``DATA/base``) into two temporary build folders,
one per executor; nothing under ``DATA`` is written. Reports wall seconds, LoRAs per second, the speedup of the
workers over one worker and its efficiency (speedup / workers), and checks that both executors trained the same
LoRAs bit for bit (same jobs, same seeds, one thread each). Ray's start-up is timed separately (a build pays it
once). Run it on a quiet machine: the point is what the second core adds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def _sub_manifest(manifest, groups: list[str]):
    from lol.zoo.jobs import Manifest

    keep = {g: manifest["groups"][g] for g in groups}
    ids = {j for g in keep.values() for j in g}
    return Manifest({**manifest, "groups": keep, "n_jobs": len(ids),
                     "jobs": [j for j in manifest["jobs"] if j["id"] in ids]})


def _same_loras(a: Path, b: Path, groups: list[str]) -> float:
    """Largest absolute difference between the two builds' factors, over every LoRA and module (0.0: identical)."""
    from lol.zoo.jobs import read_group

    worst = 0.0
    for g in groups:
        ra = {r.job_id: r for r in read_group(a, g)}
        for r in read_group(b, g):
            for m, n in zip(ra[r.job_id].lora, r.lora):
                worst = max(worst, float((m.U - n.U).abs().max()), float((m.V - n.V).abs().max()))
    return worst


def run(collection: str, preset: str, data: Path, groups: int, group_size: int, workers: int) -> dict:
    import os

    import ray
    import torch

    from lol.zoo.build import COLLECTION_RECIPES, PRESETS
    from lol.zoo.jobs import load_object, make_executor, make_manifest, run_order

    recipe = load_object(COLLECTION_RECIPES.get(collection, collection), f"collection recipe {collection!r}")
    missing = [b for b in recipe.requires if not (data / "base" / b / "record.json").is_file()]
    if missing:
        raise SystemExit(f"bench workers: {data}/base lacks the base model(s) {missing} that {collection} needs")
    manifest = make_manifest(recipe, preset, int(PRESETS[preset]["seed"]), group_size)
    chosen = run_order(list(manifest["groups"]), manifest, recipe)[:groups]
    sub = _sub_manifest(manifest, chosen)
    tmp = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    bases = {b: (data / "base" / b).resolve() for b in recipe.requires}
    out = {"collection": collection, "preset": preset, "groups": len(chosen), "group_size": group_size,
           "loras": sub["n_jobs"], "workers": workers, "cpus": os.cpu_count()}
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        make_executor("local", progress=False).run(recipe, tmp / "local", sub,
                                                   {**bases, "samples": tmp / "samples-local", "root": tmp})
        out["one_worker_s"] = time.perf_counter() - t0
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        out["ray_start_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        make_executor("ray", progress=False).run(recipe, tmp / "ray", sub,
                                                 {**bases, "samples": tmp / "samples-ray", "root": tmp})
        out["workers_s"] = time.perf_counter() - t0
        out["max_abs_diff"] = _same_loras(tmp / "local", tmp / "ray", chosen)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    out["one_worker_loras_per_s"] = out["loras"] / out["one_worker_s"]
    out["workers_loras_per_s"] = out["loras"] / out["workers_s"]
    out["speedup"] = out["one_worker_s"] / out["workers_s"]
    out["efficiency"] = out["speedup"] / workers
    return out


def write_results(out_dir: Path, r: dict) -> None:
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([r]).to_csv(out_dir / "bench_workers.csv", index=False)
    same = "bit for bit" if r["max_abs_diff"] == 0 else f"max |Δ| {r['max_abs_diff']:.3g}"
    lines = ["# Zoo build: two workers vs one, same groups, one run", "",
             f"`python -m bench workers`: the first {r['groups']} groups of {r['group_size']} `{r['collection']}` LoRAs "
             f"(preset `{r['preset']}`) on a {r['cpus']}-CPU machine; one torch thread per worker.", "",
             "| executor | wall s | LoRAs/s |", "|---|---|---|",
             f"| local, 1 worker | {r['one_worker_s']:.1f} | {r['one_worker_loras_per_s']:.3f} |",
             f"| ray, {r['workers']} workers | {r['workers_s']:.1f} | {r['workers_loras_per_s']:.3f} |", "",
             f"Speedup {r['speedup']:.2f}× (efficiency {r['efficiency']:.0%} of {r['workers']}×); Ray's start-up "
             f"{r['ray_start_s']:.1f} s, paid once per build, not included. Both executors trained the same LoRAs "
             f"({same})."]
    (out_dir / "bench_workers.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench workers")
    p.add_argument("--collection", default="lm",
                   help="collection recipe: a name of lol.zoo.build.COLLECTION_RECIPES or a 'module:Class' reference")
    p.add_argument("--preset", default="default")
    p.add_argument("--data", default="data", help="data folder whose base/ holds the bases (nothing is written)")
    p.add_argument("--groups", type=int, default=4, help="groups to train with each executor")
    p.add_argument("--group-size", type=int, default=4, help="LoRAs per group")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="results", help="folder for bench_workers.csv/.md ('' writes nothing)")
    args = p.parse_args(argv)
    r = run(args.collection, args.preset, Path(args.data), args.groups, args.group_size, args.workers)
    print(json.dumps(r, indent=1))
    if args.out:
        write_results(Path(args.out), r)
    return 0
