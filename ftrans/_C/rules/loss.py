"""Loss kernels, forward and backward.

A loss's ``reduction`` ('mean' / 'sum') reduces over the whole example; the physical kernel
would reduce over the batch as well.  So every loss is computed with ``reduction='none'`` on
operands expanded to one common physical shape ``[B, *example]`` and reduced over the example
dims afterwards.  Backward kernels get the same treatment: with 'none', the incoming gradient
is elementwise, so a per-example scalar gradient is broadcast to the example's shape and the
'mean' normalization (``1/numel`` of one example) applied afterwards.

``nll_loss`` needs a gather at the target class; it is written directly with ``gather`` /
``scatter`` on the physical tensors, which also covers per-example class weights.

Kernels that already loop over samples (ctc, multilabel_margin, multi_margin) get the vmap
batch folded into their sample dim N instead, as the pooling kernels do.
"""
from __future__ import annotations

import math

import torch

from ..registry import register_batch_rule
from ._util import aten_op, batched_front, register_present, to_front

aten = torch.ops.aten

_NONE, _MEAN, _SUM = 0, 1, 2


def _align(args, bdims, positions, B):
    """Front-batch, pad and expand the tensors at ``positions`` to one shape ``[B, *ex]``."""
    xs = {}
    rank = max(args[p].dim() - (bdims[p] is not None) for p in positions
               if isinstance(args[p], torch.Tensor))
    for p in positions:
        t = args[p]
        if not isinstance(t, torch.Tensor):
            continue
        x = batched_front(t, bdims[p], B)
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


def _per_element(args, kwargs, red_pos):
    """(args, kwargs) asking the kernel for reduction='none', and the reduction asked for:
    the reduction then happens per example, over the logical dims only."""
    args = list(args)
    if red_pos < len(args):
        reduction = args[red_pos]
        args[red_pos] = _NONE
    else:
        kwargs = dict(kwargs)
        reduction = kwargs.get("reduction", _MEAN)
        kwargs["reduction"] = _NONE
    return args, kwargs, reduction


def loss_rule(positions, red_pos):
    def rule(level, func, args, bdims, kwargs):
        args, kwargs, reduction = _per_element(args, kwargs, red_pos)
        xs, _ = _align(args, bdims, [p for p in positions if p < len(args)], level.batch_size)
        for p, x in xs.items():
            args[p] = x
        return _reduce(func(*args, **kwargs), reduction), 0

    return rule


def loss_backward_rule(positions, red_pos):
    """``positions[0]`` is grad_output: a per-example scalar unless reduction is 'none'."""

    def rule(level, func, args, bdims, kwargs):
        args, kwargs, reduction = _per_element(args, kwargs, red_pos)
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
    register_present(aten_op(_name))(loss_rule(_pos, _red))
    register_present(aten_op(_name + "_backward"))(
        loss_backward_rule([0] + [p + 1 for p in _pos], _red + 1))


# ----------------------------------------------------------------------------------------------
# nll_loss / nll_loss2d
# ----------------------------------------------------------------------------------------------

def _nll_parts(level, args, bdims):
    """(x, class dim, safe targets, per-element weights, kept mask) with the batch at 0."""
    B = level.batch_size
    x = batched_front(args[0], bdims[0], B)
    t = batched_front(args[1], bdims[1], B)
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
    return x, cdim, safe, wt, keep


def _nll_forward_rule(level, func, args, bdims, kwargs):
    x, cdim, safe, wt, _ = _nll_parts(level, args, bdims)
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
    x, cdim, safe, wt, keep = _nll_parts(level, args[1:], bdims[1:])
    reduction, tw, twb = args[4], args[6], bdims[6]
    g = batched_front(go, gb, B)
    if reduction != _NONE:
        g = g.reshape((B,) + (1,) * (wt.dim() - 1))
        if reduction == _MEAN:
            total = batched_front(tw, twb, B).reshape(g.shape)
            g = g / total
    # Ignored targets get no gradient at all, as in torch's kernel (not 0 * g / 0 = nan when
    # every target of an example is ignored and 'mean' divides by a zero total weight).
    coef = torch.where(keep, -(wt * g), torch.zeros((), dtype=wt.dtype, device=wt.device))
    grad = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    return grad.scatter(cdim, safe.unsqueeze(cdim), coef.unsqueeze(cdim).to(x.dtype)), 0


