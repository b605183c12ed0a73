"""Packed collections: many LoRAs over one `ModuleSpec`, stored so that opening is instant and batches are slices.

A collection is a folder with three files:

* ``collection.json``: format version, layout, the spec (module names and (out, in) shapes), conv kernel shapes, base
  model description, label schema ``{name: {"kind": "regression"|"binary"|"category", "description", "task"}}``,
  label groups ``{"tasks": {task: [label, ...]}}``, provenance, and a content hash of the factors file
  (``factors_blake3``; collections written before BLAKE3 hold ``factors_sha256``, still verified: `FACTOR_HASHES`);
* ``factors.safetensors``: ``rank`` (N, L) int32; ``alpha`` and ``scale`` (N, L) float32; and the factors (float16 by
  default, stored at the dtype written, never widened; U has the scale folded in, so ``ΔW = U Vᵀ``), in one of two
  layouts:

  - **rank buckets** (version 2, written now): per module ℓ and per rank r that occurs in it, ``U/<name>/r<r>``
    (N_r, out_ℓ, r) and ``V/<name>/r<r>`` (N_r, in_ℓ, r) hold the LoRAs whose module ℓ has rank r, in collection
    order. Nothing is padded; where a LoRA sits is read from ``rank`` alone (its row in bucket r is the number of
    earlier LoRAs with rank r in that module).
  - **padded** (version 1, still read, written with ``layout="padded"``): ``U/<name>`` (N, out_ℓ, rmax_ℓ) and
    ``V/<name>`` (N, in_ℓ, rmax_ℓ), zero-padded past each LoRA's true rank;

* ``loras.parquet``: one row per LoRA, in factor order: ``id`` (unique), ``source``, ``format``, optional ``group``
  and ``split``, then label and metadata columns.

Opening memory-maps the factors through the `safetensors` library (copy-on-write, never modifying the file) and reads
only headers, ranks and the table; `Collection.batch` gathers rows of the maps into a `LoRABatch`, zero-padded in
memory to the largest selected rank per module as before. Zero padding is invisible to GL-invariant computations:
``U Vᵀ`` is unchanged and the GL(r) action acts on the first ``rank`` columns only.
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import struct
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .batch import LoRABatch, empty_factors
from .errors import CollectionError, SpecMismatchError
from .labels import LABEL_KINDS
from .lora import LoRA, LoRAModule, ModuleSpec
from .paths import atomic_dir

__all__ = ["Collection", "open_collection", "write_collection", "FORMAT_VERSION", "LAYOUTS", "LABEL_KINDS",
           "FACTOR_HASHES"]

FORMAT_VERSION = 2  # 2: rank buckets; 1: padded to the largest rank (still read)
LAYOUTS = {"rank_buckets": 2, "padded": 1}
META_NAME, FACTORS_NAME, TABLE_NAME = "collection.json", "factors.safetensors", "loras.parquet"
_ST_DTYPE = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int32: "I32"}
_TORCH_DTYPE = {v: k for k, v in _ST_DTYPE.items()}
# factors files up to this size are populated when mapped for writing; larger ones are written a window at a time,
# each window's pages released (`_release`) once this many bytes were written, so the writer's memory stays flat
_POPULATE_MAX = 1 << 30
_RELEASE_BYTES = 256 << 20


def _blake3():
    from blake3 import blake3

    return blake3(max_threads=1)


# the content hash each collection records of its factors file, newest first: BLAKE3 (~5x SHA-256's speed on one core,
# the hash an import spends most of its time on after the bytes themselves) is written; a collection written before it
# holds SHA-256, which `Collection.verify` still checks
FACTOR_HASHES = {"factors_blake3": ("BLAKE3", _blake3), "factors_sha256": ("SHA-256", hashlib.sha256)}
WRITE_HASH = "factors_blake3"


# ----------------------------------------------------------------------------------------------------------- writing

def _check_labels(labels: dict | None, tasks: dict | None, table) -> tuple[dict, dict]:
    labels = dict(labels or {})
    for name, info in labels.items():
        if name not in table.columns:
            raise CollectionError(f"label {name!r} has no column in the table (columns: {list(table.columns)[:8]})")
        kind = info.get("kind")
        if kind not in LABEL_KINDS:
            raise CollectionError(f"label {name!r}: kind must be one of {LABEL_KINDS}, got {kind!r}")
    if tasks is None:
        tasks = {}
        for name, info in labels.items():
            tasks.setdefault(info.get("task") or name, []).append(name)
    for task, names in tasks.items():
        bad = [n for n in names if n not in labels]
        if bad:
            raise CollectionError(f"task {task!r} lists unknown label(s) {bad}")
    return labels, {t: list(v) for t, v in tasks.items()}


def _ordered_modules(lora: LoRA, spec: ModuleSpec, i: int) -> list[LoRAModule]:
    try:
        return spec.match(lora, what="this collection")
    except SpecMismatchError as e:
        raise SpecMismatchError(f"LoRA #{i}: {e}") from None


class _Spool:
    """LoRAs of an iterator written once to a scratch file (target dtype, no padding) and replayed from a memory map,
    so every rank is known before the packed file is laid out, without holding all LoRAs in RAM."""

    def __init__(self, folder: Path, spec: ModuleSpec, dtype: torch.dtype):
        self.path, self.spec, self.dtype = folder / "spool.bin", spec, dtype
        self.f = open(self.path, "wb")
        self.entries: list[tuple[int, list[int], list[float], list[float]]] = []
        self.offset = 0

    def add(self, mods: list[LoRAModule]) -> None:
        start = self.offset
        for m in mods:
            for t in (m.U, m.V):
                b = t.detach().to("cpu", self.dtype).contiguous().numpy().tobytes()
                self.f.write(b)
                self.offset += len(b)
        self.entries.append((start, [m.rank for m in mods], [m.alpha for m in mods], [m.scale for m in mods]))

    def replay(self) -> Iterator[list[LoRAModule]]:
        self.f.close()
        if self.offset == 0:
            return
        with open(self.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        buf = torch.frombuffer(mm, dtype=torch.uint8)
        size = torch.empty((), dtype=self.dtype).element_size()
        for start, ranks, alphas, scales in self.entries:
            pos, mods = start, []
            for name, (o, n), r, a, s in zip(self.spec.names, self.spec.shapes, ranks, alphas, scales):
                U = buf[pos:pos + o * r * size].view(self.dtype).reshape(o, r)
                pos += o * r * size
                V = buf[pos:pos + n * r * size].view(self.dtype).reshape(n, r)
                pos += n * r * size
                mods.append(LoRAModule(name, U, V, alpha=a, scale=s))
            yield mods


def _safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict) -> tuple[bytes, dict]:
    """Header bytes (length prefix included, padded to 8) and ``{key: (start, end)}`` absolute offsets."""
    table, pos = {}, 0
    for key, dt, shape, nbytes in entries:
        table[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    table["__metadata__"] = metadata
    raw = json.dumps(table, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    head = struct.pack("<Q", len(raw)) + raw
    return head, {k: (len(head) + v["data_offsets"][0], len(head) + v["data_offsets"][1])
                  for k, v in table.items() if k != "__metadata__"}


def _bucket_rows(ranks: torch.Tensor) -> torch.Tensor:
    """For (N, L) ranks, the (N, L) row of each LoRA in its rank bucket: the number of earlier LoRAs whose module has
    the same rank (the rank-bucket layout's whole index, so nothing but ``rank`` is stored)."""
    r = ranks.numpy() if isinstance(ranks, torch.Tensor) else np.asarray(ranks)
    n = r.shape[0]
    if n == 0:
        return torch.zeros(r.shape, dtype=torch.long)
    order = np.argsort(r, axis=0, kind="stable")  # per module: LoRAs grouped by rank, in collection order
    s = np.take_along_axis(r, order, axis=0)
    idx = np.arange(n)[:, None]
    first = np.ones(s.shape, dtype=bool)
    first[1:] = s[1:] != s[:-1]
    start = np.maximum.accumulate(np.where(first, idx, 0), axis=0)  # where each rank's group begins
    rows = np.empty(r.shape, dtype=np.int64)
    np.put_along_axis(rows, order, idx - start, axis=0)
    return torch.from_numpy(rows)


def _bucket_key(side: str, name: str, r: int) -> str:
    return f"{side}/{name}/r{int(r)}"


def write_collection(dest, loras: Iterable[LoRA], table, labels: dict | None = None, tasks: dict | None = None,
                     base_model: str | None = None, dtype: torch.dtype = torch.float16,
                     spec: ModuleSpec | None = None, provenance: dict | None = None,
                     rmax: Sequence[int] | None = None, overwrite: bool = False,
                     ranks: Sequence[Sequence[int]] | None = None, layout: str = "rank_buckets",
                     atomic: bool = True) -> "Collection":
    """Pack LoRAs (row ``i`` of ``table`` describes the ``i``-th LoRA) into the collection folder ``dest``.

    Streaming: each LoRA is written as it arrives and dropped. The layout needs every LoRA's rank per module before
    the file is laid out: pass them as ``ranks`` ((N, L), spec order; each LoRA must then have exactly those), or
    give a sequence (scanned first); otherwise LoRAs go once through a scratch spool. ``rmax`` (per module) is an
    upper bound that is checked, and the width of the ``"padded"`` layout (version 1, for readers older than version
    2; the default ``"rank_buckets"`` stores no padding). Atomic: all files are written into a temporary sibling
    folder that is renamed to ``dest`` at the end. ``spec`` defaults to the first LoRA's; every LoRA is matched to it
    by module key. Missing ``source`` / ``format`` columns are filled from the LoRAs. Deterministic: the same inputs
    give byte-identical files. ``atomic=False``: write straight into ``dest``, an empty folder that the caller itself
    renames into place when complete (`lol.packing.pack` stages there); the files are made durable all the same.
    """
    import pandas as pd

    dest = Path(dest)
    if layout not in LAYOUTS:
        raise CollectionError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise CollectionError(f"{dest}: already exists (pass overwrite=True to replace it)")
    table = pd.DataFrame(table).reset_index(drop=True)
    if "id" not in table.columns:
        raise CollectionError("the table needs an 'id' column (one unique string per LoRA)")
    table["id"] = table["id"].astype(str)
    dup = table["id"][table["id"].duplicated()].tolist()
    if dup:
        raise CollectionError(f"duplicate ids in the table: {dup[:3]}")
    labels, tasks = _check_labels(labels, tasks, table)
    n = len(table)
    if n == 0:
        raise CollectionError("no LoRAs to pack (the table is empty)")
    st_dtype = _ST_DTYPE.get(dtype)
    if st_dtype is None or not dtype.is_floating_point:
        raise CollectionError(f"factor dtype must be float16/bfloat16/float32/float64, got {dtype}")

    if not atomic:
        dest.mkdir(parents=True, exist_ok=True)
        _write_into(dest, loras, table, n, labels, tasks, base_model, dtype, st_dtype, spec, provenance, rmax, ranks,
                    layout)
        return open_collection(dest)
    try:
        with atomic_dir(dest, overwrite=overwrite) as tmp:
            _write_into(tmp, loras, table, n, labels, tasks, base_model, dtype, st_dtype, spec, provenance, rmax,
                        ranks, layout)
    except FileExistsError:
        raise CollectionError(f"{dest}: already exists (written meanwhile by another process; pass overwrite=True "
                              f"to replace it)") from None
    return open_collection(dest)


def _known_ranks(ranks, n: int, L: int) -> torch.Tensor:
    try:
        t = torch.as_tensor([[int(r) for r in row] for row in ranks], dtype=torch.long)
    except (TypeError, ValueError) as e:
        raise CollectionError(f"ranks must be N lists of L integers ({e})") from None
    if t.shape != (n, L):
        if t.ndim == 2 and t.shape[1] == L:
            raise CollectionError(f"the table has {n} rows but ranks were given for {t.shape[0]} LoRAs")
        raise CollectionError(f"ranks has shape {tuple(t.shape)}, expected ({n}, {L}) (table rows, spec modules)")
    if bool((t < 1).any()):
        raise CollectionError("ranks must be ≥ 1")
    return t


def _write_into(tmp: Path, loras, table, n, labels, tasks, base_model, dtype, st_dtype, spec, provenance, rmax,
                ranks, layout) -> None:
    """`write_collection`'s work, into the temporary folder ``tmp`` (made durable before the caller renames it)."""
    from .formats.stacked import StackedLoRAs

    it = iter(loras)
    first = next(it, None)
    if first is None:
        raise CollectionError("no LoRAs to pack (the iterable is empty)")
    one = first.template if isinstance(first, StackedLoRAs) else first
    spec = spec or one.spec
    L = len(spec)
    kernels = [list(m.kernel_shape) if m.kernel_shape else None for m in _ordered_modules(one, spec, 0)]
    sources, formats = [], []
    orders: dict[int, list[int]] = {}  # id(template) → its module index per spec position

    def chain():
        """``(modules in spec order, None)`` per LoRA, ``(stack, module index per spec position)`` per stack."""
        i = 0
        for lora in _prepend(first, it):
            if isinstance(lora, StackedLoRAs):
                order = orders.get(id(lora.template))
                if order is None:
                    index = {m.name: k for k, m in enumerate(lora.template)}
                    order = orders[id(lora.template)] = [index[m.name] for m in _ordered_modules(lora.template, spec,
                                                                                               i)]
                sources.extend(lora.sources)
                formats.extend([lora.format] * len(lora))
                yield lora, order
                i += len(lora)
            else:
                sources.append(lora.source)
                formats.append(lora.format)
                yield _ordered_modules(lora, spec, i), None
                i += 1

    # every rank up front (the buckets' sizes), unless the padded layout streams with a given rmax
    known = None
    if ranks is not None:
        known = _known_ranks(ranks, n, L)
    elif isinstance(loras, Sequence):
        if len(loras) != n:
            raise CollectionError(f"the table has {n} rows but {len(loras)} LoRAs were given")
        known = torch.tensor([[m.rank for m in _ordered_modules(lo, spec, i)] for i, lo in enumerate(loras)],
                             dtype=torch.long).reshape(n, L)
    if known is None and (layout == "rank_buckets" or rmax is None):
        spool = _Spool(tmp, spec, dtype)
        for unit, order in chain():
            if order is None:
                spool.add(unit)
            else:
                for k in range(len(unit)):
                    lora = unit.lora(k)
                    spool.add([list(lora)[o] for o in order])
        if len(spool.entries) != n:
            spool.f.close()
            raise CollectionError(f"the table has {n} rows but {len(spool.entries)} LoRAs were given")
        known = torch.tensor([e[1] for e in spool.entries], dtype=torch.long).reshape(n, L)
        stream = ((mods, None) for mods in spool.replay())
    else:
        stream = chain()
    if rmax is not None:
        rmax = [int(r) for r in rmax]
        if len(rmax) != L:
            raise CollectionError(f"rmax has {len(rmax)} entries but the spec has {L} modules")
        if known is not None:
            over = (known > torch.tensor(rmax)).nonzero()
            if len(over):
                j, ell = (int(x) for x in over[0])
                raise CollectionError(f"LoRA #{j} module {spec.names[ell]!r} has rank {int(known[j, ell])} > rmax "
                                      f"{rmax[ell]}")
    else:
        rmax = [int(r) for r in known.max(dim=0).values]

    size = torch.empty((), dtype=dtype).element_size()
    # the 4-byte tensors first: every tensor then starts at an offset aligned to its item size (16-bit factors)
    entries = [("rank", "I32", (n, L), n * L * 4), ("alpha", "F32", (n, L), n * L * 4),
               ("scale", "F32", (n, L), n * L * 4)]
    # per module: {bucket width: key suffix}; LoRA j of module ℓ goes to bucket width[j, ℓ] at row rows[j, ℓ]
    if layout == "padded":
        for name, (o, i_), r in zip(spec.names, spec.shapes, rmax):
            entries.append((f"U/{name}", st_dtype, (n, o, r), n * o * r * size))
            entries.append((f"V/{name}", st_dtype, (n, i_, r), n * i_ * r * size))
    else:
        for ell, (name, (o, i_)) in enumerate(zip(spec.names, spec.shapes)):
            counts = torch.bincount(known[:, ell])
            for r in torch.nonzero(counts).reshape(-1).tolist():
                c = int(counts[r])
                entries.append((_bucket_key("U", name, r), st_dtype, (c, o, r), c * o * r * size))
                entries.append((_bucket_key("V", name, r), st_dtype, (c, i_, r), c * i_ * r * size))
        rows = _bucket_rows(known)
    head, offsets = _safetensors_header(entries, {"format": "pt", "lol": "collection"})
    total = len(head) + sum(e[3] for e in entries)
    fpath = tmp / FACTORS_NAME
    with open(fpath, "w+b") as f:
        f.write(head)
        _reserve(f, total, tmp)  # every block allocated now: a full disk is an error here, never a SIGBUS later
        # shared: writes go to the file's pages; a small file is populated up front (Linux), not one page fault at a
        # time; a large one is not (populating maps the whole file into this process at once)
        populate = getattr(mmap, "MAP_POPULATE", 0) if total <= _POPULATE_MAX else 0
        mm = mmap.mmap(f.fileno(), total, flags=mmap.MAP_SHARED | populate)
    views = {key: torch.frombuffer(mm, dtype=_TORCH_DTYPE[dt], count=nbytes // _TORCH_DTYPE[dt].itemsize,
                                   offset=offsets[key][0]).view(shape)
             for key, dt, shape, nbytes in entries if nbytes}
    np_views = {key: _numpy(t) for key, t in views.items()}  # the same bytes, for numpy's faster small copies

    known_np = known.numpy() if known is not None else None  # one row of Python ints per LoRA (below): no tensor
    rows_np = rows.numpy() if layout != "padded" else None   # indexing per module, no N×L Python objects
    # per module ℓ and rank r: the (U, V) destination blocks, numpy and torch views of the same bytes, looked up once
    names = spec.names
    if layout == "padded":
        dest_of = [{None: tuple((np_views[f"{s}/{nm}"], views[f"{s}/{nm}"]) for s in "UV")} for nm in names]
    else:
        dest_of = [{r: tuple((np_views[_bucket_key(s, nm, r)], views[_bucket_key(s, nm, r)]) for s in "UV")
                    for r in torch.unique(known[:, ell]).tolist()} for ell, nm in enumerate(names)]

    def put(np_view, t_view, row: int, r: int, src: torch.Tensor) -> None:
        if src.dtype == dtype and not src.requires_grad and src.device.type == "cpu":
            a = _numpy(src)  # same dtype: a bitwise numpy copy, several times faster than torch's for V = Aᵀ
            np.copyto(np_view[row] if np_view.shape[2] == r else np_view[row, :, :r], a)
        else:
            t_view[row, :, :r].copy_(src)  # converts: one rounding to the storage dtype

    def check_ranks(j: int, mods, ranks: list[int]) -> None:
        """LoRA #j's ranks agree with the given ones (if any) and none exceeds its module's rmax."""
        if known_np is not None:
            known_j = known_np[j].tolist()
            if ranks != known_j:
                ell = next(e for e, (a, b) in enumerate(zip(ranks, known_j)) if a != b)
                raise CollectionError(f"LoRA #{j} module {mods[ell].name!r} has rank {ranks[ell]} but the "
                                      f"given ranks say {known_j[ell]}")
        over = [e for e, r in enumerate(ranks) if r > rmax[e]]
        if over:
            raise CollectionError(f"LoRA #{j} module {mods[over[0]].name!r} has rank {ranks[over[0]]} > rmax "
                                  f"{rmax[over[0]]}")

    def put_stack(j: int, st, order: list[int], views: dict) -> None:
        """A `StackedLoRAs` of K LoRAs (one plan: the same ranks) into rows j..j+K-1: one operation per module."""
        K, tm = len(st), list(st.template)
        mods = [tm[o] for o in order]
        ranks_s = [m.rank for m in mods]
        first_bad = 0   # the K LoRAs share their ranks: the first whose given ranks differ (else any) is checked
        if known_np is not None:
            bad = np.nonzero((known_np[j:j + K] != np.asarray(ranks_s)).any(axis=1))[0]
            first_bad = int(bad[0]) if len(bad) else 0
        check_ranks(j + first_bad, mods, ranks_s)
        for ell, o in enumerate(order):
            r = ranks_s[ell]
            (_, u_t), (_, v_t) = dest_of[ell][None if layout == "padded" else r]
            # K consecutive LoRAs of one rank fill consecutive rows of its bucket
            row = int(rows_np[j, ell]) if rows_np is not None else j
            st.write_U(o, u_t[row:row + K, :, :r])
            st.write_V(o, v_t[row:row + K, :, :r])
        views["rank"][j:j + K] = torch.tensor(ranks_s, dtype=torch.int32)
        views["alpha"][j:j + K] = st.alpha_rows(order)  # the files' own where they differ (``alpha`` tensors)
        views["scale"][j:j + K] = st.scale_rows(order)

    count, since_release = 0, 0
    per_lora = max(1, (total - len(head)) // n)
    with torch.no_grad():
        for mods, order in stream:
            j = count
            if order is not None:
                if j + len(mods) > n:
                    raise CollectionError(f"more LoRAs than table rows ({n})")
                put_stack(j, mods, order, views)
                count += len(mods)
                since_release += per_lora * len(mods)
                if since_release >= _RELEASE_BYTES:
                    _release(mm)
                    since_release = 0
                continue
            if j >= n:
                raise CollectionError(f"more LoRAs than table rows ({n})")
            ranks_j = [m.rank for m in mods]
            check_ranks(j, mods, ranks_j)
            rows_j = rows_np[j].tolist() if rows_np is not None else [j] * L
            for ell, m in enumerate(mods):
                r, row = ranks_j[ell], rows_j[ell]
                (u_np, u_t), (v_np, v_t) = dest_of[ell][None if layout == "padded" else r]
                put(u_np, u_t, row, r, m.U)
                put(v_np, v_t, row, r, m.V)
            views["rank"][j] = torch.tensor(ranks_j, dtype=torch.int32)
            views["alpha"][j] = torch.tensor([m.alpha for m in mods], dtype=torch.float32)
            views["scale"][j] = torch.tensor([m.scale for m in mods], dtype=torch.float32)
            count += 1
            since_release += per_lora
            if since_release >= _RELEASE_BYTES:  # flat memory for any size: written pages leave this process
                _release(mm)
                since_release = 0
    if count != n:
        raise CollectionError(f"the table has {n} rows but {count} LoRAs were given")
    del views, np_views
    # the factors reach the disk while they are hashed: fsync waits on the disk, the hash on the CPU (both let go of
    # the GIL); every file is durable before this returns, so before the caller's rename makes the folder visible
    # written: the writable map goes before the fsync starts (its write-back would otherwise write-protect every page
    # of a live writable map while the hash reads it); the hash reads the same page-cache pages through a read-only one
    mm.close()
    with open(fpath, "rb") as f:
        populate = getattr(mmap, "MAP_POPULATE", 0) if total <= _POPULATE_MAX else 0
        mm = mmap.mmap(f.fileno(), total, flags=mmap.MAP_SHARED | populate, prot=mmap.PROT_READ)
    syncing = _Fsync(fpath)
    try:
        _finish(tmp, mm, total, table, sources, formats, spec, kernels, rmax, dtype, base_model, labels, tasks,
                provenance, layout, n)
    finally:
        syncing.thread.join()  # never left running (on an error the folder is removed)
    syncing.join()


def _finish(tmp: Path, mm, total: int, table, sources, formats, spec, kernels, rmax, dtype, base_model, labels, tasks,
            provenance, layout, n) -> None:
    """`_write_into`'s end: the factors' content hash (`WRITE_HASH`, from the written pages), the table and the
    description, each file fsynced (the two small ones at once, so one journal commit can serve both)."""
    sha = FACTOR_HASHES[WRITE_HASH][1]()  # hashed from the written pages (no second read of the file), a window at a time
    with memoryview(mm) as whole:
        for start in range(0, total, _RELEASE_BYTES):
            end = min(start + _RELEASE_BYTES, total)
            sha.update(whole[start:end])
            if total > _RELEASE_BYTES:
                _release(mm, start, end - start)
    mm.close()
    (tmp / "spool.bin").unlink(missing_ok=True)

    if "source" not in table.columns:
        table["source"] = [s or "" for s in sources]
    if "format" not in table.columns:
        table["format"] = [fm or "unknown" for fm in formats]
    front = [c for c in ("id", "source", "format", "group", "split") if c in table.columns]
    table = table[front + [c for c in table.columns if c not in front]]
    table.to_parquet(tmp / TABLE_NAME, index=False)
    meta = {
        "format": "lol-collection", "version": LAYOUTS[layout], "layout": layout, "n": n, "spec": spec.to_json(),
        "kernel_shapes": kernels, "rmax": rmax, "dtype": str(dtype).replace("torch.", ""),
        "base_model": base_model, "labels": labels, "tasks": tasks, "provenance": provenance or {},
        WRITE_HASH: sha.hexdigest(),
    }
    (tmp / META_NAME).write_text(json.dumps(meta, indent=1))  # insertion order: labels keep theirs
    small = [_Fsync(tmp / TABLE_NAME), _Fsync(tmp / META_NAME)]  # durable before the rename makes them visible
    for f in small:
        f.join()


def _prepend(first, it):
    yield first
    yield from it


def _release(mm: mmap.mmap, start: int = 0, length: int | None = None) -> None:
    """Drop ``mm``'s pages (a shared file mapping) from this process's resident set: written data stay in the page
    cache and reach the file as usual (for a shared file mapping ``MADV_DONTNEED`` loses nothing; a later access
    maps the page again). So writing a collection larger than RAM keeps the writer's memory flat. No-op where
    ``madvise`` is missing."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None or not hasattr(mm, "madvise"):
        return
    try:
        mm.madvise(advice, start, len(mm) - start if length is None else length)
    except OSError:  # advice refused: pages stay mapped, only memory use differs
        pass


def _numpy(t: torch.Tensor) -> np.ndarray:
    """The same memory as a numpy array (bfloat16, which numpy lacks, as int16 bits: copies stay bitwise)."""
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _reserve(f, total: int, folder: Path) -> None:
    """Allocate ``total`` bytes of ``f`` on disk up front (``posix_fallocate``), so that writing through the memory
    map cannot hit a full disk (which would kill the process with SIGBUS). Where the file system cannot allocate
    (no fallocate support), fall back to a sparse ``truncate``."""
    try:
        os.posix_fallocate(f.fileno(), 0, total)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(e.errno, f"no space for the {total / 1e6:.1f} MB factors file ({os.strerror(e.errno)})",
                          str(folder.parent)) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        f.truncate(total)
    except AttributeError:  # no posix_fallocate on this platform
        f.truncate(total)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Fsync:
    """``fsync(path)`` in a helper thread, started now; `join` waits for it and raises its `OSError`, if any."""

    def __init__(self, path: Path):
        import threading

        self.error: OSError | None = None
        self.thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self.thread.start()

    def _run(self, path: Path) -> None:
        try:
            _fsync(path)
        except OSError as e:
            self.error = e

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


# ----------------------------------------------------------------------------------------------------------- reading

class Collection:
    """An opened packed collection. Factors stay memory-mapped; nothing is read until sliced.

    ``batch`` / ``lora`` return exactly the stored (U, V): every GL-invariant quantity of a LoRA read back equals the
    one of the LoRA written, up to the storage dtype's rounding.
    """

    def __init__(self, path: Path, meta: dict, table, tensors: dict[str, torch.Tensor]):
        self.path = path
        self.meta = meta
        self.table = table
        self.spec = ModuleSpec.from_json(meta["spec"])
        self.labels: dict[str, dict] = meta.get("labels") or {}
        self.tasks: dict[str, list[str]] = meta.get("tasks") or {}
        self.base_model: str | None = meta.get("base_model")
        self.provenance: dict = meta.get("provenance") or {}
        self.kernel_shapes = [tuple(k) if k else None for k in meta.get("kernel_shapes") or [None] * len(self.spec)]
        self.layout: str = meta.get("layout") or "padded"
        self.ranks = tensors["rank"].long()  # (N, L), small: read now
        self.alpha = tensors["alpha"].clone()
        self.scale = tensors["scale"].clone()
        self._map(tensors)

    def _map(self, tensors: dict[str, torch.Tensor]) -> None:
        # per module: {bucket width: (U, V) mapped}, and per LoRA the width of its bucket and its row there. Padded:
        # one bucket of width rmax holding every LoRA; rank buckets: one per rank, the LoRAs of that rank in order
        self._buckets: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
        if self.layout == "padded":
            for n in self.spec.names:
                U, V = tensors[f"U/{n}"], tensors[f"V/{n}"]
                self._buckets.append({int(U.shape[2]): (U, V)})
            self._width = torch.tensor([next(iter(b)) for b in self._buckets], dtype=torch.long).expand(len(self), -1)
            self._row = torch.arange(len(self)).unsqueeze(1).expand(-1, len(self.spec))
        else:
            for ell, n in enumerate(self.spec.names):
                self._buckets.append({r: (tensors[_bucket_key("U", n, r)], tensors[_bucket_key("V", n, r)])
                                      for r in torch.unique(self.ranks[:, ell]).tolist()})
            if not hasattr(self, "_row"):
                self._width, self._row = self.ranks, _bucket_rows(self.ranks)

    def release(self) -> None:
        """Let go of the factor pages this process has read: the factors file is mapped afresh and the old mapping is
        unmapped once nothing else refers to it (a `lora` taken at the storage dtype is a view that keeps it). The
        pages stay in the OS page cache; only this process's resident memory drops. A pass over a collection larger
        than RAM (`lol.stream`) calls it every few hundred MB, so its memory stays flat."""
        self._map(_map_factors(self.path / FACTORS_NAME))

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"Collection({str(self.path)!r}, n={len(self)}, modules={len(self.spec)})"

    @property
    def ids(self) -> list[str]:
        return self.table["id"].tolist()

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 over ``collection.json`` (which holds the factors file's content hash) and ``loras.parquet``."""
        h = hashlib.sha256()
        for name in (META_NAME, TABLE_NAME):
            h.update((self.path / name).read_bytes())
        return h.hexdigest()

    @cached_property
    def loras_fingerprint(self) -> str:
        """SHA-256 over what makes the LoRAs themselves: the factors file's content hash (factors, ranks, alphas and
        scales), the layout, the module spec and the ids in table order — not the labels. Re-measuring a label
        (`lol zoo measure --apply`) changes `fingerprint` but not this, so a model's recorded split (which LoRA ids it
        trained, validated and tested on) still applies to the collection (`lol.predict.CollectionPredictions`)."""
        field, digest = self.factors_hash
        h = hashlib.sha256()
        for part in ("lol-loras-v1", field, digest, self.layout, json.dumps(self.spec.to_json(), sort_keys=True),
                     "\n".join(str(i) for i in self.table["id"])):
            h.update(part.encode() + b"\0")
        return h.hexdigest()

    @property
    def factors_hash(self) -> tuple[str, str]:
        """(field, hex digest) of the content hash recorded for the factors file (`FACTOR_HASHES`)."""
        for field in FACTOR_HASHES:
            if self.meta.get(field):
                return field, self.meta[field]
        raise CollectionError(f"{self.path / META_NAME}: no content hash of the factors file "
                              f"(expected one of {', '.join(FACTOR_HASHES)})")

    def verify(self) -> None:
        """Recompute the factors file's content hash (reads every byte) and compare with the recorded one."""
        field, want = self.factors_hash
        name, make = FACTOR_HASHES[field]
        h = make()
        with open(self.path / FACTORS_NAME, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        if h.hexdigest() != want:
            raise CollectionError(f"{self.path / FACTORS_NAME}: contents changed since the collection was written "
                                  f"({name} mismatch)")

    def _index(self, indices) -> torch.Tensor:
        if indices is None:
            return torch.arange(len(self))
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise IndexError(f"{self.path}: index out of range for a collection of {len(self)} LoRAs")
        return idx % len(self) if idx.numel() else idx

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the factors."""
        return next(iter(self._buckets[0].values()))[0].dtype

    def _factor_tensors(self) -> list[torch.Tensor]:
        """Every mapped factor tensor (U and V of every bucket of every module)."""
        return [t for b in self._buckets for pair in b.values() for t in pair]

    def batch(self, indices=None, dtype: torch.dtype = torch.float32, device=None) -> LoRABatch:
        """A `LoRABatch` of the selected LoRAs (all by default); per module the width is the largest selected rank,
        smaller ranks zero-padded (``ranks`` keeps each LoRA's true rank)."""
        idx = self._index(indices)
        ranks = self.ranks[idx]
        Us, Vs = [], []
        for ell, (o, i_) in enumerate(self.spec.shapes):
            r = int(ranks[:, ell].max()) if len(idx) else 0
            buckets = self._buckets[ell]
            widths, rows = self._width[idx, ell], self._row[idx, ell]
            if len(buckets) == 1:  # one bucket (padded layout, or one rank): a gather of rows, as one slice
                U, V = next(iter(buckets.values()))
                # converted into the rank-major layout (`lol.batch`) on the way: one copy, as a plain conversion is
                Us.append(empty_factors(len(idx), o, r, dtype, device).copy_(U[rows, :, :r]))
                Vs.append(empty_factors(len(idx), i_, r, dtype, device).copy_(V[rows, :, :r]))
                continue
            U_out = empty_factors(len(idx), o, r, dtype, device, zero=True)
            V_out = empty_factors(len(idx), i_, r, dtype, device, zero=True)
            for w in torch.unique(widths).tolist():
                sel = (widths == w).nonzero().reshape(-1)
                U, V = buckets[w]
                k = min(w, r)
                U_out[sel.to(U_out.device), :, :k] = U[rows[sel], :, :k].to(device=device, dtype=dtype)
                V_out[sel.to(V_out.device), :, :k] = V[rows[sel], :, :k].to(device=device, dtype=dtype)
            Us.append(U_out)
            Vs.append(V_out)
        return LoRABatch(self.spec, Us, Vs, ranks.to(device) if device is not None else ranks)

    def lora(self, i: int, dtype: torch.dtype = torch.float32) -> LoRA:
        """The ``i``-th LoRA with its true ranks, alpha and scale."""
        i = int(self._index([i])[0])
        row = self.table.iloc[i]
        mods = []
        for ell, name in enumerate(self.spec.names):
            r = int(self.ranks[i, ell])
            U, V = self._buckets[ell][int(self._width[i, ell])]
            j = int(self._row[i, ell])
            mods.append(LoRAModule(name, U[j, :, :r].to(dtype), V[j, :, :r].to(dtype),
                                   alpha=float(self.alpha[i, ell]), scale=float(self.scale[i, ell]),
                                   kernel_shape=self.kernel_shapes[ell]))
        return LoRA.from_modules(mods, format=str(row.get("format", "unknown")),
                                 metadata={"id": str(row["id"])}, source=str(row.get("source", "")) or None)

    def loras(self, dtype: torch.dtype = torch.float32) -> Iterator[LoRA]:
        for i in range(len(self)):
            yield self.lora(i, dtype)

    def label_columns(self, task_or_labels=None) -> list[str]:
        """Column names for a task name, a label name, or a list of label names; all labels for None."""
        if task_or_labels is None:
            return list(self.labels)
        if isinstance(task_or_labels, str):
            if task_or_labels in self.tasks:
                return list(self.tasks[task_or_labels])
            if task_or_labels in self.labels:
                return [task_or_labels]
            raise CollectionError(f"{self.path}: no task or label {task_or_labels!r} (tasks: {list(self.tasks)}, "
                                  f"labels: {list(self.labels)})")
        names = list(task_or_labels)
        bad = [n for n in names if n not in self.labels]
        if bad:
            raise CollectionError(f"{self.path}: unknown label(s) {bad} (labels: {list(self.labels)})")
        return names


def _map_factors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the factors file, memory-mapped by the `safetensors` library (private pages: the file is never
    modified; nothing is read until sliced). Its parse errors become `CollectionError`s naming the file."""
    from .errors import LoRAFormatError
    from .formats.safetensors_file import open_safetensors

    try:
        with open_safetensors(path) as f:
            out = {key: f.get_tensor(key) for key in f.keys()}
    except LoRAFormatError as e:
        raise CollectionError(str(e)) from None
    for key, t in out.items():
        if t.dtype not in _ST_DTYPE:
            raise CollectionError(f"{path}: tensor {key!r} has unsupported dtype {str(t.dtype).replace('torch.', '')}")
    return out


def open_collection(path) -> Collection:
    """Open a packed collection lazily (headers, table and ranks only) and validate it against its spec."""
    import pandas as pd

    path = Path(path)
    if not path.is_dir():
        raise CollectionError(f"{path}: no such collection folder")
    for name in (META_NAME, FACTORS_NAME, TABLE_NAME):
        if not (path / name).is_file():
            raise CollectionError(f"{path / name}: missing (a collection needs {META_NAME}, {FACTORS_NAME}, "
                                  f"{TABLE_NAME})")
    try:
        meta = json.loads((path / META_NAME).read_text())
    except json.JSONDecodeError as e:
        raise CollectionError(f"{path / META_NAME}: not valid JSON ({e})") from None
    if meta.get("format") != "lol-collection" or "spec" not in meta:
        raise CollectionError(f"{path / META_NAME}: not a lol collection description")
    version = int(meta.get("version", 0))
    if version > FORMAT_VERSION:
        raise CollectionError(f"{path / META_NAME}: format version {meta['version']} is newer than this lol "
                              f"({FORMAT_VERSION})")
    layout = meta.get("layout") or "padded"  # version 1 has no "layout": padded
    if LAYOUTS.get(layout) != max(version, 1):
        raise CollectionError(f"{path / META_NAME}: layout {layout!r} does not match format version {version} "
                              f"(known: {LAYOUTS})")
    spec = ModuleSpec.from_json(meta["spec"])
    try:
        table = pd.read_parquet(path / TABLE_NAME)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a bad file; all become one line
        raise CollectionError(f"{path / TABLE_NAME}: cannot be read ({type(e).__name__}: {e})") from None
    if "id" not in table.columns:
        raise CollectionError(f"{path / TABLE_NAME}: no 'id' column")
    tensors = _map_factors(path / FACTORS_NAME)
    fpath, n, L = path / FACTORS_NAME, len(table), len(spec)
    for key in ("rank", "alpha", "scale"):
        if key not in tensors:
            raise CollectionError(f"{fpath}: missing tensor {key!r}")
        if tuple(tensors[key].shape) != (n, L):
            raise CollectionError(f"{fpath}: {key!r} has shape {tuple(tensors[key].shape)} but the table "
                                  f"{TABLE_NAME} has {n} rows and the spec {L} modules: expected ({n}, {L})")
    if bool((tensors["rank"] < 1).any()):
        raise CollectionError(f"{fpath}: ranks below 1")
    if layout == "padded":
        _check_padded(fpath, tensors, spec, n)
    else:
        _check_buckets(fpath, tensors, spec)
    return Collection(path, meta, table, tensors)


def _check_padded(fpath: Path, tensors: dict, spec: ModuleSpec, n: int) -> None:
    for name, (o, i) in zip(spec.names, spec.shapes):
        for side, dim in (("U", o), ("V", i)):
            key = f"{side}/{name}"
            t = tensors.get(key)
            if t is None:
                raise CollectionError(f"{fpath}: missing tensor {key!r} for module {name!r} of the spec")
            if t.ndim != 3 or t.shape[0] != n or t.shape[1] != dim:
                raise CollectionError(f"{fpath}: {key!r} has shape {tuple(t.shape)}, expected ({n}, {dim}, rmax) "
                                      f"from the spec and the {n}-row table")
    rmax = torch.tensor([tensors[f"U/{nm}"].shape[2] for nm in spec.names])
    if bool((tensors["rank"].long() > rmax).any()):
        raise CollectionError(f"{fpath}: ranks outside 1..rmax")
    for name in spec.names:
        if tensors[f"V/{name}"].shape[2] != tensors[f"U/{name}"].shape[2]:
            raise CollectionError(f"{fpath}: 'U/{name}' and 'V/{name}' have different widths "
                                  f"({tensors[f'U/{name}'].shape[2]} and {tensors[f'V/{name}'].shape[2]})")


def _check_buckets(fpath: Path, tensors: dict, spec: ModuleSpec) -> None:
    """Every bucket the ranks call for is there with its shape, and nothing else is."""
    ranks = tensors["rank"].long()
    expected = {"rank", "alpha", "scale"}
    for ell, (name, (o, i)) in enumerate(zip(spec.names, spec.shapes)):
        counts = torch.bincount(ranks[:, ell])
        for r in torch.nonzero(counts).reshape(-1).tolist():
            for side, dim in (("U", o), ("V", i)):
                key = _bucket_key(side, name, r)
                expected.add(key)
                t = tensors.get(key)
                want = (int(counts[r]), dim, r)
                if t is None:
                    raise CollectionError(f"{fpath}: missing tensor {key!r} for the {want[0]} LoRA(s) whose module "
                                          f"{name!r} has rank {r}")
                if tuple(t.shape) != want:
                    raise CollectionError(f"{fpath}: {key!r} has shape {tuple(t.shape)}, expected {want} from the "
                                          f"spec and the ranks")
    extra = sorted(set(tensors) - expected)
    if extra:
        raise CollectionError(f"{fpath}: unexpected tensor(s) {extra[:3]} (no LoRA of the ranks tensor belongs there)")
