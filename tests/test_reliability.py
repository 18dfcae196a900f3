"""ftrans never leaves the process in a bad state and never hands out a silently wrong value.

The transforms keep per-thread state (the level stack, the vmap dispatch mode, grad mode) and
wrap user values in BatchedTensors.  Everything that can outlive a call is checked here:

- exceptions (user errors, ftrans errors, errors in backward, KeyboardInterrupt) at any depth
  unwind every level and the dispatch mode, and the next call is correct;
- threads: each thread has its own stack and mode; concurrent transforms give correct results;
- user inputs, module parameters, their ``.grad`` and flags are never changed;
- a BatchedTensor that escapes its vmap refuses to compute (outside a backward pass) instead of
  handing out per-example values with no batch in sight;
- randomness 'same'/'different' is reproducible under ``torch.manual_seed``, chunked or not.

Memory (leaks, ``chunk_size`` bounds) is in tests/test_reliability_memory.py.
"""
from __future__ import annotations

import sys
import threading

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

import ftrans
from ftrans._C import levels
from ftrans._C import dispatch as fdispatch

X = torch.randn(2, 3)


def assert_clean(grad_enabled=True):
    assert levels.current_stack() == [], levels.current_stack()
    assert _get_current_dispatch_mode() is None
    assert getattr(fdispatch._tls, "active", False) is False
    assert torch.is_grad_enabled() is grad_enabled
    assert torch.autograd.forward_ad._current_level == -1


def assert_next_call_correct():
    x = torch.randn(4, 3)
    torch.testing.assert_close(ftrans.vmap(ftrans.grad(lambda v: (v ** 2).sum()))(x), 2 * x)
    torch.testing.assert_close(ftrans.vmap(ftrans.vmap(torch.mul))(x, x), x * x)
    y = torch.randn(3) + 1  # a random op outside vmap must not see a stale 'error' mode
    assert type(y) is torch.Tensor


# ---------------------------------------------------------------------------------------------
# Exceptions at every depth

class _Boom(Exception):
    pass


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise _Boom("backward")


def _raise_forward(exc):
    def f(x):
        x.sin()  # some batched work first, so the level has produced values
        raise exc
    return f


def _raise_backward(x):
    return _RaiseInBackward.apply(x.sin()).sum()


# name -> lift(f) -> callable on X.  f maps one example (shape (3,)) or all of X to a scalar.
_DEPTHS = {
    "vmap": lambda f: ftrans.vmap(f),
    "vmap_vmap": lambda f: lambda x: ftrans.vmap(ftrans.vmap(f))(x.reshape(2, 3, 1)),
    "vmap_chunked_same": lambda f: ftrans.vmap(f, randomness="same", chunk_size=1),
    "vmap_grad": lambda f: ftrans.vmap(ftrans.grad(f)),
    "grad_vmap": lambda f: ftrans.grad(lambda x: ftrans.vmap(f)(x).sum()),
    "vmap_grad_vmap": lambda f: ftrans.vmap(ftrans.grad(lambda x: ftrans.vmap(f)(x.reshape(3, 1))
                                                        .sum())),
    "jacrev": lambda f: ftrans.jacrev(f),
    "jacfwd": lambda f: ftrans.jacfwd(f),
    "hessian": lambda f: ftrans.hessian(f),
    "vjp": lambda f: lambda x: ftrans.vjp(f, x)[1](torch.ones(())),
    "jvp": lambda f: lambda x: ftrans.jvp(f, (x,), (torch.ones_like(x),)),
}