for _name in ("nll_loss_forward", "nll_loss2d_forward"):
    if hasattr(aten, _name):
        register_batch_rule(getattr(aten, _name).default)(_nll_forward_rule)
for _name in ("nll_loss_backward", "nll_loss2d_backward"):
    if hasattr(aten, _name):
        register_batch_rule(getattr(aten, _name).default)(_nll_backward_rule)


# ----------------------------------------------------------------------------------------------
# Kernels that loop over a sample dim N: fold the vmap batch into it
# ----------------------------------------------------------------------------------------------
# ctc, multilabel_margin and multi_margin losses compute one loss per sample of N, so the batch
# folds into N (``[B, N, ...] -> [B*N, ...]``) and 'mean'/'sum' are applied per example after
# an unreduced call.  A logical input without N is a single sample: the batch *is* N.

def _fold(x, bdim, B, has_n):
    """``[B, N, *] -> [B*N, *]``; without N, ``[B, C]`` (a 0-d example is one class)."""
    x = batched_front(x, bdim, B)
    if has_n:
        x = x.reshape((B * x.shape[1],) + tuple(x.shape[2:]))
    else:
        x = x.reshape(B, -1)
    return x.contiguous()


def _lengths(lengths, bdim, B):
    """Per-sample lengths for the folded N: an int list is the same for every example."""
    if isinstance(lengths, torch.Tensor):
        return batched_front(lengths, bdim, B).reshape(-1)
    return list(lengths) * B


def _ctc_check(args, bdims):
    if args[0].dim() - (bdims[0] is not None) != 3:
        raise RuntimeError("Expected 3-dimensional tensor for argument #1 'log_probs' (while "
                           "checking arguments for ctc_loss_allocate_outputs)")


def _ctc_log_probs(lp, bdim, B):
    """Logical ``[T, N, C]`` -> physical ``[T, B*N, C]`` (example-major samples)."""
    lp = lp.unsqueeze(1).expand((lp.shape[0], B) + tuple(lp.shape[1:])) if bdim is None \
        else lp.movedim(bdim, 1)
    return lp.reshape((lp.shape[0], B * lp.shape[2], lp.shape[3]))


def _ctc_targets(t, bdim, B):
    # Concatenated 1-D targets fold by plain concatenation: each example's lengths already sum
    # to its own targets' size (the kernel checks it), so the offsets line up across examples.
    if t.dim() - (bdim is not None) == 2:
        return _fold(t, bdim, B, True)
    return batched_front(t, bdim, B).reshape(-1)


def _ctc_rule(level, func, args, bdims, kwargs):
    _ctc_check(args, bdims)
    B = level.batch_size
    lp = _ctc_log_probs(args[0], bdims[0], B)
    N = lp.shape[1] // B
    args = [lp, _ctc_targets(args[1], bdims[1], B), _lengths(args[2], bdims[2], B),
            _lengths(args[3], bdims[3], B)] + list(args[4:])
    nll, alpha = func(*args, **kwargs)
    return (nll.view(B, N), alpha.view((B, N) + tuple(alpha.shape[1:]))), (0, 0)


def _ctc_backward_rule(level, func, args, bdims, kwargs):
    _ctc_check(args[1:], bdims[1:])
    B = level.batch_size
    lp = _ctc_log_probs(args[1], bdims[1], B)
    N = lp.shape[1] // B
    args = [_fold(args[0], bdims[0], B, True), lp, _ctc_targets(args[2], bdims[2], B),
            _lengths(args[3], bdims[3], B), _lengths(args[4], bdims[4], B),
            _fold(args[5], bdims[5], B, True), _fold(args[6], bdims[6], B, True)] + list(args[7:])
    g = func(*args, **kwargs)
    return g.view((g.shape[0], B, N) + tuple(g.shape[2:])), 1


for _name, _rule in (("_ctc_loss", _ctc_rule), ("_ctc_loss_backward", _ctc_backward_rule)):
    register_present(aten_op(_name), aten_op(_name, "Tensor"))(_rule)


