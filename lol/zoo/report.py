"""`data/README.md` written from what a build recorded — never typed by hand.

Everything here is read from the build folder: ``build.json`` (commands, versions, times), each base model's
``record.json`` (training time, quality figures), each packed collection (size, ranks, label spread) and the sample
images. A part that is not built yet is listed as such.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["data_readme", "write_data_readme"]

BASE_TITLES = {
    "sd": "Text-to-image model (`StableDiffusionPipeline`)",
    "sd_v1": "Sibling text-to-image model: stage 1 of `base/sd`, as SD-1.4 is to SD-1.5 (`StableDiffusionPipeline`)",
    "clip": "CLIP scorer (`transformers.CLIPModel`)",
    "lm": "Causal language model (`transformers` Qwen2 family)",
    "lm_v2": "Sibling causal language model: `base/lm` pretrained further on a fresh pool, as SD-1.5 continues "
             "SD-1.4 (`transformers` Qwen2 family)",
}
COLLECTION_TITLES = {
    "faces": "faces — CelebA-LoRA analogue: one procedurally drawn identity per LoRA; attributes and CLIP score",
    "fashion": "fashion — Imagenette-LoRA analogue: Fashion-MNIST class subsets in the catalogue look (each class in "
               "its own garment colour, `lol.zoo.fashion`); class membership, number of classes (dataset size), class "
               "gain",
    "fashion_v1": "fashion_v1 — the fashion recipe on the sibling base `base/sd_v1` (SD-1.4 to fashion's SD-1.5): "
                  "class membership, number of classes; for training on one base and testing on the other (notebook 08)",
    "lm": "lm — Qwen2-ARC-LoRA analogue: QA sources dropped at random; challenge accuracy, eval loss, membership",
    "lm_v2": "lm_v2 — the lm recipe on the sibling base `base/lm_v2`: challenge accuracy, eval loss, membership; "
             "for training on one base and testing on the other (notebook 08)",
}


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


DATA_BUDGET_MB = 300     # what data/ may hold in all, in megabytes of 10⁶ bytes (issue "Zoo v2, part 2")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested record -> [("a.b.c", value)]."""
    if isinstance(d, dict):
        return [kv for k, v in d.items() for kv in _flatten(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), d)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _base_section(name: str, folder: Path) -> list[str]:
    lines = [f"### {BASE_TITLES.get(name, name)} — `base/{name}/`", ""]
    rec_path = folder / "record.json"
    if not rec_path.is_file():
        return lines + ["Not built yet (no `record.json`).", ""]
    rec = json.loads(rec_path.read_text())
    lines.append(f"Size on disk: {_mb(_size(folder))}. Load with `from_pretrained(\"data/base/{name}\")`.")
    lines += ["", "| recorded | value |", "|---|---|"]
    for k, v in _flatten(rec):
        if isinstance(v, (dict, list)) and len(str(v)) > 200:
            continue
        lines.append(f"| {k} | {_fmt(v)} |")
    return lines + [""]


