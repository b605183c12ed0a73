"""Storage benchmark: bytes on disk of a collection in the padded layout (format version 1: every LoRA padded to the
largest rank per module) against the rank-bucket layout (version 2: grouped by rank per module, nothing padded), at
the collection's own storage dtype (``python -m bench storage -- [--data DIR] [--collections faces lm ...]``).

Each shipped collection (``$LOL_DATA/collections/*``, whatever layout it is in now) is repacked twice into a
temporary folder with `write_collection` — ``layout="padded"`` and ``layout="rank_buckets"`` — and the sizes of the
two ``factors.safetensors`` files and whole folders are measured (not computed). A synthetic mixed-rank collection
(the paper's Figure 4 setting: rank 4 for most LoRAs, a share at ranks 1–32) is measured the same way, so the ratio
shows where padding costs most. Also: CPU seconds to open each and to take a batch of 32 (the bucket layout gathers
per rank and pads in memory).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _batch_time(path: Path, repeat: int = 5) -> tuple[float, float]:
    """CPU seconds (this process) to open the collection, and the best of ``repeat`` batches of 32 random LoRAs.
    CPU time, not wall: on a loaded machine wall time measures the neighbours (and torch's intra-op threads waiting
    for cores: run with ``--threads 1``, the default, or a gather of 16 kB can take seconds)."""
    import torch

    from lol.collection import open_collection

    t0 = time.process_time()
    c = open_collection(path)
    t_open = time.process_time() - t0
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeat):
        idx = torch.randperm(len(c), generator=g)[:32]
        t0 = time.process_time()
        c.batch(idx)
        times.append(time.process_time() - t0)
    return t_open, min(times)


def measure(name: str, loras, table, ranks, dtype, spec, tmp: Path) -> dict:
    """Repack ``loras`` (a callable giving a fresh iterator) in both layouts under ``tmp`` and measure them."""
    from lol.collection import write_collection

    row = {"collection": name, "n": len(table), "dtype": str(dtype).replace("torch.", "")}
    for layout, tag in (("padded", "v1 padded"), ("rank_buckets", "v2 buckets")):
        dest = tmp / f"{name}-{layout}"
        t0 = time.perf_counter()
        write_collection(dest, loras(), table, ranks=ranks, dtype=dtype, spec=spec, layout=layout)
        row[f"write s ({tag})"] = time.perf_counter() - t0
        row[f"factors MB ({tag})"] = (dest / "factors.safetensors").stat().st_size / 1e6
        row[f"folder MB ({tag})"] = _folder_bytes(dest) / 1e6
        row[f"open cpu s ({tag})"], row[f"batch32 cpu s ({tag})"] = _batch_time(dest)
        shutil.rmtree(dest)
    row["factors v1/v2"] = row["factors MB (v1 padded)"] / row["factors MB (v2 buckets)"]
    row["folder v1/v2"] = row["folder MB (v1 padded)"] / row["folder MB (v2 buckets)"]
    return row


def main(argv=None) -> list[dict]:
    import pandas as pd
    import torch

    from lol.collection import open_collection
    from lol.paths import data_root
    from lol.synth import random_lora, sd15_unet_qv_spec

    ap = argparse.ArgumentParser(prog="python -m bench storage")
    ap.add_argument("--data", default=str(data_root()), help="folder with collections/ (default: $LOL_DATA, else data/)")
    ap.add_argument("--collections", nargs="*", default=None, help="names under collections/ (default: all)")
    ap.add_argument("--synthetic", type=int, default=200, help="LoRAs in the synthetic mixed-rank collection (0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady timings on a shared machine)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    root = Path(a.data) / "collections"
    names = a.collections
    if names is None:
        names = sorted(p.name for p in root.iterdir() if (p / "collection.json").is_file()) if root.is_dir() else []
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="lol-bench-storage-"))
    try:
        for name in names:
            c = open_collection(root / name)
            shipped = _folder_bytes(root / name) / 1e6
            row = measure(name, lambda c=c: c.loras(dtype=c.dtype), c.table, c.ranks.tolist(), c.dtype, c.spec, tmp)
            rows.append({**row, "shipped layout": c.layout, "shipped folder MB": shipped})
            del c
        if a.synthetic:
            spec = sd15_unet_qv_spec()
            n = a.synthetic
            rank_of = [4 if i % 5 else (1, 2, 8, 16, 32)[(i // 5) % 5] for i in range(n)]  # 80 % rank 4
            table = pd.DataFrame({"id": [f"s{i:05d}" for i in range(n)]})
            rows.append(measure("synthetic SD-1.x q/v, 80% rank 4, 20% ranks 1-32",
                                lambda: (random_lora(spec, r, seed=i, dtype=torch.float16)
                                         for i, r in enumerate(rank_of)),
                                table, [[r] * len(spec) for r in rank_of], torch.float16, spec, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cols = ["collection", "n", "dtype", "factors MB (v1 padded)", "factors MB (v2 buckets)", "factors v1/v2",
            "folder MB (v1 padded)", "folder MB (v2 buckets)", "folder v1/v2", "open cpu s (v1 padded)",
            "open cpu s (v2 buckets)", "batch32 cpu s (v1 padded)", "batch32 cpu s (v2 buckets)"]
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3g}".format):
        print(df[[c for c in cols if c in df.columns]].to_string(index=False))
        if "shipped layout" in df.columns:
            print(df[["collection", "shipped layout", "shipped folder MB"]].dropna().to_string(index=False))
    return rows


if __name__ == "__main__":
    main()
