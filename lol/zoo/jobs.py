"""A resumable build of one collection: a manifest of seeded jobs in fixed groups, group outputs written atomically.

Layout under a build folder ``B`` (``OUT/_build/<collection>/``)::

    B/manifest.json            recipe, preset, seed, group size, every job (id, seed, params) and the fixed groups
    B/groups/g00007/           one finished group: loras.safetensors (U, V of every job), results.json,
                               done.json (completion record, written last inside the temp dir)
    B/groups/.g00007.tmp-*     a group being written (renamed into place when complete; removed on restart)

A group is done iff ``B/groups/<gid>/done.json`` exists. Killing the build at any moment loses at most the groups in
flight; re-running skips finished groups, redoes the rest, and gives identical results because the manifest (hence
each group's jobs) is fixed and each job's result depends only on its seed and params.

Executors: `LocalExecutor` (in-process, default) and `RayExecutor` (one ``@ray.remote`` task per group, ``num_gpus=1``
when CUDA is available, else one CPU; ``ray.init`` starts a local cluster unless one is running).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import LoLError
from ..labels import plain
from ..lora import LoRA, LoRAModule
from .recipe import CollectionRecipe, Job, JobResult

__all__ = ["ZooError", "Manifest", "make_manifest", "load_or_create_manifest", "pending_groups", "adopt_packed", "job_mismatch",
           "adopted_groups",
           "run_order", "compute_seconds", "phase_seconds",
           "run_group_to_disk", "write_group", "read_group", "collect_results", "LocalExecutor", "RayExecutor",
           "make_executor",
           "recipe_ref", "load_object"]

MANIFEST = "manifest.json"
DONE = "done.json"


class ZooError(LoLError):
    """A zoo build cannot go on: a missing recipe, a manifest that does not match, a corrupt group."""


# --- recipes by reference (so Ray workers can rebuild them) ---------------------------------------------------------
def recipe_ref(obj) -> str:
    """``"module:Class"`` of a recipe instance (recipes are rebuilt from it with no arguments)."""
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def load_object(ref: str, what: str = "recipe", **kwargs):
    """Instantiate ``"module:Class"`` (with ``kwargs``); a missing module or class is a `ZooError` naming it."""
    import importlib

    mod_name, _, attr = ref.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise ZooError(f"{what} {ref} is not available: module {e.name!r} not found") from e
    try:
        cls = getattr(mod, attr)
    except AttributeError as e:
        raise ZooError(f"{what} {ref} is not available: {mod_name} has no {attr!r}") from e
    return cls(**kwargs)


# --- the manifest -------------------------------------------------------------------------------------------------
class Manifest(dict):
    """JSON dict: collection, recipe, preset, seed, group_size, jobs [{id, seed, params}], groups {gid: [job ids]}."""

    @property
    def jobs(self) -> dict[str, Job]:
        return {j["id"]: Job(j["id"], int(j["seed"]), j["params"]) for j in self["jobs"]}

    def group_jobs(self, gid: str) -> list[Job]:
        jobs = self.jobs
        return [jobs[i] for i in self["groups"][gid]]


def make_manifest(recipe: CollectionRecipe, preset: str, seed: int, group_size: int) -> Manifest:
    """Jobs of ``recipe`` grouped deterministically: by stage and ``group_key`` (in order of first appearance), then
    in consecutive chunks of at most ``group_size`` jobs in job order.

    A collection grown in stages (a job's ``params["stage"]``, 0 when absent: e.g. 400 LoRAs shipped first, then
    grown to 2,000) keeps every earlier stage's groups exactly as they were, so a grown build adopts the LoRAs it
    already packed (`adopt_packed`) instead of training them again."""
    if group_size < 1:
        raise ZooError(f"group size must be at least 1, got {group_size}")
    jobs = recipe.jobs(preset, seed)
    ids = [j.id for j in jobs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise ZooError(f"recipe {recipe.name}: duplicate job ids {dup}")
    by_key: dict[Any, list[str]] = {}
    for j in jobs:
        key = [int(j.params.get("stage", 0)), recipe.group_key(j)]
        by_key.setdefault(json.dumps(key, sort_keys=True, default=str), []).append(j.id)
    groups: dict[str, list[str]] = {}
    for members in by_key.values():
        for i in range(0, len(members), group_size):
            groups[f"g{len(groups):05d}"] = members[i: i + group_size]
    return Manifest(collection=recipe.name, recipe=recipe_ref(recipe), preset=preset, seed=int(seed),
                    group_size=int(group_size), n_jobs=len(jobs),
                    jobs=[{"id": j.id, "seed": int(j.seed), "params": j.params} for j in jobs], groups=groups)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def load_or_create_manifest(build_dir: Path, recipe: CollectionRecipe, preset: str, seed: int,
                            group_size: int, inputs: dict[str, Any] | None = None) -> Manifest:
    """The build's manifest: created once, then fixed. A re-run with another preset, seed or ``inputs`` (e.g. the
    fingerprints of the base models) is refused; a different group size is ignored (the groups stay fixed)."""
    build_dir = Path(build_dir)
    path = build_dir / MANIFEST
    if path.is_file():
        try:
            m = Manifest(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ZooError(f"{path}: corrupt manifest ({e}); delete {build_dir} to start this collection over") from e
        if (m.get("preset"), m.get("seed"), m.get("collection")) != (preset, int(seed), recipe.name):
            raise ZooError(f"{path} was made for collection {m.get('collection')!r}, preset {m.get('preset')!r}, "
                           f"seed {m.get('seed')}, not {recipe.name!r}, {preset!r}, {seed}; use another --out or "
                           f"delete {build_dir}")
        if inputs is not None and m.get("inputs") != json.loads(json.dumps(inputs, default=str)):
            raise ZooError(f"{path}: its finished groups were trained on other inputs ({m.get('inputs')}) than "
                           f"now ({inputs}), e.g. another base model; use another --out or delete {build_dir}")
        fresh = make_manifest(recipe, preset, seed, m["group_size"])
        if json.loads(json.dumps(fresh["jobs"], default=str)) != m["jobs"]:
            raise ZooError(f"{path}: the recipe now makes different jobs than this manifest lists (code changed?); "
                           f"delete {build_dir} to rebuild this collection")
        return m
    m = make_manifest(recipe, preset, seed, group_size)
    if inputs is not None:
        m["inputs"] = inputs
    build_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, m)
    return Manifest(json.loads(path.read_text()))


def _groups_dir(build_dir: Path) -> Path:
    return Path(build_dir) / "groups"


def pending_groups(build_dir: Path, manifest: Manifest) -> list[str]:
    """Groups without a completion record, in manifest order. Leftover temp dirs of killed runs are removed."""
    gdir = _groups_dir(build_dir)
    gdir.mkdir(parents=True, exist_ok=True)
    for p in gdir.iterdir():
        if p.name.startswith(".") and ".tmp-" in p.name:
            shutil.rmtree(p, ignore_errors=True)
    return [g for g in manifest["groups"] if not (gdir / g / DONE).is_file()]


def run_order(todo: Sequence[str], manifest: Manifest, recipe) -> list[str]:
    """The order to run pending groups in: every kind of group (one ``group_key``, e.g. one rank) spread evenly over
    the run, in proportion to how many it has, instead of one kind after another — so a build cut short (and packed
    with ``--pack-partial``) holds every kind of LoRA in its planned shares. Within a kind, manifest order."""
    rec = load_object(recipe, "collection recipe") if isinstance(recipe, str) else recipe
    kinds: dict[str, list[str]] = {}
    for g in todo:
        key = json.dumps(rec.group_key(manifest.group_jobs(g)[0]), sort_keys=True, default=str)
        kinds.setdefault(key, []).append(g)
    order = sorted(((i + 0.5) / len(members), k, g) for k, members in enumerate(kinds.values())
                   for i, g in enumerate(members))
    return [g for *_, g in order]


# --- one group's outputs ------------------------------------------------------------------------------------------
def write_group(build_dir: Path, gid: str, jobs: Sequence[Job], results: Sequence[JobResult],
                info: dict[str, Any] | None = None) -> Path:
    """Write a finished group into a temp dir, then rename it into place (the rename is the commit)."""
    from safetensors.torch import save_file

    want = [j.id for j in jobs]
    got = [r.job_id for r in results]
    if sorted(want) != sorted(got):
        raise ZooError(f"group {gid}: recipe returned results for {got}, expected {want}")
    gdir = _groups_dir(build_dir)
    gdir.mkdir(parents=True, exist_ok=True)
    final = gdir / gid
    tmp = gdir / f".{gid}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    tensors, modules = {}, {}
    for r in results:
        modules[r.job_id] = []
        for m in r.lora:
            tensors[f"{r.job_id}/{m.name}/U"] = m.U.detach().to(torch.float32).contiguous().cpu()
            tensors[f"{r.job_id}/{m.name}/V"] = m.V.detach().to(torch.float32).contiguous().cpu()
            modules[r.job_id].append({"name": m.name, "alpha": m.alpha, "scale": m.scale,
                                      "kernel_shape": list(m.kernel_shape) if m.kernel_shape else None})
    save_file(tensors, str(tmp / "loras.safetensors"))
    (tmp / "results.json").write_text(json.dumps(
        [{"job_id": r.job_id, "row": r.row, "extras": r.extras, "modules": modules[r.job_id],
          "format": r.lora.format, "config": r.lora.config} for r in results], indent=1, default=float))
    (tmp / DONE).write_text(json.dumps({"group": gid, "jobs": want, "finished": time.time(),
                                        "host": socket.gethostname(), "pid": os.getpid(), **(info or {})}, indent=1))
    if final.exists():  # a concurrent or earlier writer finished first: keep its result, drop ours
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / DONE).is_file():
            raise ZooError(f"{final} exists without {DONE}; delete it and re-run")
        return final
    os.rename(tmp, final)
    return final


def read_group(build_dir: Path, gid: str) -> list[JobResult]:
    from safetensors.torch import load_file

    gdir = _groups_dir(build_dir) / gid
    if not (gdir / DONE).is_file():
        raise ZooError(f"{gdir}: group is not finished (no {DONE})")
    tensors = load_file(str(gdir / "loras.safetensors"))
    out = []
    for rec in json.loads((gdir / "results.json").read_text()):
        mods = []
        for m in rec["modules"]:
            key = f"{rec['job_id']}/{m['name']}"
            if f"{key}/U" not in tensors:
                raise ZooError(f"{gdir / 'loras.safetensors'}: missing tensor {key}/U")
            mods.append(LoRAModule(m["name"], tensors[f"{key}/U"], tensors[f"{key}/V"], alpha=m["alpha"],
                                   scale=m["scale"], kernel_shape=tuple(m["kernel_shape"]) if m["kernel_shape"]
                                   else None))
        lora = LoRA.from_modules(mods, format=rec.get("format", "zoo"), config=rec.get("config", {}),
                                 source=f"{gdir.name}/{rec['job_id']}")
        out.append(JobResult(rec["job_id"], lora, rec["row"], rec.get("extras", {})))
    return out


def collect_results(build_dir: Path, manifest: Manifest, partial: bool = False) -> list[JobResult]:
    """Every job's result in manifest job order; raises `ZooError` naming unfinished groups, unless ``partial``:
    then the results of the finished groups only (still in manifest order), e.g. to ship what an interrupted build
    has finished so far."""
    missing = pending_groups(build_dir, manifest)
    if missing and not partial:
        raise ZooError(f"{build_dir}: {len(missing)} group(s) not finished (e.g. {', '.join(missing[:3])})")
    by_id = {}
    for gid in manifest["groups"]:
        if gid in missing:
            continue
        for r in read_group(build_dir, gid):
            by_id[r.job_id] = r
    return [by_id[j["id"]] for j in manifest["jobs"] if j["id"] in by_id]


NOT_RECORDED = "<not recorded>"


def _same_setting(recorded, v) -> bool:
    if isinstance(v, float) and isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
        return math.isclose(recorded, v, rel_tol=1e-12, abs_tol=0.0)
    return recorded == v


def job_mismatch(job: Job, row: dict, unrecorded: Sequence[str] | None = None) -> dict[str, tuple]:
    """The settings a collection's ``row`` records differently from ``job`` (its seed and every scalar
    hyperparameter the row has a column for): ``{name: (row's, job's)}``; empty when the row is this job's LoRA.
    Floats agree when they match to 1e-12 relative: a sampled hyperparameter (``exp(uniform(log lo, log hi))``)
    can come out one ulp apart on another CPU, as numpy's exp and log dispatch on the CPU's vector instructions,
    and a learning rate one ulp apart is the same job.

    ``unrecorded``: the recipe's scalar job settings that its rows do not record (`CollectionRecipe.unrecorded`);
    given, any other setting of the job that the row lacks is a mismatch too (``(NOT_RECORDED, job's)``): the
    recipe gained a setting since the row was written, so the row cannot be this job's LoRA."""
    out = {}
    for p, v in [("seed", job.seed), *job.params.items()]:
        if not isinstance(v, (int, float, str, bool)):
            continue
        if p in row:
            if not _same_setting(plain(row[p]), v):
                out[p] = (plain(row[p]), v)
        elif unrecorded is not None and p not in unrecorded:
            out[p] = (NOT_RECORDED, v)
    return out


def adopt_packed(build_dir: Path, manifest: Manifest, collection_dir: Path, log=print,
                 unrecorded: Sequence[str] | None = None) -> list[str]:
    """Mark as finished every pending group whose LoRAs the packed collection ``collection_dir`` already holds.

    The packed collection is the build's checkpoint that outlives its build folder (``data/_build`` is never
    committed; ``data/collections/<name>`` is): a build grown by a later stage (`make_manifest`), or resumed on
    another machine, takes the LoRAs it already shipped from there instead of training them again. A group is
    adopted only whole, and only from a collection packed by the same collection, preset, seed and recipe (and base
    fingerprints, where the collection records them); every adopted job is checked against the collection's row: its
    seed and every hyperparameter the row records must be the job's, else `ZooError` (the recipe changed since
    then: rebuild). With the recipe's ``unrecorded`` settings given, a job setting the row lacks is a change too
    (`job_mismatch`). Factors come back bit for bit (the collection's float16 in float32), so packing the adopted
    groups again gives the same bytes. Returns the adopted group ids."""
    from ..collection import open_collection

    collection_dir = Path(collection_dir)
    if not (collection_dir / "collection.json").is_file():
        return []
    todo = pending_groups(build_dir, manifest)
    if not todo:
        return []
    coll = open_collection(collection_dir)
    prov = (coll.meta.get("provenance") or {}).get("zoo") or {}
    mine = {"collection": manifest["collection"], "recipe": manifest["recipe"], "preset": manifest["preset"],
            "seed": manifest["seed"]}
    theirs = {k: prov.get(k) for k in mine}
    if theirs != mine:
        log(f"[zoo] {collection_dir} was packed by {theirs}, not {mine}: nothing adopted from it")
        return []
    if "inputs" in prov and manifest.get("inputs") is not None and prov["inputs"] != manifest["inputs"]:
        log(f"[zoo] {collection_dir} was packed from other inputs ({prov['inputs']}) than this build's "
            f"({manifest['inputs']}): nothing adopted from it")
        return []
    index = {str(i): k for k, i in enumerate(coll.table["id"])}
    jobs = manifest.jobs
    adopted = []
    for gid in todo:
        members = manifest["groups"][gid]
        if not all(j in index for j in members):
            continue
        results = []
        for jid in members:
            job, k = jobs[jid], index[jid]
            row = {c: plain(v) for c, v in coll.table.iloc[k].items() if c not in ("source", "format")}
            wrong = job_mismatch(job, row, unrecorded)
            if wrong:
                raise ZooError(f"{collection_dir}: LoRA {jid} was trained with other settings than this build's job "
                               f"(collection, job: {wrong}); the recipe changed since it was packed: move the "
                               f"collection away to rebuild it")
            lora = coll.lora(k)
            lora = LoRA.from_modules(list(lora), format=str(coll.table.iloc[k].get("format", "zoo")))
            results.append(JobResult(jid, lora, row))
        write_group(build_dir, gid, manifest.group_jobs(gid), results,
                    info={"adopted_from": collection_dir.name, "seconds": 0.0})
        adopted.append(gid)
    if adopted:
        log(f"[zoo] adopted {len(adopted)} finished group(s) ({sum(len(manifest['groups'][g]) for g in adopted)} "
            f"LoRAs) from {collection_dir}")
    return adopted


def adopted_groups(build_dir: Path, manifest: Manifest) -> list[str]:
    """The finished groups that `adopt_packed` took from a packed collection (their completion record says so)."""
    gdir = _groups_dir(build_dir)
    return [g for g in manifest["groups"] if (gdir / g / DONE).is_file()
            and "adopted_from" in json.loads((gdir / g / DONE).read_text())]


def compute_seconds(build_dir: Path, manifest: Manifest) -> float:
    """Σ of every finished group's training seconds (its completion record): the build's compute time, including
    groups finished by earlier, interrupted runs."""
    gdir = _groups_dir(build_dir)
    return sum(float(json.loads((gdir / g / DONE).read_text()).get("seconds", 0.0))
               for g in manifest["groups"] if (gdir / g / DONE).is_file())


def phase_seconds(results: Sequence[JobResult], manifest: Manifest) -> dict[str, Any]:
    """Where a build's compute went: per phase a recipe times (``extras["group_<phase>_seconds"]``, one figure per group,
    e.g. the image recipes' ``train`` and ``sample`` — the images that measure the labels), the sum over the groups
    that recorded it, and ``groups``, how many did (LoRAs adopted from a packed collection carry no timing). {} when
    no group recorded any."""
    import re

    by_id = {r.job_id: r for r in results}
    sums: dict[str, float] = {}
    n = 0
    for jobs in manifest["groups"].values():
        first = next((by_id[j] for j in jobs if j in by_id), None)
        timed = {m.group(1): float(v) for k, v in (first.extras if first else {}).items()
                 if (m := re.fullmatch(r"group_(\w+)_seconds", k)) and v is not None}
        if timed:
            n += 1
            for k, v in timed.items():
                sums[k] = sums.get(k, 0.0) + v
    return {**{k: round(v, 1) for k, v in sums.items()}, "groups": n} if n else {}


def run_group_to_disk(recipe_or_ref, build_dir: str, gid: str, jobs: list[Job], bases: dict[str, str],
                      device: str) -> dict[str, Any]:
    """Train one group and commit it to disk; returns a small summary. Runs in-process or inside a Ray task."""
    if isinstance(recipe_or_ref, str):  # inside a Ray task: one torch thread per task (one CPU each)
        recipe = load_object(recipe_or_ref)
        if not torch.cuda.is_available():
            torch.set_num_threads(1)
    else:
        recipe = recipe_or_ref
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    results = recipe.run_group(list(jobs), {k: Path(v) for k, v in bases.items()}, device)
    seconds = time.time() - t0
    write_group(Path(build_dir), gid, jobs, results, info={"seconds": round(seconds, 3), "device": device})
    return {"group": gid, "n_jobs": len(jobs), "seconds": seconds}


# --- executors ----------------------------------------------------------------------------------------------------
def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="LoRA", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)


class LocalExecutor:
    """Run pending groups one after another in this process."""

    name = "local"

    def __init__(self, device: str | None = None, progress: bool = True):
        self.device = device
        self.progress = progress

    def run(self, recipe, build_dir: Path, manifest: Manifest, bases: dict[str, Path],
            max_groups: int | None = None) -> list[dict]:
        todo = run_order(pending_groups(build_dir, manifest), manifest, recipe)
        if max_groups is not None:
            todo = todo[:max_groups]
        n_done = manifest["n_jobs"] - sum(len(manifest["groups"][g]) for g in pending_groups(build_dir, manifest))
        summaries = []
        with _progress(manifest["n_jobs"], n_done, manifest["collection"], self.progress) as bar:
            for gid in todo:
                s = run_group_to_disk(recipe, str(build_dir), gid, manifest.group_jobs(gid),
                                      {k: str(v) for k, v in bases.items()}, self.device)
                summaries.append(s)
                bar.update(s["n_jobs"])
        return summaries


class RayExecutor:
    """One Ray task per pending group (``num_gpus=1`` per task when CUDA is available, else ``num_cpus=1``); each task
    writes its own group to disk, so a killed driver loses only groups in flight. The recipe travels by reference."""

    name = "ray"

    def __init__(self, device: str | None = None, progress: bool = True, num_cpus: int | None = None,
                 address: str | None = None):
        self.device = device
        self.progress = progress
        self.num_cpus = num_cpus
        self.address = address

    def run(self, recipe, build_dir: Path, manifest: Manifest, bases: dict[str, Path],
            max_groups: int | None = None) -> list[dict]:
        import ray

        if not ray.is_initialized():
            kw = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if self.address:
                ray.init(address=self.address, **kw)
            else:
                ray.init(num_cpus=self.num_cpus or os.cpu_count(), **kw)
        gpu = torch.cuda.is_available()
        task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1)(run_group_to_disk)
        todo = run_order(pending_groups(build_dir, manifest), manifest, recipe)
        if max_groups is not None:
            todo = todo[:max_groups]
        n_done = manifest["n_jobs"] - sum(len(manifest["groups"][g]) for g in pending_groups(build_dir, manifest))
        ref = manifest["recipe"] if isinstance(recipe, str) else recipe_ref(recipe)
        device = self.device or ("cuda" if gpu else "cpu")
        futures = [task.remote(ref, str(Path(build_dir).resolve()), gid, manifest.group_jobs(gid),
                               {k: str(Path(v).resolve()) for k, v in bases.items()}, device) for gid in todo]
        summaries = []
        with _progress(manifest["n_jobs"], n_done, manifest["collection"] + " (ray)", self.progress) as bar:
            pending = list(futures)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                s = ray.get(ready[0])
                summaries.append(s)
                bar.update(s["n_jobs"])
        return summaries


def make_executor(name: str, device: str | None = None, progress: bool = True, **kwargs):
    if name == "local":
        return LocalExecutor(device=device, progress=progress)
    if name == "ray":
        return RayExecutor(device=device, progress=progress, **kwargs)
    raise ZooError(f"unknown executor {name!r}; choose 'local' or 'ray'")