def _collection_section(name: str, folder: Path, build: dict) -> list[str]:
    lines = [f"### {COLLECTION_TITLES.get(name, name)} — `collections/{name}/`", ""]
    if not (folder / "collection.json").is_file():
        return lines + ["Not built yet.", ""]
    from ..collection import open_collection

    coll = open_collection(folder)
    t = coll.table
    ranks = sorted({int(r) for r in coll.ranks.flatten().tolist()})
    rec = build.get("collections", {}).get(name, {})
    lines.append(f"{len(coll)} LoRAs over {len(coll.spec)} modules (Σ(n+m) = {coll.spec.total_out_plus_in}), "
                 f"ranks {ranks}, {_mb(_size(folder))} on disk"
                 + (f", built in {rec.get('compute_seconds', rec['seconds_total']):.0f} s of training "
                    f"({rec.get('executor', 'local')} executor, groups of {rec.get('group_size')}; summed over every "
                    f"group, resumed runs included)" if "seconds_total" in rec else "") + ".")
    lines += _phase_lines(rec)
    zoo = (coll.provenance or {}).get("zoo", {})
    if zoo.get("bases"):
        lines.append("Built on " + ", ".join(f"`{v}` ({k})" for k, v in zoo["bases"].items()) + "."
                     + (f" Note: {zoo['note']}." if zoo.get("note") else ""))
    if rec.get("complete") is False:
        lines.append(f"**A partial build**: {len(coll)} of the {rec['n_planned']} planned LoRAs (every rank in its "
                     f"planned share); `lol zoo build --preset {build.get('preset', 'default')} --out data --only "
                     f"{name}` resumes it and repacks the whole collection.")
    if "group" in t.columns:
        lines.append(f"Groups (for group-disjoint splits): {t['group'].nunique()} distinct.")
    lines += ["", "Tasks: " + "; ".join(f"**{k}** ({len(v)} label{'s' if len(v) != 1 else ''})"
                                         for k, v in coll.tasks.items()), ""]
    lines += ["| label | kind | mean | std | min | max |", "|---|---|---|---|---|---|"]
    for lab, info in coll.labels.items():
        if lab not in t.columns:
            continue
        col = t[lab]
        if info.get("kind") in ("regression", "binary"):
            col = col.astype(float)
            lines.append(f"| {lab} | {info.get('kind')} | {col.mean():.4g} | {col.std():.4g} | {col.min():.4g} | "
                         f"{col.max():.4g} |")
        else:
            lines.append(f"| {lab} | {info.get('kind')} | {col.nunique()} values | | | |")
    lines += [""] + _reliability_lines(t, coll.labels) + _measurement_lines(coll) + _effect_lines(t)
    return lines + [""]


IDENTITY_GOAL = 0.9
PHASE_WORDS = {"train": "finetuning the LoRAs", "sample": "generating and scoring the images that measure the labels"}


def _phase_lines(rec: dict) -> list[str]:
    """Where the build's compute went, per phase its recipe timed (`lol.zoo.jobs.phase_seconds`): what labels cost."""
    ph = dict(rec.get("phase_seconds") or {})
    n = ph.pop("groups", 0)
    total = sum(ph.values())
    if not n or total <= 0:
        return []
    parts = [f"{k} {v / total:.0%}" + (f" ({PHASE_WORDS[k]})" if k in PHASE_WORDS else "") for k, v in ph.items()]
    return [f"Compute per phase, over the {n} groups timed by phase ({total:,.0f} s): " + ", ".join(parts) + "."]


def _effect_lines(table) -> list[str]:
    """Do the LoRAs do what a DreamBooth LoRA does? (faces: generations pulled toward the LoRA's own identity)."""
    if "identity_gain" not in table.columns:
        return []
    g = table["identity_gain"].astype(float).dropna()
    share = float((g > 0).mean())
    line = (f"**LoRA effect.** `identity_gain` > 0 (the LoRA's generations of its own instance prompt are nearer its "
            f"finetuning images in CLIP image space than the base model's, same noises) for {share:.1%} of {len(g)} "
            f"LoRAs (goal ≥ {IDENTITY_GOAL:.0%}: {'met' if share >= IDENTITY_GOAL else '**not met**'}); median gain "
            f"{g.median():.3f}, quartiles {g.quantile(0.25):.3f} / {g.quantile(0.75):.3f}.")
    if "pixel_change_255" in table.columns:
        p = table["pixel_change_255"].astype(float).dropna()
        line += (f" Mean absolute pixel change LoRA vs base on those images: median {p.median():.1f}/255, "
                 f"quartiles {p.quantile(0.25):.1f} / {p.quantile(0.75):.1f}.")
    return [line, ""] + _effect_by_lr(table)


