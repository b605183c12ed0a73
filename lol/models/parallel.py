"""Row-parallel inference on a CPU: split a batch of LoRAs into one slice per intra-op thread and run each slice's
forward pass on its own thread with single-threaded kernels.

Why: LoL models make hundreds of mid-sized kernels per batch (one GEMM per module and side, one small head GEMM per
module, transposed copies of the factors). Splitting each of them across threads (torch's intra-op parallelism) pays
a fork/join per kernel, halves every GEMM's M, and leaves the memory-bound copies and Python dispatch in lock-step
with the compute. Running whole slices side by side instead keeps each thread's kernels as large as in the
one-thread run, overlaps one thread's copies with the other's GEMMs, and releases the GIL inside every kernel; the
outputs are the same rows (each LoRA's output depends on that LoRA only), concatenated in order.

`row_parallel` applies only without autograd, on CPU tensors, with ≥ 2 intra-op threads and enough rows per thread;
it sets torch's intra-op threads to 1 for the duration (process-wide, restored on exit) so the worker threads do not
oversubscribe the cores.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable

import torch

from ..batch import LoRABatch

__all__ = ["row_parallel", "MIN_ROWS"]

MIN_ROWS = 16            # rows per thread below which the split is not worth it
_local = threading.local()
_pool: ThreadPoolExecutor | None = None
_pool_key = (0, 0)                   # (process id, workers): a forked child never reuses its parent's dead threads
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    with _pool_lock:
        if _pool is None or _pool_key[0] != os.getpid() or _pool_key[1] < workers:
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lol-rows")
            _pool_key = (os.getpid(), workers)
        return _pool


def _rows(x, start: int, stop: int):
    if isinstance(x, LoRABatch):
        return replace(x, U=[u[start:stop] for u in x.U], V=[v[start:stop] for v in x.V], ranks=x.ranks[start:stop])
    return x[start:stop]


def _run(fn, x):
    """``fn(x)`` on this thread without autograd. Grad mode is per thread: a pool thread starts with it on, so without
    this its slice would take the models' differentiable paths (slower, and recording a graph nobody uses) while the
    caller's thread — which `row_parallel` only splits for when grad is off — takes the inference paths."""
    _local.inside = True
    try:
        with torch.no_grad():
            return fn(x)
    finally:
        _local.inside = False


def row_parallel(fn: Callable, x, min_rows: int | None = None):
    """``fn(x)`` for a row-wise ``fn`` (row i of the output depends on row i of ``x`` only), computed slice by slice on
    torch's intra-op thread count of threads when that pays (module docstring); else ``fn(x)`` as is. ``x``: a
    `LoRABatch` or a tensor with rows first."""
    threads = torch.get_num_threads()
    min_rows = MIN_ROWS if min_rows is None else min_rows
    n = len(x)
    device = x.device if isinstance(x, (LoRABatch, torch.Tensor)) else None
    if (threads < 2 or n < 2 * min_rows or torch.is_grad_enabled() or getattr(_local, "inside", False)
            or device is None or device.type != "cpu"):
        return fn(x)
    parts = min(threads, n // min_rows)
    bounds = [n * i // parts for i in range(parts + 1)]
    torch.set_num_threads(1)
    try:
        futures = [_executor(parts - 1).submit(_run, fn, _rows(x, bounds[i], bounds[i + 1])) for i in range(1, parts)]
        first = _run(fn, _rows(x, bounds[0], bounds[1]))
        outs = [first, *(f.result() for f in futures)]
    finally:
        torch.set_num_threads(threads)
    return torch.cat(outs)
