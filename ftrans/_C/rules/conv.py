"""Convolution, pooling, upsampling, im2col and padding: forward and backward.

These kernels already loop over a leading sample dim N (and, for convolution, over channel
groups), so the vmap batch is folded into one of those:

- into N when every example uses the same weight: ``[B, N, C, ...] -> [B*N, C, ...]``, the
  cheapest fold (a view when the batch dim leads);
- into the channel groups when the weight is per-example (and for the per-example *weight
  gradient*, which a fold into N would sum over the batch): ``[N, B*C, ...]`` with
  ``groups * B`` groups, so example ``b``'s channels only ever meet example ``b``'s weights.

Pooling-like kernels accept the unbatched form ``(C, *spatial)`` too; a logical input of that
rank is already a valid batched input once its batch dim is moved to the front.
"""
from __future__ import annotations

import torch

from ..registry import register_batch_rule
from ._util import aten_op, batched_front, register_present, to_channels, to_front

aten = torch.ops.aten


def _from_channels(out, B):
    """``[N, B*C, *]`` -> ``[N, B, C, *]`` (batch dim 1)."""
    return out.view((out.shape[0], B, out.shape[1] // B) + tuple(out.shape[2:]))


def _weight_rows(w, bdim, B):
    """Weight ``[O, ...]`` -> ``[B*O, ...]``."""
    w = batched_front(w, bdim, B)
    return w.reshape((B * w.shape[1],) + tuple(w.shape[2:]))


def _add_bias(out, obd, bias, bbd, B):
    """``out`` (logical ``[N, C, *]``) plus a per-example bias ``[B, C]``; batch at 0."""
    out = batched_front(out, obd, B) if obd is not None else out.unsqueeze(0)
    bias = to_front(bias, bbd)
    bias = bias.view((B, 1, bias.shape[1]) + (1,) * (out.dim() - 3))
    return out + bias, 0


def _conv_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    x, w, bias = args[0], args[1], args[2]
    dx, dw, dbias = bdims[0], bdims[1], bdims[2]
    rest = list(args[3:])
    if dw is None:
        bias_in = bias if dbias is None else None
        if dx is None:
            out, obd = func(x, w, bias_in, *rest, **kwargs), None
        else:
            x = to_front(x, dx)
            out = func(x.reshape((-1,) + tuple(x.shape[2:])), w, bias_in, *rest, **kwargs)
            out, obd = out.view(tuple(x.shape[:2]) + tuple(out.shape[1:])), 0
        if dbias is not None:
            return _add_bias(out, obd, bias, dbias, B)
        return out, obd
    groups_pos = 5  # index of `groups` in args[3:]
    rest[groups_pos] = rest[groups_pos] * B
    if bias is not None:
        bias = batched_front(bias, dbias, B).reshape(-1)
    out = func(to_channels(x, dx, B), _weight_rows(w, dw, B), bias, *rest, **kwargs)
    return _from_channels(out, B), 1


register_batch_rule(aten.convolution.default)(_conv_rule)
if "default" in aten._convolution.overloads():
    register_batch_rule(aten._convolution.default)(_conv_rule)


@register_batch_rule(aten.convolution_backward.default)
def conv_backward_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    go, x, w = args[0], args[1], args[2]
    dgo, dx, dw = bdims[0], bdims[1], bdims[2]
    stride, padding, dilation, transposed, output_padding, groups = args[4:10]
    mask = args[10]
    geo = (stride, padding, dilation, transposed, output_padding)
    gi = gw = gb = None
    bi = bw = bb = None

    if mask[2]:
        if dgo is None:
            gb = go.sum([0] + list(range(2, go.dim())))
        else:
            g = to_front(go, dgo)
            gb, bb = g.sum([1] + list(range(3, g.dim()))), 0

    if mask[0]:
        if dgo is None and dw is None:  # the input only lends its shape
            xs = x.select(dx, 0)
            gi = func(go, xs, w, None, *geo, groups, [True, False, False])[0]
        elif dw is None:
            g = to_front(go, dgo)
            xf = batched_front(x, dx, B)
            gi = func(g.reshape((-1,) + tuple(g.shape[2:])),
                      xf.reshape((-1,) + tuple(xf.shape[2:])), w, None, *geo, groups,
                      [True, False, False])[0]
            gi, bi = gi.view(tuple(xf.shape[:2]) + tuple(gi.shape[1:])), 0
        else:
            gi = func(to_channels(go, dgo, B), to_channels(x, dx, B), _weight_rows(w, dw, B),
                      None, *geo, groups * B, [True, False, False])[0]
            gi, bi = _from_channels(gi, B), 1

    if mask[1]:
        ws = w if dw is None else w.select(dw, 0)  # the weight only lends its shape
        if dgo is None and dx is None:
            gw = func(go, x, ws, None, *geo, groups, [False, True, False])[1]
        else:
            gw = func(to_channels(go, dgo, B), to_channels(x, dx, B),
                      _weight_rows(ws, None, B), None, *geo, groups * B,
                      [False, True, False])[1]
            gw, bw = gw.view((B, gw.shape[0] // B) + tuple(gw.shape[1:])), 0
    return (gi, gw, gb), (bi, bw, bb)


# ----------------------------------------------------------------------------------------------
# pooling, upsampling, im2col, padding: fold into N
# ----------------------------------------------------------------------------------------------

def fold_rule(core, positions, size_pos=None):
    """Rule for a kernel taking ``(N, *core)`` or ``core``-rank inputs at ``positions``.

    ``core`` is the rank of the kernel's form without N.  ``size_pos`` names an int-list
    argument holding a full input size (N first), rescaled when N is folded.
    """

    def rule(level, func, args, bdims, kwargs):
        B = level.batch_size
        args = list(args)
        lead = None
        for p in positions:
            if p >= len(args) or args[p] is None:
                continue
            x = batched_front(args[p], bdims[p], B)
            if x.dim() - 1 > core:
                lead = tuple(x.shape[:2])
                x = x.reshape((-1,) + tuple(x.shape[2:]))
            if bdims[p] is None:
                # An expanded (stride-0) input crashes some CPU kernels (torch 2.13's
                # adaptive_max_pool3d_backward segfaults on an expanded self/indices).
                x = x.contiguous()
            args[p] = x
        if size_pos is not None and lead is not None:
            size = list(args[size_pos])
            args[size_pos] = [size[0] * B] + size[1:]
        out = func(*args, **kwargs)

        def unfold(o):
            return o if lead is None else o.view(lead + tuple(o.shape[1:]))

        if isinstance(out, torch.Tensor):
            return unfold(out), 0
        return tuple(unfold(o) for o in out), (0,) * len(out)

    return rule


def _register_fold(name, core, positions, size_pos=None, overload="default"):
    register_present(aten_op(name, overload))(fold_rule(core, positions, size_pos))


for _d in (1, 2, 3):
    _core = _d + 1
    if _d != 2:  # max_pool2d_with_indices has its own rule below (a faster CPU layout)
        _register_fold(f"max_pool{_d}d_with_indices", _core, [0])
    _register_fold(f"max_pool{_d}d_with_indices_backward", _core, [0, 1, 7])
    _register_fold(f"avg_pool{_d}d", _core, [0])
    _register_fold(f"avg_pool{_d}d_backward", _core, [0, 1])
    _register_fold(f"_adaptive_avg_pool{_d}d", _core, [0])
    _register_fold(f"_adaptive_avg_pool{_d}d_backward", _core, [0, 1])
    _register_fold(f"adaptive_max_pool{_d}d", _core, [0])
    _register_fold(f"adaptive_max_pool{_d}d_backward", _core, [0, 1, 2])
    _register_fold(f"reflection_pad{_d}d", _core, [0])
    _register_fold(f"reflection_pad{_d}d_backward", _core, [0, 1])
    _register_fold(f"replication_pad{_d}d", _core, [0])
    _register_fold(f"replication_pad{_d}d_backward", _core, [0, 1])
    # upsampling kernels require N: a core rank of d+1 makes every logical input fold
    for _up in (f"upsample_nearest{_d}d", f"_upsample_nearest_exact{_d}d"):
        _register_fold(_up, _core, [0])
        _register_fold(f"{_up}_backward", _core, [0], size_pos=2)
_register_fold("upsample_linear1d", 2, [0])
_register_fold("upsample_linear1d_backward", 2, [0], size_pos=2)
_register_fold("upsample_bilinear2d", 3, [0])
_register_fold("upsample_bilinear2d_backward", 3, [0], size_pos=2)
_register_fold("upsample_bicubic2d", 3, [0])
_register_fold("upsample_bicubic2d_backward", 3, [0], size_pos=2)
_register_fold("upsample_trilinear3d", 4, [0])
_register_fold("upsample_trilinear3d_backward", 4, [0], size_pos=2)
_register_fold("im2col", 3, [0])
_register_fold("col2im", 2, [0])


def _max_pool2d_channels_last(x, *args, **kwargs):
    """``max_pool2d_with_indices`` of the folded ``[N, C, H, W]`` input, in channels-last layout
    on CPU, returned contiguous.

    torch's CPU kernel for contiguous NCHW input is 3-10x slower than its channels-last one
    (1.1 ms vs 0.11 ms on [32, 16, 28, 28], torch 2.13), and the batched input of a pooled
    CNN layer is exactly that.  Both kernels scan each window in the same order (same values,
    same indices: the indices are offsets within one (n, c) plane, whatever the layout); the
    two layout copies cost far less than the difference.  The outputs are made contiguous
    again, so the logical tensors have the strides eager torch gives them.
    """
    op = aten.max_pool2d_with_indices.default
    if not (x.device.type == "cpu" and x.is_floating_point() and x.dim() == 4
            and x.shape[1] > 1):
        return op(x, *args, **kwargs)
    out, idx = op(x.contiguous(memory_format=torch.channels_last), *args, **kwargs)
    return out.contiguous(), idx.contiguous()


_fold_max_pool2d = fold_rule(3, [0])


@register_batch_rule(aten.max_pool2d_with_indices.default)
def max_pool2d_rule(level, func, args, bdims, kwargs):
    return _fold_max_pool2d(level, _max_pool2d_channels_last, args, bdims, kwargs)


@register_batch_rule(aten.constant_pad_nd.default)
def constant_pad_rule(level, func, args, bdims, kwargs):
    """Pads trailing dims only, so a front batch dim is just one more leading dim."""
    return func(to_front(args[0], bdims[0]), *args[1:], **kwargs), 0


def _fractional_rule(core):
    """fractional_max_pool{2,3}d: fold into N; ``random_samples`` ``[N', C, d]`` (N' >= N) is
    per sample, so its first N rows follow the samples into the folded N."""

    def rule(level, func, args, bdims, kwargs):
        B = level.batch_size
        x = batched_front(args[0], bdims[0], B)
        n = x.shape[1] if x.dim() - 1 > core else 1
        x = x.reshape((B * n,) + tuple(x.shape[-core:]))
        rs = batched_front(args[3], bdims[3], B)
        rs = rs[:, :n].reshape((B * n,) + tuple(rs.shape[2:])).contiguous()
        out, idx = func(x.contiguous(), args[1], args[2], rs, **kwargs)
        lead = (B, n) if args[0].dim() - (bdims[0] is not None) > core else (B,)
        return (out.view(lead + tuple(out.shape[1:])),
                idx.view(lead + tuple(idx.shape[1:]))), (0, 0)

    return rule


for _d in (2, 3):
    _packet = getattr(aten, f"fractional_max_pool{_d}d", None)
    if _packet is not None:
        register_batch_rule(_packet.default)(_fractional_rule(_d + 1))
        _register_fold(f"fractional_max_pool{_d}d_backward", _d + 1, [0, 1, 4])
