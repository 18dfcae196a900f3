"""The direct physical call of pointwise ops (``dispatch.direct_pointwise``): single level,
nested levels and mixed levels give torch.func's values, and errors are still eager's."""
import pytest
import torch
import torch.func

import ftrans

from _helpers import count_direct_calls, entries, tf_entry


@pytest.fixture(autouse=True, params=entries())
def _entry(request):
    """Every test under each torch-function entry: the compiled one (when built) and Python's."""
    with tf_entry(request.param):
        yield


def _both(build, *args):
    a = build(ftrans)(*args)
    b = build(torch.func)(*args)
    torch.testing.assert_close(a, b)
    return a


def test_mixed_levels_broadcast():
    x, y, w = torch.randn(5, 7), torch.randn(3, 7), torch.randn(7)
    h = lambda a, b: (a * b + a.sin() - b) * w  # noqa: E731
    _both(lambda lib: lib.vmap(lib.vmap(h, (None, 0)), (0, None)), x, y)
    _both(lambda lib: lib.vmap(lib.vmap(h, (0, None)), (None, 0)), x, y)
    _both(lambda lib: lib.vmap(lambda a: lib.vmap(lambda b: h(a, b))(y)), x)
    _both(lambda lib: lib.vmap(lib.vmap(lib.vmap(h, (0, None)), (None, 0)), (0, 0)),
          torch.randn(2, 5, 7), torch.randn(2, 3, 7))


def test_nested_same_levels_and_other_dims():
    x = torch.randn(4, 3, 6)
    f = lambda v: (v * 1.5 + 0.5).sin() * v  # noqa: E731
    _both(lambda lib: lib.vmap(lib.vmap(f)), x)
    _both(lambda lib: lib.vmap(lib.vmap(f, in_dims=1), in_dims=2), x)


def test_jacobians_through_the_direct_call():
    f = lambda x: (x.sin() * x.cos().sum() + x ** 2).tanh()  # noqa: E731
    xs = torch.randn(5, 7)
    _both(lambda lib: lib.vmap(lib.jacrev(f)), xs)
    g = lambda x: f(x).sum()  # noqa: E731
    _both(lambda lib: lib.hessian(g), xs[0])
    _both(lambda lib: lib.vmap(lib.hessian(g)), xs)


def test_grad_through_a_nested_call_with_captured_grad():
    w = torch.randn(7)
    x, y = torch.randn(5, 7), torch.randn(3, 7)

    def loss(lib, w):
        return lib.vmap(lambda a: lib.vmap(lambda b: (a * b * w).tanh())(y))(x).sum()

    torch.testing.assert_close(ftrans.grad(lambda w: loss(ftrans, w))(w),
                               torch.func.grad(lambda w: loss(torch.func, w))(w))


def test_per_example_shape_error_is_eagers():
    x, y = torch.randn(5, 7), torch.randn(3, 6)
    with pytest.raises(RuntimeError, match="must match the size"):
        ftrans.vmap(lambda a: ftrans.vmap(lambda b: a * b)(y))(x)


def test_backward_ops_take_the_direct_call(monkeypatch):
    hits = count_direct_calls(monkeypatch, "direct_pointwise")
    f = lambda x: (x.sin() * x.cos().sum() + x ** 2).tanh()  # noqa: E731
    ftrans.vmap(ftrans.jacrev(f))(torch.randn(4, 6))  # mixed levels in the backward
    assert any(hits)
