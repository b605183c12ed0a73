"""Reading many LoRA files of one layout at once: the fast path of `lol import` (`lol.packing.pack`).

Files written by one trainer for one base model share their tensor table (names, dtypes, shapes, byte offsets) and
differ only in their data and string metadata. `StackedReader.header`, the scan of every file, pairs each table once
with the per-file reader (`read_lora`'s shapes-only read) and records which tensors became which module: a *plan*.
Every file with that table is then read straight into one row of a reused byte array, and up to `CHUNK_FILES`
consecutive files become one `StackedLoRAs`:
per module, views of all their factors at once, which `write_collection` converts and stores with one torch operation
per module for all of them, instead of one per module per file.

Every check of the per-file route is kept, file by file:

* the ``safetensors`` library validated the file's header in the scan (`StackedReader.header`, through `read_lora`);
  the read compares the header bytes and the file size with the scan's (a BLAKE2b digest), so the tensors' byte
  ranges are known to tile the data exactly as the library checked;
* NaN/Inf: one vectorized pass over each file's data bytes (`all_finite_bytes`);
* key pairing, dtypes, shapes and ranks are decided once per plan, by the reader on the table's first file, and so
  are alpha and scale of every module without an ``alpha`` tensor (the header's: alpha = r, or diffusers' adapter
  metadata, which is part of the plan's key). A module's ``alpha`` tensor (kohya files, some diffusers files) is a
  scalar of the file's data: it is read per file and per module from the stacked bytes, as the per-file readers take
  it (``alpha = float(value)``, ``scale = alpha / r`` in float64), and folded into U with `_fold_scale`'s rounding
  (see `StackedLoRAs.write_U`). A plan is only made for a table of one float dtype (alpha tensors included), in
  diffusers or kohya layout; a file with several dtypes, or a PEFT folder (scale from its config), is read the
  per-file way.

A file that changed since the scan, fails the NaN/Inf test or fits no plan is read by `read_lora` alone, which names
the problem. The numbers are bit for bit those of ``read_lora(path, dtype)`` (tests/test_formats_fast.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import LoLError
from ..lora import LoRA
from .diffusers import METADATA_KEY
from .safetensors_file import _DTYPES, _EXPONENT, all_finite_bytes

__all__ = ["StackedLoRAs", "StackedReader", "CHUNK_FILES", "CHUNK_BYTES"]

CHUNK_FILES = 64        # files per stack
CHUNK_BYTES = 8 << 20   # data bytes per stack: one reused buffer, small enough to stay warm (larger files: fewer per
                        # stack; one file larger than this has a buffer of its own)
# the metadata keys a single-file reader's pairing or scale depends on (diffusers' adapter configs); the rest is
# description, carried by each file's own shapes-only read
_SCALE_METADATA = (METADATA_KEY,)


def _fold_scale(B, scale, out_dtype):
    from .pairs import _fold_scale as fold

    return fold(B, scale, out_dtype)


@dataclass
class StackedLoRAs:
    """K LoRAs read from K files of one plan: the same modules, shapes and ranks, their factors as stored in the
    files, stacked. Module ``m`` has the down factors ``A[m]`` (K, r, in) and the up factors ``B[m]`` (K, out, r);
    `write_U` / `write_V` turn them into ``U = scale·B`` and ``V = Aᵀ`` exactly as `read_lora` at ``dtype`` does.
    ``template``: the modules (names, shapes, kernel shapes, and alpha and scale of modules without an ``alpha``
    tensor; factors on the meta device). ``alphas`` / ``scales``: per module, its alpha and scale — one float when
    the K files agree (always for a module without an ``alpha`` tensor), else a (K,) float64 tensor, the files' own
    (`alpha_rows` / `scale_rows`). ``A`` and ``B`` are views of the reader's buffer: valid until the reader's next
    item is taken."""

    template: LoRA
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    dtype: torch.dtype
    sources: list[str]
    format: str
    alphas: list | None = None
    scales: list | None = None

    def __post_init__(self):
        if self.alphas is None:
            self.alphas = [m.alpha for m in self.template]
        if self.scales is None:
            self.scales = [m.scale for m in self.template]

    def __len__(self) -> int:
        return len(self.sources)

    def write_U(self, m: int, dest: torch.Tensor) -> None:
        """Module ``m``'s U of all K LoRAs into ``dest`` (K, out, r): one rounding to ``dtype`` (`_fold_scale`'s
        rule), then to ``dest``'s dtype if it differs (as storing a read LoRA does)."""
        B, scale = self.B[m], self.scales[m]
        if isinstance(scale, torch.Tensor):  # the files' own scales: `_fold_scale`'s product for each (the scale
            # rounded to the width it computes in, one product in it, one rounding to ``dtype``), all K at once
            wide = torch.float64 if torch.float64 in (self.dtype, B.dtype) else torch.float32
            U = B.to(wide) * scale.to(wide).view(-1, *[1] * (B.ndim - 1))
            dest.copy_(U if dest.dtype == self.dtype else U.to(self.dtype))
        elif dest.dtype == self.dtype == B.dtype and scale != 1.0:
            torch.mul(B, scale, out=dest)  # `_fold_scale`'s own operation, written in place
        else:
            dest.copy_(_fold_scale(B, scale, self.dtype))

    def write_V(self, m: int, dest: torch.Tensor) -> None:
        """Module ``m``'s V = Aᵀ of all K LoRAs into ``dest`` (K, in, r)."""
        A = self.A[m]
        if dest.dtype == self.dtype:
            dest.copy_(A.transpose(1, 2))  # one conversion, as ``A.to(dtype)`` then a bitwise copy
        else:
            dest.copy_(A.to(self.dtype).transpose(1, 2))

    def alpha_rows(self, order: list[int]) -> torch.Tensor:
        """The alphas of modules ``order`` as the collection's float32 column: (L,) when the K files agree, else
        (K, L)."""
        return self._rows(self.alphas, order)

    def scale_rows(self, order: list[int]) -> torch.Tensor:
        """The scales of modules ``order``, as `alpha_rows`."""
        return self._rows(self.scales, order)

    def _rows(self, values: list, order: list[int]) -> torch.Tensor:
        picked = [values[o] for o in order]
        if not any(isinstance(v, torch.Tensor) for v in picked):
            return torch.tensor(picked, dtype=torch.float32)
        K = len(self)
        return torch.stack([v if isinstance(v, torch.Tensor) else torch.full((K,), v, dtype=torch.float64)
                            for v in picked], dim=1).to(torch.float32)

    def _at(self, values: list, m: int, k: int) -> float:
        v = values[m]
        return float(v[k]) if isinstance(v, torch.Tensor) else v

    def lora(self, k: int) -> LoRA:
        """The ``k``-th LoRA on its own, as `read_lora` gives it (its own copy: the stack's bytes are reused)."""
        mods = []
        for m, t in enumerate(self.template):
            scale = self._at(self.scales, m, k)
            mods.append(replace(t, U=_fold_scale(self.B[m][k], scale, self.dtype).clone(),
                                V=self.A[m][k].to(self.dtype, copy=True).T, alpha=self._at(self.alphas, m, k),
                                scale=scale))
        return replace(self.template, modules={m.name: m for m in mods}, source=self.sources[k])


