"""Batching rules for copies, fills and factories (ftrans/_C/rules/factory.py): values against the
per-example loop, plus the *logical* layout promises (a contiguous or channels_last clone is
contiguous / channels_last per example) and the batched-or-not status of the results."""
import pytest
import torch

import ftrans
from ftrans._C.batched import BatchedTensor
from tests._helpers import check_vmap, no_fallback

aten = torch.ops.aten
B = 3


def r(*shape):
    return torch.randn(B, *shape)


CASES = [
    ("clone", lambda x: x.clone()),
    ("clone_contig", lambda x: x.clone(memory_format=torch.contiguous_format)),
    ("clone_preserve", lambda x: x.transpose(0, 1).clone(memory_format=torch.preserve_format)),
    ("contiguous", lambda x: x.t().contiguous()),
    ("lift_fresh_copy", lambda x: aten.lift_fresh_copy(x)),
    ("to_dtype", lambda x: x.to(torch.float64)),
    ("to_int", lambda x: (x * 10).to(torch.int32)),
    ("_to_copy", lambda x: aten._to_copy(x, dtype=torch.float16)),
    ("double", lambda x: x.double()),
    ("empty_like_shape", lambda x: torch.empty_like(x).fill_(2) + x),
    ("zeros_like", lambda x: torch.zeros_like(x) + x),
    ("ones_like", lambda x: torch.ones_like(x, dtype=torch.float64)),
    ("full_like", lambda x: torch.full_like(x, 3.5)),
    ("new_zeros", lambda x: x.new_zeros(2, 3) + x.sum()),
    ("new_ones", lambda x: x.new_ones(4) * x[0]),
    ("new_full", lambda x: x.new_full((2,), 7.0) + x[0, 0]),
    ("new_empty", lambda x: x.new_empty(4).fill_(1) * x[1]),
    ("new_empty_strided", lambda x: x.new_empty_strided((2, 2), (1, 2)).fill_(1) + x[0, :2]),
    ("fill_", lambda x: x.clone().fill_(2.0)),
    ("fill_tensor_", lambda x: x.clone().fill_(x[0, 0])),
    ("fill_tensor_unbatched", lambda x: x.clone().fill_(torch.tensor(4.0))),
    ("zero_", lambda x: x.clone().zero_() + 1),
    ("fill", lambda x: aten.fill.Scalar(x, 2.0)),
    ("fill_T", lambda x: aten.fill.Tensor(x, x[1, 1])),
    ("zero", lambda x: aten.zero(x)),
    ("copy_", lambda x: torch.zeros_like(x).copy_(x.flip(0))),
    ("copy_bcast", lambda x: torch.zeros_like(x).copy_(x[0])),
    ("copy_dtype", lambda x: torch.zeros_like(x, dtype=torch.float64).copy_(x)),
    ("copy_functional", lambda x: aten.copy(x, x[0] * 2)),
    ("copy_functional_src", lambda x: aten.copy(torch.zeros(3, 4), x)),
]