def _effect_by_lr(table, bins: int = 5) -> list[str]:
    """The LoRA effect per fifth of the sampled learning rates (equal counts): where the recipe's LoRAs barely move
    the model, measured."""
    import pandas as pd

    if "lr" not in table.columns:
        return []
    t = table[["lr", "identity_gain"] + (["pixel_change_255"] if "pixel_change_255" in table.columns else [])]
    t = t.dropna(subset=["lr", "identity_gain"])
    if len(t) < 20 * bins or t["lr"].nunique() < bins:
        return []
    fifth = pd.qcut(t["lr"].astype(float), bins, labels=False, duplicates="drop")
    head = "| learning rate | LoRAs | identity_gain > 0 | median identity_gain |"
    lines = [f"By learning rate ({bins} bins of equal count):", "",
             head + (" median pixel change /255 |" if "pixel_change_255" in t.columns else ""),
             "|---|---|---|---|" + ("---|" if "pixel_change_255" in t.columns else "")]
    for _, g in t.groupby(fifth):
        row = (f"| {g.lr.min():.2g} – {g.lr.max():.2g} | {len(g)} | {(g.identity_gain > 0).mean():.1%} | "
               f"{g.identity_gain.median():.3f} |")
        if "pixel_change_255" in t.columns:
            row += f" {g.pixel_change_255.median():.1f} |"
        lines.append(row)
    return lines + [""]


def _reliability_lines(table, labels) -> list[str]:
    """The labels' reliability (`lol.reliability`): test–retest for measured labels, vote ambiguity for voted ones,
    and the labels that carry no evidence either way (said, not hidden)."""
    from ..reliability import RELIABILITY_GOAL, label_reliability, measurements_needed

    rel = label_reliability(table, labels)
    lines = ["**Label reliability.** A measured label is measured a second time, independently (other seeds, a "
             "disjoint question or eval set of the same size); the test–retest correlation r is the ceiling on any "
             f"model's test R² for that label (goal: r ≥ {RELIABILITY_GOAL}). A label stored as the mean of k "
             "measurements (`lol zoo measure --apply`) has the reliability of that mean (Spearman–Brown from the "
             "measurements' mean pairwise r). A voted label is ambiguous when its vote share is within 0.1 of one "
             "half.", ""]
    reg = {k: v for k, v in rel.items() if v["method"] in ("retest", "repeated")}
    if reg:
        lines += ["| label | LoRAs measured again | reliability r (95 % CI) | R² ceiling | label std | noise std per "
                  f"measurement | goal met | measurements for r ≥ {RELIABILITY_GOAL} |", "|---|---|---|---|---|---|---|---|"]
        for lab, v in reg.items():
            ok = "yes" if v["r"] >= RELIABILITY_GOAL else "**no**"
            lo, hi = v["r_ci95"]
            k = measurements_needed(v["r"], RELIABILITY_GOAL)
            n = (f"{v['n']} ({v['k']} times; the label is their mean)" if v["method"] == "repeated"
                 else str(v["n"]))
            lines.append(f"| {lab} | {n} | {v['r']:.3f} ({lo:.3f} – {hi:.3f}) | {v['r2_ceiling']:.3f} | "
                         f"{v['label_std']:.4g} | {v['noise_std']:.4g} | {ok} | {k:.1f}× |")
        lines += ["", f"*Measurements for r ≥ {RELIABILITY_GOAL}*: how many independent measurements of today's "
                  "size (images, prompts, questions) would have to be averaged into one label to reach the goal, by the "
                  "Spearman–Brown formula `k r / (1 + (k − 1) r)` (`lol.reliability.measurements_needed`): the label's "
                  "cost grows by that factor.", ""]
    other = {k: v for k, v in rel.items() if v["method"] not in ("retest", "repeated")}
    if other:
        lines += ["| label | evidence | LoRAs | ambiguous share |", "|---|---|---|---|"]
        for lab, v in other.items():
            how = "exact by construction" if v["method"] == "exact" else f"vote share (`{v['vote']}`)"
            lines.append(f"| {lab} | {how} | {v['n']} | {v['ambiguous']:.3f} |")
        lines.append("")
    missing = [lab for lab, info in labels.items() if lab not in rel and lab in table.columns]
    if missing:
        lines += ["No reliability evidence in this collection for " + ", ".join(f"`{m}`" for m in missing)
                  + ": its build measured each LoRA once (no retest column) and nothing was measured again.", ""]
    return lines


