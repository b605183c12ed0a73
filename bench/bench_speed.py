"""LoL against the standard evaluation it replaces, both timed in one run (``python -m bench speed -- [options]``).

At the paper's scale (the default; `lol.speed`):

* image: the CLIP-score label of one LoRA as the paper measures it — 33 prompts × 20 denoising steps with
  classifier-free guidance on SD-1.5's UNet with the LoRA loaded by diffusers, VAE decode of 512×512 images, CLIP
  ViT-B/16 score — with the published architectures (`lol.architectures`) and random weights; a few calls of each
  stage timed and multiplied out;
* language: ARC-Challenge (1,172 questions × 4 options, each scored by log-likelihood) by Qwen2-1.5B with the LoRA
  loaded by PEFT, a few batches of options timed and multiplied out;
* LoL: the shipped checkpoints' model kinds (``data/checkpoints``) and the paper's GL-net, fresh (weights do not
  change the cost), on random LoRAs of SD-1.5 q/v, SD-1.5 all-attention and Qwen2-1.5B q/v shapes, batched.

Each of the four runs in its own subprocess, one after the other, so the peak memory is one model's (Qwen2-1.5B in
float32: ~7 GB). Writes ``speed_scale.csv`` (LoL vs standard, ratio), ``speed_scale_standard.csv`` (the parts timed
and the arithmetic), ``speed_scale.json`` (settings) and ``speed.md`` (`lol.speed.write_speed_md`, with the tiny-zoo
rows of ``speed.csv`` when present) to ``--out``: ``results/`` on the CPU, ``results/gpu/`` on CUDA (chosen
automatically; ``--device`` overrides).

``--quick``: the same code on tiny models with a few steps (seconds on a quiet machine; what the tests run).
``--zoo``: also the old tiny-zoo comparison (`lol.speed.speed_ratios` on ``data/``: the zoo's own labelling against
the shipped checkpoint, same LoRA) and GL-net/dense throughput, written as ``speed.csv`` and ``throughput.csv``.

Duration of the full CPU run: about 8 minutes (``-- --threads 1 --clock cpu``: 500 s at ``nice 10`` on a 2-core
machine shared with other work; the process's CPU time is unaffected by the sharing, the wall clock is). Most of it is
the standard evaluation's few timed calls (one guided SD-1.5 UNet step ≈ 19 CPU s, one 512×512 VAE decode ≈ 28 CPU s,
one batch of 4 ARC-C options through Qwen2-1.5B ≈ 7 CPU s) and building the random-weight models.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILDREN = ("image", "lm", "lol-image", "lol-lm")


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench speed")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--data", default=None, help="folder with checkpoints/ (and base/, collections/ for --zoo); "
                                                 "default: $LOL_DATA, else data/")
    ap.add_argument("--out", default=None, help="default: results/ (CPU) or results/gpu/ (CUDA)")
    ap.add_argument("--quick", action="store_true", help="tiny models, few steps: tests the code path in seconds")
    ap.add_argument("--parts", default="image,lm", help="sides to run: image, lm (default both)")
    ap.add_argument("--kinds", default=None, help="LoL kinds (default: the shipped checkpoints' kinds, then glnet)")
    ap.add_argument("--batch", type=int, default=None, help="LoRAs per LoL call (default 64 on CPU, 1024 on CUDA)")
    ap.add_argument("--memory-budget-gb", type=float, default=None,
                    help="LoL weights and batch features each within this (default 3 on CPU, 40 on CUDA)")
    ap.add_argument("--prompts-per-call", type=int, default=None, help="images per UNet/VAE/CLIP call "
                                                                       "(default 1 on CPU, 33 on CUDA)")
    ap.add_argument("--unet-calls", type=int, default=2, help="timed denoising steps, after one warm-up")
    ap.add_argument("--sequences-per-call", type=int, default=None,
                    help="ARC option sequences per LM forward (default 4 on CPU: one question; 64 on CUDA)")
    ap.add_argument("--lm-calls", type=int, default=2, help="timed LM forwards, after one warm-up")
    ap.add_argument("--repeat", type=int, default=3, help="timed LoL calls (and --zoo repeats)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for every part (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time the ratios divide: wall clock, or the process's CPU time (with --threads 1 on a CPU "
                         "shared with other work: what the computation needs on a free core)")
    ap.add_argument("--in-process", action="store_true", help="run the parts in this process (tests)")
    ap.add_argument("--zoo", action="store_true", help="also the tiny-zoo rows (speed.csv, throughput.csv)")
    ap.add_argument("--sizes", default="1,8,64,512,4096", help="--zoo: LoRAs per call of the throughput rows")
    ap.add_argument("--child", default=None, choices=CHILDREN, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    from lol.devices import default_device
    from lol.paths import data_root

    a.device = default_device(a.device)
    gpu = a.device.startswith("cuda")
    a.data = Path(a.data) if a.data else data_root()
    a.out = Path(a.out) if a.out else REPO / "results" / ("gpu" if gpu else "")
    a.batch = a.batch or (1024 if gpu else 64)
    a.memory_budget_gb = a.memory_budget_gb or (40.0 if gpu else 3.0)
    a.prompts_per_call = a.prompts_per_call or (33 if gpu and not a.quick else 1)
    a.sequences_per_call = a.sequences_per_call or (64 if gpu and not a.quick else 4)
    if a.quick:
        a.batch = min(a.batch, 8)
    return a


def _kinds(a) -> tuple[list[str], dict]:
    from lol import speed

    shipped = speed.shipped_kinds(a.data / "checkpoints")
    kinds = a.kinds.split(",") if a.kinds else ([*shipped, "glnet"] if shipped else list(speed.DEFAULT_KINDS))
    return list(dict.fromkeys(kinds)), shipped


def run_child(a, which: str) -> list[dict]:
    """One part, in this process: `Part.row` dicts (standard) or `lol_at_scale` rows with ``side`` and ``LoRA``."""
    from lol import speed

    if which == "image":
        return [p.row() for p in speed.standard_image_evaluation(
            a.quick, a.device, prompts_per_call=a.prompts_per_call, unet_calls=a.unet_calls)]
    if which == "lm":
        return [p.row() for p in speed.standard_lm_evaluation(
            a.quick, a.device, sequences_per_call=a.sequences_per_call, calls=a.lm_calls)]
    side = speed.IMAGE if which == "lol-image" else speed.LANGUAGE
    kinds, shipped = _kinds(a)
    rows = []
    for words, spec in speed.scale_specs(a.quick)[side]:
        for r in speed.lol_at_scale(spec, kinds, {k: v["hparams"] for k, v in shipped.items()}, batch=a.batch,
                                    memory_budget=a.memory_budget_gb * 1e9, repeat=a.repeat, device=a.device):
            rows.append({"side": side, "LoRA": f"{words} ({len(spec)} modules)", **r})
            print(f"  {words}: {r['kind']:10s} {r['seconds per LoRA']:.3g} s per LoRA ({r['how']})", file=sys.stderr,
                  flush=True)
    return rows


def _spawn(a, argv, which: str) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "bench.bench_speed", *argv, "--child", which]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"bench speed: part {which!r} failed (exit {r.returncode})")
    return json.loads(r.stdout.strip().splitlines()[-1])


def notes(a, threads: int, lol_rows) -> list[str]:
    from lol import speed

    img, arc = (speed.QUICK_IMAGE, speed.QUICK_ARC) if a.quick else (speed.ImageProtocol(), speed.ArcProtocol())
    return [
        f"Measured, then multiplied: every part of the standard evaluation is timed on a few calls after a warm-up "
        f"call (median of the timed calls), then × the calls one LoRA needs (`arithmetic`). Image: "
        f"{img.prompts} prompts × {img.steps} steps, guidance {img.guidance}, {a.prompts_per_call} prompt(s) per "
        f"call. Language: {arc.questions:,} questions × {arc.options} options, {a.sequences_per_call} option "
        f"sequences per forward.",
        f"ARC-C token lengths are assumed, not measured on the dataset: {arc.prompt_tokens} tokens for "
        f"`Question: …\\nAnswer:` + {arc.option_tokens} per option (`lol.speed.ArcProtocol`: ARC-C prompts with all "
        "options average ~454 characters in evalscope's statistics); each option a full sequence, as "
        "lm-evaluation-harness scores it. Sharing the question's prefix across options (KV cache) would cut the "
        f"tokens per question from {arc.options * (arc.prompt_tokens + arc.option_tokens)} to "
        f"{arc.prompt_tokens + arc.options * arc.option_tokens}, dividing the LM time by about "
        f"{arc.options * (arc.prompt_tokens + arc.option_tokens) / (arc.prompt_tokens + arc.options * arc.option_tokens):.1f}.",
        "The standard image evaluation loads a rank-4 LoRA on the UNet's to_q/to_v (the paper's layer set); the "
        "all-projection LoRA adds a little forward cost, so its ratio here is a lower bound. Not timed on either "
        "side: reading the LoRA file, loading the base models once.",
        "LoL: a fresh model of each kind with the shipped checkpoint's hyperparameters (weights do not change the "
        "cost; GL-net, the paper's model, with its defaults), random rank-4 LoRAs with factors in memory, "
        f"featurization included, median of {a.repeat} calls after a warm-up; seconds per LoRA = seconds per call ÷ "
        "LoRAs per call.",
        *([f"Models whose weights exceed the {a.memory_budget_gb:g} GB budget ({', '.join(reduced)}: Σ n·m or Σ n² "
           "inputs × width) are timed at a smaller width and their time scaled up linearly to the shipped width: "
           "their featurization does not grow with the width, so this over-estimates their time."]
          if (reduced := sorted({r["kind"] for r in lol_rows if r["timed width"] != r["width"]})) else []),
        f"torch {threads} thread(s); the LoL models and the standard evaluation ran one after the other in the same "
        "run, each part in its own process.",
    ]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        rows = run_child(a, a.child)
        print(json.dumps(rows, default=float))
        return
    from lol import speed

    gpu = a.device.startswith("cuda")
    n = torch.get_num_threads()
    name = torch.cuda.get_device_name() if gpu else f"CPU ({n} thread{'s' if n > 1 else ''})"
    print(f"device: {a.device} ({name}); {'quick mode' if a.quick else 'paper scale'}; out: {a.out}", flush=True)
    sides = [s.strip() for s in a.parts.split(",") if s.strip()]
    which = [c for s in sides for c in ((s, f"lol-{s}") if s in ("image", "lm") else ())]
    if not which:
        raise SystemExit(f"--parts: choose from image, lm (got {a.parts!r})")
    t_all, parts, lol_rows = time.perf_counter(), [], []
    for w in which:
        t0 = time.perf_counter()
        print(f"[{w}] …", flush=True)
        rows = run_child(a, w) if a.in_process else _spawn(a, argv, w)
        (lol_rows if w.startswith("lol-") else parts).extend(rows)
        for r in rows:
            if "part" in r:
                print(f"  {r['part']}: {r['seconds per call']:.4g} s (CPU {r['CPU seconds per call']:.4g} s) × "
                      f"{r['calls per LoRA']:,.4g} ({r['arithmetic']}) = {r['seconds per LoRA']:.4g} s per LoRA",
                      flush=True)
        print(f"[{w}] {time.perf_counter() - t0:.0f} s", flush=True)
    _, shipped = _kinds(a)
    std, cmp = speed.scale_tables(parts, lol_rows, shipped, a.clock)
    a.out.mkdir(parents=True, exist_ok=True)
    std.to_csv(a.out / "speed_scale_standard.csv", index=False)
    cmp.to_csv(a.out / "speed_scale.csv", index=False)
    dtypes = {"image": "float16" if gpu else "float32", "lm": "bfloat16" if gpu else "float32"}
    meta = {"command": "python -m bench speed" + (" -- " + " ".join(argv) if argv else ""),
            "date": time.strftime("%Y-%m-%d"), "device": name, "quick": a.quick, "clock": a.clock,
            "dtype": ", ".join(f"{dtypes[s]} ({s})" for s in sides if s in dtypes),
            "seconds": round(time.perf_counter() - t_all), "notes": notes(a, torch.get_num_threads(), lol_rows)}
    (a.out / "speed_scale.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    if a.zoo:
        zoo_rows(a, name)
    md = speed.write_speed_md(a.out)
    for _, r in cmp.iterrows():
        c = f"{speed.CLOCKS[a.clock]} per LoRA"
        print(f"{r['side']} | {r['LoRA']} | {r['kind']}: standard {r[f'standard {c}']:,.4g} s / LoL "
              f"{r[c]:.3g} s = {r['ratio']:,.0f}× ({a.clock})")
    print(f"wrote {md} ({meta['seconds']} s)")


def zoo_rows(a, name: str) -> None:
    """The tiny-zoo comparison (our small base models, not the paper's scale): ``speed.csv`` and ``throughput.csv``."""
    import pandas as pd

    from lol import speed
    from lol.collection import open_collection

    data, out = a.data, a.out
    rows = speed.speed_ratios(data / "base", data / "collections", data / "checkpoints", repeat=a.repeat,
                              device=a.device)
    if rows:
        pd.DataFrame(rows).to_csv(out / "speed.csv", index=False)
        for r in rows:
            print(f"{r['task']}: standard {r['standard_seconds']:.4g} s (label {r['recomputed_label']:.4g}, "
                  f"stored {r['stored_label']:.4g}), LoL {r['lol_seconds'] * 1e3:.3g} ms -> {r['ratio']:,.0f}x")
    else:
        print("no shipped collection with a checkpoint for faces/clip_score or lm/challenge_accuracy: zoo rows skipped")
        return
    coll_name = "faces" if (data / "collections" / "faces" / "collection.json").is_file() else "lm"
    coll = open_collection(data / "collections" / coll_name)
    sizes = [int(s) for s in a.sizes.split(",")]
    tp = pd.DataFrame(speed.collection_throughput(coll, sizes, repeat=a.repeat, device=a.device))
    tp.insert(0, "collection", coll_name)
    tp.to_csv(out / "throughput.csv", index=False)
    print(f"LoRAs per second on {coll_name} LoRAs ({name}):")
    print(tp.pivot(index="n_loras", columns="model", values="loras_per_second").to_string(
        float_format=lambda v: f"{v:,.1f}"))


if __name__ == "__main__":
    main()
