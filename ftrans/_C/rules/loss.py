"""Loss kernels, forward and backward.

A loss's ``reduction`` ('mean' / 'sum') reduces over the whole example; the physical kernel
would reduce over the batch as well.  So every loss is computed with ``reduction='none'`` on
operands expanded to one common physical shape ``[B, *example]`` and reduced over the example
dims afterwards.  Backward kernels get the same treatment: with 'none', the incoming gradient
is elementwise, so a per-example scalar gradient is broadcast to the example's shape and the
'mean' normalization (``1/numel`` of one example) applied afterwards.

``nll_loss`` needs a gather at the target class; it is written directly with ``gather`` /
``scatter`` on the physical tensors, which also covers per-example class weights.
"""
from __future__ import annotations

import math

import torch

from ..registry import register_batch_rule
from ._util import to_front

aten = torch.ops.aten

_NONE, _MEAN, _SUM = 0, 1, 2


def _expand_front(x, bdim, B):
    if bdim is None:
        return x.unsqueeze(0).expand((B,) + tuple(x.shape))
    return to_front(x, bdim)


def _align(args, bdims, positions, B):
    """Front-batch, pad and expand the tensors at ``positions`` to one shape ``[B, *ex]``."""
    xs = {}
    rank = max(args[p].dim() - (bdims[p] is not None) for p in positions
               if isinstance(args[p], torch.Tensor))
    for p in positions:
        t = args[p]
        if not isinstance(t, torch.Tensor):
            continue
        x = _expand_front(t, bdims[p], B)
        missing = rank - (x.dim() - 1)
        if missing > 0:
            x = x.view((B,) + (1,) * missing + tuple(x.shape[1:]))
        xs[p] = x
    shape = torch.broadcast_shapes(*(x.shape for x in xs.values()))
    return {p: x.expand(shape) for p, x in xs.items()}, shape


def _reduce(out, reduction):
    dims = list(range(1, out.dim()))
    if reduction == _NONE or not dims:
        return out
    return out.mean(dims) if reduction == _MEAN else out.sum(dims)


def loss_rule(positions, red_pos):
    def rule(level, func, args, bdims, kwargs):
        args = list(args)
        if red_pos < len(args):
            reduction = args[red_pos]
            args[red_pos] = _NONE
        else:
            kwargs = dict(kwargs)
            reduction = kwargs.get("reduction", _MEAN)
            kwargs["reduction"] = _NONE
        xs, _ = _align(args, bdims, [p for p in positions if p < len(args)], level.batch_size)
        for p, x in xs.items():
            args[p] = x
        return _reduce(func(*args, **kwargs), reduction), 0

    return rule


def loss_backward_rule(positions, red_pos):
    """``positions[0]`` is grad_output: a per-example scalar unless reduction is 'none'."""

    def rule(level, func, args, bdims, kwargs):
        args = list(args)
        if red_pos < len(args):
            reduction = args[red_pos]
            args[red_pos] = _NONE
        else:
            kwargs = dict(kwargs)
            reduction = kwargs.get("reduction", _MEAN)
            kwargs["reduction"] = _NONE
        xs, shape = _align(args, bdims, [p for p in positions if p < len(args)],
                           level.batch_size)
        for p, x in xs.items():
            args[p] = x
        out = func(*args, **kwargs)
        if reduction == _MEAN:
            out = out / math.prod(shape[1:])
        return out, 0

    return rule


_LOSSES = {
    # name: (tensor positions, reduction position)
    "mse_loss": ([0, 1], 2),
    "huber_loss": ([0, 1], 2),
    "smooth_l1_loss": ([0, 1], 2),
    "soft_margin_loss": ([0, 1], 2),
    "binary_cross_entropy": ([0, 1, 2], 3),
    "binary_cross_entropy_with_logits": ([0, 1, 2, 3], 4),
}
for _name, (_pos, _red) in _LOSSES.items():
    packet = getattr(aten, _name, None)
    if packet is not None and "default" in packet.overloads():
        register_batch_rule(packet.default)(loss_rule(_pos, _red))
    packet = getattr(aten, _name + "_backward", None)
    if packet is not None and "default" in packet.overloads():
        register_batch_rule(packet.default)(
            loss_backward_rule([0] + [p + 1 for p in _pos], _red + 1))


# ----------------------------------------------------------------------------------------------
# nll_loss / nll_loss2d
# ----------------------------------------------------------------------------------------------

def _nll_parts(level, args, bdims):
    """(x, class dim, safe targets, per-element weights) with the batch at 0."""
    B = level.batch_size
    x = _expand_front(args[0], bdims[0], B)
    t = _expand_front(args[1], bdims[1], B)
    w, wb = args[2], bdims[2]
    ignore = args[4]
    cdim = 2 if x.dim() - 1 >= 2 else 1
    keep = t != ignore
    safe = torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))
    if w is None:
        wt = keep.to(x.dtype)
    else:
        if wb is None:
            wt = w.index_select(0, safe.reshape(-1)).view(safe.shape)
        else:
            wt = to_front(w, wb).gather(1, safe.reshape(B, -1)).view(safe.shape)
        wt = wt * keep.to(wt.dtype)
    return x, cdim, safe, wt


def _nll_forward_rule(level, func, args, bdims, kwargs):
    x, cdim, safe, wt = _nll_parts(level, args, bdims)
    reduction = args[3]
    picked = x.gather(cdim, safe.unsqueeze(cdim)).squeeze(cdim)
    losses = -picked * wt
    dims = list(range(1, losses.dim()))
    if reduction == _NONE:
        return (losses, x.new_zeros(())), (0, None)
    total = wt.sum(dims) if dims else wt
    summed = losses.sum(dims) if dims else losses
    return (summed / total if reduction == _MEAN else summed, total), (0, 0)


def _nll_backward_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    go, gb = args[0], bdims[0]
    x, cdim, safe, wt = _nll_parts(level, args[1:], bdims[1:])
    reduction, tw, twb = args[4], args[6], bdims[6]
    g = _expand_front(go, gb, B)
    if reduction != _NONE:
        g = g.reshape((B,) + (1,) * (wt.dim() - 1))
        if reduction == _MEAN:
            total = _expand_front(tw, twb, B).reshape(g.shape)
            g = g / total
    coef = -(wt * g)
    grad = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    return grad.scatter(cdim, safe.unsqueeze(cdim), coef.unsqueeze(cdim).to(x.dtype)), 0


for _name in ("nll_loss_forward", "nll_loss2d_forward"):
    if hasattr(aten, _name):
        register_batch_rule(getattr(aten, _name).default)(_nll_forward_rule)
for _name in ("nll_loss_backward", "nll_loss2d_backward"):
    if hasattr(aten, _name):
        register_batch_rule(getattr(aten, _name).default)(_nll_backward_rule)