@pytest.mark.parametrize("depth", list(_DEPTHS))
@pytest.mark.parametrize("where", ["user", "keyboard_interrupt", "ftrans", "backward"])
def test_exception_unwinds_everything(depth, where):
    if where == "user":
        f, exc = _raise_forward(_Boom("forward")), _Boom
    elif where == "keyboard_interrupt":
        f, exc = _raise_forward(KeyboardInterrupt()), KeyboardInterrupt
    elif where == "ftrans":  # a data-dependent op ftrans refuses (outside vmap it is fine)
        exc = RuntimeError
        if depth in ("jacrev", "jacfwd", "hessian", "vjp", "jvp"):
            f = _raise_forward(RuntimeError("no vmap around: raise it ourselves"))
        else:
            def f(x):  # (a Python value would pass a one-example chunk: its batch agrees)
                return x.sum() * torch.unique_consecutive(x.detach()).shape[0]
    else:
        if depth in ("vmap", "vmap_vmap", "vmap_chunked_same", "jvp"):
            pytest.skip("no backward pass at this depth")
        f, exc = _raise_backward, _Boom
    with pytest.raises(exc):
        _DEPTHS[depth](f)(X.clone())
    assert_clean()
    assert_next_call_correct()


def test_exception_under_no_grad_restores_grad_mode():
    with torch.no_grad():
        with pytest.raises(_Boom):
            ftrans.grad(_raise_forward(_Boom()))(X)
        with pytest.raises(_Boom):
            ftrans.vmap(ftrans.grad(_raise_forward(_Boom())))(X)
        assert_clean(grad_enabled=False)


def test_exception_in_user_rule_and_in_out_dims_check():
    with pytest.raises(IndexError, match="out_dim"):
        ftrans.vmap(lambda x: ftrans.vmap(torch.sin, out_dims=5)(x))(torch.ones(2, 3, 4))
    assert_clean()
    lib = torch.library.Library("ftrans_test_rel", "DEF")
    lib.define("bad(Tensor x) -> Tensor")
    lib.impl("bad", lambda x: x.clone(), "CompositeExplicitAutograd")

    @ftrans.register_batch_rule(torch.ops.ftrans_test_rel.bad)
    def bad_rule(level, func, args, bdims, kwargs):
        raise _Boom("rule")

    with pytest.raises(_Boom):
        ftrans.vmap(ftrans.vmap(torch.ops.ftrans_test_rel.bad.default))(torch.ones(2, 3, 4))
    assert_clean()
    assert_next_call_correct()


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_exception_inside_functional_call_restores_the_module(exc):
    m = _model()
    originals = dict(m.named_parameters())
    new = {k: torch.zeros_like(v) for k, v in originals.items()}

    def f(p, x):
        ftrans.functional_call(m, p, (x,))
        raise exc()

    with pytest.raises(exc):
        ftrans.vmap(ftrans.grad(lambda p, x: f(p, x)), in_dims=(None, 0))(new, X)
    assert dict(m.named_parameters()) == originals
    assert all(v is originals[k] for k, v in m.named_parameters())
    assert_clean()


def test_generator_abandoned_mid_vmap_is_fine():
    # A function that raises StopIteration (PEP 479 territory) must unwind like any other.
    def f(x):
        next(iter(()))
    with pytest.raises(StopIteration):
        ftrans.vmap(f)(X)
    assert_clean()


# ---------------------------------------------------------------------------------------------
# Threads

@pytest.fixture
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads' Python code as much as possible
    yield
    sys.setswitchinterval(old)


def _thread_job(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 3, generator=g)
    w = torch.randn(3, 3, generator=g)

    def f(v):
        return (w @ v).tanh().sum()

    return x, w, f


def _expected(seed):
    x, w, f = _thread_job(seed)
    a = torch.stack([w @ xi.sin() for xi in x])
    b = torch.stack([_plain_grad(f, xi) for xi in x])
    c = torch.autograd.functional.jacobian(lambda v: (w @ v).tanh(), x[0])
    return a, b, c


def _plain_grad(f, xi):
    xi = xi.clone().requires_grad_()
    return torch.autograd.grad(f(xi), xi)[0]


