"""``chunk_size="auto"`` and ``memory_budget=``: vmap picks its own chunk size.

A good chunk is not knowable a priori (BEYOND.md 4.2: on a jacrev R^512 -> R^4096, chunk 512 is
both faster and smaller than no chunking; chunk 1 is ten times slower), so it is measured:

1. Two probe chunks (1 and 2 examples) run under an accounting dispatch mode that
   sees every physical op the batching rules emit and tracks the bytes of live outputs (on
   CUDA, ``max_memory_allocated``).  Their peaks fit ``peak = a + b * chunk``; their outputs
   are kept (they are part of the result, no work is wasted).
2. The chunk is the largest power of two whose workspace ``a + b * chunk`` fits the budget
   after the result itself (twice: the chunk outputs and their concatenation).  The budget is
   ``memory_budget`` (bytes, or a fraction of the free memory of the device), and for plain
   ``"auto"`` a cache-friendly default (32 MiB of workspace on CPU, half the free memory on
   CUDA).
3. The choice is cached per input signature on the transform object, so later calls skip the
   probes; a chunk that still runs out of memory is halved and retried.
"""
from __future__ import annotations

import math
import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _pytree

__all__ = ["AutoChunk", "check_chunk_args"]

_CPU_DEFAULT_WORKSPACE = 32 << 20


def check_chunk_args(api: str, chunk_size, memory_budget):
    """Validate ``chunk_size`` (positive int, None or "auto") and ``memory_budget``; return an
    :class:`AutoChunk` when the chunk size is to be chosen, else ``chunk_size``."""
    if memory_budget is not None:
        ok = (isinstance(memory_budget, int) and not isinstance(memory_budget, bool)
              and memory_budget > 0) or (isinstance(memory_budget, float)
                                         and 0 < memory_budget <= 1)
        if not ok:
            raise ValueError(
                f"{api}: memory_budget must be a positive int (bytes) or a float in (0, 1] (a "
                f"fraction of the free device memory), got {memory_budget!r}"
            )
        if chunk_size not in (None, "auto"):
            raise ValueError(f"{api}: give either chunk_size={chunk_size!r} or memory_budget, "
                             "not both (memory_budget chooses the chunk size)")
        return AutoChunk(memory_budget)
    if chunk_size == "auto":
        return AutoChunk(None)
    return chunk_size


class _PeakMemory(TorchDispatchMode):
    """Tracks the bytes of live tensors created by the ops below it (per storage)."""

    def __init__(self):
        super().__init__()
        self.live = {}
        self.current = self.peak = self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in _pytree.tree_leaves(out):
            if type(t) is torch.Tensor:
                if inputs is None:
                    inputs = {_storage_ptr(a) for a in _pytree.tree_leaves((args, kwargs))
                              if isinstance(a, torch.Tensor)}
                if _storage_ptr(t) not in inputs:  # a view of an input allocates nothing
                    self._track(t)
        return out

    def _track(self, t):
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            return
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [nbytes, 1]
            self.total += nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.current -= entry[0]


def _storage_ptr(t):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, oom) or "out of memory" in str(e) or "can't allocate memory" in str(e)


def _available_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) \
        if hasattr(os, "sysconf") else 8 << 30


def _out_bytes(out) -> int:
    return sum(t.numel() * t.element_size() for t in _pytree.tree_leaves(out)
               if isinstance(t, torch.Tensor))


class AutoChunk:
    """Per-transform state of ``chunk_size="auto"`` / ``memory_budget``: the budget and the
    chunk chosen for each input signature."""

    def __init__(self, memory_budget=None):
        self.memory_budget = memory_budget
        self.cache = {}
        self.last = None  # (chunk, workspace model) of the latest call, for tests and benchmarks

    def __repr__(self):
        return f"AutoChunk(memory_budget={self.memory_budget!r})"

    def _budget(self, device) -> int:
        b = self.memory_budget
        if isinstance(b, float):
            return int(b * _available_bytes(device))
        if b is not None:
            return b
        if device.type == "cuda":
            return _available_bytes(device) // 2
        return _CPU_DEFAULT_WORKSPACE

    def run(self, run_chunk, key, batch_size: int, device):
        """``run_chunk(start, n)`` -> outputs of examples ``[start, start + n)``; returns the
        list of chunk outputs in order."""
        outs, start = [], 0
        chunk = self.cache.get(key)
        if chunk is None:
            c = 1  # probes must fit any budget the full choice would: the smallest ones
            peaks = []
            for n in (c, 2 * c):
                n = min(n, batch_size - start)
                if n <= 0:
                    break
                peak, total, out = self._measure(run_chunk, start, n, device)
                peaks.append((n, peak, total, _out_bytes(out)))
                outs.append(out)
                start += n
            if start >= batch_size:
                self.last = (batch_size, None)
                return outs
            (n1, p1, t1, o1), (n2, p2, t2, o2) = peaks
            # Bytes per example: the slope of the peak or of everything the chunk allocated,
            # and at least the second probe's allocations per example (the first probe pays
            # one-time costs, a weight's transposed copy, which can make both slopes read 0 or
            # less) and each example's share of the result.  Views of inputs are not counted.
            b = max((p2 - p1) / (n2 - n1), (t2 - t1) / (n2 - n1), t2 / n2,
                    (o1 + o2) / (n1 + n2), 1.0)
            a = max(p1 - b * n1, 0.0)
            result = 2 * (o1 + o2) / (n1 + n2) * batch_size
            # An explicit budget is a hard limit: fixed costs and the result come out of it.
            # Plain "auto" sizes the workspace that grows with the chunk (cache-friendly): a
            # fixed cost (a basis, a captured weight's transpose) is paid at any chunk size.
            room = self._budget(device) - (a + result if self.memory_budget is not None else 0)
            chunk = max(1, int(room // b))
            chunk = 1 << int(math.log2(chunk)) if chunk < batch_size else batch_size
            self.cache[key] = chunk
            self.last = (chunk, (a, b))
        else:
            self.last = (chunk, None)
        while start < batch_size:
            n = min(chunk, batch_size - start)
            try:
                outs.append(run_chunk(start, n))
            except Exception as e:  # noqa: BLE001 - only out-of-memory is retried
                if not _is_oom(e) or n == 1:
                    raise
                chunk = max(1, n // 2)
                self.cache[key] = chunk
                continue
            start += n
        return outs

    @staticmethod
    def _measure(run_chunk, start, n, device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = run_chunk(start, n)
            peak = torch.cuda.max_memory_allocated(device) - base
            return peak, peak, out
        meter = _PeakMemory()
        with meter:
            out = run_chunk(start, n)
        return meter.peak, meter.total, out
