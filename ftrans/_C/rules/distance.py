"""Pairwise distances: ``torch.cdist`` and ``F.pdist``, forward and backward.

``_cdist_forward``/``_cdist_backward`` take ``[*batch, P, M]`` x ``[*batch', R, M]`` and
broadcast the two batch shapes, so the vmap batch becomes one more leading batch dim.  Batched
operands are front-batched and padded with size-1 dims to the larger logical rank so that the
vmap dim lines up; an unbatched operand broadcasts as it is.  The backward writes the gradient
in the *broadcast* shape (autograd reduces it later), so the per-example gradient's logical
shape is the broadcast one, and ``grad``/``cdist`` must arrive in exactly that shape: they are
expanded to it (as is ``x1`` when only ``grad`` carries the batch).

``_pdist_*`` have no batch support at all.  The distances of all pairs of rows are the cdist of
``x`` with itself, and ``pdist`` lists its strict upper triangle row by row, which is what
``triu_indices`` enumerates: the forward is one batched ``_cdist_forward`` (with
``compute_mode=2``, the exact kernel, never the matrix-product shortcut) and one
``index_select``.  For the backward, ``sum_{i<j} g_ij d(x_i, x_j)`` differentiated by ``x`` is
``_cdist_backward`` of the *symmetric* gradient matrix (``G[i,j] = G[j,i] = g_ij``, zero
diagonal) against the same symmetric distance matrix: each pair then reaches both of its rows,
as in pdist's own kernel.  Both matrices come from one gather of ``[0, values]`` through an
``N*N`` map of pair numbers, built once per ``N``.
"""
from __future__ import annotations

import torch

from ..registry import register_batch_rule
from ._util import batched_front, logical_rank, pad_rank, to_front

aten = torch.ops.aten

_DONOT_USE_MM = 2  # cdist compute_mode: the exact per-pair kernel, as pdist computes


def _cdist_operands(x1, b1, x2, b2, B, force_x1=False):
    """Front-batch and rank-align ``x1``/``x2`` so their batch shapes broadcast with the vmap
    dim in front.  ``force_x1`` expands an unbatched ``x1`` so the batch reaches the result."""
    r = max(logical_rank(x1, b1), logical_rank(x2, b2))
    if b1 is not None or force_x1:
        x1 = pad_rank(batched_front(x1, b1, B), r)
    if b2 is not None:
        x2 = pad_rank(to_front(x2, b2), r)
    return x1, x2


@register_batch_rule(aten._cdist_forward.default)
def cdist_forward_rule(level, func, args, bdims, kwargs):
    x1, x2 = _cdist_operands(args[0], bdims[0], args[1], bdims[1], level.batch_size)
    return func(x1, x2, *args[2:], **kwargs), 0


@register_batch_rule(aten._cdist_backward.default)
def cdist_backward_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    grad, x1, x2, p, dist = args
    x1, x2 = _cdist_operands(x1, bdims[1], x2, bdims[2], B, force_x1=True)
    batch = torch.broadcast_shapes(tuple(x1.shape[:-2]), tuple(x2.shape[:-2]))
    full = tuple(batch) + (x1.shape[-2], x2.shape[-2])
    grad = pad_rank(batched_front(grad, bdims[0], B), len(full) - 1).expand(full).contiguous()
    dist = pad_rank(batched_front(dist, bdims[4], B), len(full) - 1).expand(full).contiguous()
    return func(grad, x1, x2, p, dist, **kwargs), 0


# ----------------------------------------------------------------------------------------------
# pdist
# ----------------------------------------------------------------------------------------------

_PAIR_MAPS: dict = {}
_CACHE_MAX_N = 256  # beyond this the maps cost as much memory as the distances: rebuild them


def _pair_maps(n: int, device):
    """(``upper``, ``sym``): ``upper`` the flat ``n*n`` positions of the pairs ``i<j`` in pdist
    order; ``sym[i*n+j]`` the pair number + 1 of ``{i, j}`` (0 on the diagonal)."""
    key = (n, str(device))
    maps = _PAIR_MAPS.get(key)
    if maps is None:
        iu = torch.triu_indices(n, n, 1, device=device)
        upper = iu[0] * n + iu[1]
        sym = torch.zeros(n * n, dtype=torch.long, device=device)
        pair = torch.arange(1, upper.numel() + 1, device=device)
        sym[upper] = pair
        sym[iu[1] * n + iu[0]] = pair
        maps = (upper, sym)
        if n <= _CACHE_MAX_N:
            _PAIR_MAPS[key] = maps
    return maps


def _symmetric(v, sym, n):
    """``[B, K]`` pair values -> the symmetric ``[B, n, n]`` matrix with a zero diagonal."""
    padded = torch.cat([v.new_zeros((v.shape[0], 1)), v], dim=1)
    return padded.index_select(1, sym).view(v.shape[0], n, n)


@register_batch_rule(aten._pdist_forward.default)
def pdist_forward_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])  # the only tensor argument, hence batched
    p = args[1] if len(args) > 1 else kwargs.get("p", 2.0)
    n = x.shape[1]
    upper, _ = _pair_maps(n, x.device)
    dist = aten._cdist_forward(x, x, p, _DONOT_USE_MM)
    return dist.reshape(x.shape[0], n * n).index_select(1, upper), 0


@register_batch_rule(aten._pdist_backward.default)
def pdist_backward_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    grad, x, p, dist = args
    x = batched_front(x, bdims[1], B)
    n = x.shape[1]
    _, sym = _pair_maps(n, x.device)
    g = _symmetric(batched_front(grad, bdims[0], B), sym, n)
    d = _symmetric(batched_front(dist, bdims[3], B), sym, n)
    return aten._cdist_backward(g.contiguous(), x, x, p, d.contiguous()), 0
