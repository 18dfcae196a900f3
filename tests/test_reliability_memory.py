"""Memory: repeated transform calls leak nothing, and ``chunk_size`` really bounds memory.

A leak in a transform (a level, a wrapper or an autograd graph kept alive by a cache, a hook or
a closure) grows with every call of a training loop, so it is checked three ways: weakrefs to
everything the call handed to user code die with the call; the number of live tensors, the
Python heap (tracemalloc) and the RSS stay flat over a few hundred calls; and for
``chunk_size`` the largest physical intermediate shrinks by the chunking factor (measured by a
dispatch mode below ftrans that sees every physical op).
"""
from __future__ import annotations

import gc
import tracemalloc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ftrans
from ftrans._C import levels

_W = torch.randn(16, 16)


def _loss(v):
    return (_W @ v).tanh().pow(2).sum()


_CALLS = {
    "vmap": lambda x: ftrans.vmap(lambda v: (_W @ v).tanh())(x),
    "vmap_grad": lambda x: ftrans.vmap(ftrans.grad(_loss))(x),
    "grad_vmap": lambda x: ftrans.grad(lambda v: ftrans.vmap(_loss)(v).sum())(x),
    "jacrev": lambda x: ftrans.jacrev(lambda v: (_W @ v).tanh())(x[0]),
    "jacfwd": lambda x: ftrans.jacfwd(lambda v: (_W @ v).tanh())(x[0]),
}


@pytest.mark.parametrize("name", list(_CALLS))
def test_weakrefs_to_inputs_outputs_intermediates_die(name):
    refs = []

    def spy(v):  # record every value the transform hands to user code, and the level
        refs.extend([weakref.ref(v), weakref.ref(levels.current_stack()[-1])])
        y = (_W @ v).tanh()
        refs.append(weakref.ref(y))
        return y

    call = {"vmap": lambda x: ftrans.vmap(spy)(x),
            "vmap_grad": lambda x: ftrans.vmap(ftrans.grad(lambda v: spy(v).sum()))(x),
            "grad_vmap": lambda x: ftrans.grad(lambda v: ftrans.vmap(spy)(v).sum())(x),
            "jacrev": lambda x: ftrans.jacrev(spy)(x[0]),
            "jacfwd": lambda x: ftrans.jacfwd(spy)(x[0])}[name]

    def run():  # every local of the call dies with this frame
        x = torch.randn(4, 16, requires_grad=(name == "grad_vmap"))
        out = call(x)
        refs.extend([weakref.ref(out), weakref.ref(x)])

    run()
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    assert not alive, f"{len(alive)} objects outlived the call: {alive[:3]}"


def _rss_bytes():
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * 4096
    except OSError:  # not Linux: the tensor count and tracemalloc still apply
        return 0


def _live_tensors():
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


@pytest.mark.parametrize("name", ["vmap", "vmap_grad", "grad_vmap", "jacrev"])
def test_repeated_calls_stay_flat(name):
    call = _CALLS[name]
    x = torch.randn(8, 16, requires_grad=(name == "grad_vmap"))
    call(x)
    gc.collect()
    tensors0, rss0 = _live_tensors(), _rss_bytes()
    # Warm up *under* tracing: interpreter free lists and torch's bounded caches fill during
    # the first few hundred calls (measured: ~60 KiB over 200 calls after 30, ~15 KiB after
    # 300); a leak keeps growing linearly instead.
    tracemalloc.start()
    try:
        for _ in range(150):
            call(x)
        gc.collect()
        snap0 = tracemalloc.take_snapshot()
        for _ in range(200):
            call(x)
        gc.collect()
        growth = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap0, "filename"))
    finally:
        tracemalloc.stop()
    assert _live_tensors() == tensors0, "tensors accumulate across calls"
    assert growth < 64 * 1024, f"Python heap grew by {growth} bytes over 200 calls"
    assert _rss_bytes() - rss0 < 32 * 2 ** 20


class _LargestAlloc(TorchDispatchMode):
    """Size of the largest plain tensor storage any op produced (the physical intermediates)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if type(o) is torch.Tensor:
                self.largest = max(self.largest, o.untyped_storage().nbytes())
        return out


def _outer(v):  # a (D, D) intermediate per example, a (D,) result
    return (v[:, None] * v[None, :]).sin().sum(0)


@pytest.mark.parametrize("kind", ["vmap", "jacrev", "jacfwd"])
def test_chunk_size_bounds_the_largest_intermediate(kind):
    B, D, chunk = 64, 48, 8
    x = torch.randn(B, D) if kind == "vmap" else torch.randn(D)
    make = {"vmap": ftrans.vmap, "jacrev": ftrans.jacrev, "jacfwd": ftrans.jacfwd}[kind]
    sizes, outs = {}, {}
    for cs in (None, chunk):
        with _LargestAlloc() as m:
            outs[cs] = make(_outer, chunk_size=cs)(x)
        sizes[cs] = m.largest
    torch.testing.assert_close(outs[chunk], outs[None])
    n = B if kind == "vmap" else D  # batch rows, or basis rows of the Jacobian
    assert sizes[None] >= n * D * D * 4, sizes  # the unchunked run holds all (D, D) blocks
    assert sizes[chunk] <= sizes[None] * chunk // n, sizes
