"""Static-size data-dependent ops (ftrans.nonzero/argwhere/unique/masked_select/bincount with
size=, torch.nonzero_static) under vmap: equal to a per-example loop of torch's own op, padded,
and batched natively (no per-example loop fallback)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import ftrans
from _helpers import no_fallback


def _pad(t, size, fill, dim=0):
    t = t.narrow(dim, 0, min(size, t.shape[dim]))
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.full(shape, fill, dtype=t.dtype)], dim)


def _sparse(g, shape, p=0.5):
    return torch.where(torch.rand(shape, generator=g) < p, torch.randn(shape, generator=g), 0.0)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=0, max_size=3), st.integers(0, 12),
       st.integers(0, 2 ** 16))
def test_nonzero_argwhere_and_nonzero_static_equal_loop(shape, size, seed):
    g = torch.Generator().manual_seed(seed)
    x = _sparse(g, [3] + shape)
    ref = torch.stack([_pad(torch.nonzero(r), size, -1) for r in x])
    cnt = torch.tensor([int((r != 0).sum()) for r in x])
    with no_fallback():
        out, n = ftrans.vmap(lambda r: ftrans.nonzero(r, size=size, return_count=True))(x)
        assert torch.equal(out, ref) and torch.equal(n, cnt)
        assert torch.equal(ftrans.vmap(lambda r: ftrans.argwhere(r, size=size))(x), ref)
        if shape:  # batch dim elsewhere than 0
            xm = x.movedim(0, -1)
            out = ftrans.vmap(lambda r: torch.nonzero_static(r, size=size, fill_value=7),
                              in_dims=-1)(xm)
            ref7 = torch.stack([_pad(torch.nonzero(r), size, 7) for r in x])
            assert torch.equal(out, ref7)
    assert ftrans.op_status(torch.ops.aten.nonzero_static.default) == "rule"


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 12), st.integers(0, 14), st.integers(0, 2 ** 16))
def test_unique_with_counts_and_inverse_equals_loop(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 5, (4, n), generator=g)
    with no_fallback():
        vals, inv, counts, k = ftrans.vmap(lambda r: ftrans.unique(
            r, size=size, fill_value=-1, return_inverse=True, return_counts=True,
            return_count=True))(x)
    for i in range(4):
        rv, ri, rc = torch.unique(x[i], return_inverse=True, return_counts=True)
        assert int(k[i]) == rv.numel()
        assert torch.equal(vals[i], _pad(rv, size, -1))
        assert torch.equal(counts[i], _pad(rc, size, 0))
        assert torch.equal(inv[i], ri)
    # default fill: the smallest value, as jax.numpy.unique
    out = ftrans.vmap(lambda r: ftrans.unique(r, size=size))(x)
    for i in range(4):
        rv = torch.unique(x[i])
        fill = int(rv[0])
        assert torch.equal(out[i], _pad(rv, size, fill))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 10), st.integers(0, 12), st.integers(0, 2 ** 16))
def test_masked_select_equals_loop_and_is_differentiable(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    with no_fallback():
        out, k = ftrans.vmap(lambda r: ftrans.masked_select(r, r > 0, size=size, fill_value=0.5,
                                                            return_count=True))(x)
    for i in range(3):
        ref = torch.masked_select(x[i], x[i] > 0)
        assert torch.equal(out[i], _pad(ref, size, 0.5)) and int(k[i]) == ref.numel()
    grads = ftrans.vmap(ftrans.grad(lambda r: ftrans.masked_select(r, r > 0, size=size)
                                    .pow(2).sum()))(x)
    ref = torch.stack([torch.func.grad(lambda r: torch.masked_select(r, r > 0)[:size].pow(2)
                                       .sum())(r) for r in x])
    torch.testing.assert_close(grads, ref)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 10), st.integers(1, 8), st.booleans(), st.integers(0, 2 ** 16))
def test_bincount_with_length_equals_loop(n, length, weighted, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 8, (4, n), generator=g)
    w = torch.rand(4, n, generator=g) if weighted else None
    with no_fallback():
        if weighted:
            out = ftrans.vmap(lambda r, q: ftrans.bincount(r, q, length=length))(x, w)
        else:
            out = ftrans.vmap(lambda r: ftrans.bincount(r, length=length))(x)
    for i in range(4):
        keep = x[i] < length
        ref = torch.bincount(x[i][keep], None if w is None else w[i][keep], minlength=length)
        assert out.dtype == (torch.float32 if weighted else torch.long)
        torch.testing.assert_close(out[i], ref[:length].to(out.dtype))  # (torch: int64 if empty)


def test_static_size_outside_vmap_and_errors():
    x = torch.tensor([0.0, 2.0, 0.0, 3.0])
    assert torch.equal(ftrans.nonzero(x), torch.nonzero(x))
    assert torch.equal(ftrans.nonzero(x, size=3, as_tuple=True)[0], torch.tensor([1, 3, -1]))
    assert torch.equal(ftrans.unique(torch.tensor([2, 1, 2])), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="size"):
        ftrans.nonzero(x, size=-1)
    with pytest.raises(TypeError, match="length"):
        ftrans.bincount(torch.tensor([1]), length=2.0)
    with pytest.raises(RuntimeError, match="1-d"):
        ftrans.bincount(torch.tensor([[1]]), length=2)
    with pytest.raises(ftrans.VmapError, match="data-dependent"):  # without size: refused
        ftrans.vmap(ftrans.nonzero)(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))  # (counts differ)


@pytest.mark.parametrize("fn", [torch.nonzero, torch.argwhere], ids=["nonzero", "argwhere"])
@pytest.mark.parametrize("shape", [(4, 5), (3, 2, 4), (6,), (0, 3), (3, 0)])
def test_nonzero_with_agreeing_counts_is_batched_like_a_loop(fn, shape):
    # every example has the same number of nonzero entries: what a loop stacks (torch.func's
    # argwhere does the same through its per-example fallback), from one nonzero of the batch
    g = torch.Generator().manual_seed(0)
    base = (torch.rand(shape, generator=g) > 0.5).float()
    perms = [torch.randperm(base.numel(), generator=g) for _ in range(5)]
    x = torch.stack([base.reshape(-1)[p].reshape(shape) for p in perms])  # same count each
    with no_fallback():
        got = ftrans.vmap(fn)(x)
    torch.testing.assert_close(got, torch.stack([fn(e) for e in x]))
    scalars = torch.tensor([1.0, 2.0, 3.0])  # 0-dim examples
    torch.testing.assert_close(ftrans.vmap(fn)(scalars), torch.stack([fn(e) for e in scalars]))
    with pytest.raises(RuntimeError, match="output dynamic shape"):
        ftrans.vmap(fn)(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))


def test_nonzero_static_of_an_empty_example():
    for shape in ((0, 5), (5, 0), (2, 0, 3)):
        out = ftrans.vmap(lambda t: torch.nonzero_static(t, size=3))(torch.zeros(2, *shape))
        torch.testing.assert_close(out, torch.full((2, 3, len(shape)), -1, dtype=torch.long))
