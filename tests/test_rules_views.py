"""Batching rules for view and shape ops (ftrans/_C/rules/views.py): each op is compared with the
per-example loop for every batch-dim placement, with the loop fallback forbidden; in-place view
ops must keep the logical shape right, and writes through views must reach the base."""
import pytest
import torch

import ftrans
from tests._helpers import check_nested_vmap, check_vmap, no_fallback

aten = torch.ops.aten
B = 3


def r(*shape, dtype=torch.float32):
    return torch.randn(B, *shape).to(dtype)


CASES = [
    ("view", lambda x: x.view(6, 2), (3, 4)),
    ("view_-1", lambda x: x.view(-1), (3, 4)),
    ("view_0dim", lambda x: x.view(1, 1), ()),
    ("view_dtype", lambda x: x.view(torch.int32), (3, 4)),
    ("reshape", lambda x: x.reshape(2, -1), (3, 4)),
    ("reshape_T", lambda x: x.t().reshape(-1), (3, 4)),
    ("_unsafe_view", lambda x: aten._unsafe_view(x.clone(), [12]), (3, 4)),
    ("_reshape_alias", lambda x: aten._reshape_alias(x.contiguous(), [4, 3], [3, 1]), (3, 4)),
    ("view_as", lambda x: x.view_as(torch.empty(2, 6)), (3, 4)),
    ("flatten", lambda x: x.flatten(1), (2, 3, 4)),
    ("unflatten", lambda x: x.unflatten(-1, (2, 2)), (3, 4)),
    ("permute", lambda x: x.permute(2, 0, 1), (2, 3, 4)),
    ("permute_neg", lambda x: x.permute(-1, -3, -2), (2, 3, 4)),
    ("transpose", lambda x: x.transpose(0, -1), (2, 3, 4)),
    ("transpose_0dim", lambda x: aten.transpose.int(x, 0, -1), ()),
    ("swapaxes", lambda x: x.swapaxes(0, 1), (2, 3)),
    ("t", lambda x: x.t(), (3, 4)),
    ("t_1d", lambda x: x.t(), (3,)),
    ("mT", lambda x: x.mT, (2, 3, 4)),
    ("expand", lambda x: x.expand(2, 3, 4), (3, 1)),
    ("expand_-1", lambda x: x.expand(-1, 5), (3, 1)),
    ("expand_0dim", lambda x: x.expand(2, 2), ()),
    ("expand_as", lambda x: x.expand_as(torch.empty(2, 3, 4)), (4,)),
    ("squeeze", lambda x: x.squeeze(), (1, 3, 1)),
    ("squeeze_dim", lambda x: x.squeeze(-1), (1, 3, 1)),
    ("squeeze_dims", lambda x: x.squeeze((0, 2)), (1, 3, 1)),
    ("squeeze_noop", lambda x: x.squeeze(1), (1, 3, 1)),
    ("squeeze_0dim", lambda x: x.squeeze(0), ()),
    ("unsqueeze", lambda x: x.unsqueeze(-1), (3, 4)),
    ("unsqueeze_0dim", lambda x: x.unsqueeze(0), ()),
    ("select", lambda x: x.select(1, -1), (3, 4)),
    ("index_int", lambda x: x[1], (3, 4)),
    ("slice", lambda x: x[:, 1:4:2], (3, 5)),
    ("slice_neg", lambda x: aten.slice.Tensor(x, -1, -3, None, 1), (3, 5)),
    ("narrow", lambda x: x.narrow(-1, 1, 2), (3, 5)),
    ("narrow_copy", lambda x: aten.narrow_copy(x, 0, 1, 2), (3, 5)),
    ("_reshape_copy", lambda x: aten._reshape_copy(x.t(), [-1]), (3, 5)),
    ("unbind", lambda x: x.unbind(-1), (3, 2)),
    ("split", lambda x: x.split(2, -1), (3, 5)),
    ("split_sizes", lambda x: x.split([1, 4], 1), (3, 5)),
    ("unsafe_split", lambda x: x.unsafe_split(2, 0), (3, 5)),
    ("unsafe_split_with_sizes", lambda x: x.unsafe_split_with_sizes([2, 1], 0), (3, 5)),
    ("chunk", lambda x: x.chunk(3, -1), (3, 5)),
    ("tensor_split", lambda x: x.tensor_split(2, 1), (3, 5)),
    ("unfold", lambda x: x.unfold(-1, 2, 1), (3, 5)),
    ("unfold_0dim", lambda x: x.unfold(0, 1, 1), ()),
    ("diagonal", lambda x: x.diagonal(1, -1, 0), (3, 4, 5)),
    ("diagonal_neg_offset", lambda x: x.diagonal(-1), (4, 3)),
    ("movedim", lambda x: x.movedim(0, -1), (2, 3, 4)),
    ("movedim_list", lambda x: x.movedim((0, 1), (-1, 0)), (2, 3, 4)),
    ("flip", lambda x: x.flip(0, -1), (3, 4)),
    ("flip_0dim", lambda x: x.flip(0), ()),
    ("fliplr", lambda x: x.fliplr(), (3, 4)),
    ("rot90", lambda x: x.rot90(1, (0, -1)), (3, 4)),
    ("roll", lambda x: x.roll(1, -1), (3, 4)),
    ("roll_multi", lambda x: x.roll((1, 2), (0, 1)), (3, 4)),
    ("roll_flat", lambda x: x.roll(2), (3, 4)),
    ("repeat", lambda x: x.repeat(2, 1, 3), (3, 4)),
    ("repeat_0dim", lambda x: x.repeat(2), ()),
    ("alias", lambda x: aten.alias(x), (3,)),
    ("detach", lambda x: x.detach(), (3,)),
    ("lift_fresh", lambda x: aten.lift_fresh(x), (3,)),
    ("diag_embed", lambda x: torch.diag_embed(x, 1, 0, -1), (2, 3)),
    ("diag_embed_default", lambda x: torch.diag_embed(x), (3,)),
    ("tril", lambda x: x.tril(-1), (2, 4, 4)),
    ("triu", lambda x: x.triu(1), (4, 3)),
    ("pixel_shuffle", lambda x: torch.pixel_shuffle(x, 2), (8, 2, 3)),
    ("pixel_unshuffle", lambda x: torch.pixel_unshuffle(x, 2), (2, 4, 6)),
    ("channel_shuffle", lambda x: torch.channel_shuffle(x, 2), (2, 4, 3)),
    ("native_channel_shuffle", lambda x: torch.native_channel_shuffle(x, 2), (2, 4, 3)),
    ("as_strided", lambda x: x.as_strided((2, 2), (1, 2)), (3, 4)),
    ("as_strided_offset", lambda x: x.as_strided((2,), (3,), x.storage_offset() + 1), (3, 4)),
    ("expand_copy", lambda x: aten.expand_copy(x, [2, 3]), (3,)),
    ("permute_copy", lambda x: aten.permute_copy(x, [1, 0]), (3, 4)),
    ("select_copy", lambda x: aten.select_copy(x, -1, 0), (3, 4)),
    ("transpose_copy", lambda x: aten.transpose_copy(x, 0, 1), (3, 4)),
    ("split_copy", lambda x: aten.split_copy(x, 2, 1), (3, 4)),
    ("unbind_copy", lambda x: aten.unbind_copy(x, 0), (3, 4)),
    ("view_copy", lambda x: aten.view_copy(x, [4, 3]), (3, 4)),
]


