"""LoRA files into a packed collection: the one packing function behind `lol import`, the explorer's folders on the
server and its uploads, so every route keeps and leaves out the same files for the same reasons.

`pack` takes LoRAs as paths (a folder tree is found with `scan`) or as objects already read (uploads) and

* reads every header (``shapes_only``: cheap), leaving out unreadable files with their reason;
* keeps the LoRAs of the *majority* module spec (module keys without a component prefix, and shapes: a PEFT folder
  and a diffusers file of one base model count as the same), or of the ``spec`` given; every other LoRA is named;
* optionally joins a labels table (CSV / Parquet, on ``id`` = path relative to the source, or ``path``);
* streams the factors into the collection at the storage dtype (files whose data turn out unreadable are dropped
  and the collection re-packed without them), all in a hidden sibling of ``dest`` renamed into place only when
  complete, under an exclusive lock (a concurrent packer of the same ``dest`` is refused).

Nothing is silently dropped: `Packed` lists every file left out and why.
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CollectionError, LoLError, LoRAFormatError
from .formats import scan_tree

__all__ = ["Packed", "PackError", "pack", "scan", "spec_signature"]


@dataclass
class Packed:
    dest: Path
    n: int
    spec: object                                                     # lol.lora.ModuleSpec of the collection
    failed: list[tuple[str, str]] = field(default_factory=list)      # (id, why): unreadable
    mismatched: list[tuple[str, str]] = field(default_factory=list)  # (id, why): other modules than the rest
    not_lora: list[tuple[str, str]] = field(default_factory=list)    # (path, why): not a LoRA file
    warnings: list[str] = field(default_factory=list)                # e.g. label rows matching no LoRA
    paths: dict[str, str] = field(default_factory=dict, repr=False)  # id -> the path it was read from

    def notes(self) -> list[str]:
        """One line per LoRA left out, naming it (by id, not by its full path) and why."""
        out = []
        for i, why in self.failed + self.mismatched:
            p = self.paths.get(i)
            why = why.replace(f"{p}: ", "").replace(p, i) if p else why
            out.append(f"{i}: {why}".splitlines()[0])
        return out


class PackError(CollectionError):
    """Nothing could be packed; ``packed`` lists every file left out and why."""

    def __init__(self, msg: str, packed: Packed):
        super().__init__(msg)
        self.packed = packed


def scan(src, limit: int | None = None, follow_links: bool = True) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(LoRAs, not LoRAs)`` under ``src`` (`lol.formats.scan_tree`); a single file or PEFT folder is one LoRA."""
    src = Path(src)
    if src.is_file() or (src / "adapter_config.json").is_file():
        return [src], []
    return scan_tree(src, limit=limit, follow_links=follow_links)


def spec_signature(lora) -> tuple:
    """What the majority vote compares: module keys without a component prefix (`split_component`) and shapes."""
    from .lora import split_component

    return tuple(sorted((split_component(m.name)[1], m.out_features, m.in_features) for m in lora))


def pack(items, dest, *, root=None, spec=None, labels=None, base_model: str | None = None,
         dtype: torch.dtype | None = torch.float16, overwrite: bool = False, provenance: dict | None = None,
         not_lora=(), progress: bool = False, doing: str = "packing into") -> Packed:
    """Pack ``items`` — paths, or ``(id, path or LoRA)`` pairs — into the collection folder ``dest``.

    A path's id is its path relative to ``root`` (default: its parent). ``spec``: keep the LoRAs that fit it (e.g. a
    shipped base's), else those of the majority spec. ``labels``: a table file joined on ``id`` or ``path`` (a
    ``.json`` schema beside it is used when present). ``dtype``: storage dtype (None: float32, float64 if any LoRA
    is). ``not_lora``: ``(path, why)`` found beside them (`scan`), carried into the result. ``doing`` names the
    work in the message refusing a concurrent packer. Raises `CollectionError` when no LoRA could be read, or
    ``dest`` exists without ``overwrite``."""
    from .paths import clean_stale_temp, exclusive_lock

    dest = Path(dest)
    named = []
    for it in items:
        if isinstance(it, tuple):
            named.append((str(it[0]), it[1]))
        else:
            p = Path(it)
            base = Path(root) if root is not None else p.parent
            named.append((p.relative_to(base).as_posix() if p.is_relative_to(base) else p.name, p))
    res = Packed(dest, 0, None, not_lora=[(str(p), why) for p, why in not_lora],
                 paths={i: str(s) for i, s in named if isinstance(s, (str, Path))})
    with exclusive_lock(dest, doing):
        clean_stale_temp(dest)
        if dest.exists() and any(dest.iterdir()) and not overwrite:
            raise CollectionError(f"{dest}: already exists (use --overwrite to replace it)")
        # one torch thread: import's torch ops are copies and products of one module's factors for up to 64 files
        # (`lol.formats.stacked`), each too small for two threads to pay; on a shared 2-core machine two threads
        # stall each other (a 50 µs product took 2-4 ms). Restored after, as `lol.models.parallel` does
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _pack_locked(named, dest, res, spec, labels, base_model, dtype, overwrite, provenance or {}, progress)
        finally:
            torch.set_num_threads(threads)
    return res