def test_threads_run_transforms_concurrently(fast_switching):
    n, reps = 4, 15
    expected = {i: _expected(i) for i in range(n)}
    barrier = threading.Barrier(n)
    errors, done = [], []

    def work(i):
        try:
            x, w, f = _thread_job(i)
            barrier.wait(timeout=30)
            for _ in range(reps):
                a = ftrans.vmap(lambda v: w @ v.sin())(x)
                b = ftrans.vmap(ftrans.grad(f))(x)
                c = ftrans.jacrev(lambda v: (w @ v).tanh())(x[0])
                for got, exp in zip((a, b, c), expected[i]):
                    torch.testing.assert_close(got, exp)
                assert levels.current_stack() == []
            done.append(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append((i, e))
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(done) == list(range(n))


def test_thread_never_sees_another_threads_levels_or_mode():
    inside, release = threading.Event(), threading.Event()
    seen, out = {}, []

    def f(x):
        seen["a_stack"] = list(levels.current_stack())
        inside.set()
        assert release.wait(30)
        seen["a_stack_after"] = list(levels.current_stack())
        return x * 2

    a = threading.Thread(target=lambda: out.append(ftrans.vmap(f)(X)))
    a.start()
    try:
        assert inside.wait(30)
        # Thread A sits inside vmap (randomness='error').  This thread must be untouched.
        assert_clean()
        y = torch.ones(3) * 2
        assert type(y) is torch.Tensor and torch.equal(y, torch.full((3,), 2.0))
        torch.randn(3)  # no 'error' randomness mode leaked from A

        def g(v):
            seen["b_stack"] = list(levels.current_stack())
            return v + 1
        torch.testing.assert_close(ftrans.vmap(g)(X), X + 1)
    finally:
        release.set()
        a.join(timeout=30)
    torch.testing.assert_close(out[0], X * 2)
    assert len(seen["a_stack"]) == 1 and seen["a_stack"] == seen["a_stack_after"]
    assert len(seen["b_stack"]) == 1 and seen["b_stack"][0] is not seen["a_stack"][0]


# ---------------------------------------------------------------------------------------------
# Inputs are never changed

def _model():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    m[0].weight.grad = torch.randn(4, 3)  # an existing .grad must survive untouched
    return m


def _snapshot(named):
    snap = {}
    for k, t in named.items():
        g = t.grad
        snap[k] = (t.detach().clone(), t._version, t.requires_grad, t.is_leaf, t.grad_fn,
                   None if g is None else (g.clone(), g._version))
    return snap


def _assert_same(before, after):
    for k in before:
        v0, ver0, rg0, leaf0, fn0, g0 = before[k]
        v1, ver1, rg1, leaf1, fn1, g1 = after[k]
        assert torch.equal(v0, v1), f"{k}: value changed"
        assert (ver0, rg0, leaf0, fn0) == (ver1, rg1, leaf1, fn1), f"{k}: version/flags changed"
        if g0 is None:
            assert g1 is None, f"{k}: .grad was created"
        else:
            assert g1 is not None and torch.equal(g0[0], g1[0]) and g0[1] == g1[1], \
                f"{k}: .grad changed"


def _fc(model, p, x):
    return ftrans.functional_call(model, p, (x,))


_TRANSFORMS = {
    "vmap_model": lambda m, p, x, y: ftrans.vmap(lambda v: m(v) * y.sum())(x),
    "vmap_inplace_on_clone": lambda m, p, x, y: ftrans.vmap(lambda v: v.clone().mul_(2) + y)(x),
    "vmap_grad_params": lambda m, p, x, y: ftrans.vmap(
        ftrans.grad(lambda q, v: _fc(m, q, v).sum()), in_dims=(None, 0))(p, x),
    "grad_params": lambda m, p, x, y: ftrans.grad(lambda q: _fc(m, q, x).sum())(p),
    "grad_of_vmap_x": lambda m, p, x, y: ftrans.grad(
        lambda v: ftrans.vmap(lambda r: m(r).sum() * y.sum())(v).sum())(x),
    "jacrev": lambda m, p, x, y: ftrans.jacrev(m)(x[0]),
    "jacfwd": lambda m, p, x, y: ftrans.jacfwd(m)(x[0]),
    "hessian": lambda m, p, x, y: ftrans.hessian(lambda v: m(v).sum())(x[0]),
    "vjp": lambda m, p, x, y: ftrans.vjp(m, x)[1](torch.ones(2, 1)),
    "jvp": lambda m, p, x, y: ftrans.jvp(m, (x,), (torch.ones_like(x),)),
    "stack_module_state": lambda m, p, x, y: ftrans.stack_module_state([m, m]),
    "vmap_ensemble": lambda m, p, x, y: ftrans.vmap(lambda q: _fc(m, q, x))(
        ftrans.stack_module_state([m, m])[0]),
}


@pytest.mark.parametrize("name", list(_TRANSFORMS))
@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_inputs_params_and_grads_unchanged(name, x_requires_grad):
    m = _model()
    x = torch.randn(2, 3, requires_grad=x_requires_grad)
    if x_requires_grad:
        x.grad = torch.randn(2, 3)
    y = torch.randn(3)
    p = dict(m.named_parameters())
    named = {**{f"param.{k}": v for k, v in p.items()}, "x": x, "y": y}
    before = _snapshot(named)
    _TRANSFORMS[name](m, p, x, y)
    _assert_same(before, _snapshot(named))
    assert dict(m.named_parameters()) == p  # functional_call put the originals back


# ---------------------------------------------------------------------------------------------
# Ambient torch modes: a transform's answer must not depend on them silently

_AMBIENT = {
    "grad": lambda L, x: L.grad(lambda v: (v ** 3).sum())(x),
    "vjp": lambda L, x: L.vjp(torch.sin, x)[1](torch.ones(3))[0],
    "jacrev": lambda L, x: L.jacrev(torch.sin)(x),
    "jacfwd": lambda L, x: L.jacfwd(torch.sin)(x),
    "jvp": lambda L, x: L.jvp(torch.sin, (x,), (torch.ones(3),))[1],
    "hessian": lambda L, x: L.hessian(lambda v: (v ** 3).sum())(x),
    "vmap_grad": lambda L, x: L.vmap(L.grad(lambda v: (v ** 3).sum()))(x[None])[0],
}


@pytest.mark.parametrize("name", list(_AMBIENT))
def test_autodiff_under_inference_mode_matches_torch_func(name):
    import torch.func as tf

    x = torch.randn(3)
    with torch.inference_mode():
        expected = _AMBIENT[name](tf, x)
        got = _AMBIENT[name](ftrans, x)
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected)
    assert_clean()


