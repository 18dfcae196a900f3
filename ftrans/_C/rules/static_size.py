"""Static-size versions of the data-dependent ops (``nonzero_static`` and ftrans's ``size=``
variants): the result is padded to a size given up front, so every example has the same shape
and the batch runs as a handful of native batched ops, never a per-example loop.

Each kernel takes ``lead`` leading batch dims and works along the flattened rest: the rule for
``aten.nonzero_static`` calls it on the physical tensor with the batch dim in front (``lead=1``);
the public functions in ``ftrans/static_shape.py`` call it on the logical tensor (``lead=0``),
where vmap batches each op inside by its own rule.

The common step is a stable compaction: ``argsort`` of ``~keep`` (stable) puts the kept
positions first, in order; the first ``size`` of them are the answer and positions past the
kept count are filled.
"""
from __future__ import annotations

import torch

from ..errors import data_dependent
from ..registry import register_batch_rule
from ._util import to_front

__all__ = ["nonzero_padded", "masked_select_padded", "unique_padded", "bincount_padded"]

aten = torch.ops.aten


def _compact(keep: torch.Tensor, size: int):
    """(positions of the True entries of ``keep`` along the last dim, first ``size`` of them,
    padded with 0; their count; a mask of the valid slots)."""
    n = keep.shape[-1]
    order = torch.argsort((~keep).to(torch.uint8), dim=-1, stable=True)
    k = min(size, n)
    idx = order[..., :k]
    if size > k:
        idx = torch.cat([idx, idx.new_zeros(idx.shape[:-1] + (size - k,))], dim=-1)
    count = keep.sum(-1)
    valid = torch.arange(size, device=keep.device) < count.unsqueeze(-1)
    return idx, count, valid


def nonzero_padded(x: torch.Tensor, size: int, fill_value: int = -1, lead: int = 0):
    """``[*lead, size, ndim]`` coordinates of the nonzero entries (row-major), and the count."""
    shape = tuple(x.shape[lead:])
    keep = (x != 0).reshape(tuple(x.shape[:lead]) + (-1,))
    idx, count, valid = _compact(keep, size)
    coords = []
    stride = 1
    for s in reversed(shape):
        # (a size-0 dim: no entry at all, every slot is filled; only avoid dividing by 0)
        coords.append((idx // stride) % max(s, 1))
        stride *= max(s, 1)
    coords = torch.stack(coords[::-1], dim=-1) if coords else idx.new_zeros(idx.shape + (0,))
    out = torch.where(valid.unsqueeze(-1), coords, torch.full((), fill_value, dtype=coords.dtype,
                                                              device=coords.device))
    return out, count


def masked_select_padded(x, mask, size: int, fill_value=0, lead: int = 0):
    x, mask = torch.broadcast_tensors(x, mask)
    flat_shape = tuple(x.shape[:lead]) + (-1,)
    idx, count, valid = _compact(mask.reshape(flat_shape), size)
    vals = x.reshape(flat_shape).gather(-1, idx)
    return torch.where(valid, vals, torch.full((), fill_value, dtype=vals.dtype,
                                               device=vals.device)), count


def unique_padded(x, size: int, fill_value=None, lead: int = 0):
    """(sorted unique values padded to ``size``, inverse indices (x's shape), counts, count)."""
    flat = x.reshape(tuple(x.shape[:lead]) + (-1,))
    s, perm = torch.sort(flat, dim=-1, stable=True)
    first = torch.ones_like(s[..., :1], dtype=torch.bool)
    is_new = torch.cat([first, s[..., 1:] != s[..., :-1]], dim=-1)
    group = torch.cumsum(is_new.to(torch.long), dim=-1) - 1
    idx, count, valid = _compact(is_new, size)
    vals = s.gather(-1, idx)
    fill = vals[..., :1] if fill_value is None else torch.full(
        (), fill_value, dtype=vals.dtype, device=vals.device)
    values = torch.where(valid, vals, fill)
    inverse = torch.empty_like(group).scatter(-1, perm, group).reshape(x.shape)
    counts = torch.zeros(tuple(group.shape[:-1]) + (size + 1,), dtype=torch.long,
                         device=x.device).scatter_add(-1, group.clamp(max=size),
                                                      torch.ones_like(group))[..., :size]
    return values, inverse, counts, count


def bincount_padded(x, weights, length: int, lead: int = 0):
    inside = (x >= 0) & (x < length)
    idx = torch.where(inside, x, length).long()
    if weights is None:
        src = torch.ones_like(idx)
        dtype = torch.long
    else:
        src = weights.to(torch.double) if not weights.is_floating_point() else weights
        dtype = src.dtype
    out = torch.zeros(tuple(idx.shape[:lead]) + (length + 1,), dtype=dtype, device=x.device)
    return out.scatter_add(-1, idx, src.to(dtype))[..., :length]


_nonzero_static = getattr(aten, "nonzero_static", None)
if _nonzero_static is not None:
    @register_batch_rule(_nonzero_static.default)
    def nonzero_static_rule(level, func, args, bdims, kwargs):
        x = to_front(args[0], bdims[0])
        out, _ = nonzero_padded(x, kwargs["size"], kwargs.get("fill_value", -1), lead=1)
        return out, 0


@register_batch_rule(aten.nonzero.default)
def nonzero_rule(level, func, args, bdims, kwargs):
    """``nonzero`` (and ``argwhere``, which calls it) when every example has the same number of
    nonzero entries: what a loop stacks, from one ``nonzero`` of the physical tensor (its rows
    come grouped by example, in order).  Examples that disagree get torch.func's refusal;
    ``ftrans.nonzero(x, size=)`` pads instead."""
    x = to_front(args[0], bdims[0])
    b = x.shape[0]
    counts = (x != 0).reshape(b, -1).sum(1)
    if b and bool((counts != counts[0]).any()):
        data_dependent(level, "aten::nonzero")  # torch.func's message and ftrans's hint
    coords = torch.nonzero(x)
    k = int(counts[0]) if b else 0
    return coords[:, 1:].reshape(b, k, x.dim() - 1), 0
