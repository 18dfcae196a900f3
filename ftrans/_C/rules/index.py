"""Advanced indexing and gathers: ``index``, ``index_put``, ``index_select``, ``gather``,
``take``, ``put``.

Every rule lowers to ONE call of the same native op on front-batched tensors.  The two tricks:

- a batched index tensor gets a companion ``arange(B)`` index for the batch dim, so one
  advanced-indexing call picks example ``b``'s entries from example ``b``'s slice;
- an unbatched index with a batched ``self`` gets a leading ``None`` (a full slice) instead.

Advanced indexing has layout rules that the batch dim must survive: the broadcast index dims
replace the indexed dims in place when the index tensors are adjacent, and go to the front when
they are not.  Adding a batch index/slice can change adjacency, so the rules below work out
where the physical result's batch dim and index dims land and move them back (views only).
``index_put`` needs the inverse permutation on ``values``.

Boolean masks are data dependent when batched (each example selects a different number of
elements) and raise; an unbatched mask is the same for every example, so it is turned into
its ``nonzero()`` long indices and handled like any other index.  One batched-mask case has a
fixed-shape result and is supported: ``x[mask] = v`` with ``v`` broadcasting over the selected
elements, which is a ``where``.
"""
from __future__ import annotations

import math

import torch

from ..errors import data_dependent
from ..registry import register_batch_rule
from ._util import batched_front, logical_rank, pad_rank, to_front, wrap_dim

aten = torch.ops.aten

__all__ = ["is_inplace", "lift0", "index_rule", "index_put_rule"]


def is_inplace(func) -> bool:
    arg = func._schema.arguments[0]
    return arg.alias_info is not None and arg.alias_info.is_write


def lift0(x, logical_rank_):
    """A front-batched logical 0-dim tensor viewed as logical 1-dim (many kernels need a dim)."""
    return x.unsqueeze(1) if logical_rank_ == 0 else x


def _expand_masks(level, func, indices, ibd):
    """Bool/uint8 masks -> long indices (unbatched masks only: batched ones are data dependent)."""
    if not any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
        return list(indices), list(ibd)
    new_idx, new_bd = [], []
    for t, b in zip(indices, ibd):
        if t is not None and t.dtype in (torch.bool, torch.uint8):
            if b is not None:
                data_dependent(level, func._schema.name, "boolean-mask indexing `x[mask]`")
            if t.dim() == 0:
                # x[True] / x[False]: inserts a dim of size 1 / 0; rare enough to go the slow way.
                raise NotImplementedError("vmap: indexing with a 0-dim boolean mask")
            new_idx.extend(t.nonzero().unbind(1))
            new_bd.extend([None] * t.dim())
        else:
            new_idx.append(t)
            new_bd.append(b)
    return new_idx, new_bd


class _Plan:
    """How the physical indexing call is laid out relative to the logical one."""

    __slots__ = ("indices", "batched_index", "n_idx", "first", "adjacent", "n_indexed")


def _plan(level, func, indices, ibd, device) -> _Plan:
    indices, ibd = _expand_masks(level, func, indices, ibd or (None,) * len(indices))
    p = _Plan()
    pos = [i for i, t in enumerate(indices) if t is not None]
    p.n_indexed = len(pos)
    p.first = pos[0] if pos else 0
    p.adjacent = not pos or pos[-1] - pos[0] + 1 == len(pos)
    p.n_idx = max((logical_rank(t, b) for t, b in zip(indices, ibd) if t is not None),
                  default=0)
    p.batched_index = any(b is not None for b in ibd)
    if not p.batched_index:
        p.indices = [None] + indices
        return p
    B = level.batch_size
    phys = []
    for t, b in zip(indices, ibd):
        phys.append(t if b is None else pad_rank(to_front(t, b), p.n_idx))
    ar = torch.arange(B, device=device).view((B,) + (1,) * p.n_idx)
    p.indices = [ar] + phys
    return p


def _phys_to_logical(out, p: _Plan):
    """(out, bdim) with out's dims in logical order around the batch dim."""
    if not p.batched_index:
        # [None, *idx]: adjacent idx stay adjacent (batch first); otherwise index dims go first.
        return out, (0 if p.adjacent else p.n_idx)
    if p.adjacent and p.first > 0:
        # arange at 0 and idx at first+1 are not adjacent: result is [B, *R, before, after].
        r = p.n_idx
        out = out.movedim(tuple(range(1, 1 + r)), tuple(range(1 + p.first, 1 + p.first + r)))
    return out, 0


@register_batch_rule(aten.index.Tensor, aten._unsafe_index.Tensor)
def index_rule(level, func, args, bdims, kwargs):
    x, indices = args[0], args[1]
    p = _plan(level, func, indices, bdims[1], x.device)
    if p.n_indexed == 0:
        return to_front(x, bdims[0]).clone(), 0
    if p.batched_index:
        x = batched_front(x, bdims[0], level.batch_size)
    else:
        x = to_front(x, bdims[0])
    return _phys_to_logical(func(x, p.indices), p)


