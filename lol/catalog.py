"""What a data folder offers, and what fits what: the packed collections, the base models they were trained on, and
the trained checkpoints — read from their own metadata (``collection.json``, a checkpoint's ``config.json``), never
guessed from names. Used by the explorer to tell which shipped base an uploaded LoRA belongs to, which models can
predict for it (`checkpoints`, `CheckpointInfo.fits`) and what each recorded when it was trained (`metrics_table`).

A *base* here is one module spec (names and shapes of the adapted layers) with the base-model folders the
collections on it record (``{"sd": "base/sd", "clip": "base/clip"}``); collections that share a spec (the zoo's faces
and fashion share one Stable Diffusion base) share a base. No Streamlit, no torch at import.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LoLError, one_line
from .lora import ModuleSpec

__all__ = ["Base", "bases", "fitting_base", "judge", "Fit", "model_folder", "CheckpointInfo", "FAMILY", "checkpoints",
           "checkpoints_for", "home_collection", "metrics_table", "model_name"]


@dataclass
class Base:
    spec: ModuleSpec
    collections: list[str] = field(default_factory=list)    # shipped collections on this base, in order
    models: dict[str, Path] = field(default_factory=dict)    # {"sd": folder, "clip": folder, "lm": folder}

    @property
    def name(self) -> str:
        """For people: ``"the Stable Diffusion base of faces and fashion"``."""
        kind = ("Stable Diffusion" if "sd" in self.models else "language-model" if "lm" in self.models
                else f"{len(self.spec)}-module")
        colls = " and ".join([", ".join(self.collections[:-1]), self.collections[-1]] if len(self.collections) > 1
                             else self.collections)
        return f"the {kind} base of {colls}" if colls else f"a {kind} base"

    def fits(self, lora) -> bool:
        try:
            self.spec.match(lora)
        except LoLError:
            return False
        return True


def _recorded_models(meta: dict, coll_dir: Path) -> dict[str, Path]:
    raw = meta.get("base_model")
    try:
        rec = json.loads(raw) if isinstance(raw, str) and raw.strip().startswith("{") else None
    except json.JSONDecodeError:
        rec = None
    if not isinstance(rec, dict):
        return {}
    out = {}
    for k, rel in rec.items():
        p = Path(str(rel))
        out[str(k)] = p if p.is_absolute() else (coll_dir.resolve().parent.parent / p)
    return out


def bases(collections: dict[str, Path]) -> list[Base]:
    """One `Base` per distinct module spec among ``collections`` (``{name: packed folder}``), in their order.
    Unreadable ``collection.json`` files are skipped (the collection itself reports the problem when opened)."""
    out: list[Base] = []
    for name, folder in collections.items():
        try:
            meta = json.loads((Path(folder) / "collection.json").read_text())
            spec = ModuleSpec.from_json(meta["spec"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        same = next((b for b in out if b.spec.keys == spec.keys and b.spec.shapes == spec.shapes), None)
        if same is None:
            same = Base(spec)
            out.append(same)
        same.collections.append(name)
        for k, p in _recorded_models(meta, Path(folder)).items():
            same.models.setdefault(k, p)
    return out


def fitting_base(lora, known: list[Base]) -> Base | None:
    """The first base whose modules the LoRA matches (by name, across formats: `ModuleSpec.match`), else None."""
    return next((b for b in known if b.fits(lora)), None)


@dataclass
class Fit:
    """How an uploaded LoRA relates to the known bases: ``base`` it fits (or None) and one line saying so."""

    base: Base | None
    message: str


def judge(name: str, lora, known: list[Base], want: Base | None = None) -> Fit:
    """One short line for one file: which base it fits, or that it fits none (with its module count and the first
    module name, so the user can tell what it was trained on). With ``want`` (the base the page is on), a LoRA for
    another known base is named as such."""
    base = fitting_base(lora, known)
    if base is None:
        first = lora.names[0] if len(lora.names) else "?"
        return Fit(None, f"{name}: fits none of the shipped base models ({len(lora.names)} modules, e.g. "
                         f"{first}; the shipped bases: " + "; ".join(b.name.removeprefix("the ") for b in known)
                   + ")")
    if want is not None and base is not want:
        return Fit(base, f"{name}: a LoRA for {base.name}, not for {want.name}")
    return Fit(base, f"{name}: fits {base.name}")


_MARKER = {"sd": "model_index.json", "clip": "config.json", "lm": "config.json"}


def _usable(p: Path | None, name: str) -> bool:
    if p is None or not Path(p).is_dir():
        return False
    from .zoo.image_bases import resolve_base

    try:
        return (resolve_base(p) / _MARKER.get(name, "config.json")).is_file()
    except (LoLError, OSError, ValueError):
        return False


def model_folder(coll, name: str, known: list[Base], data_root: Path | None = None) -> Path | None:
    """The folder of base model ``name`` (``sd``, ``clip``, ``lm``) for a collection: the one it records, else the
    one recorded by a shipped collection on the same base (the zoo's fashion collection records only ``sd``; the
    faces collection on the same base records ``clip`` too), else — for image LoRAs (every module a diffusers
    ``unet.`` / ``text_encoder.`` one) of a collection that records no base — ``data_root/base/<name>``; None when
    there is none here."""
    meta = {"base_model": getattr(coll, "base_model", None)}
    rec = _recorded_models(meta, Path(getattr(coll, "path", ".")))
    if _usable(rec.get(name), name):
        return rec[name]
    spec = coll.spec
    for b in known:
        if b.spec.keys == spec.keys and b.spec.shapes == spec.shapes and _usable(b.models.get(name), name):
            return b.models[name]
    image = all(n.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2") for n in spec.names)
    if not rec and data_root is not None and name in ("sd", "clip") and image \
            and _usable(Path(data_root) / "base" / name, name):
        return Path(data_root) / "base" / name
    return None


def _checkpoint_config(folder) -> dict:
    try:
        return json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


# short names of the model families (the kinds of `lol.models`), for people
FAMILY = {"mlp": "flat MLP", "mlp_aug": "flat MLP + GL augmentation", "dense": "ΔW MLP",
          "colspace": "column-space MLP", "colsketch": "column-space sketch", "svals": "singular-value MLP",
          "oalign": "Procrustes-aligned MLP", "canon_mlp": "SVD-canonical MLP",
          "canon_transformer": "SVD-canonical Transformer", "glnet": "GL-net", "ensemble": "ensemble",
          "count": "count of a membership model"}


def model_name(config: dict) -> str:
    """A checkpoint's model kind as its ``config.json`` records it; an ensemble as its members, a weight above one as
    ×k (``ensemble of dense×2 + colspace + glnet``); a count as what it counts (``count of membership by colspace``)."""
    kind = config.get("kind") or "?"
    if kind == "count":
        counted = config.get("counted") or {}
        inner = model_name({"kind": counted.get("kind"), "members": counted.get("members")})
        return f"count of {counted.get('task') or '?'} by {inner}"
    if kind != "ensemble":
        return kind
    return "ensemble of " + " + ".join(m.get("kind", "?") + (f"×{m['weight']}" if m.get("weight", 1) > 1 else "")
                                       for m in config.get("members") or [])


@dataclass(frozen=True)
class CheckpointInfo:
    """A trained checkpoint as its ``config.json`` describes it, read without loading the model: ``name`` is its
    folder under the checkpoints root (``faces/attributes``), ``shipped_for`` the labels the checkpoint index ships it
    for. A folder that is not a readable checkpoint has ``error`` (one line naming the file) and no spec."""

    path: str
    name: str
    kind: str | None = None
    labels: tuple[str, ...] = ()
    spec: ModuleSpec | None = None
    config: dict = field(default_factory=dict, compare=False)
    shipped_for: tuple[str, ...] = ()
    error: str | None = None

    def fits(self, spec: ModuleSpec, shapes: bool = False) -> bool:
        """Whether the checkpoint reads LoRAs of ``spec``: the same module keys (and shapes, with ``shapes``)."""
        return self.spec is not None and self.spec.keys == spec.keys and (not shapes or self.spec.shapes == spec.shapes)

    @property
    def title(self) -> str:
        """``faces/attributes — male, young, … (5 labels) · ΔW MLP``: the checkpoint (collection/task), what it
        predicts and its model family, so a name on screen says all three."""
        labels = list(self.labels)
        what = (", ".join(labels) or "no labels") if len(labels) <= 2 else \
            f"{labels[0]}, {labels[1]}, … ({len(labels)} labels)"
        return f"{self.name} — {what} · {FAMILY.get(self.kind or '', self.kind or '?')}"


def _checkpoint_info(folder: Path, name: str, shipped_for: tuple[str, ...]) -> CheckpointInfo:
    from .checkpoint import CONFIG_NAME, FORMAT, WEIGHTS_NAME

    cfg_file = folder / CONFIG_NAME
    try:
        missing = next((f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / f).is_file()), None)
        if missing:
            raise LoLError(f"{folder}: not a LoL checkpoint (missing {missing})")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != FORMAT:
            raise LoLError(f"{cfg_file}: not a LoL checkpoint config (format {cfg.get('format')!r})")
        return CheckpointInfo(str(folder), name, cfg.get("kind"), tuple(t["name"] for t in cfg["labels"]),
                              ModuleSpec.from_json(cfg["spec"]), cfg, shipped_for)
    except (LoLError, OSError, ValueError, KeyError, TypeError) as e:
        return CheckpointInfo(str(folder), name, shipped_for=shipped_for,
                              error=one_line(e) if isinstance(e, LoLError) else f"{cfg_file}: {one_line(e)}")


def checkpoints(root: Path | None = None) -> list[CheckpointInfo]:
    """Every checkpoint folder under ``DATA/checkpoints`` (`lol.paths.checkpoint_dirs`): the ones the index ships
    first, then by name. A malformed index raises `ValueError` naming the file."""
    from .paths import checkpoint_dirs, checkpoint_index, checkpoint_index_path, checkpoints_root

    index = checkpoint_index(checkpoint_index_path(root))
    top = checkpoints_root(root).resolve()
    out = [_checkpoint_info(d, str(d.relative_to(top)) if d.is_relative_to(top) else d.name,
                            tuple(label for label, p in index.items() if p == d)) for d in checkpoint_dirs(root)]
    return sorted(out, key=lambda c: (not c.shipped_for, c.name))


def checkpoints_for(base: Base, infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """The checkpoints whose modules (keys and shapes) are the base's: the models that can predict for any LoRA of
    that base, labels or not."""
    return [c for c in infos if c.fits(base.spec, shapes=True)]


def metrics_table(infos: list[CheckpointInfo], split: str = "test"):
    """One row per (checkpoint, label): model kind, symmetry, whether the index ships it for that label, and the
    ``split`` metrics recorded in its ``config.json`` when it was trained (`lol.train`), under their names on screen
    (`lol.metrics.METRIC_NAMES`); unreadable checkpoints get one row with the ``problem``. None without rows."""
    import pandas as pd

    from .metrics import METRIC_NAMES

    rows = []
    for c in infos:
        head = {"checkpoint": c.name, "model": model_name(c.config), "invariant to": c.config.get("invariant_to") or "?"}
        if c.error:
            rows.append({**head, "label": "", "problem": c.error})
            continue
        recorded = (c.config.get("metrics") or {}).get(split) or {}
        for label in c.labels:
            rows.append({**head, "label": label, "shipped": "yes" if label in c.shipped_for else "",
                         **{f"{split} {METRIC_NAMES.get(k, k)}": v for k, v in (recorded.get(label) or {}).items()}})
    return pd.DataFrame(rows) if rows else None


def home_collection(checkpoint_dir, base: Base, collections: dict[str, Path]) -> str | None:
    """The collection (of ``collections``, on ``base``) the checkpoint was trained on — the one whose fingerprint it
    records, or whose LoRAs it records (`lol.predict.trained_on`: labels re-measured since) — else the base's first
    collection."""
    from .collection import open_collection
    from .predict import trained_on

    config = _checkpoint_config(checkpoint_dir)
    if config.get("fingerprint"):
        for name in base.collections:
            if name in collections and trained_on(config, open_collection(collections[name]))[0]:
                return name
    return base.collections[0] if base.collections else None
