"""`lol train` and `lol predict`: train a LoL model on a packed collection; predict labels of LoRA files.

Only light modules are imported at the top; torch-heavy modules load inside the commands.
"""
from __future__ import annotations

import json
import math
import sys

from ..errors import LoLError


def register(sub) -> None:
    from ..models import MODELS  # the registry is the one list of kinds

    p = sub.add_parser("train", help="train a LoL model on a collection and write a checkpoint")
    p.add_argument("--collection", required=True, help="packed collection folder")
    p.add_argument("--task", required=True, help="task name, or LABEL[,LABEL...]")
    p.add_argument("--model", default="glnet", choices=tuple(MODELS), help="model kind (default: glnet)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=64, help="MLP width")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--patience", type=int, default=30, help="early-stopping patience in epochs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict labels of LoRA files (or folder trees of them) with a trained "
                                       "checkpoint, here or on a Ray cluster")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="LoRA files, PEFT folders, or folders searched recursively (any supported format)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="checkpoint folder written by `lol train`")
    g.add_argument("--task", help="use the shipped default checkpoint for this label ($LOL_DATA/checkpoints/index.json, "
                                  "default data/ of this repository)")
    p.add_argument("--json", action="store_true", help="print JSON [{path, predictions: {label: value}}]")
    p.add_argument("--out", help="write the table to this file (.csv, .tsv or .parquet) and the skipped files with "
                                 "their reasons to <stem>.skipped.csv beside it, instead of printing the table")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: this process (default); ray: tasks on a Ray cluster (same table)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to use ('auto': the one `ray start` began here; default: start a local one)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="LoRAs predicted together (default 32)")
    p.add_argument("--files-per-task", type=int, default=256, help="files per Ray task (default 256)")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_predict)


def _fmt(v) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else (f"{v:.4g}" if isinstance(v, float) else str(v))


def cmd_train(args) -> int:
    from ..collection import open_collection
    from ..train import TrainConfig, train

    coll = open_collection(args.collection)
    task = args.task.split(",") if "," in args.task else args.task
    labels = coll.label_columns(task)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, width=args.width, seed=args.seed, device=args.device,
                      batch_size=args.batch_size, patience=args.patience, progress=not args.no_progress)
    print(f"training {args.model} on {args.collection} ({len(coll)} LoRAs, {len(coll.spec)} modules) "
          f"for {', '.join(labels)}", file=sys.stderr)
    res = train(coll, labels, args.model, cfg)
    res.save(args.out)
    sizes = {s: int((res.split == s).sum()) for s in ("train", "val", "test")}
    print(f"best epoch {res.best_epoch} of {len(res.history)} ({res.seconds:.1f} s); "
          f"split sizes {sizes}")
    shown = "test" if "test" in res.metrics else "val"
    for label, ms in res.metrics[shown].items():
        print(f"{shown} {label}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in ms.items()))
    print(f"checkpoint written to {args.out}")
    return 0


def cmd_predict(args) -> int:
    """Every file found is either a row of the table or listed as skipped with its reason (stderr, and
    ``<stem>.skipped.csv`` with ``--out``); a run where nothing could be scored is an error naming the first
    reason."""
    from ..checkpoint import default_checkpoint, load_checkpoint
    from ..predict import predict_files

    path = args.checkpoint or default_checkpoint(args.task)
    ckpt = load_checkpoint(path, device=args.device)
    if args.task and args.task not in ckpt.labels:
        raise LoLError(f"checkpoint {path} does not predict {args.task!r} (it predicts {', '.join(ckpt.labels)})")
    res = predict_files(ckpt, args.paths, args.executor, batch_size=args.batch_size,
                        files_per_task=args.files_per_task, ray_address=args.ray_address, num_cpus=args.num_cpus,
                        progress=args.progress)
    if len(res.table) == 0:
        n = len(res.skipped)
        if n > 1:
            _report_skipped(res.skipped)
        if n:
            p, why = res.skipped.iloc[0]
            raise LoLError(f"{p}: {why}" + (f" (no LoRA scored: {n} files skipped, listed above)" if n > 1 else ""))
        raise LoLError(f"{', '.join(args.paths)}: no LoRA files found (.safetensors files or PEFT folders)")
    labels = ckpt.labels if not args.task else [args.task]
    if args.out:
        written = res.save(args.out)
        print(f"wrote {len(res.table)} predictions to {written[0]} ({len(res.skipped)} skipped: {written[1]})")
    elif args.json:
        out = [{"path": row["path"], "predictions": {k: _json(row[k]) for k in labels}}
               for _, row in res.table.iterrows()]
        print(json.dumps(out, indent=1))
    else:
        print("\t".join(["path", *labels]))
        for _, row in res.table.iterrows():
            print("\t".join([row["path"], *(_fmt(_json(row[k])) for k in labels)]))
    _report_skipped(res.skipped)
    return 0


def _report_skipped(skipped) -> None:
    if len(skipped):
        print(f"{len(skipped)} file(s) skipped:", file=sys.stderr)
        for p, why in skipped.itertuples(index=False):
            print(f"  {p}: {why}", file=sys.stderr)


def _json(v):
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and math.isnan(v) else v