def _measurement_lines(coll) -> list[str]:
    """Labels measured again after the build (`lol.zoo.measure`): per label, each measurement's coverage and cost,
    and the reliability of their mean over the LoRAs measured every time, against the goal."""
    from ..reliability import MIN_RETEST, RELIABILITY_GOAL
    from .measure import MEASUREMENTS_DIR, measured_reliability

    folder = Path(coll.path) / MEASUREMENTS_DIR
    labels = sorted({p.stem.rsplit("-seed", 1)[0] for p in folder.glob("*-seed*.parquet")}) if folder.is_dir() else []
    lines = []
    for lab in labels:
        v = measured_reliability(coll, lab)
        if v is None:
            continue
        src = "; ".join(f"{s['column']}: {s['n']} LoRAs{_cost(s)}" for s in v["sources"])
        lo, hi = v["r_mean_ci95"]
        ok = ("met" if v["r_mean"] >= RELIABILITY_GOAL else "**not met**") if v["n"] >= MIN_RETEST else \
            f"too few LoRAs to judge (fewer than {MIN_RETEST})"
        lines += [f"**`{lab}` measured again** (`lol zoo measure`, same protocol, other noise seeds; files under "
                  f"`{MEASUREMENTS_DIR}/`): {src}. Over the {v['n']} LoRAs measured all {v['k']} times, one "
                  f"measurement's reliability (mean pairwise r) is {v['r_single']:.3f} and their mean's "
                  f"{v['r_mean']:.3f} (95 % CI {lo:.3f} – {hi:.3f}; goal r ≥ {RELIABILITY_GOAL}: {ok}). "
                  + (f"The `{lab}` column is their mean (`lol zoo measure --apply`)."
                     if coll.labels.get(lab, {}).get("measurements") else
                     f"The `{lab}` column is the build's measurement alone: these files do not change it."
                     + _remaining(v["sources"], len(coll)) + _main_rows_measured(coll, lab)), ""]
    return lines


def _main_rows_measured(coll, label: str) -> str:
    """For a collection of mixed ranks: how many of the LoRAs the tasks train on (`lol.experiments.main_rows`) have
    every measurement of ``label`` (`lol zoo measure --main-rows` measures those first)."""
    from ..experiments import main_row_indices, main_rows
    from .measure import measurements

    where = main_rows(coll)
    if not where:
        return ""
    values, _ = measurements(coll, label)
    idx = main_row_indices(coll)
    done = int(values.iloc[idx].notna().all(1).sum())
    what = ", ".join(f"{k} {v}" for k, v in where.items())
    return (f" Of the {len(idx):,} LoRAs the tasks train on ({what}), {done:,} have every measurement "
            "(`--main-rows` measures those first).")


def _remaining(sources: list[dict], n: int) -> str:
    """What is left before ``--apply`` can average the measurements: LoRAs still to measure per seed and, at each
    file's measured CPU cost per LoRA, the CPU time."""
    left = [(s, n - s["n"]) for s in sources[1:] if s["n"] < n]
    if not left:
        return " Every LoRA has every measurement: `lol zoo measure --apply` averages them."
    cpu = sum(k * s["cpu_seconds"] for s, k in left if s.get("cpu_seconds"))
    return (" Left before `--apply` can average them: " + ", ".join(f"{k:,} LoRAs ({s['column']})" for s, k in left)
            + (f", about {cpu / 3600:.1f} CPU-hours at the measured cost (`lol zoo measure` resumes)." if cpu else
               " (`lol zoo measure` resumes)."))


def _cost(source: dict) -> str:
    """What one LoRA's measurement cost, as `lol.zoo.measure.measurements` recorded it: CPU seconds where known (on
    a shared CPU the wall time says little), else wall seconds."""
    if source.get("cpu_seconds"):
        return f", {source['cpu_seconds']:.1f} CPU-s per LoRA"
    return f", {source['seconds']:.1f} s wall per LoRA" if source.get("seconds") else ""


