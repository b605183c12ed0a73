"""Measure a packed collection's label again, after the build: how a label reaches reliability ≥ 0.95.

A measured label (a CLIP score over generated images) carries noise; its test–retest reliability r bounds any
model's R² (`lol.reliability`). Averaging k independent measurements raises it to ``spearman_brown(r, k)``: faces'
CLIP score, r = 0.895 per measurement, needs k = 3 for 0.95 (`measurements_needed` says 2.2). The build measured
each LoRA once; this module measures the packed LoRAs again, each time with another seed and the build's own
protocol, so the label can become the mean of k measurements without training a single LoRA again.

`measure` loads the collection's LoRAs (fp16 factors, U carrying each LoRA's scale) into the base UNet as adapters
(`lol.zoo.image_recipes.load_adapters`, the build's own multi-adapter sampler) and measures them with the build's
own function and protocol for the label (`label_protocol`: the preset's prompts, images, steps, guidance; the
collection's own base and scorer, from its provenance) and another noise seed. Three labels can be measured again
(`MEASURED`): a faces LoRA's ``clip_score`` and ``identity_gain`` and a fashion LoRA's ``class_gain``; the two gains
compare the LoRA's generations with its finetuning images, which the build's jobs (recipe, preset and seed from the
provenance) name and each row's recorded identity, instance prompt and image count confirm. Results go to
``<collection>/measurements/<label>-seed<S>.parquet`` (one row per LoRA: id, value, wall and CPU seconds; the
protocol, seed and the factors' content hash in the file's metadata), rewritten atomically after every chunk of
LoRAs: an interrupted run keeps what it measured and a rerun measures only the rest; while a run holds a file's lock
(`lol.paths.exclusive_lock`) a second run of the same seed is refused. Two processes measuring two seeds use two
cores; on a GPU (``device="cuda"``) take larger chunks.

`measurements` gathers a label's measurements (the build's column and every complete file of the same protocol and
factors) and `measured_reliability` gives the reliability of their mean (`repeated_reliability`); ``lol zoo report``
shows it. Files live beside the collection but outside its fingerprint (``collection.json`` and ``loras.parquet``):
measuring changes no label until the mean replaces the label column.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..errors import CollectionError, LoLError
from ..paths import atomic_file, exclusive_lock

__all__ = ["MEASUREMENTS_DIR", "measurement_path", "measurement_chunks", "MEASURED", "label_protocol", "measure",
           "measurements", "centred_on_build", "lora_measurements", "measured_reliability", "apply_measurements"]

MEASUREMENTS_DIR = "measurements"
_META_KEY = b"lol_measurement"
_FACES = "lol.zoo.image_recipes:FacesRecipe"
_FASHION = "lol.zoo.image_recipes:FashionRecipe"


def _seed_column(label: str, seed: int) -> str:
    return f"{label}_seed{int(seed)}"


RECENT = 200  # a measurement file's latest rows, whose median cost `measurements` reports

def measurement_path(collection_dir, label: str, seed: int) -> Path:
    return Path(collection_dir) / MEASUREMENTS_DIR / f"{label}-seed{int(seed)}.parquet"


def _provenance(coll) -> dict:
    prov = (coll.meta.get("provenance") or {}).get("zoo")
    if not prov:
        raise CollectionError(f"{coll.path}: no zoo provenance in collection.json: not built by `lol zoo build`, so "
                              "its measurement protocol is unknown")
    return prov


# the labels a packed collection can measure again: label → (the recipe that built it, its protocol from the preset)
MEASURED = {"clip_score": _FACES, "identity_gain": _FACES, "class_gain": _FASHION}


def label_protocol(coll, label: str = "clip_score") -> dict:
    """The protocol the build used to measure ``label`` on ``coll``: `faces_clip_protocol` of a faces collection's
    preset (``clip_score``, ``identity_gain``), `fashion_gain_protocol` of a fashion one's (``class_gain``)."""
    from .image_recipes import FACES_PRESETS, FASHION_PRESETS, faces_clip_protocol, fashion_gain_protocol

    if label not in MEASURED:
        raise LoLError(f"{coll.path}: {label!r} cannot be measured again; measurable labels: {sorted(MEASURED)}")
    prov = _provenance(coll)
    recipe = MEASURED[label]
    if prov.get("recipe") != recipe:
        raise LoLError(f"{coll.path}: {label!r} is measured for collections built by {recipe}; this one was built by "
                       f"{prov.get('recipe')!r}")
    presets, protocol_of = ((FACES_PRESETS, faces_clip_protocol) if recipe == _FACES
                            else (FASHION_PRESETS, fashion_gain_protocol))
    if prov.get("preset") not in presets:
        raise LoLError(f"{coll.path}: unknown preset {prov.get('preset')!r} of {recipe}")
    protocol = protocol_of(presets[prov["preset"]])
    if protocol is None:
        raise LoLError(f"{coll.path}: its preset {prov['preset']!r} measures no {label!r}")
    return protocol


