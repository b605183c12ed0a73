"""Build the zoo: base models, then LoRA collections, into one output folder ``OUT``.

::

    OUT/base/{sd,clip,lm}/            base models (``save_pretrained`` folders + record.json, the completion marker)
    OUT/collections/{faces,fashion,lm}/   packed collections (`lol.collection.write_collection`)
    OUT/_build/<collection>/          manifest + finished groups (resumable, see `lol.zoo.jobs`)
    OUT/build.json                    preset, seeds, times, sizes, package versions

Recipes are found by name in `BASE_RECIPES` / `COLLECTION_RECIPES` (``"module:Class"``); a base recipe is built with
``Class()`` or, for a user-given folder (``--base`` / ``--scorer`` / ``--lm-base``), ``Class(pretrained=PATH)``, which
records the folder instead of training. Every step is skipped when already done, so ``lol zoo build`` can be
re-run after a kill and finishes the build with no job lost or done twice.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from .jobs import (ZooError, adopt_packed, adopted_groups, collect_results, compute_seconds, load_object,
                   load_or_create_manifest, make_executor, pending_groups, phase_seconds)

__all__ = ["PRESETS", "BASE_RECIPES", "COLLECTION_RECIPES", "build", "plan", "status", "folder_size"]

BASE_RECIPES: dict[str, str] = {
    "clip": "lol.zoo.image_bases:CLIPBase",
    "sd": "lol.zoo.image_bases:SDBase",
    "sd_v1": "lol.zoo.image_bases:SDSiblingBase",
    "lm": "lol.zoo.lm:LMBase",
    "lm_v2": "lol.zoo.lm:LMSiblingBase",
}
COLLECTION_RECIPES: dict[str, str] = {
    "faces": "lol.zoo.image_recipes:FacesRecipe",
    "fashion": "lol.zoo.image_recipes:FashionRecipe",
    "fashion_v1": "lol.zoo.image_recipes:FashionSiblingRecipe",
    "lm": "lol.zoo.lm:LMRecipe",
    "lm_v2": "lol.zoo.lm:LMSiblingRecipe",
}

# per preset: the build seed and how many jobs share one batched pass (a recipe may override with
# ``group_size(preset) -> int``). Recipes keep their own per-preset settings.
PRESETS: dict[str, dict[str, Any]] = {
    "ci": {"seed": 0, "group_size": {"faces": 4, "fashion": 4, "fashion_v1": 4, "lm": 8, "lm_v2": 8, "*": 4}},
    "default": {"seed": 0, "group_size": {"faces": 8, "fashion": 8, "fashion_v1": 8, "lm": 16, "lm_v2": 16, "*": 8}},
}


def folder_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("lol", "torch", "diffusers", "transformers", "peft", "safetensors", "tokenizers", "numpy", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _command() -> str:
    """The command line as a user would type it (``lol zoo build …``), never the build machine's paths."""
    argv = list(sys.argv)
    head = Path(argv[0]).name if argv else ""
    if head in ("__main__.py", "lol", "lol.exe"):
        return " ".join(["lol", *argv[1:]])
    return " ".join([head, *argv[1:]])


def _parse_only(only: str | Sequence[str] | None, collections: Iterable[str]) -> list[str]:
    known = ["base", *collections]
    if only is None:
        return known
    items = [s.strip() for s in (only.split(",") if isinstance(only, str) else only) if s.strip()]
    bad = [s for s in items if s not in known]
    if bad:
        raise ZooError(f"--only: unknown target(s) {bad}; choose from {', '.join(known)}")
    return items