def data_readme(out: str | Path) -> str:
    """The text of ``OUT/README.md`` for a build folder."""
    out = Path(out)
    build = json.loads((out / "build.json").read_text()) if (out / "build.json").is_file() else {}
    lines = ["# Shipped data", "",
             "Generated by `lol zoo report --out data` from the build's own records; do not edit by hand.", "",
             "Everything here was built on a 2-core CPU by this project's own pipeline:", "",
             "```bash",
             "lol zoo build --preset default --out data   # resumable: re-run after a kill or on a fresh checkout",
             "lol zoo report --out data                   # rewrites this file",
             "```", "",
             "A user with real weights builds the same collections on them: `--base PATH` (a Stable Diffusion 1.x "
             "folder), `--scorer PATH` (e.g. `openai/clip-vit-base-patch16` in a local folder), `--lm-base PATH`; "
             "CUDA is used when present.", ""]
    if build:
        v = build.get("versions", {})
        lines += [f"Preset `{build.get('preset')}`, seed {build.get('seed')}; "
                  + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", ""]
    lines += [f"In all, this folder holds {_mb(_size(out))} (budget: {DATA_BUDGET_MB} MB; 1 MB = 10⁶ bytes "
              f"throughout).", ""]
    lines += ["## Base models", ""]
    for name in ("sd", "sd_v1", "clip", "lm", "lm_v2"):
        if name in ("sd_v1", "lm_v2") and not (out / "base" / name).is_dir():
            continue
        lines += _base_section(name, out / "base" / name)
    lines += ["## Collections", ""]
    cdir = out / "collections"
    # the three default collections always (a missing one says so), the sibling and any other one when packed there
    names = [n for n in COLLECTION_TITLES if n in ("faces", "fashion", "lm") or (cdir / n).is_dir()]
    names += sorted(p.name for p in cdir.glob("*") if p.is_dir() and p.name not in names) if cdir.is_dir() else []
    for name in names:
        lines += _collection_section(name, out / "collections" / name, build)
    samples = sorted((out / "samples").glob("*.png")) if (out / "samples").is_dir() else []
    if samples:
        lines += ["## Samples", ""]
        for p in samples:
            lines += [f"**{p.stem}**", "", f"![{p.stem}](samples/{p.name})", ""]
    ckpt_index = out / "checkpoints" / "index.json"
    if ckpt_index.is_file():
        lines += ["## Shipped checkpoints", "", "Used by `lol predict --task LABEL` (see `checkpoints/index.json`); "
                  "the model and its test score (the label's primary metric, and for a category label its "
                  "accuracy) as its `config.json` records them.",
                  "", "| label | checkpoint | model | test |", "|---|---|---|---|"]
        for lab, rel in json.loads(ckpt_index.read_text()).items():
            folder = f"checkpoints/{rel}" if not str(rel).startswith("checkpoints") else str(rel)
            lines.append(f"| {lab} | `{folder}` | {_shipped_model(out / folder, lab)} |")
        lines.append("")
    return "\n".join(lines)


def _shipped_model(folder: Path, label: str) -> str:
    """``kind | test score`` of a shipped checkpoint for ``label``, from its ``config.json``: an ensemble as its members
    (a weight above one as ×k); a category label's accuracy beside its primary metric (balanced accuracy), since
    accuracy is what the paper reports for the dataset size; ``? | ?`` when the config cannot be read."""
    from ..catalog import _checkpoint_config, model_name
    from ..experiments import PRIMARY_METRIC

    cfg = _checkpoint_config(folder)          # {} when unreadable: "? | ?"
    kind = model_name(cfg)
    lab = next((t for t in cfg.get("labels") or [] if t.get("name") == label), {})
    metric = PRIMARY_METRIC.get(lab.get("kind"), "")
    test = ((cfg.get("metrics") or {}).get("test") or {}).get(label, {})
    value = test.get(metric)
    if not isinstance(value, (int, float)):
        return f"{kind} | ?"
    also = test.get("accuracy") if lab.get("kind") == "category" and metric != "accuracy" else None
    return f"{kind} | {metric} {value:.3f}" + (f", accuracy {also:.3f}" if isinstance(also, (int, float)) else "")


def write_data_readme(out: str | Path) -> Path:
    path = Path(out) / "README.md"
    path.write_text(data_readme(out))
    return path