def _identity(coll, label: str, protocol: dict) -> dict:
    """What every measurement file of ``label`` on ``coll`` must record alike (its seed aside): the label, the
    build's protocol without its seeds, and the content hash of the LoRAs' factors."""
    return {"label": label, "protocol": {k: v for k, v in protocol.items() if k not in ("seed", "retest_seed")},
            "factors": list(coll.factors_hash)}


def _check_identity(path: Path, meta: dict, want: dict, coll) -> None:
    if {k: meta.get(k) for k in want} != want:
        raise CollectionError(f"{path}: measured with another protocol or other LoRAs than {coll.path} holds now; "
                              "move it away to measure again")


def _read(path: Path) -> tuple[pd.DataFrame, dict]:
    import pyarrow.parquet as pq

    try:
        t = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported by name
        raise CollectionError(f"{path}: not a readable measurement file ({e})") from None
    raw = (t.schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise CollectionError(f"{path}: not a lol measurement file (no {_META_KEY.decode()!r} metadata)")
    return t.to_pandas(), json.loads(raw)


def _write(path: Path, df: pd.DataFrame, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    t = pa.Table.from_pandas(df, preserve_index=False)
    t = t.replace_schema_metadata({**(t.schema.metadata or {}), _META_KEY: json.dumps(meta).encode()})
    atomic_file(path, lambda f: pq.write_table(t, f))


def _bases(coll, bases: dict | None) -> dict[str, Path]:
    from .image_bases import resolve_base

    if bases is None:
        root = Path(coll.path).parent.parent                      # data/collections/<name> → data
        rel = _provenance(coll).get("bases") or {}
        missing = [k for k in ("sd", "clip") if k not in rel]
        if missing:
            raise CollectionError(f"{coll.path}: provenance names no base model {missing}; pass bases=")
        bases = {k: root / rel[k] for k in ("sd", "clip")}
    out = {k: resolve_base(Path(v)) for k, v in bases.items()}
    for k, p in out.items():
        if not p.is_dir():
            raise LoLError(f"{coll.path}: base model {k!r} not found at {p}")
    return out


def measurement_chunks(ranks, todo, chunk: int) -> list[list[int]]:
    """The LoRAs ``todo`` (row numbers, in table order; ``ranks[j]`` the rank of ``todo[j]``) cut into chunks of one
    rank each, in table order: a chunk is cut when its rank has ``chunk`` LoRAs waiting, and the chunks left short at
    the end follow in the order of their first LoRA. Runs of two seeds side by side thus measure the same LoRAs
    first, so their overlap (and the reliability it supports) grows from the start, whatever the ranks' order."""
    if int(chunk) < 1:
        raise ValueError(f"measurement chunk must be ≥ 1, got {chunk}")
    chunks, waiting = [], {}
    for i, r in zip(todo, ranks):
        waiting.setdefault(int(r), []).append(i)
        if len(waiting[int(r)]) == int(chunk):
            chunks.append(waiting.pop(int(r)))
    return chunks + sorted(waiting.values())


def _build_jobs(coll) -> dict[str, Any]:
    """The build's jobs of ``coll`` by id (its recipe, preset and seed from the provenance): what each LoRA was
    finetuned on, which identity_gain and class_gain compare its generations with."""
    import importlib

    prov = _provenance(coll)
    mod, cls = prov["recipe"].split(":")
    recipe = getattr(importlib.import_module(mod), cls)()
    return {j.id: j for j in recipe.jobs(prov["preset"], int(prov.get("seed", 0)))}


def _job_of(coll, jobs: dict, i: int):
    """The build's job of row ``i``, checked against what the row records of it (a collection packed by other code
    would otherwise be compared with the wrong finetuning images)."""
    row = coll.table.iloc[i]
    job = jobs.get(str(row["id"]))
    if job is None:
        raise CollectionError(f"{coll.path}: LoRA {row['id']!r} is not a job of its recorded build "
                              f"({_provenance(coll).get('preset')!r}, seed {_provenance(coll).get('seed')})")
    recorded = {"identity": job.params.get("identity"), "instance_prompt": job.params.get("instance_prompt"),
                "n_images": len(job.params["images"])}
    if "classes" in job.params:                                   # fashion: which classes it was finetuned on
        from .fashion import CLASS_LABELS

        recorded.update({lab: int(c in job.params["classes"]) for c, lab in enumerate(CLASS_LABELS)})
    bad = {k: (row[k], v) for k, v in recorded.items() if v is not None and k in row.index and row[k] != v}
    if bad:
        raise CollectionError(f"{coll.path}: LoRA {row['id']!r} differs from its build's job "
                              + ", ".join(f"{k}: table {a!r}, job {b!r}" for k, (a, b) in bad.items()))
    return job


def _measure_chunk(label: str, trainer, scorer, ml, coll, idx: list[int], protocol: dict, seed: int, jobs) -> list:
    """``label`` of the LoRAs ``idx`` (loaded as adapters 0..len(idx)−1 of ``ml``), measured with the build's own
    function for it, ``protocol`` and noise seed ``seed``."""
    import numpy as np

    from .image_recipes import _class_gain, _class_targets, _clip_score_measure, _identity_gain, instance_caption

    ks = range(len(idx))
    if label == "clip_score":
        res = _clip_score_measure(trainer, ml, scorer, ks, protocol, seed, base=False)
        return [float(res["scores"][k].mean()) for k in ks]
    todo = [_job_of(coll, jobs, i) for i in idx]
    res_px = trainer.resolution
    if label == "identity_gain":
        from .faces import Identity, render_face

        captions, targets = [], []
        for j in todo:
            faces = [render_face(Identity.from_seed(j.params["identity"]), k, res_px) for k in j.params["images"]]
            captions.append(instance_caption(j.params["instance_prompt"]))
            targets.append(scorer.image_features([np.asarray(f.image) for f in faces]).mean(0))
        return [float(g) for g in _identity_gain(trainer, ml, scorer, ks, captions, targets, protocol, seed)["gain"]]
    from .fashion import fashion_image

    targets = [_class_targets(scorer, [fashion_image(k, "test", res_px, look=j.params.get("look", ""))
                                       for k in j.params["images"]]) for j in todo]
    return [float(g) for g in _class_gain(trainer, ml, scorer, ks, targets, protocol, seed)["gain"]]


def measure(collection_dir, seed: int, label: str = "clip_score", *, bases: dict | None = None,
            limit: int | None = None, chunk: int = 8, device: str | None = None, main_rows: bool = False,
            progress: Callable[[str], None] | None = None) -> Path:
    """Measure ``label`` of every LoRA of the packed collection at ``collection_dir`` once more, with the build's
    protocol (`label_protocol`) and noise seed ``seed``; resumable (module docstring). ``label``: ``clip_score`` or
    ``identity_gain`` (faces), ``class_gain`` (fashion). ``limit``: measure at most that many LoRAs not yet
    measured, in table order, then stop (a rerun continues). ``main_rows``: only the LoRAs the tasks train on
    (`lol.experiments.main_rows`: the collection's most common rank), so the training rows are measured every time
    first; a later run without it measures the rest. ``chunk``: LoRAs per batched pass (one rank each).
    ``bases``: {"sd", "clip"} folders (default: the collection's own, from its provenance). Returns the measurement
    file. Two runs of one seed cannot write its file side by side: the second is refused at once (`BlockingIOError`
    naming the file) while the first holds the file's lock."""
    import torch

    from ..collection import open_collection
    from .clipscore import CLIPScorer
    from .image_recipes import ImageLoRATrainer, load_adapters

    coll = open_collection(collection_dir)
    protocol = label_protocol(coll, label)
    if int(seed) == int(protocol["seed"]):
        raise LoLError(f"{coll.path}: seed {seed} is the build's own: that measurement is the {label} column "
                       "already; choose another seed")
    if label not in coll.table.columns:
        raise CollectionError(f"{coll.path}: no label column {label!r}")
    want = _identity(coll, label, protocol)
    meta = {**want, "seed": int(seed), "bases": (_provenance(coll).get("inputs") or {}).get("bases"),
            "written_by": "lol.zoo.measure.measure (lol zoo measure)"}
    path = measurement_path(coll.path, label, seed)
    with exclusive_lock(path, "measuring"):       # a second run of the same seed would append the same rows beside it
        done = pd.DataFrame({"id": pd.Series(dtype=str), "value": pd.Series(dtype=float),
                             "seconds": pd.Series(dtype=float)})
        if path.is_file():
            done, old = _read(path)
            _check_identity(path, old, {**want, "seed": int(seed)}, coll)
        seen = set(done["id"].astype(str))
        todo = [i for i, x in enumerate(coll.table["id"].astype(str)) if x not in seen]
        if main_rows:
            from ..experiments import main_row_indices

            main = set(main_row_indices(coll).tolist())
            todo = [i for i in todo if i in main]
        if limit is not None:
            todo = todo[:max(0, int(limit))]
        say = progress or (lambda _t: None)
        if not todo:
            say(f"{path}: every main-row LoRA measured ({len(seen)} of {len(coll)} LoRAs)"
                if main_rows and len(seen) < len(coll) else f"{path}: all {len(coll)} LoRAs measured")
            return path
        jobs = _build_jobs(coll) if label != "clip_score" else None
        if jobs is not None:
            _job_of(coll, jobs, todo[0])                            # a mismatch fails before the bases load
        b = _bases(coll, bases)
        trainer = ImageLoRATrainer(b["sd"], device)
        scorer = CLIPScorer(b["clip"], device=trainer.device)
        ranks = coll.table["rank"].to_numpy() if "rank" in coll.table.columns else None
        chunks = measurement_chunks([int(ranks[i]) if ranks is not None else int(coll.lora(i).ranks[0])
                                     for i in todo], todo, chunk)
        for c, idx in enumerate(chunks):
            t0, c0 = time.time(), time.process_time()
            ml = load_adapters(trainer.unet, [coll.lora(i) for i in idx])
            try:
                with torch.no_grad():
                    values = _measure_chunk(label, trainer, scorer, ml, coll, idx, protocol, int(seed), jobs)
            finally:
                ml.remove()
            sec, cpu = (time.time() - t0) / len(idx), (time.process_time() - c0) / len(idx)
            new = pd.DataFrame({"id": [str(coll.table["id"].iloc[i]) for i in idx], "value": values,
                                "seconds": [round(sec, 3)] * len(idx), "cpu_seconds": [round(cpu, 3)] * len(idx)})
            done = pd.concat([done, new], ignore_index=True)
            _write(path, done, meta)
            say(f"{path.name}: {len(done)}/{len(coll)} LoRAs ({sec:.1f} s wall, {cpu:.1f} CPU-s per LoRA, chunk "
                f"{c + 1}/{len(chunks)})")
    return path


def measurements(coll, label: str = "clip_score") -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """(values, sources): one column per independent measurement of ``label`` over the collection's LoRAs (rows in
    table order, NaN where a LoRA was not measured): the build's column first, then every file of this label, this
    protocol and these factors under ``measurements/`` (seed order). ``sources`` says, per column, the seed, how
    many LoRAs it covers and what one LoRA's measurement cost (median wall seconds, and CPU seconds of the process
    where recorded: on a shared CPU the wall time says little). A file measured on other LoRAs or
    with another protocol raises, naming it."""
    folder = Path(coll.path) / MEASUREMENTS_DIR
    files = sorted(folder.glob(f"{label}-seed*.parquet"), key=lambda p: int(p.stem.rsplit("seed", 1)[1])) \
        if folder.is_dir() else []
    if label not in coll.table.columns:
        raise CollectionError(f"{coll.path}: no label column {label!r}")
    ids = coll.table["id"].astype(str)
    protocol = label_protocol(coll, label) if files else None
    first = _seed_column(label, protocol["seed"]) if protocol else None
    build = first if first in coll.table.columns else label      # after `apply_measurements`: the build's own column
    cols = {"build": pd.to_numeric(coll.table[build], errors="coerce").to_numpy(float)}
    sources = [{"column": "build", "seed": protocol["seed"] if protocol else None,
                "n": int(np.isfinite(cols["build"]).sum()), "seconds": None, "cpu_seconds": None}]
    want = _identity(coll, label, protocol) if protocol else None
    for f in files:
        df, meta = _read(f)
        _check_identity(f, meta, want, coll)
        v = ids.map(dict(zip(df["id"].astype(str), df["value"].astype(float)))).to_numpy(float)
        name = f"seed {meta['seed']}"
        cols[name] = v
        # the cost as the code runs now: the median of the latest RECENT rows (a file grows in measuring order, and its
        # older rows may predate a speed-up, e.g. `lol.allocator`)
        recent = df.tail(RECENT)
        cpu = recent["cpu_seconds"] if "cpu_seconds" in df.columns else pd.Series(dtype=float)
        sources.append({"column": name, "seed": meta["seed"], "n": int(np.isfinite(v).sum()),
                        "seconds": float(recent["seconds"].median()) if len(df) else None,
                        "cpu_seconds": float(cpu.median()) if cpu.notna().any() else None})
    return pd.DataFrame(cols), sources


def centred_on_build(M) -> np.ndarray:
    """Measurements M (LoRAs × measurements, the build's first; NaN where a LoRA was not measured) less each one's
    seed offset: its mean difference from the build's measurement over the LoRAs both measured. A noise seed shifts
    every LoRA's score alike (the measurements share their noises across LoRAs): an offset between seeds, not a
    difference between LoRAs; removed, every measurement is on the build's scale."""
    M = np.asarray(M, dtype=float)
    d = M - M[:, :1]
    n = np.isfinite(d).sum(0)
    return M - np.where(n > 0, np.nansum(d, 0) / np.maximum(n, 1), 0.0)


def lora_measurements(coll, label: str, lora_id: str) -> pd.DataFrame | None:
    """Every measurement of ``label`` of one LoRA (`measurements`: the build's first), or None when the label was
    measured only by the build (or the LoRA not again). Columns: ``source`` ("build", "seed S"), ``value`` (as
    measured) and ``centred``: the value less its seed's offset, the mean difference from the build's measurement over
    the LoRAs both measured (a noise seed shifts every LoRA's score alike, the measurements sharing their noises), so
    the values compare on the build's scale."""
    folder = Path(coll.path) / MEASUREMENTS_DIR
    if not folder.is_dir() or not any(folder.glob(f"{label}-seed*.parquet")):
        return None
    values, _ = measurements(coll, label)
    row = np.nonzero((coll.table["id"].astype(str) == str(lora_id)).to_numpy())[0]
    if len(row) == 0:
        raise CollectionError(f"{coll.path}: no LoRA {lora_id!r}")
    M = values.to_numpy(float)
    mine = M[row[0]]
    keep = np.isfinite(mine)
    if keep.sum() < 2:
        return None
    return pd.DataFrame({"source": np.asarray(values.columns)[keep], "value": mine[keep],
                         "centred": centred_on_build(M)[row[0]][keep]})


def measured_reliability(coll, label: str = "clip_score") -> dict[str, Any] | None:
    """`repeated_reliability` of ``label``'s measurements (`measurements`) over the LoRAs measured every time, with
    ``sources``; None when only the build measured it."""
    from ..reliability import repeated_reliability

    values, sources = measurements(coll, label)
    if values.shape[1] < 2:
        return None
    return {**repeated_reliability(values.to_numpy()), "sources": sources}


def apply_measurements(collection_dir, label: str = "clip_score") -> dict[str, Any]:
    """Make ``label`` the mean of all its measurements, once every LoRA has every one (`measurements`): the table
    keeps each as its own column (``<label>_seed<S>``, the build's first) and ``label`` becomes their row mean; the
    schema lists them under ``"measurements"``, so `lol.reliability.label_reliability` gives the mean's reliability
    (`repeated_reliability`) and every reader (report, app, notebooks) uses it. Changes the collection's
    fingerprint, as a new label should: rerun ``lol zoo precompute`` and the notebooks. Its LoRAs stay the same
    (`Collection.loras_fingerprint`), so a model trained before keeps its recorded split here. Running it again after a
    further seed was measured averages that one in too. The table is replaced before ``collection.json`` (each
    atomically); if a crash falls between, running it again completes it. Returns the new
    `measured_reliability`."""
    from ..collection import META_NAME, TABLE_NAME, open_collection

    coll = open_collection(collection_dir)
    values, sources = measurements(coll, label)
    if values.shape[1] < 2:
        raise LoLError(f"{coll.path}: {label!r} has no measurement beyond the build's; run `lol zoo measure` first")
    short = {s["column"]: len(coll) - s["n"] for s in sources if s["n"] < len(coll)}
    if short:
        raise LoLError(f"{coll.path}: every LoRA needs every measurement before {label!r} becomes their mean; "
                       + ", ".join(f"{c}: {n} LoRAs missing" for c, n in short.items())
                       + " (`lol zoo measure` resumes)")
    names = [_seed_column(label, s["seed"]) for s in sources]
    table = coll.table.copy()
    for name, col in zip(names, values.columns):
        table[name] = values[col].to_numpy()
    table[label] = values.to_numpy().mean(1)
    meta = json.loads((coll.path / META_NAME).read_text())
    info = dict(meta["labels"][label])
    info["measurements"] = names
    info.setdefault("single_description", info.get("description", ""))
    info["description"] = (f"mean of {len(names)} independent measurements (noise seeds "
                           f"{', '.join(str(s['seed']) for s in sources)}; `lol zoo measure`) of: "
                           f"{info['single_description']}")
    meta["labels"][label] = info
    folder = Path(coll.path)
    coll.release()
    atomic_file(folder / TABLE_NAME, lambda f: table.to_parquet(f, index=False))
    atomic_file(folder / META_NAME, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return measured_reliability(open_collection(folder), label)

