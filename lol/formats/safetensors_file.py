"""Reading safetensors files through the `safetensors` library itself, with every failure a `LoRAFormatError` that
names the file and the problem.

The library parses and validates the header (JSON, dtypes, shapes, byte ranges that exactly tile the data) and
memory-maps the data (``safe_open``); nothing here parses the format by hand. Before handing a file to it, two cheap
checks keep the clearest messages for the commonest broken files: a file too short for the 8-byte header length,
and a header length larger than the file (a truncated file or not safetensors at all). Its own errors become one
line naming the file (`_library_error`). What the library does not check and a LoRA reader must — finiteness
(NaN/Inf, one vectorized integer pass per tensor, `all_finite_bytes`) and exact widening of 16-bit factors — is done
here; dtypes and factor shapes are checked where tensors are paired (`lol.formats.pairs`).
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

__all__ = ["open_safetensors", "read_safetensors", "read_safetensors_header", "load_safetensors", "Loaded", "all_finite_bytes",
           "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# safetensors dtype names → torch dtypes, for header-only reads (full reads get their dtype from the library)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


def _precheck(path: Path) -> None:
    """The two clearest messages, from the first 8 bytes and the file size, before the library sees the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise LoRAFormatError(path, f"cannot be read ({e.strerror or type(e).__name__})") from None
    if size < 8 or len(head) < 8:
        raise LoRAFormatError(path, f"not a safetensors file: {size} bytes, too short for a header")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise LoRAFormatError(path, f"not a valid safetensors file: header length {n} exceeds the file size "
                                    f"({size} bytes); the file is truncated or not safetensors")


# the library's messages (after "Error while deserializing header: ") → ours; the library's text is kept after it
_LIBRARY_ERRORS = (
    ("incomplete metadata", "the file is truncated or corrupt: the tensors' byte ranges do not match its data"),
    ("invalid offset", "the file is truncated or corrupt: a tensor's byte range does not follow the previous one"),
    ("invalid shape, data type, or offset", "the file is truncated or corrupt: a tensor's byte range does not "
                                            "match its shape and dtype"),
    ("invalid json", "corrupt safetensors header"),
    ("invalid utf-8", "corrupt safetensors header"),
    ("header too large", "not a valid safetensors file: header too large"),
    ("header too small", "not a safetensors file: header too small"),
)


def _library_error(path: Path, e: Exception) -> LoRAFormatError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    detail = msg.split(": ", 1)[1] if msg.startswith("Error while deserializing header: ") else msg
    for needle, ours in _LIBRARY_ERRORS:
        if needle in detail.lower():
            return LoRAFormatError(path, f"{ours} (safetensors: {detail})")
    return LoRAFormatError(path, f"cannot be read as safetensors ({detail})")


def open_safetensors(path):
    """``safe_open(path, framework="pt")`` with our checks first and every error a `LoRAFormatError` naming the file."""
    path = Path(path)
    from safetensors import safe_open

    _precheck(path)
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 -- SafetensorError, OSError and the library's other errors: one line each
        raise _library_error(path, e) from None


def _str_meta(meta) -> dict[str, str]:
    return {str(k): str(v) for k, v in (meta or {}).items()}