def _values_layout(values, vbd, p: _Plan, self_rank):
    """``values`` laid out like the physical indexing result (size-1 batch if unbatched)."""
    v = values.unsqueeze(0) if vbd is None else to_front(values, vbd)
    out_rank = p.n_idx + self_rank - p.n_indexed
    extra = (v.dim() - 1) - out_rank
    if extra > 0:  # values may carry leading size-1 dims beyond the indexing result's rank
        v = v.reshape((v.shape[0],) + tuple(v.shape[1 + extra:]))
    v = pad_rank(v, out_rank)
    r = p.n_idx
    if not p.batched_index:
        return v if p.adjacent else v.movedim(0, r)
    if p.adjacent and p.first > 0:
        return v.movedim(tuple(range(1 + p.first, 1 + p.first + r)), tuple(range(1, 1 + r)))
    return v


_INDEX_PUT = [aten.index_put, aten.index_put_, aten._index_put_impl_, aten._index_put_impl]
if hasattr(aten, "_unsafe_index_put"):
    _INDEX_PUT.append(aten._unsafe_index_put)


def _batched_mask_put(level, func, args, bdims, mask_pos):
    """``x[mask] = v`` with a per-example mask: a ``where`` when ``v`` does not depend on how
    many elements each example selects (it broadcasts to the unmasked trailing dims)."""
    x, indices, values = args[0], args[1], args[2]
    accumulate = args[3] if len(args) > 3 else False
    B = level.batch_size
    ibd = bdims[1]
    mask, mbd = indices[mask_pos], ibd[mask_pos]
    self_rank, m_rank = logical_rank(x, bdims[0]), logical_rank(mask, mbd)
    rest = self_rank - mask_pos - m_rank
    vbd = bdims[2]
    v_rank = logical_rank(values, vbd)
    if any(t is not None for i, t in enumerate(indices) if i != mask_pos) or v_rank > rest:
        data_dependent(level, func._schema.name, "boolean-mask indexing `x[mask] = v` with more "
                       "than one value per selected element")
    inplace = is_inplace(func)
    xf = to_front(x, bdims[0]) if inplace else batched_front(x, bdims[0], B)
    m = to_front(mask, mbd).to(torch.bool)
    m = m.view((B,) + (1,) * mask_pos + tuple(m.shape[1:]) + (1,) * rest)
    v = values.unsqueeze(0) if vbd is None else to_front(values, vbd)
    v = pad_rank(v, self_rank).to(xf.dtype)
    out = xf + torch.where(m, v, 0) if accumulate else aten.where.self(m, v, xf)
    if inplace:
        xf.copy_(out)
        return xf, 0
    return out, 0


@register_batch_rule(*_INDEX_PUT)
def index_put_rule(level, func, args, bdims, kwargs):
    x, indices, values = args[0], args[1], args[2]
    for i, (t, b) in enumerate(zip(indices, bdims[1] or ())):
        if b is not None and t is not None and t.dtype in (torch.bool, torch.uint8):
            return _batched_mask_put(level, func, args, bdims, i)
    self_rank = logical_rank(x, bdims[0])
    x = to_front(x, bdims[0]) if is_inplace(func) else batched_front(x, bdims[0],
                                                                      level.batch_size)
    p = _plan(level, func, indices, bdims[1], x.device)
    if p.n_indexed == 0:
        p.indices = [None] * (self_rank + 1)
    v = _values_layout(values, bdims[2], p, self_rank)
    return func(x, p.indices, v, *args[3:], **kwargs), 0


@register_batch_rule(aten.index_select)
def index_select_rule(level, func, args, bdims, kwargs):
    x, dim, index = args[0], args[1], args[2]
    sbd, ibd = bdims[0], bdims[2]
    s_rank = logical_rank(x, sbd)
    d = wrap_dim(dim, s_rank)
    B = level.batch_size
    if s_rank == 0:
        # A 0-dim self yields a 0-dim result: it is a gather of one element.
        x = batched_front(x, sbd, B).unsqueeze(1)
        ix = batched_front(index, ibd, B).reshape(B, 1)
        return aten.gather.default(x, 1, ix).squeeze(1), 0
    if ibd is None:
        return func(to_front(x, sbd), d + 1, index), 0
    idx = to_front(index, ibd).reshape(B, -1)  # a 0-dim index selects one
    K = idx.shape[1]
    if sbd is None:
        # One selection of all examples' indices, then split the selected dim into (B, K).
        out = func(x, d, idx.reshape(-1))
        return out.unflatten(d, (B, K)), d
    x = to_front(x, sbd)
    shape = list(x.shape)
    shape[d + 1] = K
    ix = idx.view((B,) + (1,) * d + (K,) + (1,) * (s_rank - d - 1)).expand(shape)
    return aten.gather.default(x, d + 1, ix), 0


