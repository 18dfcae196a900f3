"""Shared test utilities: compare vmap against a per-example loop, for every batch-dim placement."""
from __future__ import annotations

import contextlib
import itertools
import warnings

import pytest
import torch

import ftrans

# For test modules whose subject is a transform, not a rule (``pytestmark = QUIET_FALLBACKS``):
# rules for some ops are written concurrently, and a fallback there is slow but must still be
# right, so its warning is noise.  Tests that must see no fallback use ``no_fallback()``.
QUIET_FALLBACKS = pytest.mark.filterwarnings("ignore::ftrans.FallbackWarning")


def loop_reference(fn, args, in_dims, out_dims=0, kwargs=None):
    """Stack ``fn`` applied to each example (the oracle)."""
    kwargs = kwargs or {}
    sizes = [a.shape[d] for a, d in zip(args, in_dims) if d is not None]
    B = sizes[0]
    outs = []
    for i in range(B):
        ex = [a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]
        outs.append(fn(*ex, **kwargs))
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs, dim=out_dims)
    n = len(outs[0])
    ods = out_dims if isinstance(out_dims, (tuple, list)) else (out_dims,) * n
    return type(outs[0])(torch.stack([o[j] for o in outs], dim=ods[j]) for j in range(n))


@contextlib.contextmanager
def no_fallback():
    """Fail if any op inside ran through the loop fallback."""
    before = dict(ftrans.fallback_stats())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ftrans.FallbackWarning)
        yield
    after = ftrans.fallback_stats()
    new = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    assert not new, f"ops fell back to the per-example loop: {new}"


def bdim_variants(args, in_dims):
    """Yield (args, in_dims) with each batched arg's batch dim moved to 0, the end, the middle."""
    choices = []
    for a, d in zip(args, in_dims):
        if d is None or not isinstance(a, torch.Tensor):
            choices.append([(a, d)])
            continue
        n = a.dim()
        opts = []
        for p in sorted({0, n - 1, n // 2}):
            opts.append((a.movedim(d, p), p))
        choices.append(opts)
    for combo in itertools.product(*choices):
        yield [c[0] for c in combo], tuple(c[1] for c in combo)


def check_vmap(fn, args, in_dims=0, *, kwargs=None, atol=1e-5, rtol=1e-5, allow_fallback=False,
               all_placements=True, out_dims=0):
    """Assert vmap(fn) equals the per-example loop for every placement of the batch dims."""
    if not isinstance(in_dims, tuple):
        in_dims = (in_dims,) * len(args)
    variants = bdim_variants(args, in_dims) if all_placements else [(list(args), in_dims)]
    for vargs, vdims in variants:
        expected = loop_reference(fn, vargs, vdims, out_dims, kwargs)
        ctx = contextlib.nullcontext() if allow_fallback else no_fallback()
        with ctx:
            got = ftrans.vmap(fn, in_dims=vdims, out_dims=out_dims)(*vargs, **(kwargs or {}))
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, equal_nan=True,
                                   msg=lambda m: f"in_dims={vdims}: {m}")


def check_nested_vmap(fns, x):
    """Assert ``vmap(vmap(fn))`` equals a double loop over the first two dims of the 4-dim ``x``,
    with the two batch dims in front and, on a permuted copy, in the middle and at the end."""
    for fn in fns:
        expected = torch.stack([torch.stack([fn(x[i, j]) for j in range(x.shape[1])])
                                for i in range(x.shape[0])])
        with no_fallback():
            got = ftrans.vmap(ftrans.vmap(fn))(x)
            got2 = ftrans.vmap(ftrans.vmap(fn, in_dims=1), in_dims=3)(x.permute(2, 1, 3, 0))
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(got2, expected)


class Cube(torch.autograd.Function):
    """``x ** 3`` as a custom autograd.Function with a hand-written backward, the way user code
    extends autograd: transforms must run its forward and backward, not decompose it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


def _stack_examples(xs):
    if isinstance(xs[0], torch.Tensor):
        return torch.stack(xs)
    return tuple(torch.stack([x[i] for x in xs]) for i in range(len(xs[0])))


def check_grads(f, args, in_dims, argnums, atol=1e-6):
    """``vmap(grad(f, argnums))`` against a loop of ``torch.autograd.grad``, with no fallback."""
    with no_fallback():
        got = ftrans.vmap(ftrans.grad(f, argnums=argnums), in_dims=in_dims)(*args)
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    size = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    expected = []
    for b in range(size):
        ex = [a if d is None else a.select(d, b) for a, d in zip(args, in_dims)]
        ex = [a.detach().requires_grad_() if i in nums else a for i, a in enumerate(ex)]
        gs = torch.autograd.grad(f(*ex), [ex[i] for i in nums])
        expected.append(gs if isinstance(argnums, tuple) else gs[0])
    torch.testing.assert_close(got, _stack_examples(expected), atol=atol, rtol=atol)


def run_in_threads(work, n=4):
    """Run ``work(i)`` in ``n`` threads at once; re-raise what any of them raised."""
    import threading

    errors = []

    def guarded(i):
        try:
            work(i)
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.fixture(autouse=True)
def float64_norm_rules():
    """float64 by default and fresh norm-rule counters: autouse in the test modules that import
    it by name (the clipping tests)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    ftrans.reset_norm_rule_stats()
    yield
    torch.set_default_dtype(old)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def count_direct_calls(monkeypatch, name):
    """Record, per call of ``ftrans._C.dispatch.<name>`` (``direct_view``, ``direct_pointwise``),
    whether it took the direct path (anything but ``MISS``)."""
    from ftrans._C import dispatch as D
    hits = []
    real = getattr(D, name)

    def counting(*a, **k):
        out = real(*a, **k)
        hits.append(out is not D.MISS)
        return out

    monkeypatch.setattr(D, name, counting)
    return hits


class LogOps:
    """A dispatch mode recording every aten op it sees: ``with LogOps() as seen: ...``."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        seen = self.seen = []

        class _Log(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.append(func)
                return func(*args, **(kwargs or {}))

        self._mode = _Log()

    def __enter__(self):
        self._mode.__enter__()
        return self.seen

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


class tf_entry:
    """Make ``entry`` ("c": the compiled extension's, "python": ``batched_torch_function``)
    BatchedTensor's ``__torch_function__`` for a while."""

    def __init__(self, entry):
        self.entry = entry

    def __enter__(self):
        from ftrans._C import torch_function
        from ftrans._C.batched import BatchedTensor

        self.saved = BatchedTensor.__dict__["__torch_function__"]
        if self.entry == "c":
            from ftrans._C import _fastc
            fn = _fastc.tf_entry
        else:
            fn = torch_function.batched_torch_function
        BatchedTensor.__torch_function__ = classmethod(fn)
        return self

    def __exit__(self, *exc):
        from ftrans._C.batched import BatchedTensor

        BatchedTensor.__torch_function__ = self.saved


def entries():
    """The torch-function entries this build has: "python", and "c" when the extension is."""
    from ftrans._C import torch_function

    return ["python", "c"] if torch_function.C_ENTRY else ["python"]