@dataclass(frozen=True)
class _Plan:
    data_len: int
    finite_dtype: torch.dtype  # every tensor's dtype: the data bytes are all floats of it
    A: tuple[tuple[int, int, torch.dtype, tuple[int, ...]], ...]  # per module: data byte range, dtype, (r, in)
    B: tuple[tuple[int, int, torch.dtype, tuple[int, ...]], ...]  # per module: data byte range, dtype, (out, r)
    # per module: its alpha scalar's data byte range and dtype, or None (alpha and scale are then the template's)
    alpha: tuple[tuple[int, int, torch.dtype] | None, ...]
    template: LoRA
    dtype: torch.dtype


def _digest(b) -> bytes:
    return hashlib.blake2b(b, digest_size=16).digest()


def _read_head(path: Path) -> tuple[int, bytes] | None:
    """``(file size, header bytes with their 8-byte length)``, or None when it is not read so cheaply (the per-file
    route then says why)."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                return None
            head += f.read(n)
            return (size, head) if len(head) == 8 + n else None
    except OSError:
        return None


_META_OPEN = b'{"__metadata__":'


def _canonical(head: bytes, size: int):
    """``(key, metadata)``: what a plan and a shapes-only read depend on — the data length, the tensor table (the
    header's bytes after ``__metadata__``, as a digest) and the metadata the readers use — and the file's metadata.
    None for a header that does not start with its ``__metadata__`` (as the ``safetensors`` library writes it)."""
    if not head.startswith(_META_OPEN, 8):
        return None
    try:
        text = head[8:].decode("utf-8")
        meta, end = json.JSONDecoder().raw_decode(text, len(_META_OPEN))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return None
    rest = text[end:].rstrip(" ").encode()  # the padding to 8 bytes varies with the metadata
    return (size - len(head), _digest(rest), tuple(meta.get(k) for k in _SCALE_METADATA)), meta


def _table(head: bytes) -> dict[str, tuple[str, tuple[int, ...], tuple[int, int]]]:
    """``{key: (dtype, shape, (start, end))}`` of a header the library validated."""
    d = json.loads(head[8:])
    d.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in d.items()}


class StackedReader:
    """`header` for the scan of every file, then `read` for the data (see the module docstring). ``dtype``: the
    dtype the factors are read at (as ``read_lora(path, dtype)``)."""

    def __init__(self, dtype: torch.dtype | None):
        self.dtype = dtype
        self._heads: dict[tuple[bytes, int], tuple[object, dict]] = {}  # (header digest, size) → (key, metadata)
        self._canon: dict[object, tuple[LoRA, bytes, list]] = {}        # key → (shapes-only LoRA, header, pairing)
        self._files: dict[str, tuple[int, bytes, object]] = {}          # path → (size, header digest, key)
        self._plans: dict[object, _Plan | None] = {}                     # key → plan (None: not plannable)
        self._pool: np.ndarray | None = None                             # the bytes files are read into

    # -------------------------------------------------------------------------------------------------- scan
    def header(self, path) -> LoRA:
        """``read_lora(path, shapes_only=True)``. The ``safetensors`` library validates every file's header; files
        with the same tensor table (and the metadata the readers use) share one pairing, which is also their plan."""
        from . import _read_file, read_lora
        from .safetensors_file import open_safetensors

        path = Path(path)
        got = _read_head(path) if path.suffix == ".safetensors" and path.is_file() else None
        if got is None:
            return read_lora(path, shapes_only=True)
        size, head = got
        raw = (_digest(head), size)
        known = self._heads.get(raw)
        if known is None:
            canon = _canonical(head, size)
            key, meta = canon if canon is not None else (("raw", *raw), None)
            if key in self._canon:
                with open_safetensors(path):  # the library validates this header (else a LoRAFormatError)
                    pass
            else:
                keys: list = []
                lora = _read_file(path, None, True, plan=keys)  # validates, pairs, reads the shapes
                self._canon[key] = (lora, head, keys)
            if len(self._heads) >= 1 << 16:
                self._heads.clear()
            known = self._heads[raw] = (key, meta)
        key, meta = known
        lora = self._canon[key][0]
        self._files[str(path)] = (size, raw[0], key)
        return replace(lora, modules=dict(lora.modules), metadata=dict(lora.metadata if meta is None else meta),
                       source=str(path))

    def key(self, path):
        """The tensor table (and scale metadata) key of a file `header` read, or None: files with one key have the
        same modules, shapes and ranks."""
        return self._files.get(str(path), (None, None, None))[2] if isinstance(path, (str, Path)) else None

    # -------------------------------------------------------------------------------------------------- read
    def read(self, paths) -> Iterator[tuple[int, object]]:
        """``(j, item)`` for the files in order: item is a `StackedLoRAs` of files ``j, j+1, ...``, a `LoRA` (file
        ``j`` read alone) or the `LoLError` / `OSError` reading file ``j`` raised."""
        rows: list[tuple[int, Path]] = []
        plan: _Plan | None = None
        buf: np.ndarray | None = None
        for j, path in enumerate(paths):
            path = Path(path)
            rec = self._files.get(str(path))
            p = self._plan(rec[2]) if rec is not None else None
            if p is not None and (p is not plan or len(rows) >= len(buf)):
                yield from self._flush(rows, plan, buf)
                rows, plan = [], p
                buf = self._buffer(p.data_len)
            if p is not None and self._read_into(path, rec, buf[len(rows)]):
                rows.append((j, path))
                continue
            yield from self._flush(rows, plan, buf)
            rows = []
            yield j, self._read_one(path)
        yield from self._flush(rows, plan, buf)

    def _buffer(self, data_len: int) -> np.ndarray:
        """(K, data_len) bytes for the next K files: one pool reused (its pages are touched once, not per stack)."""
        k = max(1, min(CHUNK_FILES, CHUNK_BYTES // max(1, data_len)))
        if k * data_len > CHUNK_BYTES:  # one file larger than the pool: its own buffer
            return np.empty((1, data_len), np.uint8)
        if self._pool is None:
            self._pool = np.empty(CHUNK_BYTES, np.uint8)
        return self._pool[:k * data_len].reshape(k, data_len)

    @staticmethod
    def _read_into(path: Path, rec, row: np.ndarray) -> bool:
        """File ``path``'s data bytes into ``row``, if its header and size are still the scan's."""
        size, digest, _ = rec
        try:
            with open(path, "rb", buffering=0) as f:
                if os.fstat(f.fileno()).st_size != size:
                    return False
                head = f.read(size - len(row))
                if len(head) != size - len(row) or _digest(head) != digest:
                    return False
                return f.readinto(row) == len(row) and f.read(1) == b""
        except OSError:
            return False

    def _read_one(self, path: Path):
        """``read_lora(path, dtype)``, or the error it raised."""
        from . import read_lora

        try:
            return read_lora(path, dtype=self.dtype)
        except (LoLError, OSError) as e:
            return e

    def _plan(self, key) -> _Plan | None:
        if key not in self._plans:
            self._plans[key] = self._make_plan(key)
        return self._plans[key]

    def _make_plan(self, key) -> _Plan | None:
        """The plan of a tensor table, from the scan's shapes-only read of it (the pairing; for modules without an
        ``alpha`` tensor, alpha and scale are the header's; an ``alpha`` tensor's bytes are read per file), or None
        when files of it are read one by one."""
        if key[0] == "raw" or key not in self._canon:
            return None
        data_len = key[0]
        lora, head, keys = self._canon[key]
        entries = _table(head)
        dtypes = {_DTYPES.get(dt) for dt, _, _ in entries.values()}
        if lora.format not in ("diffusers", "kohya") or len(dtypes) != 1 or len(keys) != len(lora):
            return None
        (finite_dtype,) = dtypes
        if finite_dtype not in _EXPONENT:
            return None
        A, B, alpha, template = [], [], [], []
        for m, (ka, kb, kalpha) in zip(lora, keys):
            (da, sa, (a0, a1)), (db, sb, (b0, b1)) = entries[ka], entries[kb]
            r, o, i_ = m.rank, m.out_features, m.in_features
            if len(sa) < 2 or sa[0] != r or int(np.prod(sa[1:])) != i_ or len(sb) < 2 or tuple(sb[:2]) != (o, r) \
                    or int(np.prod(sb[2:])) != 1:
                return None  # not the shapes the reader paired (cannot happen for an unchanged file): no plan
            A.append((a0, a1, _DTYPES[da], (r, i_)))
            B.append((b0, b1, _DTYPES[db], (o, r)))
            if kalpha is None:
                alpha.append(None)
            else:
                dt, shape, (c0, c1) = entries[kalpha]
                if int(np.prod(shape)) != 1:
                    return None  # not a scalar: the per-file reader names the key
                alpha.append((c0, c1, _DTYPES[dt]))
            template.append(replace(m, U=torch.empty(o, r, device="meta"), V=torch.empty(i_, r, device="meta")))
        tmpl = replace(lora, modules={t.name: t for t in template}, metadata={}, source=None)
        return _Plan(data_len, finite_dtype, tuple(A), tuple(B), tuple(alpha), tmpl, self.dtype or (
            torch.float64 if finite_dtype == torch.float64 else torch.float32))

    def _flush(self, rows, plan: _Plan | None, buf) -> Iterator[tuple[int, object]]:
        """The files read into ``buf``: runs of finite ones as stacks, any other one read alone (naming the key)."""
        if not rows:
            return
        finite = [all_finite_bytes(buf[k], plan.finite_dtype) for k in range(len(rows))]
        start = 0
        for k in range(len(rows) + 1):
            if k < len(rows) and finite[k]:
                continue
            if k > start:
                yield rows[start][0], self._stack(plan, buf[start:k], [str(p) for _, p in rows[start:k]])
            if k < len(rows):
                yield rows[k][0], self._read_one(rows[k][1])
            start = k + 1

    @staticmethod
    def _stack(plan: _Plan, data: np.ndarray, sources: list[str]) -> StackedLoRAs:
        t = torch.from_numpy(data)
        K = len(sources)
        A = [t[:, a0:a1].view(dt).reshape(K, *shape) for a0, a1, dt, shape in plan.A]
        B = [t[:, b0:b1].view(dt).reshape(K, *shape) for b0, b1, dt, shape in plan.B]
        alphas, scales = [], []
        for m, got in zip(plan.template, plan.alpha):
            if got is None:  # the header's (alpha = r, or diffusers' adapter metadata)
                alphas.append(m.alpha)
                scales.append(m.scale)
                continue
            # as `Pair.set` and the formats' ``scale_of``: alpha = float(value) (exact), scale = alpha / r in float64
            c0, c1, dt = got
            a = t[:, c0:c1].view(dt).reshape(K).double()
            s = a / m.rank
            bits = a.view(torch.int64)
            if bool((bits == bits[0]).all()):  # the K files agree (bit for bit: -0.0 is not 0.0): one Python float,
                # the per-file route's own numbers
                alphas.append(float(a[0]))
                scales.append(float(a[0]) / m.rank)
            else:
                alphas.append(a)
                scales.append(s)
        return StackedLoRAs(plan.template, A, B, plan.dtype, sources, plan.template.format, alphas, scales)
