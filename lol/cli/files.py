"""`lol inspect`, `lol import`, `lol export`, `lol synth`: LoRA files in and out, packed collections.

Every command reports errors as one ``error: <path>: <problem>`` line (see `lol.cli.main`). Only light modules are
imported at the top; pandas, safetensors and tqdm are imported by the commands that need them.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from ..errors import CollectionError, LoLError, LoRAFormatError

DTYPES = ("float16", "bfloat16", "float32")


def register(sub) -> None:
    p = sub.add_parser("inspect", help="show the modules, ranks, alpha and ‖ΔW‖ of a LoRA file, folder or collection")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("import", help="pack a folder tree of LoRA files (any format) into a collection")
    p.add_argument("src", help="folder with LoRA files / PEFT folders (searched recursively)")
    p.add_argument("dest", help="collection folder to create")
    p.add_argument("--labels", help="CSV or Parquet table joined on a column 'id' (relative path) or 'path'")
    p.add_argument("--base-model", help="description of the base model, e.g. 'runwayml/stable-diffusion-v1-5'")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="storage dtype of the factors")
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write every LoRA of a collection back as files")
    p.add_argument("collection")
    p.add_argument("dest")
    p.add_argument("--format", choices=("diffusers", "peft"), default="diffusers")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="file dtype (default: float32)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("synth", help="write synthetic LoRAs with known GL-invariant labels")
    p.add_argument("--spec", choices=("sd15", "tiny"), default="tiny")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--rank", default="4", help="rank, or comma-separated ranks drawn per LoRA (e.g. 2,4,8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--packed", action="store_true", help="write a packed collection instead of files")
    p.add_argument("--dtype", choices=DTYPES, default="float16")
    p.set_defaults(func=cmd_synth)


def _torch_dtype(name):
    import torch

    return None if name is None else getattr(torch, name)


# ----------------------------------------------------------------------------------------------------------- inspect

def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def cmd_inspect(args) -> int:
    from ..formats import detect_format, read_lora

    path = Path(args.path)
    fmt = detect_format(path)
    if fmt == "collection":
        return _inspect_collection(path, args.json)
    lora = read_lora(path)
    mods = [{"name": m.name, "out_features": m.out_features, "in_features": m.in_features, "rank": m.rank,
             "alpha": m.alpha, "scale": m.scale, "delta_norm": m.delta_norm()} for m in lora]
    metadata = dict(lora.metadata)
    if lora.config:
        metadata["adapter_config"] = lora.config
    full = [{"name": n, "shape": list(s)} for n, s in lora.full_weight_modules]
    if args.json:
        print(json.dumps({"path": str(path), "format": fmt, "modules": mods, "full_weight_modules": full,
                          "metadata": metadata}, indent=1))
        return 0
    print(f"{path}: {fmt} LoRA, {len(mods)} modules, ranks {sorted(set(lora.ranks))}, "
          f"{lora.num_parameters():,} parameters")
    rows = [[m["name"], f"{m['out_features']}×{m['in_features']}", m["rank"], _fmt(m["alpha"]), _fmt(m["scale"]),
             _fmt(m["delta_norm"])] for m in mods]
    rows += [[f["name"], "×".join(map(str, f["shape"])), "full", "-", "-", "-"] for f in full]
    _print_table(rows, ["module", "out×in", "rank", "alpha", "scale", "‖ΔW‖_F"])
    if full:
        print(f"{len(full)} full-weight tensor(s) (rank 'full': saved whole beside the LoRA pairs, e.g. "
              f"modules_to_save heads; listed, not used by LoL models)")
    if metadata:
        print("metadata:")
        for k, v in metadata.items():
            s = " ".join((v if isinstance(v, str) else json.dumps(v)).split())
            print(f"  {k}: {s if len(s) <= 100 else s[:97] + '...'}")
    return 0


def _inspect_collection(path: Path, as_json: bool) -> int:
    from ..collection import open_collection

    c = open_collection(path)
    ranks = c.ranks
    mods = [{"name": n, "out_features": o, "in_features": i, "rmax": int(ranks[:, ell].max()),
             "ranks": sorted({int(r) for r in ranks[:, ell].tolist()})}
            for ell, (n, (o, i)) in enumerate(zip(c.spec.names, c.spec.shapes))]
    cols = [col for col in c.table.columns if col not in ("id", "source")]
    summary = {"path": str(path), "format": "collection", "n": len(c), "base_model": c.base_model,
               "dtype": c.meta.get("dtype"), "modules": mods, "labels": c.labels, "tasks": c.tasks,
               "columns": cols, "fingerprint": c.fingerprint, "metadata": {"provenance": c.provenance}}
    if as_json:
        print(json.dumps(summary, indent=1, default=str))
        return 0
    print(f"{path}: packed collection of {len(c)} LoRAs over {len(c.spec)} modules "
          f"(Σ(n+m) = {c.spec.total_out_plus_in:,}, Σ n·m = {c.spec.total_dense:,}), {summary['dtype']} factors")
    print(f"base model: {c.base_model or '-'}   fingerprint: {c.fingerprint[:16]}")
    rank_counts = Counter(int(r) for r in ranks.flatten().tolist())
    print("ranks: " + ", ".join(f"{r} ×{k}" for r, k in sorted(rank_counts.items())) + " (module instances)")
    if "format" in c.table.columns:
        print("source formats: " + ", ".join(f"{f} ×{k}" for f, k in c.table["format"].value_counts().items()))
    if c.labels:
        print("labels:")
        for name, info in c.labels.items():
            print(f"  {name} ({info.get('kind')}, task {info.get('task') or '-'}): {info.get('description', '')}")
    if c.tasks:
        print("tasks: " + "; ".join(f"{t}: {', '.join(v)}" for t, v in c.tasks.items()))
    print(f"columns: {', '.join(cols)}")
    _print_table([[m["name"], f"{m['out_features']}×{m['in_features']}", m["rmax"]] for m in mods[:8]],
                 ["module", "out×in", "rmax"])
    if len(mods) > 8:
        print(f"... and {len(mods) - 8} more modules")
    return 0


# ------------------------------------------------------------------------------------------------------------ import

def cmd_import(args) -> int:
    """Pack SRC into DEST with `lol.packing.pack` (the explorer packs folders and uploads with it too). Never lies and
    never loses data: an exclusive lock per DEST (a concurrent import is refused), everything is built in temporary
    siblings of DEST and renamed into place only when complete and valid (files whose data turn out unreadable, e.g.
    NaN/Inf, are dropped before that), temporary folders of killed imports are removed on start, and every file of
    SRC that is not imported is listed with its reason."""
    from ..packing import PackError, pack, scan

    src, dest = Path(args.src), Path(args.dest)
    if not src.exists():
        raise LoRAFormatError(src, "no such folder")
    paths, not_lora = scan(src)
    not_lora = [(p.relative_to(src).as_posix(), why) for p, why in not_lora]
    if not paths:
        _report_failures([], [], not_lora)
        raise LoRAFormatError(src, "no LoRA files found (.safetensors files or PEFT folders)")
    try:
        res = pack(paths, dest, root=src if src.is_dir() else src.parent, labels=args.labels,
                   base_model=args.base_model, dtype=_torch_dtype(args.dtype), overwrite=args.overwrite,
                   provenance={"command": "lol import", "source_root": str(src)}, progress=True,
                   doing="importing into")
    except PackError as e:
        _report_failures(e.packed.failed, e.packed.mismatched, not_lora)
        raise CollectionError(f"{src}: {e}") from None
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"packed {res.n} LoRAs ({len(res.spec)} modules each) into {dest}")
    _report_failures(res.failed, res.mismatched, not_lora)
    return 0


def _report_failures(failed, mismatched, not_lora=()) -> None:
    if mismatched:
        print(f"{len(mismatched)} LoRA(s) skipped: their modules differ from the majority spec:", file=sys.stderr)
        for p, why in mismatched:
            print(f"  {p}: {why}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} file(s) skipped: unreadable:", file=sys.stderr)
        for p, why in failed:
            print(f"  {p}: {why}", file=sys.stderr)
    if not_lora:
        print(f"{len(not_lora)} file(s) not imported: not LoRA files:", file=sys.stderr)
        for p, why in not_lora:
            print(f"  {p}: {why}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------------------ export

def _export_path(dest: Path, lora_id: str, suffix: str) -> Path:
    parts = Path(lora_id).parts
    if not parts or ".." in parts or Path(lora_id).is_absolute():
        raise CollectionError(f"id {lora_id!r} cannot be used as a relative file path")
    p = dest.joinpath(*parts)
    if p.suffix == ".safetensors":
        p = p.with_suffix("")
    return p.with_name(p.name + suffix) if suffix else p


def cmd_export(args) -> int:
    from tqdm import tqdm

    from ..collection import open_collection
    from ..formats import save_diffusers, save_peft

    c = open_collection(args.collection)
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    dtype = _torch_dtype(args.dtype)
    written = []
    for i, lora in enumerate(tqdm(c.loras(), total=len(c), desc="exporting", unit="LoRA", file=sys.stderr,
                                  mininterval=0.5)):
        lora_id = str(c.table["id"].iloc[i])
        if args.format == "peft":
            out = _export_path(dest, lora_id, "")
            save_peft(lora, out, dtype=dtype)
        else:
            out = _export_path(dest, lora_id, ".safetensors")
            save_diffusers(lora, out, dtype=dtype)
        written.append(out.relative_to(dest).as_posix())
    table = c.table.drop(columns=["id"]).copy()
    table.insert(0, "path", written)
    table.to_csv(dest / "labels.csv", index=False)
    print(f"wrote {len(written)} {args.format} LoRAs to {dest} (table: {dest / 'labels.csv'})")
    return 0


# ------------------------------------------------------------------------------------------------------------- synth

def cmd_synth(args) -> int:
    from ..formats import save_diffusers
    from ..synth import spec_by_name, synth_collection

    try:
        ranks = tuple(int(r) for r in str(args.rank).split(","))
    except ValueError:
        raise LoLError(f"--rank must be an integer or a comma-separated list, got {args.rank!r}") from None
    if args.n < 1 or min(ranks) < 1:
        raise LoLError("--n and --rank must be positive")
    ss = synth_collection(spec_by_name(args.spec), args.n, ranks=ranks, seed=args.seed, alpha=args.alpha)
    out, dtype = Path(args.out), _torch_dtype(args.dtype)
    if args.packed:
        c = ss.write(out, dtype=dtype, base_model=f"synthetic ({args.spec} spec)")
        print(f"wrote a packed collection of {len(c)} synthetic LoRAs to {out}")
        return 0
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    names = []
    for i, lora in enumerate(tqdm(ss.loras(), total=args.n, desc="writing", unit="LoRA", file=sys.stderr,
                                  mininterval=0.5)):
        name = f"{ss.table['id'].iloc[i]}.safetensors"
        save_diffusers(lora, out / name, dtype=dtype)
        names.append(name)
    table = ss.table.copy()
    table["id"] = names
    table.drop(columns=["source", "format"]).to_csv(out / "labels.csv", index=False)
    (out / "labels.json").write_text(json.dumps({"labels": ss.labels, "tasks": ss.tasks}, indent=1))
    print(f"wrote {args.n} synthetic {args.spec} LoRAs (diffusers format) and labels.csv to {out}")
    return 0