def _header(src, reader):
    return src if not isinstance(src, (str, Path)) else reader.header(src)


def _pack_locked(named, dest, res, spec, labels, base_model, dtype, overwrite, prov, progress):
    import pandas as pd
    from tqdm import tqdm

    from .collection import write_collection
    from .formats.stacked import StackedLoRAs, StackedReader
    from .lora import LoRA, LoRAModule
    from .paths import replace_dir, temp_sibling

    headers = []
    reader = StackedReader(dtype)  # files of one layout are read many at a time (lol.formats.stacked)
    for i, src in tqdm(named, desc="scanning", unit="file", disable=not progress, mininterval=0.5):
        try:
            headers.append((i, src, _header(src, reader)))
        except (LoLError, OSError) as e:
            res.failed.append((i, str(e) if isinstance(e, LoLError) else f"{type(e).__name__}: {e}"))
    if not headers:
        raise PackError(f"none of the {len(named)} file(s) could be read as a LoRA"
                        + (f" ({res.notes()[0]})" if res.failed else ""), res)
    sigs, fits = {}, {}  # files of one tensor table (`StackedReader.key`) share their signature and ranks

    def signature(src, h):
        k = reader.key(src)
        if k is None:
            return spec_signature(h)
        if k not in sigs:
            sigs[k] = spec_signature(h)
        return sigs[k]

    if spec is None:
        majority = Counter(signature(s, h) for _, s, h in headers).most_common(1)[0][0]
        spec = next(h.spec for _, s, h in headers if signature(s, h) == majority)
    keep, ranks = [], []
    for i, src, h in headers:  # matched by name (`ModuleSpec.match`): "unet."-prefixed or not, one base model
        k = reader.key(src)
        try:
            r = fits.get(k) if k is not None else None
            if r is None:
                r = [m.rank for m in spec.match(h, what="the majority of the source files")]
                if k is not None:
                    fits[k] = r
            ranks.append(list(r))
            keep.append((i, src, h))
        except LoLError as e:
            res.mismatched.append((i, str(e)))
    if not keep:
        raise PackError(f"none of the {len(headers)} LoRA(s) fits the modules asked for", res)
    table = pd.DataFrame({"id": [i for i, *_ in keep],
                          "source": [str(s) if isinstance(s, (str, Path)) else i for i, s, _ in keep],
                          "format": [h.format for *_, h in keep]})
    label_schema = tasks = None
    if labels is not None:
        table, label_schema, tasks = _join_labels(labels, table, keep, res.warnings)
    if dtype is None:
        dtype = torch.float64 if any(m.U.dtype == torch.float64 for _, s, _ in keep
                                     if not isinstance(s, (str, Path)) for m in s) else torch.float32
    reader.dtype = dtype  # files are read at the storage dtype
    late: list[int] = []

    def read_all():  # (j, a LoRA, a StackedLoRAs of LoRAs j, j+1, ..., or the error reading LoRA j)
        j = 0
        while j < len(keep):
            end = j
            while end < len(keep) and isinstance(keep[end][1], (str, Path)):
                end += 1
            if end == j:  # a LoRA given as an object (uploads)
                yield j, keep[j][1]
                j += 1
                continue
            for k, item in reader.read([keep[x][1] for x in range(j, end)]):
                yield j + k, item
            j = end

    def stream():
        with tqdm(total=len(keep), desc="packing", unit="LoRA", disable=not progress, mininterval=0.5) as bar:
            for j, item in read_all():
                if isinstance(item, (LoLError, OSError)):
                    res.failed.append((keep[j][0], str(item)))
                    late.append(j)
                    item = LoRA.from_modules(LoRAModule(n, torch.zeros(o, r), torch.zeros(k, r), 1.0, 1.0)  # its
                                             for n, (o, k), r in zip(spec.names, spec.shapes, ranks[j]))  # header's
                yield item
                bar.update(len(item) if isinstance(item, StackedLoRAs) else 1)
    common = dict(labels=label_schema, tasks=tasks, base_model=base_model, dtype=dtype, spec=spec,
                  provenance={**prov, "files_found": len(named)})
    stage = temp_sibling(dest, "stage")  # never visible as dest until complete and valid
    loras = stream()
    try:
        # ranks from the headers: no spool; written straight into the stage, which is the folder renamed into place
        c = write_collection(stage, loras, table, ranks=ranks, atomic=False, **common)
        if late:  # a file whose header was fine but whose data is not: re-pack without it, still staged
            good = [j for j in range(len(keep)) if j not in set(late)]
            if not good:
                raise PackError("none of the LoRA files could be read", res)
            stage2 = temp_sibling(dest, "stage")
            c = write_collection(stage2, (c.lora(j) for j in good), c.table.iloc[good], atomic=False, **common)
            shutil.rmtree(stage)
            stage = stage2
        res.n = len(c)  # as written (and opened, so checked) by write_collection
        del c
        try:
            replace_dir(stage, dest, overwrite=overwrite)
        except FileExistsError:
            raise CollectionError(f"{dest}: already exists (written meanwhile by another process; use --overwrite "
                                  f"to replace it)") from None
    finally:
        loras.close()  # ends the progress bar's line before any error line
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    res.spec = spec


