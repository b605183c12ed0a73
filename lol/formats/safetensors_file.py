"""Careful safetensors reading: every failure is a `LoRAFormatError` that names the file and the problem.

The file layout is ``[8-byte little-endian header length N][N bytes of JSON header][tensor data]``. The header length
is checked against the file size before anything is parsed, and every tensor's byte range against the data size, so
a truncated or corrupt file gives a plain error instead of a crash. Tensors are views into the bytes read
(``torch.frombuffer``), so reading costs about one pass over the file; a file whose tensors share one float dtype
is checked for NaN/Inf and (optionally) widened in one vectorized pass over all its data (`load_safetensors`).
"""
from __future__ import annotations

import json
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import LoRAFormatError

__all__ = ["read_safetensors", "read_safetensors_header", "load_safetensors", "Loaded", "all_finite_bytes",
           "FLOAT_DTYPES"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in _DTYPES.items()}


def _parse_header(path: Path, head, size: int) -> tuple[dict, int]:
    if size < 8 or len(head) < 8:
        raise LoRAFormatError(path, f"not a safetensors file: {size} bytes, too short for a header")
    (n,) = struct.unpack("<Q", head[:8])
    if n > size - 8:
        raise LoRAFormatError(path, f"not a valid safetensors file: header length {n} exceeds the file size "
                                    f"({size} bytes); the file is truncated or not safetensors")
    try:
        header = json.loads(bytes(head[8:8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoRAFormatError(path, f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise LoRAFormatError(path, "corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def read_safetensors_header(path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor table ``{key: {"dtype", "shape", "data_offsets"}}`` and ``__metadata__``, without reading tensors."""
    path = Path(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if n <= size - 8:
                head += f.read(n)
    header, _ = _parse_header(path, head, size)
    meta = header.pop("__metadata__", None) or {}
    return header, {str(k): str(v) for k, v in meta.items()}


class Loaded(NamedTuple):
    """One safetensors file read: its tensors, ``__metadata__``, and whether every tensor is finite (checked in one
    vectorized pass over the data; None when not checked: shapes-only read, or tensors of several dtypes)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    all_finite: bool | None


def _entries(path: Path, header: dict, body_len: int | None):
    """Validated ``(key, dtype, shape, start, end)`` per tensor; with ``body_len`` the byte ranges are checked."""
    out = []
    for key, info in header.items():
        try:
            name = info["dtype"]
            dtype = _DTYPES[name]
            shape = list(map(int, info["shape"]))
            b0, b1 = map(int, info["data_offsets"]) if body_len is not None else (0, 0)
            if shape and min(shape) < 0:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise LoRAFormatError(path, f"corrupt safetensors header entry for {key!r}: {info!r}") from None
        if body_len is not None:
            numel = 1
            for d in shape:
                numel *= d
            if b1 - b0 != numel * _ITEMSIZE[name] or b0 < 0 or b1 > body_len:
                raise LoRAFormatError(path, f"tensor {key!r} ({name} {shape}) lies outside the file's data "
                                            f"(bytes {b0}-{b1} of {body_len}); the file is truncated or corrupt")
        out.append((key, dtype, shape, b0, b1))
    return out


# IEEE exponent field per float width: a value is NaN or ±Inf exactly when all its exponent bits are set
_EXPONENT = {torch.float16: (np.uint16, 0x7C00), torch.bfloat16: (np.uint16, 0x7F80),
             torch.float32: (np.uint32, 0x7F800000), torch.float64: (np.uint64, 0x7FF0000000000000)}


def all_finite_bytes(buf, dtype: torch.dtype) -> bool:
    """Whether every ``dtype`` value in the raw bytes ``buf`` is finite: one vectorized integer pass
    (``max(bits & exponent_mask) < exponent_mask``), exact for every float width, no float conversion."""
    uint, mask = _EXPONENT[dtype]
    bits = np.frombuffer(buf, dtype=uint)
    return not bits.size or int(np.bitwise_and(bits, uint(mask)).max()) != mask


def load_safetensors(path, shapes_only: bool = False, widen_to: torch.dtype | None = None) -> Loaded:
    """Read one safetensors file with one read and validated offsets.

    When every tensor has the same floating dtype (the usual LoRA file), finiteness is checked in one vectorized
    pass over the whole data and, if ``widen_to`` is a wider float dtype (float16/bfloat16 → float32/float64,
    float32 → float64), the data is converted in one pass; each tensor is then a view. Widening is exact. Otherwise
    tensors are views of the file's bytes in their own dtype and ``all_finite`` is None.
    With ``shapes_only`` only the header is read and the tensors are empty ``meta``-device tensors."""
    path = Path(path)
    if shapes_only:
        header, meta = read_safetensors_header(path)
        return Loaded({key: _meta(tuple(shape), dt) for key, dt, shape, _, _ in _entries(path, header, None)},
                      meta, None)
    size = os.path.getsize(path)
    data = bytearray(size)  # writable, so tensors can be zero-copy views
    with open(path, "rb") as f:
        got = f.readinto(data)
    if got != size:
        raise LoRAFormatError(path, f"could only read {got} of {size} bytes")
    header, start = _parse_header(path, data, size)
    meta = header.pop("__metadata__", None) or {}
    meta = {str(k): str(v) for k, v in meta.items()}
    body = memoryview(data)[start:]
    entries = _entries(path, header, len(body))
    dtypes = {e[1] for e in entries}
    out: dict[str, torch.Tensor] = {}
    if len(dtypes) == 1 and (dt := next(iter(dtypes))) in FLOAT_DTYPES:
        item = dt.itemsize
        end = max(e[4] for e in entries)
        if end and all(e[3] % item == 0 for e in entries):  # one typed view of all data (offsets on item bounds)
            finite = all_finite_bytes(body[:end], dt)
            flat = torch.frombuffer(body[:end], dtype=dt)
            if widen_to is not None and _wider(widen_to, dt):
                flat = flat.to(widen_to)
            for key, _, shape, b0, _ in entries:  # one call per tensor: a contiguous view at its element offset
                out[key] = flat.as_strided(shape, _strides(shape), b0 // item)
            return Loaded(out, meta, finite)
    for key, dt, shape, b0, b1 in entries:
        out[key] = torch.frombuffer(body[b0:b1], dtype=dt).view(shape) if b1 > b0 else torch.empty(shape, dtype=dt)
    return Loaded(out, meta, None)


def _strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return strides[::-1]


@lru_cache(maxsize=4096)
def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty ``meta`` tensor (no data; shared between keys of the same shape, which is safe: it holds nothing)."""
    return torch.empty(shape, dtype=dtype, device="meta")


def _wider(to: torch.dtype, frm: torch.dtype) -> bool:
    order = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
    return to in order and order[to] > order[frm]


def read_safetensors(path, keys=None, shapes_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (or only ``keys``) and the ``__metadata__`` of one safetensors file, with validated offsets.

    With ``shapes_only`` only the header is read and the tensors are empty ``meta``-device tensors of the right
    dtype and shape (for checking names and shapes without reading data)."""
    tensors, meta, _ = load_safetensors(path, shapes_only)
    if keys is not None:
        tensors = {k: v for k, v in tensors.items() if k in keys}
    return tensors, meta