def read_safetensors_header(path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor table ``{key: {"dtype", "shape"}}`` and ``__metadata__``, without reading tensor data."""
    path = Path(path)
    with open_safetensors(path) as f:
        table = {}
        for key in f.keys():
            sl = f.get_slice(key)
            table[key] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape())}
        return table, _str_meta(f.metadata())


class Loaded(NamedTuple):
    """One safetensors file read: its tensors, ``__metadata__``, and whether every floating tensor is finite (None
    for a shapes-only read)."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    all_finite: bool | None


# IEEE exponent field per float width: a value is NaN or ±Inf exactly when all its exponent bits are set
_EXPONENT = {torch.float16: (np.uint16, 0x7C00), torch.bfloat16: (np.uint16, 0x7F80),
             torch.float32: (np.uint32, 0x7F800000), torch.float64: (np.uint64, 0x7FF0000000000000)}


_FINITE_BLOCK = 1 << 18  # bytes per block of `all_finite_bytes`: its scratch stays in the CPU cache


def all_finite_bytes(buf, dtype: torch.dtype) -> bool:
    """Whether every ``dtype`` value in the raw bytes ``buf`` is finite: one vectorized integer pass
    (``max(bits & exponent_mask) < exponent_mask``), exact for every float width, no float conversion. Done a
    cache-sized block at a time into one scratch array (about 3x faster than one pass over a large buffer, whose
    temporary falls out of the cache), stopping at the first block with a NaN/Inf."""
    uint, mask = _EXPONENT[dtype]
    bits = np.frombuffer(buf, dtype=uint)
    step = _FINITE_BLOCK // bits.itemsize
    scratch = np.empty(min(step, bits.size), dtype=uint)
    m = uint(mask)
    for start in range(0, bits.size, step):
        block = bits[start:start + step]
        t = scratch[:block.size]
        np.bitwise_and(block, m, out=t)
        if int(t.max()) == mask:
            return False
    return True


def _all_finite(tensors) -> bool:
    """Every floating tensor finite: one vectorized pass per dtype over all tensors' bytes together."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        if t.dtype in _EXPONENT and t.numel():
            by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    for dtype, ts in by_dtype.items():
        flat = ts[0] if len(ts) == 1 else torch.cat(ts)
        if not all_finite_bytes(flat.view(torch.uint8).numpy(), dtype):
            return False
    return True


def load_safetensors(path, shapes_only: bool = False, widen_to: torch.dtype | None = None) -> Loaded:
    """Read one safetensors file with the `safetensors` library (validated by it).

    Every floating tensor is checked for NaN/Inf (``all_finite``); floating tensors narrower than ``widen_to``
    (float16/bfloat16 → float32/float64, float32 → float64) are widened, which is exact. With ``shapes_only`` no data
    is read and the tensors are empty ``meta``-device tensors of the right dtype and shape.

    A file up to `WHOLE_READ_MAX` bytes (every LoRA file in practice) is read in one ``read`` and parsed by
    ``safetensors.deserialize``: about twice as fast as a tensor-by-tensor ``safe_open`` (one system call, no
    per-tensor mapping), which is what lets `lol import` keep pace with ``safetensors.torch.load_file``. Larger files
    are memory-mapped with ``safe_open``, tensor by tensor, so memory stays at one copy."""
    path = Path(path)
    if not shapes_only and _file_size(path) <= WHOLE_READ_MAX:
        return _load_whole(path, widen_to)
    with open_safetensors(path) as f:
        meta = _str_meta(f.metadata())
        keys = list(f.keys())
        try:
            if shapes_only:
                out = {}
                for key in keys:
                    sl = f.get_slice(key)
                    name = sl.get_dtype()
                    if name not in _DTYPES:
                        raise LoRAFormatError(path, f"tensor {key!r} has dtype {name}, which lol does not read; "
                                                    f"LoRA factors are float16/bfloat16/float32/float64")
                    out[key] = _meta(tuple(int(d) for d in sl.get_shape()), _DTYPES[name])
                return Loaded(out, meta, None)
            tensors = {key: f.get_tensor(key) for key in keys}
        except LoRAFormatError:
            raise
        except Exception as e:  # noqa: BLE001 -- the library's errors while mapping a tensor (e.g. unsupported dtype)
            raise _library_error(path, e) from None
    return _finish(tensors, meta, _all_finite(tensors.values()), widen_to)


WHOLE_READ_MAX = 1 << 30  # bytes: files up to this size are read whole (`load_safetensors`)


def _file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError as e:
        raise LoRAFormatError(path, f"cannot be read ({e.strerror or type(e).__name__})") from None


def _load_whole(path: Path, widen_to: torch.dtype | None) -> Loaded:
    """`load_safetensors` for a file read in one piece: the library parses and validates it (``deserialize``:
    header, dtypes, shapes, byte ranges that exactly tile the data); ``__metadata__`` is then taken from the header
    it validated. Because the tensors tile the data exactly, a file whose tensors share one float dtype is tested for
    NaN/Inf in one pass over its data bytes."""
    from safetensors import deserialize

    _precheck(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LoRAFormatError(path, f"cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        flat = deserialize(data)
    except Exception as e:  # noqa: BLE001 -- SafetensorError and the library's other errors: one line each
        raise _library_error(path, e) from None
    (n,) = struct.unpack("<Q", data[:8])
    meta = _str_meta(json.loads(data[8:8 + n]).get("__metadata__"))
    tensors = {}
    for key, v in sorted(flat, key=lambda kv: kv[0]):  # key order as ``safe_open(...).keys()`` gives it
        dtype = _DTYPES.get(v["dtype"].upper()) if isinstance(v["dtype"], str) else None
        if dtype is None:
            raise LoRAFormatError(path, f"tensor {key!r} has dtype {v['dtype']}, which lol does not read; LoRA "
                                        f"factors are float16/bfloat16/float32/float64")
        buf = v["data"]
        tensors[key] = (torch.frombuffer(buf, dtype=dtype).reshape(v["shape"]) if len(buf)
                        else torch.empty(v["shape"], dtype=dtype))
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1 and next(iter(dtypes)) in _EXPONENT:  # one float dtype: the data region is all factors
        finite = all_finite_bytes(memoryview(data)[8 + n:], next(iter(dtypes)))
    else:
        finite = _all_finite(tensors.values())
    return _finish(tensors, meta, finite, widen_to)


def _finish(tensors: dict, meta: dict, finite: bool, widen_to: torch.dtype | None) -> Loaded:
    if widen_to is not None:
        tensors = {k: (t.to(widen_to) if _wider(widen_to, t.dtype) else t) for k, t in tensors.items()}
    return Loaded(tensors, meta, finite)


@lru_cache(maxsize=4096)
def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty ``meta`` tensor (no data; shared between keys of the same shape, which is safe: it holds nothing)."""
    return torch.empty(shape, dtype=dtype, device="meta")


_ORDER = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _wider(to: torch.dtype, frm: torch.dtype) -> bool:
    return to in _ORDER and frm in _ORDER and _ORDER[to] > _ORDER[frm]


def read_safetensors(path, keys=None, shapes_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (or only ``keys``) and the ``__metadata__`` of one safetensors file (see `load_safetensors`)."""
    tensors, meta, _ = load_safetensors(path, shapes_only)
    if keys is not None:
        tensors = {k: v for k, v in tensors.items() if k in keys}
    return tensors, meta
