"""Joins and masked writes: ``cat``, ``stack``, ``masked_fill`` (Tensor value, in place),
``masked_scatter`` and its backward.

``cat``/``stack`` front-batch every input (an unbatched one is expanded; the join copies
anyway) and join along ``dim + 1``.  ``cat`` keeps torch's legacy rule that skips 1-D empty
inputs, judged on logical shapes.

``masked_scatter`` looks data dependent (each example consumes a different number of source
elements) but its *output* has a fixed shape: the k-th True position of example b takes
element k of example b's flattened source.  A cumulative sum of the mask gives k for every
position, so the whole thing is one gather and one ``where`` over the batch.  Torch raises when
the mask has more True entries than the source has elements; checking that here would need a
per-example Python bool, so positions past the end repeat the last source element instead.
"""
from __future__ import annotations

import math

import torch

from ..errors import data_dependent
from ..registry import register_batch_rule
from ._util import batched_front, logical_rank, pad_rank, to_front, wrap_dim
from .index import is_inplace

aten = torch.ops.aten


def _logical_shape(t, b):
    s = tuple(t.shape)
    return s if b is None else s[:b] + s[b + 1:]


@register_batch_rule(aten.cat.default)
def cat_rule(level, func, args, bdims, kwargs):
    tensors = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    tb = bdims[0]
    B = level.batch_size
    pairs = [(t, b) for t, b in zip(tensors, tb) if _logical_shape(t, b) != (0,)]
    if not pairs:  # only legacy empties: the result is an empty 1-D tensor per example
        pairs = list(zip(tensors, tb))
    d = wrap_dim(dim, logical_rank(*pairs[0]))
    return func([batched_front(t, b, B) for t, b in pairs], d + 1), 0


@register_batch_rule(aten.stack.default)
def stack_rule(level, func, args, bdims, kwargs):
    tensors = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    B = level.batch_size
    d = wrap_dim(dim, logical_rank(tensors[0], bdims[0][0]) + 1)
    return func([batched_front(t, b, B) for t, b in zip(tensors, bdims[0])], d + 1), 0


def _align(x, b, rank):
    """Pointwise alignment: batched -> front + padded to ``rank``; unbatched -> as is."""
    return x if b is None else pad_rank(to_front(x, b), rank)


@register_batch_rule(aten.masked_fill.Tensor, aten.masked_fill_.Tensor, aten.masked_fill_.Scalar)
def masked_fill_rule(level, func, args, bdims, kwargs):
    x, mask, value = args[0], args[1], args[2]
    sbd, mbd = bdims[0], bdims[1]
    vbd = bdims[2] if isinstance(value, torch.Tensor) else None
    rank = max(logical_rank(x, sbd), logical_rank(mask, mbd))
    inplace = is_inplace(func)
    xf = to_front(x, sbd) if inplace else _align(x, sbd, rank)
    m = _align(mask, mbd, rank)
    if vbd is None:
        return func(xf, m, value), 0
    # A per-example fill value: masked_fill only takes a 0-dim value, so select with where.
    v = to_front(value, vbd).to(x.dtype).view((-1,) + (1,) * rank)
    out = aten.where.self(m, v, xf)
    if inplace:
        xf.copy_(out)
        return xf, 0
    return out, 0


def _masked_positions(m, B):
    """For each position of the flattened mask: its rank among the True ones (0-based)."""
    return m.reshape(B, -1).to(torch.long).cumsum(1) - 1


@register_batch_rule(aten.masked_scatter, aten.masked_scatter_)
def masked_scatter_rule(level, func, args, bdims, kwargs):
    x, mask, source = args[0], args[1], args[2]
    if mask.dtype != torch.bool:  # `where` below would take a uint8 mask; the op refuses it
        raise RuntimeError("masked_scatter_ only supports boolean masks")  # eager's words follow
    B = level.batch_size
    rank = max(logical_rank(x, bdims[0]), logical_rank(mask, bdims[1]))
    inplace = is_inplace(func)
    xf = to_front(x, bdims[0]) if inplace else pad_rank(batched_front(x, bdims[0], B), rank)
    m = pad_rank(batched_front(mask, bdims[1], B), rank)
    shape = xf.shape if inplace else torch.broadcast_shapes(xf.shape, m.shape)
    m = m.expand(shape)
    src = batched_front(source, bdims[2], B).reshape(B, -1)
    n_src = src.shape[1]
    if n_src == 0:
        out = xf.expand(shape).clone() if not inplace else xf
        return out, 0
    pos = _masked_positions(m, B).clamp_(0, n_src - 1)
    picked = aten.gather.default(src, 1, pos).view(shape)
    out = aten.where.self(m, picked.to(xf.dtype), xf)
    if inplace:
        xf.copy_(out)
        return xf, 0
    return out, 0


if hasattr(aten, "masked_scatter_backward"):
    @register_batch_rule(aten.masked_scatter_backward)
    def masked_scatter_backward_rule(level, func, args, bdims, kwargs):
        # The source gradient: example b's grad entries at its True positions, packed in order,
        # zero-padded to the source's size.  Positions that are False go to a dump column.
        grad, mask, sizes = args[0], args[1], list(args[2])
        B = level.batch_size
        rank = max(logical_rank(grad, bdims[0]), logical_rank(mask, bdims[1]))
        g = pad_rank(batched_front(grad, bdims[0], B), rank)
        m = pad_rank(batched_front(mask, bdims[1], B), rank)
        shape = torch.broadcast_shapes(g.shape, m.shape)
        g, m = g.expand(shape), m.expand(shape)
        n = math.prod(sizes)
        mflat = m.reshape(B, -1)
        target = torch.where(mflat, _masked_positions(m, B).clamp_(max=n), n)
        vals = torch.where(mflat, g.reshape(B, -1), 0)
        out = torch.zeros((B, n + 1), dtype=grad.dtype, device=grad.device)
        out = aten.scatter_add.default(out, 1, target, vals)
        return out[:, :n].reshape([B] + sizes), 0


@register_batch_rule(aten.masked_select.default)
def masked_select_rule(level, func, args, bdims, kwargs):
    """Static only when the mask is unbatched: every example then selects the same positions."""
    x, mask = args
    xb, mb = bdims
    if mb is not None:
        data_dependent(level, func._schema.name)
    B = level.batch_size
    x = to_front(x, xb)
    shape = torch.broadcast_shapes(tuple(x.shape[1:]), tuple(mask.shape))
    x = pad_rank(x, len(shape)).expand((B,) + tuple(shape))
    return x[(slice(None),) + (mask.expand(shape),)], 0
