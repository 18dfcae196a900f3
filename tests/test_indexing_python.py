"""Python indexing (``x[i]``, ``x[..., i] = v``) with per-example 0-dim integer indices."""
import pytest
import torch
import torch.func

import ftrans
from _helpers import no_fallback

X = torch.randn(4, 5, 6)
I = torch.tensor([0, 2, 1, 3])


@pytest.mark.parametrize("f", [
    lambda t, j: t[j],
    lambda t, j: t[:, j],
    lambda t, j: t[..., j],
    lambda t, j: t[None, 1:, j],
    lambda t, j: t[j, j],
    lambda t, j: t[j, 1:3],
])
def test_getitem_matches_torch_func(f):
    with no_fallback():
        got = ftrans.vmap(f)(X, I)
    torch.testing.assert_close(got, torch.func.vmap(f)(X, I))


def test_unbatched_table_batched_index():
    table = torch.randn(7, 3)
    torch.testing.assert_close(ftrans.vmap(lambda j: table[j])(I), table[I])


def test_setitem_scalar_and_tensor():
    def g(t, j):
        t = t.clone()
        t[j] = 0.5
        return t

    def g2(t, j):
        t = t.clone()
        t[:, j] = torch.arange(5.0)
        return t

    for fn in (g, g2):
        torch.testing.assert_close(ftrans.vmap(fn)(X, I), torch.func.vmap(fn)(X, I))


def test_setitem_batched_into_unbatched_raises():
    buf = torch.zeros(5)

    def g(j):
        buf[j] = 1.0
        return buf

    with pytest.raises(RuntimeError, match="in place"):
        ftrans.vmap(g)(I)
    assert torch.equal(buf, torch.zeros(5))


def test_gradient_through_batched_index():
    x = torch.randn(4, 5, 6)
    g = ftrans.vmap(ftrans.grad(lambda t, j: t[j].sin().sum()))(x, I)
    # torch.func raises here (it calls .item() on the index); compare with a loop
    ref = torch.zeros_like(x)
    for b in range(4):
        ref[b, I[b]] = x[b, I[b]].cos()
    torch.testing.assert_close(g, ref)
