"""LoL prediction against the standard evaluation it replaces, on one device, both measured in this run
(``python -m bench speed -- [--device cuda] [--out DIR]``); the same code as notebooks/06_speed.ipynb
(`lol.speed.speed_ratios`, `lol.speed.throughput`), runnable where there is no Jupyter, e.g. on a GPU machine.

Rows: seconds per LoRA of the standard evaluation (faces: generate the CLIP prompt set with the LoRA in the zoo's
Stable Diffusion and score it; lm: run the LoRA'd LM on the challenge set) and of the shipped checkpoint's prediction
for the same LoRA, and their ratio (the paper claims > 50,000×). Then LoRAs/s of GL-net against the dense-ΔW model as
the number of LoRAs per call grows. Writes ``speed_<device>.{csv,md}`` and ``throughput_<device>.csv`` to ``--out``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    import pandas as pd
    import torch

    from lol import speed
    from lol.collection import open_collection
    from lol.experiments import write_table
    from lol.paths import data_root

    ap = argparse.ArgumentParser(prog="python -m bench speed")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--data", default=str(data_root()), help="folder with base/, collections/, checkpoints/ "
                                                           "(default: $LOL_DATA, else data/)")
    ap.add_argument("--out", default=str(REPO / "artifacts" / "bench"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--sizes", default="1,8,64,512,4096")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from lol.devices import default_device

    device = default_device(a.device)
    data, out = Path(a.data), Path(a.out)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name})")

    rows = speed.speed_ratios(data / "base", data / "collections", data / "checkpoints", repeat=a.repeat,
                              device=device)
    ratios = pd.DataFrame(rows)
    if len(ratios):
        write_table(ratios, out, f"speed_{device.split(':')[0]}", index=False,
                    title=f"Seconds per LoRA, measured in one run on {name}; ratio = standard / LoL")
        for r in rows:
            print(f"{r['task']}: standard {r['standard_seconds']:.4g} s (label {r['recomputed_label']:.4g}, "
                  f"stored {r['stored_label']:.4g}), LoL {r['lol_seconds'] * 1e3:.3g} ms -> {r['ratio']:,.0f}x")
    else:
        print("no shipped collection with a checkpoint for faces/clip_score or lm/challenge_accuracy: ratio skipped")

    coll_name = "faces" if (data / "collections" / "faces" / "collection.json").is_file() else "lm"
    coll = open_collection(data / "collections" / coll_name)
    sizes = [int(s) for s in a.sizes.split(",")]
    tp = pd.DataFrame(speed.collection_throughput(coll, sizes, repeat=a.repeat, device=device))
    tp.insert(0, "collection", coll_name)
    tp.insert(1, "device", device)
    out.mkdir(parents=True, exist_ok=True)
    tp.to_csv(out / f"throughput_{device.split(':')[0]}.csv", index=False)
    piv = tp.pivot(index="n_loras", columns="model", values="loras_per_second")
    piv["glnet / dense"] = piv["glnet"] / piv["dense"]
    print(f"LoRAs per second on {coll_name} LoRAs ({device}):")
    print(piv.to_string(float_format=lambda v: f"{v:,.1f}"))