def test_grad_of_inference_tensor_input():
    with torch.inference_mode():
        x = torch.randn(3)
    torch.testing.assert_close(ftrans.grad(lambda v: (v ** 2).sum())(x), 2 * x)


def test_transforms_inside_a_users_dispatch_mode_keep_it_active():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counting.calls += 1
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, 3)
    with Counting() as mode:
        torch.testing.assert_close(ftrans.vmap(ftrans.grad(lambda v: (v ** 2).sum()))(x), 2 * x)
        with pytest.raises(_Boom):
            ftrans.vmap(_raise_forward(_Boom()))(x)
        assert _get_current_dispatch_mode() is mode
    assert Counting.calls > 0
    assert_clean()


# ---------------------------------------------------------------------------------------------
# Escaped BatchedTensors

def _escape(fn=lambda x: x * 2, x=None):
    box = []

    def f(v):
        box.append(v)
        return fn(v)

    out = ftrans.vmap(f)(torch.arange(6.0).reshape(2, 3) if x is None else x)
    return box[0], out


@pytest.mark.parametrize("use", [
    lambda e: e + 1, lambda e: e.sum(), lambda e: e * torch.ones(2, 3), lambda e: e.add_(1),
    lambda e: e.clone(), lambda e: e.sum().item(), lambda e: torch.randn(3) + e,
    lambda e: ftrans.vmap(lambda y: y + e)(torch.ones(4, 3)),
    lambda e: ftrans.vmap(lambda y: y)(e.unsqueeze(0)),
    lambda e: ftrans.grad(lambda y: (y * e).sum())(torch.ones(3)),
], ids=["add", "sum", "broadcast", "inplace", "clone", "item", "random", "into_new_vmap",
        "as_new_vmap_input", "into_grad"])
