"""The optional C entry (ftrans/_C/_fastc.c): BatchedTensor's __torch_function__ when built.

It serves the fast path's learned pointwise calls (one vmap or nested vmaps) and hands every
other call to the Python entry untouched.  Here: it is installed and used when built, the
pure-Python entry stays selectable (FTRANS_NO_CEXT=1) and gives the same results, and generated
programs give the same values, errors and dispatch-mode state under both entries and a loop.
(test_fastpath.py and test_direct_pointwise.py run under both entries too.)
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ftrans
from ftrans._C import fastpath, torch_function
from ftrans._C.batched import BatchedTensor

from _helpers import tf_entry

try:
    from ftrans._C import _fastc
except ImportError:  # not built (no compiler at install): the Python entry is the only one
    _fastc = None

needs_c = pytest.mark.skipif(_fastc is None or not torch_function.C_ENTRY,
                             reason="the C extension is not built or is switched off")


@needs_c
def test_the_built_entry_is_installed_and_serves_learned_calls():
    assert BatchedTensor.__torch_function__.__func__ is _fastc.tf_entry
    x = torch.randn(5, 4)
    f = lambda v: (v * 1.5 + 0.25).sin()  # noqa: E731
    ftrans.vmap(f)(x)  # learns mul, add, sin
    before = _fastc.hits()
    out = ftrans.vmap(f)(x)
    assert _fastc.hits() - before == 3
    torch.testing.assert_close(out, f(x))
    before = _fastc.hits()
    ftrans.vmap(ftrans.vmap(f))(torch.randn(3, 5, 4))  # nested: learned at the outer level
    ftrans.vmap(ftrans.vmap(f))(torch.randn(3, 5, 4))
    assert _fastc.hits() - before >= 3


def test_the_python_entry_is_selectable():
    code = ("import torch, ftrans\n"
            "from ftrans._C import torch_function as t\n"
            "from ftrans._C.batched import BatchedTensor\n"
            "assert not t.C_ENTRY\n"
            "assert BatchedTensor.__torch_function__.__func__ is t.batched_torch_function\n"
            "x = torch.randn(4, 3)\n"
            "f = lambda v: (v * 2.0).sin()\n"
            "for _ in range(2):\n"
            "    torch.testing.assert_close(ftrans.vmap(f)(x), f(x))\n")
    env = dict(os.environ, FTRANS_NO_CEXT="1")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)


# ----------------------------------------------------------------------------------------------
# Generated programs: both entries and the loop agree
# ----------------------------------------------------------------------------------------------

_UNARY = [torch.sin, torch.Tensor.exp, torch.tanh, lambda v: v.abs(), lambda v: -v,
          lambda v: v * 2.5, lambda v: 0.5 + v, lambda v: 3 - v, lambda v: v / 1.5,
          lambda v: torch.relu(v), lambda v: v.sigmoid(), lambda v: v.float(),
          lambda v: v.double(), lambda v: v.cumsum(-1), lambda v: v.softmax(-1),
          lambda v: v.sum(-1, keepdim=True) + v,  # rule ops (the C entry hands them to the rule)
          lambda v: (v > 0.1).to(v.dtype)]
_BINARY = [torch.add, torch.mul, torch.maximum, lambda a, b: a - b, lambda a, b: a * b + a,
           lambda a, b: torch.where(a > b, a, b), lambda a, b: torch.atan2(a, b)]


def _program(ops, plain):
    def f(x, y):
        for kind, i in ops:
            if kind == "u":
                x = _UNARY[i](x)
            elif kind == "b":
                x = _BINARY[i](x, y)
            elif kind == "p":  # a plain (unbatched) tensor broadcast against the batch
                x = _BINARY[i](x, plain)
            else:  # a lazily negated view of a batched value
                x = x + torch.complex(y, y).conj().imag
        return x
    return f


def _loop(f, x, y, in_dims, nested):
    xs = x.movedim(in_dims[0], 0) if in_dims[0] is not None else None
    ys = y.movedim(in_dims[1], 0) if in_dims[1] is not None else None
    n = (xs if xs is not None else ys).shape[0]
    outs = []
    for i in range(n):
        xi = xs[i] if xs is not None else x
        yi = ys[i] if ys is not None else y
        if nested:
            outs.append(torch.stack([f(a, b) for a, b in zip(xi, yi)]))
        else:
            outs.append(f(xi, yi))
    return torch.stack(outs)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(ops=st.lists(st.tuples(st.sampled_from("uubpn"), st.integers(0, 13)), min_size=1,
                    max_size=6),
       in_dims=st.sampled_from([(0, 0), (1, 0), (0, None), (None, 0), (0, 1)]),
       nested=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]),
       grad=st.booleans(), transposed=st.booleans())
def test_generated_pointwise_programs_agree(ops, in_dims, nested, dtype, grad, transposed):
    ops = [(k, i % (len(_UNARY) if k == "u" else len(_BINARY))) for k, i in ops]
    g = torch.Generator().manual_seed(len(ops))
    shape = (3, 4, 4) if nested else (4, 4)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    y = torch.randn(*shape, generator=g, dtype=dtype)
    if transposed:  # a non-contiguous batch
        x = x.mT.contiguous().mT
    plain = torch.randn(4, generator=g, dtype=dtype, requires_grad=grad)
    if nested and in_dims != (0, 0):
        in_dims = (0, 0)
    f = _program(ops, plain)
    m = (lambda h: ftrans.vmap(ftrans.vmap(h), in_dims)) if nested else (
        lambda h: ftrans.vmap(h, in_dims))
    with torch.no_grad():
        expected = _loop(f, x, y, in_dims, nested)
    results = {}
    for entry in ("python", "c") if _fastc is not None else ("python",):
        with tf_entry(entry):
            for _ in range(2):  # the second call runs on learned signatures
                results[entry] = m(f)(x, y)
    for out in results.values():
        torch.testing.assert_close(out, expected.to(out.dtype), equal_nan=True)
        # a plain operand that requires grad makes the result require grad, unless a
        # comparison later cut the graph
        last_p = max((j for j, (k, _) in enumerate(ops) if k == "p"), default=None)
        cut = last_p is not None and any(k == "u" and i == len(_UNARY) - 1
                                         for k, i in ops[last_p:])
        assert out.requires_grad == (grad and last_p is not None and not cut)


@needs_c
def test_errors_and_the_mode_stack_are_those_of_the_python_entry():
    f = lambda a, b: a + b  # noqa: E731
    ok = (torch.randn(4, 3), torch.randn(4, 3))
    bad = (torch.randn(4, 3), torch.randn(4, 2))  # the same ranks: a learned signature
    msgs = {}
    for entry in ("python", "c"):
        with tf_entry(entry):
            ftrans.vmap(f)(*ok)
            depth = torch._C._len_torch_dispatch_stack()

            def g(a, b):
                inside = torch._C._len_torch_dispatch_stack()
                with pytest.raises(RuntimeError) as e:
                    f(a, b)
                assert torch._C._len_torch_dispatch_stack() == inside  # the mode is back
                assert (a * 2).shape == a.shape  # and works
                raise RuntimeError(str(e.value))
            with pytest.raises(RuntimeError) as e:
                ftrans.vmap(g)(*bad)
            msgs[entry] = str(e.value)
            assert torch._C._len_torch_dispatch_stack() == depth
    assert msgs["c"] == msgs["python"]
    assert "size of tensor a (3) must match the size of tensor b (2)" in msgs["c"]


@needs_c
def test_rule_calls_raise_eagers_error_under_both_entries():
    w, bad = torch.randn(4, 5), torch.randn(3, 5)
    x = torch.randn(6, 2, 4)
    msgs = {}
    for entry in ("python", "c"):
        with tf_entry(entry):
            torch.testing.assert_close(ftrans.vmap(lambda v: torch.mm(v, w))(x), x @ w)
            before = _fastc.hits()
            ftrans.vmap(lambda v: torch.mm(v, w))(x)
            assert (_fastc.hits() - before == 1) == (entry == "c")  # the learned rule call
            with pytest.raises(RuntimeError) as e:
                ftrans.vmap(lambda v: torch.mm(v, bad))(x)
            msgs[entry] = str(e.value)
    assert msgs["c"] == msgs["python"] and "cannot be multiplied" in msgs["c"]


@needs_c
def test_calls_it_does_not_serve_reach_the_python_entry_unchanged():
    # keyword arguments, an escaped value, requires-grad, forward AD, autocast: not served here
    x = torch.randn(4, 3)
    fn = lambda v: torch.sin(v) * 2.0  # noqa: E731
    ftrans.vmap(fn)(x)  # learned
    before = _fastc.hits()
    torch.testing.assert_close(ftrans.vmap(lambda v: torch.add(v, v, alpha=2.0))(x), 3 * x)
    w = torch.randn(3, requires_grad=True)
    out = ftrans.vmap(lambda v: v * w)(x)
    assert out.requires_grad
    torch.testing.assert_close(ftrans.jvp(ftrans.vmap(fn), (x,), (torch.ones_like(x),))[1],
                               2.0 * x.cos())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ftrans.vmap(fn)(x)
    assert _fastc.hits() == before
    box = []
    ftrans.vmap(lambda v: box.append(v) or v)(x)
    with pytest.raises(Exception, match="escaped|outside|exited"):
        box[0] * 2.0


def test_hit_tuples_name_the_physical_call():
    # The direct path calls the torch function itself only when it is a C binding of torch's.
    x = torch.randn(4, 3)
    ftrans.vmap(lambda v: (3 - v).sin())(x)
    ftrans.vmap(lambda v: torch.nn.functional.relu(v))(x)
    calls = {f: hit[2] for f, e in fastpath._CACHE.items() if e for hit in e.values() if hit}
    assert calls[torch.Tensor.sin] is torch.Tensor.sin
    assert calls[torch.Tensor.__rsub__] is torch.ops.aten.rsub.Scalar._op  # a Python function


@needs_c
def test_keyword_calls_of_the_entry_and_no_reference_leaks():
    """The entry called with keywords (as Python code may) reaches the Python entry; and
    thousands of calls through the C paths (hits, nested hits, bail-outs) leave no Python
    objects behind (a leaked key tuple or wrapper per call would).  (A failing call is left
    out of the count: torch keeps a bounded cache of small objects per raised error, which
    takes a few thousand calls to turn over, on both entries.)"""
    import gc
    import tracemalloc

    x, y = torch.randn(4, 3), torch.randn(2, 4, 3)

    def run(n):
        def f(v, w):
            for _ in range(n):
                v.sin()
                v * 1.5
                v + w
                torch.add(v, w, alpha=2.0)  # keywords: Python
            sin = type(v).__torch_function__(torch.Tensor.sin, (type(v),), args=(v,))
            torch.testing.assert_close(sin, v.sin())
            return v
        ftrans.vmap(f)(x, x)
        ftrans.vmap(ftrans.vmap(lambda v: (v * 2.0).sin()))(y)

    for _ in range(3):  # learn, then warm
        run(50)
    gc.collect()
    tracemalloc.start()
    try:
        run(10)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        hits = _fastc.hits()
        run(2000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert _fastc.hits() - hits >= 2000 * 3
    assert grown < 64 * 1024, grown  # a leaked object per call would be > 160 KB


@needs_c
def test_dispatch_keys_already_excluded_stay_excluded():
    """The physical call excludes the Python dispatch keys and includes them again after;
    keys the caller had excluded already (a `_DisableTorchDispatch` block) stay excluded."""
    K = torch._C.DispatchKey
    x = torch.randn(4, 3)
    states = []

    def f(v):
        v.sin()  # learned
        before = _fastc.hits()
        with torch._C._DisableTorchDispatch():
            out = v.sin()
            states.append((torch._C._dispatch_tls_is_dispatch_key_excluded(K.Python),
                           torch._C._dispatch_tls_is_dispatch_key_excluded(
                               K.PythonTLSSnapshot)))
        out2 = v.sin()
        states.append((torch._C._dispatch_tls_is_dispatch_key_excluded(K.Python),
                       torch._C._dispatch_tls_is_dispatch_key_excluded(K.PythonTLSSnapshot)))
        states.append(_fastc.hits() - before)
        return out + out2

    torch.testing.assert_close(ftrans.vmap(f)(x), 2 * x.sin())
    assert states == [(True, True), (False, False), 2]
