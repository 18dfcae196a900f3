"""Scatters and the dim-indexed writes: ``scatter*``, ``index_add/copy/fill/reduce``, the
``*_scatter`` ops and the backward ops of views (``select_backward``, ``slice_backward``...).

``scatter`` takes an index of the source's shape, so a batched index is just one more dim:
everything is front-batched (unbatched tensors expanded, which costs nothing) and the op runs
once with ``dim + 1``.  The ``index_*`` ops take a 1-D index shared by all rows, which cannot
carry a batch; with a batched index they are rewritten as the equivalent scatter (the index
broadcast along the other dims), which is exactly what a per-example index needs.

The view-backward ops create a zero tensor of the input's size and write the gradient into one
view of it; with the batch at the front that is the same op on ``[B, *input_sizes]``.
"""
from __future__ import annotations

import math

import torch

from ..registry import register_batch_rule
from ._util import batched_front, logical_rank, to_front, wrap_dim
from .index import is_inplace, lift0

aten = torch.ops.aten


def _self_front(func, x, bd, B):
    """In place: a view of the physical self (writes reach the user's tensor); else expanded."""
    return to_front(x, bd) if is_inplace(func) else batched_front(x, bd, B)


@register_batch_rule(aten.scatter, aten.scatter_, aten.scatter_add, aten.scatter_add_,
                     aten.scatter_reduce, aten.scatter_reduce_)
def scatter_rule(level, func, args, bdims, kwargs):
    x, dim, index = args[0], args[1], args[2]
    B = level.batch_size
    s_rank = logical_rank(x, bdims[0])
    d = wrap_dim(dim, s_rank)
    x = lift0(_self_front(func, x, bdims[0], B), s_rank)
    ix = lift0(batched_front(index, bdims[2], B), logical_rank(index, bdims[2]))
    rest = list(args[3:])
    if rest and isinstance(rest[0], torch.Tensor):
        rest[0] = lift0(batched_front(rest[0], bdims[3], B), logical_rank(rest[0], bdims[3]))
    out = func(x, d + 1, ix, *rest, **kwargs)
    return (out.squeeze(1) if s_rank == 0 else out), 0


# index_* op name -> the scatter op it becomes with a per-example index (out-of-place, in place)
_AS_SCATTER = {
    "aten::index_add": (aten.scatter_add.default, aten.scatter_add_.default),
    "aten::index_add_": (aten.scatter_add.default, aten.scatter_add_.default),
    "aten::index_copy": (aten.scatter.src, aten.scatter_.src),
    "aten::index_copy_": (aten.scatter.src, aten.scatter_.src),
    "aten::index_reduce": (aten.scatter_reduce.two, aten.scatter_reduce_.two),
    "aten::index_reduce_": (aten.scatter_reduce.two, aten.scatter_reduce_.two),
    "aten::index_fill": (aten.scatter.src, aten.scatter_.src),
    "aten::index_fill_": (aten.scatter.src, aten.scatter_.src),
}

_INDEX_OPS = [aten.index_add, aten.index_add_, aten.index_copy, aten.index_copy_,
              aten.index_fill, aten.index_fill_]
if hasattr(aten, "index_reduce"):
    _INDEX_OPS += [aten.index_reduce, aten.index_reduce_]


@register_batch_rule(*_INDEX_OPS)
def index_op_rule(level, func, args, bdims, kwargs):
    x, dim, index, other = args[0], args[1], args[2], args[3]
    B = level.batch_size
    name = func._schema.name
    fill = name.startswith("aten::index_fill")
    s_rank = logical_rank(x, bdims[0])
    d = wrap_dim(dim, s_rank)
    x = lift0(_self_front(func, x, bdims[0], B), s_rank)
    other_bd = bdims[3] if isinstance(other, torch.Tensor) else None
    if not fill:
        other = lift0(batched_front(other, other_bd, B), logical_rank(other, other_bd))
    if bdims[2] is None and not (fill and other_bd is not None):
        out = func(x, d + 1, index, other, *args[4:], **kwargs)
    else:
        # A per-example index (or fill value): the equivalent scatter, index broadcast along
        # the other dims of the source.
        idx = batched_front(index, bdims[2], B).reshape(B, -1)
        K = idx.shape[1]
        if fill:
            shape = list(x.shape)
            shape[d + 1] = K
            if isinstance(other, torch.Tensor):
                v = batched_front(other, other_bd, B) if other_bd is not None else other
                v = v.to(x.dtype)
                src = v.reshape(v.shape + (1,) * (len(shape) - v.dim())).expand(shape)
            else:
                src = torch.full((), other, dtype=x.dtype, device=x.device).expand(shape)
        else:
            src = other
            shape = list(src.shape)
            if name.startswith("aten::index_add"):
                alpha = kwargs.get("alpha", 1)
                if alpha != 1:
                    src = src * alpha
        rank = len(shape) - 1
        ix = idx.view((B,) + (1,) * d + (K,) + (1,) * (rank - d - 1)).expand(shape)
        op = _AS_SCATTER[name][is_inplace(func)]
        extra = args[4:5] if name.startswith("aten::index_reduce") else ()
        kw = {"include_self": kwargs["include_self"]} if "include_self" in kwargs else {}
        out = op(x, d + 1, ix, src, *extra, **kw)
    return (out.squeeze(1) if s_rank == 0 else out), 0