def test_escaped_batched_tensor_refuses_to_compute(use):
    e, out = _escape()
    torch.testing.assert_close(out, torch.arange(6.0).reshape(2, 3) * 2)
    # Metadata and printing stay available (debugging an escape must be possible).
    assert e.shape == (3,) and e.dtype == torch.float32
    assert "BatchedTensor" in repr(e)
    with pytest.raises(RuntimeError, match=r"^vmap\(f, \.\.\.\)\(<inputs>\): .*escaped its vmap"):
        use(e)
    assert_clean()


def test_escape_from_inner_vmap_into_live_outer_vmap_refuses():
    box = []

    def outer(x):
        y = ftrans.vmap(lambda v: box.append(v) or v * 2)(x)
        return y + box[0]  # box[0] is per-example of the exited inner vmap

    with pytest.raises(RuntimeError, match="escaped its vmap"):
        ftrans.vmap(outer)(torch.ones(2, 3, 4))
    assert_clean()


def test_exited_levels_still_work_inside_backward():
    # What the escape check must not forbid: autograd replaying an exited vmap's ops.
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(4, 3, requires_grad=True)
    ftrans.vmap(lambda v: (v * w).sin().sum())(x).sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (xr * wr).sin().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)
    # and a vjp function whose graph holds exited-level values, pulled back later under vmap
    f = lambda v: ftrans.vmap(lambda r: r.sin() * 2)(v)  # noqa: E731
    torch.testing.assert_close(ftrans.jacrev(f)(torch.ones(2, 2)),
                               torch.autograd.functional.jacobian(lambda v: v.sin() * 2,
                                                                  torch.ones(2, 2)))
    assert_clean()


# ---------------------------------------------------------------------------------------------
# Randomness reproducibility

_RANDOM_FNS = {
    "randn": lambda x: x + torch.randn(3),
    "rand_like": lambda x: x + torch.rand_like(x),
    "dropout": lambda x: torch.nn.functional.dropout(x + 1, 0.5),
    "normal_batched": lambda x: torch.normal(x, 1.0),
}


@pytest.mark.parametrize("fn", list(_RANDOM_FNS))
@pytest.mark.parametrize("randomness", ["same", "different"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_randomness_reproducible_under_seed(fn, randomness, chunk_size):
    f = ftrans.vmap(_RANDOM_FNS[fn], randomness=randomness, chunk_size=chunk_size)
    x = torch.zeros(8, 3)
    torch.manual_seed(123)
    a = f(x)
    torch.manual_seed(123)
    b = f(x)
    assert torch.equal(a, b)
    if randomness == "same":
        assert (a == a[0]).all(), "'same' must give every example the same draw"
        torch.manual_seed(123)
        assert torch.equal(a, ftrans.vmap(_RANDOM_FNS[fn], randomness="same")(x)), \
            "chunking must not change a 'same' draw"
    else:
        assert not (a == a[0]).all(), "'different' gave identical draws"


def test_nested_randomness_reproducible():
    f = ftrans.vmap(ftrans.vmap(lambda x: x + torch.rand(()), randomness="same"),
                    randomness="different")
    x = torch.zeros(4, 5)
    torch.manual_seed(7)
    a = f(x)
    torch.manual_seed(7)
    assert torch.equal(a, f(x))
    assert (a == a[:, :1]).all() and not (a == a[:1]).all()
