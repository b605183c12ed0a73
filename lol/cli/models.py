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

    p = sub.add_parser("predict", help="predict labels of LoRA files with a trained checkpoint")
    p.add_argument("paths", nargs="+", metavar="PATH", help="LoRA files or folders (any supported format)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="checkpoint folder written by `lol train`")
    g.add_argument("--task", help="use the shipped default checkpoint for this label ($LOL_DATA/checkpoints/index.json, "
                                  "default data/ of this repository)")
    p.add_argument("--json", action="store_true", help="print JSON [{path, predictions: {label: value}}]")
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
    from ..checkpoint import default_checkpoint, load_checkpoint
    from ..formats import read_lora
    from ..predict import predict

    path = args.checkpoint or default_checkpoint(args.task)
    ckpt = load_checkpoint(path, device=args.device)
    loras = []
    for p in args.paths:
        lora = read_lora(p)
        ckpt.spec.check(lora, what=f"checkpoint {path}")
        loras.append(lora)
    df = predict(ckpt, loras)
    labels = ckpt.labels if not args.task else [args.task]
    if args.task and args.task not in ckpt.labels:
        raise LoLError(f"checkpoint {path} does not predict {args.task!r} (it predicts {', '.join(ckpt.labels)})")
    if args.json:
        out = [{"path": p, "predictions": {k: _json(row[k]) for k in labels}}
               for p, (_, row) in zip(args.paths, df.iterrows())]
        print(json.dumps(out, indent=1))
    else:
        print("\t".join(["path", *labels]))
        for p, (_, row) in zip(args.paths, df.iterrows()):
            print("\t".join([p, *(_fmt(_json(row[k])) for k in labels)]))
    return 0


def _json(v):
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and math.isnan(v) else v
