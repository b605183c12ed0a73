"""`lol zoo build`, `lol zoo status`, `lol zoo report`, `lol zoo precompute`, `lol zoo measure`: build the LoRA zoo
(base models + labelled collections), resumably; describe it; ship what the explorer shows first (maps,
predictions) with each collection; measure a label again to raise its reliability.

Light at import: torch, transformers and diffusers are imported only when a build runs.
"""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("zoo", help="build the LoRA zoo (base models and labelled LoRA collections)")
    zsub = p.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    zsub.required = True

    b = zsub.add_parser("build", help="train missing base models, run collection jobs, pack collections "
                                      "(re-run to resume after a kill)")
    b.add_argument("--preset", choices=("ci", "default"), default="ci")
    b.add_argument("--out", default="data", help="output folder (default: data)")
    b.add_argument("--executor", choices=("local", "ray"), default="local")
    b.add_argument("--only", default=None,
                   help="comma list of targets: base, faces, fashion, fashion_v1, lm, lm_v2 (a collection pulls in its base "
                        "models)")
    b.add_argument("--base", default=None, help="existing Stable Diffusion folder to use instead of training one")
    b.add_argument("--sibling-base", default=None,
                   help="existing Stable Diffusion folder for the sibling base sd_v1 (e.g. SD-1.4 beside --base SD-1.5)")
    b.add_argument("--scorer", default=None, help="existing CLIP folder to use as the scorer instead of training")
    b.add_argument("--lm-base", default=None, help="existing causal-LM folder (e.g. Qwen2) instead of training one")
    b.add_argument("--lm-sibling-base", default=None,
                   help="existing causal-LM folder for the sibling base lm_v2 (same architecture as --lm-base, other "
                        "weights, e.g. Qwen2.5 beside Qwen2)")
    b.add_argument("--group-size", type=int, default=None, help="LoRAs trained together in one batched pass")
    b.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    b.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process (default 1: fastest for the tiny zoo models on a shared CPU)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--pack-partial", action="store_true",
                   help="train nothing: pack the groups finished so far (an interrupted build ships what it has)")
    b.set_defaults(func=cmd_build)

    s = zsub.add_parser("status", help="what is built in an output folder")
    s.add_argument("--out", default="data")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    r = zsub.add_parser("report", help="write OUT/README.md from the build's own records")
    r.add_argument("--out", default="data")
    r.set_defaults(func=cmd_report)

    m = zsub.add_parser("precompute", help="write beside each collection what the explorer shows first: its 2-D "
                                           "maps (UMAP of its invariant features and of every fitting checkpoint's "
                                           "embedding) and those checkpoints' predictions; run again after a "
                                           "collection is rebuilt or a model retrained")
    m.add_argument("--out", default="data", help="data folder (collections/ and checkpoints/ under it)")
    m.add_argument("--only", default=None, help="comma list of collections (default: all under OUT/collections)")
    m.set_defaults(func=cmd_precompute)

    ms = zsub.add_parser("measure", help="measure a label of a packed collection once more with another noise seed "
                                         "and the build's protocol: faces clip_score or identity_gain, fashion "
                                         "class_gain (resumable; averaged measurements raise the label's "
                                         "reliability; `lol zoo report` shows it)")
    ms.add_argument("--out", default="data", help="data folder (collections/ under it)")
    ms.add_argument("--collection", default="faces")
    ms.add_argument("--label", default="clip_score", choices=("clip_score", "identity_gain", "class_gain"))
    ms.add_argument("--seed", type=int, nargs="+", default=None,
                    help="noise seed(s), not the build's own (42); several seeds are measured side by side, one "
                         "worker process (one torch thread) per seed")
    ms.add_argument("--apply", action="store_true",
                    help="measure nothing: make the label the mean of all its measurements (every LoRA must have "
                         "every one); then rerun `lol zoo precompute` and the notebooks")
    ms.add_argument("--limit", type=int, default=None, help="measure at most this many LoRAs, then stop")
    ms.add_argument("--main-rows", action="store_true",
                    help="measure only the LoRAs the tasks train on (the collection's most common rank) first; a later "
                         "run without it measures the rest")
    ms.add_argument("--chunk", type=int, default=8, help="LoRAs per batched pass")
    ms.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ms.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads of a single seed's run (default 1: on a CPU, give several seeds instead)")
    ms.set_defaults(func=cmd_measure)