@pytest.mark.parametrize("fn,shape", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_view_op(fn, shape):
    check_vmap(fn, (r(*shape),))


def test_complex_views():
    z = torch.randn(B, 3, 2)
    check_vmap(lambda x: torch.view_as_real(torch.view_as_complex(x) * 2), (z,),
               all_placements=False)
    check_vmap(lambda x: torch.view_as_complex(x.contiguous()), (z,))
    c = torch.randn(B, 3, dtype=torch.complex64)
    check_vmap(torch.view_as_real, (c,))
    check_vmap(lambda x: x.real * 2 + x.imag, (c,))
    check_vmap(lambda x: x.conj().resolve_conj(), (c,))
    check_vmap(torch.view_as_real, (torch.randn(B, dtype=torch.complex64),))


@pytest.mark.parametrize("bdim", [0, 1, 2])
def test_inplace_view_ops_keep_shape(bdim):
    def f(x):
        x.unsqueeze_(0)
        s = [x.shape]
        x.unsqueeze_(-1)
        s.append(x.shape)
        x.squeeze_(0)
        s.append(x.shape)
        x.transpose_(0, -1)
        s.append(x.shape)
        x.squeeze_()
        s.append(x.shape)
        x.t_()
        s.append(x.shape)
        x.squeeze_(-1)
        s.append(x.shape)
        return x * 1, torch.tensor([len(t) for t in s]), torch.tensor([sum(t) for t in s])

    x = torch.randn(2, 3, 4).movedim(0, bdim)
    check_vmap(f, (x,), in_dims=bdim, all_placements=False)


def test_inplace_as_strided_and_t():
    def f(x):
        y = x.clone()
        y.as_strided_((2, 3), (1, 2))
        return y + 0

    check_vmap(f, (r(3, 2),))

    def g(x):
        y = x * 1
        y.t_()
        assert y.shape == (4, 3)
        return y

    check_vmap(g, (r(3, 4),))


def test_write_through_views_mutates_base():
    def f(x, y):
        x = x.clone()
        x[0].fill_(1)
        x.select(1, 2).copy_(y)
        x.narrow(1, 0, 1).mul_(2)
        x.t()[1].zero_()
        return x

    check_vmap(f, (r(3, 4), r(3)))
    check_vmap(f, (r(3, 4), torch.randn(3)), in_dims=(0, None))


def test_user_inplace_on_view_of_input():
    x = torch.randn(B, 3, 4)
    expected = x.clone()
    expected[:, 0] = 7.0
    with no_fallback():
        ftrans.vmap(lambda t: t[0].fill_(7.0))(x)
    torch.testing.assert_close(x, expected)


def test_nested_vmap_views():
    x = torch.randn(2, 3, 4, 5)
    fns = [lambda t: t.transpose(0, 1).reshape(-1), lambda t: t.unsqueeze(0).expand(2, 4, 5),
           lambda t: t.unbind(-1)[1], lambda t: t.movedim(0, 1)[1:].flip(0)]
    check_nested_vmap(fns, x)


def test_nested_inplace_view():
    x = torch.randn(2, 3, 4)

    def f(t):
        t = t.clone()
        t.unsqueeze_(0)
        assert t.shape == (1, 4)
        t.squeeze_(0)
        t.t_()
        return t

    with no_fallback():
        got = ftrans.vmap(ftrans.vmap(f), in_dims=1)(x)
    torch.testing.assert_close(got, x.transpose(0, 1))


COVERED = [
    "view.default", "view.dtype", "_unsafe_view.default", "_reshape_alias.default",
    "reshape.default", "view_as.default", "permute.default", "transpose.int", "t.default",
    "expand.default", "squeeze.default", "squeeze.dim", "squeeze.dims", "unsqueeze.default",
    "select.int", "slice.Tensor", "narrow.default", "unbind.int", "split.Tensor",
    "split_with_sizes.default", "unsafe_split.Tensor", "unsafe_split_with_sizes.default",
    "chunk.default", "unfold.default", "diagonal.default", "movedim.int", "movedim.intlist",
    "flip.default", "roll.default", "repeat.default", "alias.default", "detach.default",
    "view_as_real.default", "view_as_complex.default", "as_strided.default",
    "expand_copy.default", "permute_copy.default", "squeeze_.default", "squeeze_.dim",
    "squeeze_.dims", "unsqueeze_.default", "t_.default", "transpose_.default",
    "as_strided_.default", "lift_fresh.default", "pixel_shuffle.default",
    "pixel_unshuffle.default", "diag_embed.default", "tril.default", "triu.default",
    "tril_.default", "triu_.default", "channel_shuffle.default", "rot90.default",
    "narrow_copy.default", "_reshape_copy.default",
]


@pytest.mark.parametrize("name", COVERED)
def test_op_status_is_rule(name):
    packet, _, overload = name.partition(".")
    assert ftrans.op_status(getattr(getattr(aten, packet), overload)) == "rule"


def test_inplace_transpose_noop_swaps_and_scalar_examples():
    x = torch.randn(3)
    out = ftrans.vmap(lambda t: t.clone().transpose_(0, 0))(x)
    torch.testing.assert_close(out, x)
    y = torch.randn(3, 4, 5)
    out = ftrans.vmap(lambda t: t.clone().transpose_(1, -1))(y)
    assert out.shape == (3, 4, 5)
    torch.testing.assert_close(out, y)