def _reduce_samples(out, reduction):
    """'mean'/'sum' over an example's samples (dims after the batch dim 0)."""
    if reduction == _NONE or out.dim() == 1:
        return out
    dims = list(range(1, out.dim()))
    return out.mean(dims) if reduction == _MEAN else out.sum(dims)


def _logical_shape(x, bdim):
    shape = list(x.shape)
    if bdim is not None:
        del shape[bdim]
    return tuple(shape)


def _has_n(x, bdim):
    return x.dim() - (bdim is not None) == 2


@register_batch_rule(aten.multilabel_margin_loss_forward.default)
def _multilabel_margin_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    has_n = _has_n(args[0], bdims[0])
    x = _fold(args[0], bdims[0], B, has_n)
    t = _fold(args[1], bdims[1], B, has_n)
    out, is_target = func(x, t, _NONE)
    out = out.view(B, -1) if has_n else out
    is_target = is_target.view((B,) + _logical_shape(args[1], bdims[1]))
    return (_reduce_samples(out, args[2]), is_target), (0, 0)


@register_batch_rule(aten.multilabel_margin_loss_backward.default)
def _multilabel_margin_backward_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    has_n = _has_n(args[1], bdims[1])
    x = _fold(args[1], bdims[1], B, has_n)
    n = x.shape[0] // B
    g = batched_front(args[0], bdims[0], B).reshape(B, -1).expand(B, n).reshape(-1)
    if args[3] == _MEAN and has_n:
        g = g / n
    out = func(g, x, _fold(args[2], bdims[2], B, has_n), _NONE,
               _fold(args[4], bdims[4], B, has_n))
    return out.view((B,) + _logical_shape(args[1], bdims[1])), 0


def _multi_margin_args(args, bdims, kwargs, first):
    """(x, xb, t, tb, p, margin, w, wb, reduction) with trailing defaults filled in."""
    names = ("p", "margin", "weight", "reduction")
    rest = list(args[first + 2:]) + [None] * (4 - len(args[first + 2:]))
    rest = [kwargs.get(n, v) for n, v in zip(names, rest)]
    p, margin, w, reduction = [d if v is None and n != "weight" else v
                               for n, v, d in zip(names, rest, (1, 1, None, _MEAN))]
    wb = bdims[first + 4] if len(bdims) > first + 4 else None
    return (args[first], bdims[first], args[first + 1], bdims[first + 1], p, margin, w, wb,
            reduction)


def _multi_margin_fold(B, x, xb, t, tb, w, wb):
    """Folded input and targets, the unbatched weight, per-sample weights ``w[target]``."""
    has_n = _has_n(x, xb)
    # Without N the per-sample output takes the target's shape ([] or [1]).
    out_shape = (B, -1) if has_n else (B,) + _logical_shape(t, tb)
    x = _fold(x, xb, B, has_n)
    t = batched_front(t, tb, B).reshape(-1)
    sample_w = None
    if wb is not None:
        # A per-example class weight scales each sample's loss (and gradient) by w[target].
        sample_w = to_front(w, wb).gather(1, t.view(B, -1)).reshape(-1)
        w = None
    return x, t, w, sample_w, has_n, out_shape


@register_batch_rule(aten.multi_margin_loss.default)
def _multi_margin_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    x, xb, t, tb, p, margin, w, wb, reduction = _multi_margin_args(args, bdims, kwargs, 0)
    x, t, w, sample_w, _, out_shape = _multi_margin_fold(B, x, xb, t, tb, w, wb)
    out = func(x, t, p, margin, w, _NONE)
    if sample_w is not None:
        out = out * sample_w
    return _reduce_samples(out.view(out_shape), reduction), 0


@register_batch_rule(aten.multi_margin_loss_backward.default)
def _multi_margin_backward_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    x, xb, t, tb, p, margin, w, wb, reduction = _multi_margin_args(args, bdims, kwargs, 1)
    x, t, w, sample_w, _, _ = _multi_margin_fold(B, x, xb, t, tb, w, wb)
    n = x.shape[0] // B
    g = batched_front(args[0], bdims[0], B).reshape(B, -1).expand(B, n).reshape(-1)
    if reduction == _MEAN:
        g = g / n
    if sample_w is not None:
        g = g * sample_w
    out = func(g.contiguous(), x, t, p, margin, w, _NONE)
    return out.view((B,) + _logical_shape(args[1], bdims[1])), 0