@pytest.mark.parametrize("fn", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_factory_op(fn):
    check_vmap(fn, (r(3, 4),))


def test_copy_into_batched_from_unbatched_and_back():
    y = torch.randn(4)
    check_vmap(lambda x, t: x.clone().copy_(t), (r(3, 4), y), in_dims=(0, None))
    check_vmap(lambda x, t: torch.empty_like(x).copy_(t), (r(3, 4), r(4)))
    check_vmap(lambda x, t: aten.copy(x, t), (r(3, 4), torch.randn(3, 4)), in_dims=(0, None))
    check_vmap(lambda x, t: aten.fill.Tensor(t, x[0, 0]), (r(3, 4), torch.randn(2)),
               in_dims=(0, None))
    with pytest.raises(RuntimeError, match="in place"):
        ftrans.vmap(lambda x, t: t.copy_(x), in_dims=(0, None))(r(4), torch.zeros(4))


def _layout(fn, x, in_dim):
    """Per-example (is_contiguous, is channels_last) seen *inside* vmap."""
    seen = []

    def probe(t):
        out = fn(t)
        seen.append((out.is_contiguous(), out.is_contiguous(memory_format=torch.channels_last),
                     out.shape))
        return out

    with no_fallback():
        got = ftrans.vmap(probe, in_dims=in_dim)(x)
    return seen[0], got


@pytest.mark.parametrize("in_dim", [0, 2, 4])
def test_clone_memory_format_is_logical(in_dim):
    x = torch.randn(2, 3, 4, 5, 6).movedim(0, in_dim)
    ref = torch.stack([x.select(in_dim, i) for i in range(x.shape[in_dim])])
    (contig, _, _), got = _layout(lambda t: t.clone(memory_format=torch.contiguous_format), x,
                                  in_dim)
    assert contig
    torch.testing.assert_close(got, ref)
    (_, cl, _), got = _layout(lambda t: t.clone(memory_format=torch.channels_last), x, in_dim)
    assert cl
    torch.testing.assert_close(got, ref)
    (contig, _, _), got = _layout(lambda t: t.contiguous(), x, in_dim)
    assert contig
    (_, cl, _), got = _layout(lambda t: t.to(memory_format=torch.channels_last), x, in_dim)
    assert cl
    (_, cl, _), got = _layout(lambda t: torch.empty_like(t, memory_format=torch.channels_last)
                              .copy_(t), x, in_dim)
    assert cl
    torch.testing.assert_close(got, ref)


def test_channels_last_needs_rank_4():
    with pytest.raises(RuntimeError, match="rank 4"):
        ftrans.vmap(lambda t: t.clone(memory_format=torch.channels_last))(r(3, 4))


def test_factories_of_batched_are_batched_like_torch_func():
    kinds = {}

    def f(x):
        kinds["new"] = type(x.new_zeros(2)) is BatchedTensor
        kinds["strided"] = type(x.new_empty_strided((2, 2), (1, 2))) is BatchedTensor
        kinds["like"] = type(torch.zeros_like(x)) is BatchedTensor
        return x

    ftrans.vmap(f)(r(3))
    assert kinds == {"new": True, "strided": True, "like": True}


def test_new_zeros_buffer_takes_batched_writes():
    # The pattern of torch's as_strided backward: a new_zeros buffer written in place.
    def f(x):
        buf = x.new_zeros(6)
        buf.as_strided((2, 2), (1, 2)).copy_(x[:2, :2])
        return buf

    check_vmap(f, (r(3, 4),))
    g = lambda t: t.as_strided((2, 2), (1, 2)).pow(2).sum()  # noqa: E731
    x = torch.randn(B, 4, 5)
    expected = torch.stack([torch.func.grad(g)(x[i]) for i in range(B)])
    with no_fallback():
        got = ftrans.vmap(ftrans.grad(g))(x)
    torch.testing.assert_close(got, expected)


def test_nested_factories():
    x = torch.randn(2, 3, 4)

    def f(t):
        z = torch.zeros_like(t)
        z.copy_(t * 2)
        z[0].fill_(t[1])
        return z.clone(memory_format=torch.contiguous_format) + t.new_ones(4)

    expected = torch.stack([torch.stack([f(x[i, j]) for j in range(3)]) for i in range(2)])
    with no_fallback():
        got = ftrans.vmap(ftrans.vmap(f))(x)
        got2 = ftrans.vmap(ftrans.vmap(f), in_dims=1)(x.transpose(0, 1))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got2, expected)


COVERED = [
    "clone.default", "contiguous.default", "_to_copy.default", "lift_fresh_copy.default",
    "copy_.default", "copy.default", "fill_.Scalar", "fill_.Tensor", "fill.Scalar",
    "fill.Tensor", "zero_.default", "zero.default", "new_empty.default", "new_zeros.default",
    "new_ones.default", "new_full.default", "new_empty_strided.default", "empty_like.default",
    "zeros_like.default", "ones_like.default", "full_like.default",
]


@pytest.mark.parametrize("name", COVERED)
def test_op_status_is_rule(name):
    packet, _, overload = name.partition(".")
    assert ftrans.op_status(getattr(getattr(aten, packet), overload)) == "rule"
