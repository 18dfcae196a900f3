"""vmap over the batch dim of nested tensors (ftrans/vmap.py, ``_vmap_nested``).

As in torch.func: inside the vmapped function each example is a dense tensor (the component),
tensor outputs come back nested, and the limits are torch.func's, with its messages (batch dim 0
only, dense arguments batched at dim 0 only, one vmap level).  Checked against a loop over the
components.
"""
from __future__ import annotations

import pytest
import torch

import ftrans
from ftrans._C import levels

pytestmark = pytest.mark.filterwarnings(
    "ignore:The PyTorch API of nested tensors is in prototype")


def _nt(shapes, layout=torch.strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nested.nested_tensor([torch.randn(*s, generator=g) for s in shapes],
                                      layout=layout)


def _assert_nested_equal(out, expected):
    assert out.is_nested
    got = out.unbind()
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_unary_acts_as_dense(layout):
    x = _nt([(2, 3), (5, 3), (1, 3)], layout)
    seen = []

    def f(t):
        seen.append(t.is_nested)
        return t.sin() * 5.0 + 4.0

    _assert_nested_equal(ftrans.vmap(f)(x), [c.sin() * 5.0 + 4.0 for c in x.unbind()])
    assert seen and not any(seen)


def test_binary_with_nested_and_dense_arguments():
    x, y = _nt([(2, 3), (4, 3)]), _nt([(3, 5), (3, 1)], seed=1)
    _assert_nested_equal(ftrans.vmap(torch.matmul)(x, y),
                         [a @ b for a, b in zip(x.unbind(), y.unbind())])
    w = torch.randn(3, 4)
    _assert_nested_equal(ftrans.vmap(torch.matmul, in_dims=(0, None))(x, w),
                         [a @ w for a in x.unbind()])
    wb = torch.randn(2, 3, 4)
    _assert_nested_equal(ftrans.vmap(torch.matmul)(x, wb),
                         [a @ b for a, b in zip(x.unbind(), wb.unbind())])
    # ragged results of a different structure (cat along the ragged dim)
    z = _nt([(1, 3), (6, 3)], seed=2)
    _assert_nested_equal(ftrans.vmap(lambda a, b: torch.cat([a, b]))(x, z),
                         [torch.cat([a, b]) for a, b in zip(x.unbind(), z.unbind())])


def test_gradient_flows_through():
    x = _nt([(2, 3), (4, 3)]).requires_grad_()
    out = ftrans.vmap(lambda t: t.sin())(x)
    assert out.requires_grad
    grads = torch.autograd.grad([o.sum() for o in out.unbind()], x)[0]
    _assert_nested_equal(grads, [c.cos() for c in x.detach().unbind()])


def test_randomness():
    x = _nt([(2, 3), (2, 3)])
    with pytest.raises(RuntimeError, match="called random operation while in randomness error"):
        ftrans.vmap(lambda t: t + torch.rand(3))(x)
    same = ftrans.vmap(lambda t: t * 0 + torch.rand(3), randomness="same")(x).unbind()
    torch.testing.assert_close(same[0], same[1])
    diff = ftrans.vmap(lambda t: t * 0 + torch.rand(3), randomness="different")(x).unbind()
    assert not torch.equal(diff[0], diff[1])
    assert levels.current_stack() == []


def test_refusals_with_torch_func_messages():
    x = _nt([(2, 3), (4, 3)])
    with pytest.raises(RuntimeError, match="Nested tensors can only be vmapped over dim=0"):
        ftrans.vmap(lambda t: t, in_dims=2)(x)
    with pytest.raises(RuntimeError, match="Nested tensors can only be vmapped over dim=0"):
        ftrans.vmap(lambda t: t, out_dims=1)(x)
    with pytest.raises(RuntimeError, match="Fallback not supported for mixed nested / "
                       "non-nested arguments without bdim=0"):
        ftrans.vmap(torch.matmul, in_dims=(0, 1))(x, torch.randn(3, 2, 4))
    x4 = _nt([(2, 2, 3), (2, 2, 1)])
    with pytest.raises(RuntimeError, match="Only one level of vmap is supported"):
        ftrans.vmap(ftrans.vmap(torch.sin))(x4)
    assert levels.current_stack() == []
    # a vmap inside over values of its own is fine
    out = ftrans.vmap(lambda t: ftrans.vmap(torch.mul)(torch.ones(2, 3), torch.ones(2, 3)) + t[0])(
        _nt([(1, 3), (2, 3)]))
    assert out.is_nested
