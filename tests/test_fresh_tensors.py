"""Tensors the vmapped function creates from a factory become batched on their first write of a
batched value (torch.func and JAX raise); tensors that existed before the call still raise."""
import pytest
import torch

import ftrans

D = torch.float64


def _loop(fn, *xs):
    return torch.stack([fn(*ex) for ex in zip(*xs)])


def _writes(v):
    out = torch.zeros(6, dtype=v.dtype)
    out[1] = v.sum()                    # setitem (copy_ into a view)
    out[3:] = v * 2                     # slice
    out[0] += v[0]                      # in-place arithmetic through indexing
    out.index_put_((torch.tensor([2]),), v[1:2].exp())
    buf = torch.empty_like(out).copy_(out)  # empty_like of an unbatched tensor, copy_
    buf.mul_(v.mean())
    acc = torch.full((), 1.0, dtype=v.dtype)
    for i in range(3):
        acc += v[i] ** 2
    return buf + acc


def test_fresh_writes_equal_loop():
    x = torch.randn(5, 3, dtype=D)
    torch.testing.assert_close(ftrans.vmap(_writes)(x), _loop(_writes, x))
    torch.testing.assert_close(ftrans.vmap(_writes, in_dims=1)(x.T.contiguous()), _loop(_writes, x))


def test_fresh_write_with_per_example_index():
    idx = torch.tensor([0, 3, 1, 3])

    def onehot(i):
        out = torch.zeros(4)
        out[i] = 1.0
        return out

    assert torch.equal(ftrans.vmap(onehot)(idx), torch.nn.functional.one_hot(idx, 4).float())


def test_gradients_through_fresh_writes():
    x = torch.randn(5, 3, dtype=D)
    ref = torch.stack([torch.func.grad(lambda v: _writes(v).sum())(r) for r in x])
    torch.testing.assert_close(ftrans.vmap(ftrans.grad(lambda v: _writes(v).sum()))(x), ref)
    torch.testing.assert_close(ftrans.grad(lambda a: ftrans.vmap(_writes)(a).sum())(x), ref)


def test_fresh_in_nested_vmaps():
    x, y = torch.randn(3, 4, dtype=D), torch.randn(5, 4, dtype=D)

    def outer(a):
        def inner(b):
            buf = torch.zeros(4, dtype=D)
            buf.add_(a)   # batched at the outer level
            buf.add_(b)   # then at the inner level too
            return buf
        made_outside_inner = torch.zeros(4, dtype=D)
        made_outside_inner.copy_(a)  # fresh for the outer level
        return ftrans.vmap(inner)(y) * made_outside_inner

    ref = torch.stack([torch.stack([(a + b) * a for b in y]) for a in x])
    torch.testing.assert_close(ftrans.vmap(outer)(x), ref)


def test_unwritten_fresh_tensor_stays_unbatched():
    def f(v):
        z = torch.ones(3)
        assert isinstance(z, torch.Tensor) and z.shape == (3,)
        return v + z, z

    out, z = ftrans.vmap(f, out_dims=(0, None))(torch.zeros(2, 3))
    assert torch.equal(out, torch.ones(2, 3)) and torch.equal(z, torch.ones(3))


def test_tensors_made_before_the_call_still_raise_and_are_not_mutated():
    x = torch.randn(4, 3)
    pre = torch.zeros(3)
    with pytest.raises(ftrans.VmapError, match="in place"):
        ftrans.vmap(lambda v: pre.add_(v))(x)
    assert torch.equal(pre, torch.zeros(3))

    def outer(a):
        made_outer = torch.zeros(3)
        return ftrans.vmap(lambda b: made_outer.add_(b))(x)  # exists before the inner call

    with pytest.raises(ftrans.VmapError, match="in place"):
        ftrans.vmap(outer)(x)


def test_write_through_a_live_view_of_a_fresh_tensor_explains():
    def f(v):
        out = torch.zeros(2, 3)
        row = out[0]
        row.add_(v)
        return out

    with pytest.raises(ftrans.VmapError, match="view of it is alive"):
        ftrans.vmap(f)(torch.randn(4, 3))


def test_factory_requires_grad_is_kept():
    def f(v):
        w = torch.ones(3, requires_grad=True)
        assert w.requires_grad and w.is_leaf
        return v * 2

    assert torch.equal(ftrans.vmap(f)(torch.ones(2, 3)), 2 * torch.ones(2, 3))