def cmd_measure(args) -> int:
    from pathlib import Path

    import torch

    from ..errors import LoLError
    from ..zoo.measure import apply_measurements, measure

    folder = Path(args.out) / "collections" / args.collection
    if args.apply:
        rel = apply_measurements(folder, args.label)
        print(f"{folder}: {args.label} is now the mean of {rel['k']} measurements of {rel['n']} LoRAs; reliability "
              f"{rel['r_mean']:.3f} (one measurement {rel['r_single']:.3f})")
        return 0
    if not args.seed:
        raise LoLError("lol zoo measure: give --seed S (a noise seed other than the build's) or --apply")
    seeds = list(dict.fromkeys(args.seed))
    for s in seeds:                    # every seed's refusal (the build's seed, a file of other LoRAs) before any work
        measure(folder, s, args.label, limit=0, main_rows=args.main_rows)
    calls = [(str(folder), s, args.label, args.limit, args.chunk, args.device, args.main_rows) for s in seeds]
    if len(seeds) == 1:
        torch.set_num_threads(max(1, args.threads))
    from ..experiments import in_workers

    for path in in_workers(measure_seed, calls, workers=len(seeds)):   # one process per seed, one thread each
        print(f"wrote {path}")
    return 0


def measure_seed(folder: str, seed: int, label: str, limit, chunk: int, device, main_rows: bool):
    """`lol.zoo.measure.measure` of one seed, printing its progress (a worker of ``lol zoo measure --seed S1 S2 …``:
    its lines name the seed's file)."""
    from ..zoo.measure import measure

    return measure(folder, seed, label, limit=limit, chunk=chunk, device=device, main_rows=main_rows,
                   progress=lambda t: print(t, flush=True))


def cmd_build(args) -> int:
    from ..zoo.build import build

    rec = build(preset=args.preset, out=args.out, executor=args.executor, only=args.only,
                base_paths={"sd": args.base, "sd_v1": args.sibling_base, "clip": args.scorer,
                            "lm": args.lm_base, "lm_v2": args.lm_sibling_base}, group_size=args.group_size,
                device=args.device, progress=not args.no_progress, threads=args.threads,
                pack_partial=args.pack_partial)
    cols = ", ".join(f"{k}: {v['n_loras']} LoRAs" for k, v in rec["collections"].items()) or "none"
    print(f"zoo build ({args.preset}) in {args.out}: collections {cols}; {rec['last_run_seconds']} s this run")
    return 0


def cmd_status(args) -> int:
    from ..zoo.build import status

    st = status(args.out)
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    for b, ok in st["bases"].items():
        print(f"base {b:8s} {'built' if ok else '-'}")
    for c, info in st["collections"].items():
        if info is None:
            print(f"collection {c:8s} not started")
        else:
            print(f"collection {c:8s} {info['jobs_done']}/{info['jobs']} LoRAs "
                  f"({info['groups_done']}/{info['groups']} groups){', packed' if info['packed'] else ''}")
    return 0


def cmd_report(args) -> int:
    from ..zoo.report import write_data_readme

    print(f"wrote {write_data_readme(args.out)}")
    return 0


def cmd_precompute(args) -> int:
    from pathlib import Path

    from ..errors import CollectionError
    from ..precomputed import DATA_NAME, write_precomputed

    root = Path(args.out)
    found = sorted(p for p in (root / "collections").glob("*") if (p / "collection.json").is_file())
    names = args.only.split(",") if args.only else [p.name for p in found]
    missing = sorted(set(names) - {p.name for p in found})
    if missing:
        raise CollectionError(f"{root / 'collections'}: no packed collection {', '.join(missing)}")
    ckpts = sorted(p.parent for p in (root / "checkpoints").rglob("model.safetensors")
                   if (p.parent / "config.json").is_file())
    for name in names:
        meta = json.loads(write_precomputed(root / "collections" / name, ckpts,
                                            progress=lambda t: print(t, flush=True)).read_text())
        print(f"wrote {root / 'collections' / name / DATA_NAME} ({len(meta['maps'])} maps, predictions of "
              f"{len(meta['predictions'])} models)")
    return 0