# ------------------------------------------------------------------------------------------------------ labels

def _read_labels(path: Path):
    import pandas as pd

    if not path.is_file():
        raise LoRAFormatError(path, "labels table not found")
    try:
        df = pd.read_parquet(path) if path.suffix in (".parquet", ".pq") else pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 -- pandas/pyarrow raise many types for a bad table; all become one line
        raise LoRAFormatError(path, f"cannot read the labels table ({type(e).__name__}: {e})") from None
    key = "id" if "id" in df.columns else "path" if "path" in df.columns else None
    if key is None:
        raise LoRAFormatError(path, f"labels table needs a column 'id' or 'path'; it has {list(df.columns)[:8]}")
    return df, key


def _join_labels(labels_path, table, keep, warnings: list[str]):
    """The table joined with the labels file, and its label schema and tasks (from a ``.json`` beside it, if any)."""
    from .labels import infer_kind

    df, key = _read_labels(Path(labels_path))
    df = df.copy()
    df[key] = df[key].astype(str)
    ids = [i for i, *_ in keep]
    if key == "path":  # match relative paths, or absolute paths resolving to the same file
        rel = {str(Path(s).resolve()): i for i, s, _ in keep if isinstance(s, (str, Path))}
        df["id"] = [rel.get(str(Path(v).resolve()), Path(v).as_posix()) for v in df["path"]]
        df = df.drop(columns=["path"])
    dup = df["id"][df["id"].duplicated()].tolist()
    if dup:
        raise LoRAFormatError(labels_path, f"duplicate label rows for {dup[:3]}")
    df = df.drop(columns=[c for c in ("source", "format") if c in df.columns])
    unmatched = sorted(set(df["id"]) - set(ids))
    if unmatched:
        warnings.append(f"{len(unmatched)} label row(s) match no imported LoRA, e.g. {unmatched[:3]}")
    missing = len(set(ids) - set(df["id"]))
    if missing:
        warnings.append(f"{missing} imported LoRA(s) have no label row (their labels are empty)")
    table = table.merge(df, on="id", how="left")
    reserved = {"id", "source", "format", "group", "split"}
    schema = {col: {"kind": infer_kind(df[col]), "description": f"column {col!r} of the labels table",
                    "task": "labels"} for col in df.columns if col not in reserved}
    tasks = None
    schema_file = Path(labels_path).with_suffix(".json")  # e.g. written by `lol synth` beside labels.csv
    if schema_file.is_file():
        try:
            given = json.loads(schema_file.read_text())
        except json.JSONDecodeError as e:
            raise LoRAFormatError(schema_file, f"not valid JSON ({e})") from None
        if isinstance(given, dict) and isinstance(given.get("labels"), dict):
            schema, tasks = given["labels"], given.get("tasks")
    return table, schema, tasks