def plan(only=None, base_recipes=None, collection_recipes=None) -> tuple[list[str], list[str]]:
    """(bases to make, in dependency order; collections to make) for an ``--only`` selection. A collection pulls in
    the bases it requires; ``base`` selects every base."""
    base_recipes = BASE_RECIPES if base_recipes is None else base_recipes
    collection_recipes = COLLECTION_RECIPES if collection_recipes is None else collection_recipes
    targets = _parse_only(only, collection_recipes)
    cols = [c for c in collection_recipes if c in targets]
    want: list[str] = list(base_recipes) if "base" in targets else []
    for c in cols:
        want += list(load_object(collection_recipes[c], f"collection recipe {c!r}").requires)
    order: list[str] = []

    def visit(name, chain=()):
        if name in order:
            return
        if name in chain:
            raise ZooError(f"base models depend on each other in a cycle: {' -> '.join(chain + (name,))}")
        if name not in base_recipes:
            raise ZooError(f"no base recipe named {name!r} (known: {', '.join(base_recipes)})")
        for dep in load_object(base_recipes[name], f"base recipe {name!r}").requires:
            visit(dep, chain + (name,))
        order.append(name)

    for b in want:
        visit(b)
    return order, cols


def _fingerprint(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if Path(path).is_file() else "missing"


def _make_base(name: str, ref: str, out: Path, preset: str, seed: int, device: str | None,
               given: str | Path | None) -> dict[str, Any]:
    """Train (or link a user-given folder as) base ``name`` unless OUT/base/<name>/record.json says it is done."""
    path = out / "base" / name
    rec_path = path / "record.json"
    if given is not None:
        given = Path(given).resolve()
        if not given.is_dir():
            raise ZooError(f"{given}: base model folder for {name!r} not found")
        if rec_path.is_file():
            linked = json.loads(rec_path.read_text()).get("pretrained")
            if linked == str(given):
                return {"status": "exists", "path": f"base/{name}", "pretrained": str(given)}
            if not linked:
                raise ZooError(f"{path} holds a base model trained here; it is not replaced by {given}: use another "
                               f"--out or delete {path}")
        recipe = load_object(ref, f"base recipe {name!r}", pretrained=given)
        status = "linked"
    else:
        recipe = load_object(ref, f"base recipe {name!r}")
        if recipe.is_built(path):
            return {"status": "exists", "path": f"base/{name}"}
        status = "built"
    t0 = time.time()
    record = recipe.build(preset, path, device, seed)
    if not rec_path.is_file():  # recipes should write it last themselves; make sure the marker exists
        path.mkdir(parents=True, exist_ok=True)
        rec_path.write_text(json.dumps(record, indent=2, default=str))
    return {"status": status, "path": f"base/{name}", "seconds": round(time.time() - t0, 1),
            **({"pretrained": str(given)} if given is not None else {})}


def _pack(name: str, recipe, results, out: Path, bases: dict[str, Path], manifest, preset: str, seed: int) -> Path:
    from ..collection import write_collection

    schema = recipe.label_schema()
    tasks = recipe.tasks() if hasattr(recipe, "tasks") else None
    rows = []
    for r in results:
        row = dict(r.row)
        row.setdefault("id", r.job_id)
        if row["id"] != r.job_id:
            raise ZooError(f"collection {name}: row id {row['id']!r} differs from job id {r.job_id!r}")
        row.setdefault("group", r.job_id)
        rows.append(row)
    from .image_bases import _rel

    # each base under the role it plays for the collection (`recipe.base_roles`; a sibling collection records
    # ``{"sd": "base/sd_v1"}``), which is what readers of ``base_model`` look up (`lol.catalog.model_folder`)
    roles = getattr(recipe, "base_roles", {})
    base_dirs = {roles.get(b, b): _rel(bases[b], out) for b in recipe.requires}
    dest = out / "collections" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_collection(dest, (r.lora for r in results), rows, labels=schema, tasks=tasks,
                     base_model=json.dumps(base_dirs, sort_keys=True),
                     provenance={"zoo": {"collection": name, "recipe": manifest["recipe"], "preset": preset,
                                         "seed": seed, "n_jobs": manifest["n_jobs"], "n_packed": len(results),
                                         "group_size": manifest["group_size"], "bases": base_dirs,
                                         "inputs": manifest.get("inputs")}},
                     overwrite=True)
    return dest


def build(preset: str = "ci", out: str | Path = "data", executor: str = "local", only=None,
          base_paths: dict[str, str | Path] | None = None, group_size: int | None = None, device: str | None = None,
          progress: bool = True, base_recipes: dict[str, str] | None = None,
          collection_recipes: dict[str, str] | None = None, threads: int | None = None,
          pack_partial: bool = False, log=print) -> dict[str, Any]:
    """Build (or finish building) the zoo in ``out``; returns the content written to ``out/build.json``.

    ``base_paths`` maps base names (``sd``, ``sd_v1``, ``clip``, ``lm``, ``lm_v2``) to existing model folders used instead of training.
    ``threads`` sets torch's intra-op threads (the zoo's tiny models run many small ops: on a shared CPU one thread
    per process is often >10× faster than two; parallelism comes from Ray workers).
    ``pack_partial`` trains nothing: it packs the groups finished so far into the collection (its provenance says
    how many of the planned LoRAs it holds), so an interrupted build can ship what it has; a later plain build
    resumes and repacks the whole collection.
    """
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if preset not in PRESETS:
        raise ZooError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    P = PRESETS[preset]
    seed = int(P["seed"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_recipes = BASE_RECIPES if base_recipes is None else base_recipes
    collection_recipes = COLLECTION_RECIPES if collection_recipes is None else collection_recipes
    base_paths = {k: v for k, v in (base_paths or {}).items() if v is not None}
    bad = [k for k in base_paths if k not in base_recipes]
    if bad:
        raise ZooError(f"unknown base model name(s) {bad}; known: {', '.join(base_recipes)}")
    bases_todo, cols = plan(only, base_recipes, collection_recipes)
    t_start = time.time()
    record_path = out / "build.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("preset") not in (None, preset):
        raise ZooError(f"{record_path}: this folder holds a {record['preset']!r} build; use another --out for "
                       f"preset {preset!r}")
    record.update(preset=preset, seed=seed, versions=_versions(), platform=platform.platform(),
                  command=_command(), threads=threads)
    record.setdefault("bases", {})
    record.setdefault("collections", {})

    def save():
        # re-read first: another build process (e.g. another --only target) may have written its own entries
        if record_path.is_file():
            disk = json.loads(record_path.read_text())
            for part in ("bases", "collections"):
                record[part] = {**disk.get(part, {}), **{k: v for k, v in record[part].items() if k in mine[part]}}
        record["size_bytes"] = {k: folder_size(out / k) for k in ("base", "collections", "samples")}
        tmp = record_path.with_name(f".build.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1, default=str))
        os.replace(tmp, record_path)

    mine: dict[str, set] = {"bases": set(), "collections": set()}

    bases: dict[str, Path] = {}
    for name in bases_todo:
        log(f"[zoo] base {name}: " + ("linking " + str(base_paths[name]) if name in base_paths else "checking"))
        info = _make_base(name, base_recipes[name], out, preset, seed, device, base_paths.get(name))
        info["size_bytes"] = folder_size(out / "base" / name)
        rec_file = out / "base" / name / "record.json"
        if rec_file.is_file():
            brec = json.loads(rec_file.read_text())
            info["train_seconds"] = brec.get("train_seconds", brec.get("seconds"))
        prev = record["bases"].get(name, {})
        record["bases"][name] = {**prev, **info} if info["status"] == "exists" else info
        mine["bases"].add(name)
        bases[name] = out / "base" / name
        log(f"[zoo] base {name}: {info['status']}" + (f" in {info['seconds']} s" if "seconds" in info else ""))
        save()
    for name in cols:
        recipe = load_object(collection_recipes[name], f"collection recipe {name!r}")
        missing = [b for b in recipe.requires if b not in bases]
        if missing:
            raise ZooError(f"collection {name} needs base(s) {missing}, which are not built")
        gs = group_size or (recipe.group_size(preset) if hasattr(recipe, "group_size") else None) or \
            P["group_size"].get(name, P["group_size"]["*"])
        build_dir = out / "_build" / name
        inputs = {"bases": {b: _fingerprint(bases[b] / "record.json") for b in recipe.requires}}
        manifest = load_or_create_manifest(build_dir, recipe, preset, seed, gs, inputs=inputs)
        prev = record["collections"].get(name, {})
        adopted_now = adopt_packed(build_dir, manifest, out / "collections" / name, log=log,
                                   unrecorded=getattr(recipe, "unrecorded", None))
        # the training time of LoRAs adopted from the packed collection is the earlier build's (its record, when it
        # covered exactly those LoRAs); their groups here record 0 s
        adopted = adopted_groups(build_dir, manifest)
        n_adopted = sum(len(manifest["groups"][g]) for g in adopted)
        adopted_s = None
        if adopted and prev.get("n_loras") == n_adopted:        # the earlier record covered exactly these LoRAs
            adopted_s = prev.get("compute_seconds")
        elif adopted and prev.get("adopted_loras") == n_adopted:  # a resumed run of this grown build
            adopted_s = prev.get("adopted_compute_seconds")
        if adopted_now and adopted_s is None:
            log(f"[zoo] collection {name}: the training time of the {n_adopted} adopted LoRAs is unknown (no earlier "
                f"record of exactly them)")
        todo = pending_groups(build_dir, manifest)
        log(f"[zoo] collection {name}: {manifest['n_jobs']} LoRAs in {len(manifest['groups'])} groups of "
            f"≤{manifest['group_size']}; {len(todo)} group(s) to run ({executor})")
        t0 = time.time()
        summaries = [] if pack_partial else make_executor(executor, device=device, progress=progress).run(
            recipe, build_dir, manifest,
            {**{b: bases[b] for b in recipe.requires}, "samples": out / "samples", "root": out})
        run_s = time.time() - t0
        results = collect_results(build_dir, manifest, partial=pack_partial)
        if not results:
            raise ZooError(f"collection {name}: no finished group to pack in {build_dir}")
        dest = _pack(name, recipe, results, out, bases, manifest, preset, seed)
        group_s = [s["seconds"] for s in summaries]
        trained_s = compute_seconds(build_dir, manifest)
        record["collections"][name] = {
            "n_loras": len(results), "n_groups": len(manifest["groups"]), "group_size": manifest["group_size"],
            "groups_run_now": len(summaries), "seconds_now": round(run_s, 1),
            "seconds_total": round(prev.get("seconds_total", 0.0) + run_s, 1),
            "compute_seconds": round(trained_s + (adopted_s or 0.0), 1),
            **({"adopted_loras": n_adopted, "adopted_compute_seconds": adopted_s} if adopted else {}),
            "seconds_per_lora_now": round(sum(group_s) / max(1, sum(s["n_jobs"] for s in summaries)), 3)
            if summaries else prev.get("seconds_per_lora_now"),
            "size_bytes": folder_size(dest), "path": f"collections/{name}",
            "executor": executor if summaries else prev.get("executor", executor),
            "n_planned": manifest["n_jobs"], "complete": len(results) == manifest["n_jobs"],
            **({"phase_seconds": phases} if (phases := phase_seconds(results, manifest)) else {}),
        }
        mine["collections"].add(name)
        log(f"[zoo] collection {name}: packed {len(results)} LoRAs into {dest} in {run_s:.1f} s")
        save()
    record["last_run_seconds"] = round(time.time() - t_start, 1)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save()
    return record


def status(out: str | Path, collection_recipes: dict[str, str] | None = None,
           base_recipes: dict[str, str] | None = None) -> dict[str, Any]:
    """What is done in ``out``: bases with a record, and per collection the finished / total groups and jobs."""
    out = Path(out)
    collection_recipes = COLLECTION_RECIPES if collection_recipes is None else collection_recipes
    base_recipes = BASE_RECIPES if base_recipes is None else base_recipes
    res: dict[str, Any] = {"bases": {}, "collections": {}}
    for b in base_recipes:
        res["bases"][b] = (out / "base" / b / "record.json").is_file()
    for c in collection_recipes:
        mpath = out / "_build" / c / "manifest.json"
        if not mpath.is_file():
            res["collections"][c] = None
            continue
        m = json.loads(mpath.read_text())
        gdir = out / "_build" / c / "groups"
        done = [g for g in m["groups"] if (gdir / g / "done.json").is_file()]
        res["collections"][c] = {"groups_done": len(done), "groups": len(m["groups"]),
                                 "jobs_done": sum(len(m["groups"][g]) for g in done), "jobs": m["n_jobs"],
                                 "packed": (out / "collections" / c / "collection.json").is_file()}
    return res