@register_batch_rule(aten.gather)
def gather_rule(level, func, args, bdims, kwargs):
    x, dim, index = args[0], args[1], args[2]
    B = level.batch_size
    s_rank, i_rank = logical_rank(x, bdims[0]), logical_rank(index, bdims[2])
    d = wrap_dim(dim, s_rank)
    x = lift0(batched_front(x, bdims[0], B), s_rank)
    ix = lift0(batched_front(index, bdims[2], B), i_rank)
    out = func(x, d + 1, ix, *args[3:], **kwargs)
    return (out.squeeze(1) if i_rank == 0 else out), 0


def _flat_offsets(ix, n, B):
    """Per-example linear indices (negative ones wrapped) shifted into example b's block."""
    ix = torch.where(ix < 0, ix + n, ix)
    offs = torch.arange(B, device=ix.device, dtype=ix.dtype) * n
    return ix + offs.view((B,) + (1,) * (ix.dim() - 1))


@register_batch_rule(aten.take)
def take_rule(level, func, args, bdims, kwargs):
    x, index = args[0], args[1]
    sbd, ibd = bdims[0], bdims[1]
    if sbd is None:
        return func(x, index), ibd  # the result has the index's shape, batch dim included
    B = level.batch_size
    x = to_front(x, sbd)
    n = math.prod(x.shape[1:])
    ix = batched_front(index, ibd, B)
    return func(x, _flat_offsets(ix, n, B)), 0


@register_batch_rule(aten.put, aten.put_)
def put_rule(level, func, args, bdims, kwargs):
    x, index, source = args[0], args[1], args[2]
    B = level.batch_size
    x = to_front(x, bdims[0]) if is_inplace(func) else batched_front(x, bdims[0], B)
    n = math.prod(x.shape[1:])
    ix = _flat_offsets(batched_front(index, bdims[1], B), n, B)
    src = batched_front(source, bdims[2], B)
    return func(x, ix, src, *args[3:], **kwargs), 0


# ----------------------------------------------------------------------------------------------
# searchsorted / bucketize
# ----------------------------------------------------------------------------------------------
# searchsorted accepts one 1-D sorted sequence for values of any shape, or an N-D stack of
# sequences whose leading dims match the values': a per-example sequence is the N-D form with
# the batch as one more leading dim (values flattened to [B, M] when the sequence was 1-D).

def _search(B, seq, sb, vals, vb, sorter, sorterb, kw):
    if sb is None and sorterb is None and seq.dim() == 1:
        # One sequence for every example: values of any shape, batch dim anywhere (torch
        # copies non-contiguous values anyway, and warns).
        return aten.searchsorted.Tensor(seq, vals.contiguous(), sorter=sorter, **kw), vb
    rank = seq.dim() - (sb is not None)
    seq = batched_front(seq, sb, B).contiguous()
    if sorter is not None:
        sorter = batched_front(sorter, sorterb, B).contiguous()
    vals = batched_front(vals, vb, B)
    shape = vals.shape
    if rank == 1:
        vals = vals.reshape(B, -1)
    out = aten.searchsorted.Tensor(seq, vals.contiguous(), sorter=sorter, **kw)
    return out.view(shape), 0


def _scalar_values(B, value, seq, sb):
    if seq.dim() - (sb is not None) != 1:
        raise RuntimeError("torch.searchsorted(): input value can be a scalar only when "
                           "boundaries tensor dimension is 1")
    return torch.full((B,), value, device=seq.device)


def _searchsorted_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    kw = dict(kwargs)
    sorter = kw.pop("sorter", None)
    sorterb = getattr(bdims, "kw", {}).get("sorter")
    seq, sb = args[0], bdims[0]
    vals, vb = args[1], bdims[1]
    if func is aten.searchsorted.Scalar:
        vals, vb = _scalar_values(B, vals, seq, sb), 0
    return _search(B, seq, sb, vals, vb, sorter, sorterb, kw)


_searchsorted_rule.kw_bdims = True
register_batch_rule(aten.searchsorted.Tensor, aten.searchsorted.Scalar)(_searchsorted_rule)


@register_batch_rule(aten.bucketize.Tensor, aten.bucketize.Scalar)
def bucketize_rule(level, func, args, bdims, kwargs):
    """``bucketize(x, boundaries) == searchsorted(boundaries, x)`` (same ``right``)."""
    B = level.batch_size
    vals, vb, bnd, bb = args[0], bdims[0], args[1], bdims[1]
    if bb is None:
        if isinstance(vals, torch.Tensor):
            vals = vals.contiguous()
        return func(vals, bnd, **kwargs), vb
    if func is aten.bucketize.Scalar:
        vals, vb = _scalar_values(B, vals, bnd, bb), 0
    return _search(B, bnd, bb, vals, vb, None, None, dict(kwargs))