@register_batch_rule(aten.select_scatter)
def select_scatter_rule(level, func, args, bdims, kwargs):
    x, src, dim = args[0], args[1], args[2]
    B = level.batch_size
    d = wrap_dim(dim, logical_rank(x, bdims[0]))
    x, src = batched_front(x, bdims[0], B), batched_front(src, bdims[1], B)
    return func(x, src, d + 1, *args[3:], **kwargs), 0


@register_batch_rule(aten.slice_scatter)
def slice_scatter_rule(level, func, args, bdims, kwargs):
    x, src = args[0], args[1]
    dim = args[2] if len(args) > 2 else kwargs.pop("dim", 0)
    B = level.batch_size
    d = wrap_dim(dim, logical_rank(x, bdims[0]))
    x, src = batched_front(x, bdims[0], B), batched_front(src, bdims[1], B)
    return func(x, src, d + 1, *args[3:], **kwargs), 0


def _diag_dims(args, kwargs, first, rank):
    """(offset, dim1, dim2) of a diagonal op starting at ``args[first]``, dims shifted by one."""
    defaults = {"offset": 0, "dim1": 0, "dim2": 1}
    vals = []
    for i, name in enumerate(("offset", "dim1", "dim2")):
        j = first + i
        vals.append(args[j] if j < len(args) else kwargs.get(name, defaults[name]))
    off, d1, d2 = vals
    return off, wrap_dim(d1, rank) + 1, wrap_dim(d2, rank) + 1


@register_batch_rule(aten.diagonal_scatter)
def diagonal_scatter_rule(level, func, args, bdims, kwargs):
    x, src = args[0], args[1]
    B = level.batch_size
    off, d1, d2 = _diag_dims(args, kwargs, 2, logical_rank(x, bdims[0]))
    x, src = batched_front(x, bdims[0], B), batched_front(src, bdims[1], B)
    return func(x, src, off, d1, d2), 0


@register_batch_rule(aten.as_strided_scatter)
def as_strided_scatter_rule(level, func, args, bdims, kwargs):
    # Each example's logical self is cloned contiguous (storage offset 0) before the strided
    # write, so physically example b owns one contiguous block of n elements.
    x, src, size, stride = args[0], args[1], list(args[2]), list(args[3])
    offset = args[4] if len(args) > 4 else kwargs.get("storage_offset")
    B = level.batch_size
    out = batched_front(x, bdims[0], B).clone(memory_format=torch.contiguous_format)
    n = math.prod(out.shape[1:])
    view = out.as_strided([B] + size, [n] + stride, offset or 0)
    view.copy_(batched_front(src, bdims[1], B))
    return out, 0


# ---- backward ops of views: [B, *input_sizes] with dims shifted by one -----------------------

def _sizes_rule(dim_pos):
    def rule(level, func, args, bdims, kwargs):
        g = to_front(args[0], bdims[0])
        sizes = list(args[1])
        # A 0-d input (unfold of a scalar) acts as 1-d of size 1; the batch makes it 1-d.
        scalar = not sizes
        new = list(args)
        new[0] = g.unsqueeze(-1) if scalar else g  # its [1] output gains the window dim
        new[1] = [level.batch_size] + (sizes or [1])
        if dim_pos is not None:
            new[dim_pos] = wrap_dim(args[dim_pos], len(sizes)) + 1
        out = func(*new, **kwargs)
        return (out.view(level.batch_size) if scalar else out), 0

    return rule


register_batch_rule(aten.select_backward)(_sizes_rule(2))
register_batch_rule(aten.slice_backward)(_sizes_rule(2))
register_batch_rule(aten.unfold_backward)(_sizes_rule(2))


@register_batch_rule(aten.diagonal_backward)
def diagonal_backward_rule(level, func, args, bdims, kwargs):
    g = to_front(args[0], bdims[0])
    sizes = list(args[1])
    off, d1, d2 = _diag_dims(args, kwargs, 2, len(sizes))
    return func(g, [level.batch_size] + sizes, off, d1, d2), 0
