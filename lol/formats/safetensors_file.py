"""Careful safetensors reading: every failure is a `LoRAFormatError` that names the file and the problem.

The file layout is ``[8-byte little-endian header length N][N bytes of JSON header][tensor data]``. The header length
is checked against the file size before anything is parsed, and every tensor's byte range against the data size, so
a truncated or corrupt file gives a plain error instead of a crash. Tensors are views into the bytes read
(``torch.frombuffer``), so reading costs about one pass over the file.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..errors import LoRAFormatError

__all__ = ["read_safetensors", "read_safetensors_header", "FLOAT_DTYPES"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


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


def read_safetensors(path, keys=None, shapes_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (or only ``keys``) and the ``__metadata__`` of one safetensors file, with validated offsets.

    With ``shapes_only`` only the header is read and the tensors are empty ``meta``-device tensors of the right
    dtype and shape (for checking names and shapes without reading data)."""
    path = Path(path)
    if shapes_only:
        header, meta = read_safetensors_header(path)
        out = {}
        for key, info in header.items():
            if keys is not None and key not in keys:
                continue
            try:
                out[key] = torch.empty([int(s) for s in info["shape"]], dtype=_DTYPES[info["dtype"]], device="meta")
            except (KeyError, TypeError, ValueError):
                raise LoRAFormatError(path, f"corrupt safetensors header entry for {key!r}: {info!r}") from None
        return out, meta
    size = os.path.getsize(path)
    data = bytearray(size)  # writable, so tensors can be zero-copy views
    with open(path, "rb") as f:
        got = f.readinto(data)
    if got != size:
        raise LoRAFormatError(path, f"could only read {got} of {size} bytes")
    header, start = _parse_header(path, data, size)
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(data)[start:]
    out: dict[str, torch.Tensor] = {}
    for key, info in header.items():
        if keys is not None and key not in keys:
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            b0, b1 = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LoRAFormatError(path, f"corrupt safetensors header entry for {key!r}: {info!r}") from None
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if b1 - b0 != nbytes or b0 < 0 or b1 > len(body):
            raise LoRAFormatError(path, f"tensor {key!r} ({info['dtype']} {shape}) lies outside the file's data "
                                        f"(bytes {b0}-{b1} of {len(body)}); the file is truncated or corrupt")
        if numel == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        else:
            out[key] = torch.frombuffer(body[b0:b1], dtype=dtype).reshape(shape)
    return out, {str(k): str(v) for k, v in meta.items()}
