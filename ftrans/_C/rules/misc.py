"""Rules for ops that fit no bigger family: ``rsub.Tensor``, ``lu_unpack``, grid sampling.

- ``rsub.Tensor`` (``other - alpha * self``) is elementwise, but torch tags only its ``Scalar``
  overload ``pointwise``, so the generic tag rule never sees it; it gets that same rule here.
- ``lu_unpack`` accepts leading batch dims natively: the vmap batch moves to the front of both
  the factors and the pivots.  Outputs the caller asked not to unpack are empty ``[0]``
  tensors that do not depend on the batch.
- The grid sampler kernels loop over a sample dim ``N`` and, per sample, over output locations,
  each reading only ``input[n]``.  A per-example input folds the batch into ``N``.  A shared
  (unbatched) input instead folds the batch into the grid's first *output* spatial dim
  (``[N, B*H_out, ...]``): every example samples the same image, so nothing is copied B
  times.  The backward needs a per-example input gradient whenever it is asked for (it is a
  per-example value even for a shared input: it depends on each example's grad and grid), so
  only a backward that skips the input gradient (``output_mask[0]`` false) takes that shortcut.
"""
from __future__ import annotations

import torch

from ._util import aten_op, batched_front, register_present
from .pointwise import pointwise_rule

aten = torch.ops.aten




# ----------------------------------------------------------------------------------------------
# rsub.Tensor
# ----------------------------------------------------------------------------------------------

@register_present(aten_op("rsub", "Tensor"))
def rsub_tensor_rule(level, func, args, bdims, kwargs):
    return pointwise_rule(level, func, args, bdims, kwargs)


# ----------------------------------------------------------------------------------------------
# lu_unpack
# ----------------------------------------------------------------------------------------------

@register_present(aten_op("lu_unpack"))
def lu_unpack_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    args = list(args)
    args[0] = batched_front(args[0], bdims[0], B)
    args[1] = batched_front(args[1], bdims[1], B)
    outs = func(*args, **kwargs)
    # A part not unpacked comes back as an empty [0] tensor (the same for every example).
    return outs, tuple(0 if o.dim() > 1 else None for o in outs)


# ----------------------------------------------------------------------------------------------
# grid_sampler_{2,3}d and their backwards
# ----------------------------------------------------------------------------------------------

def _fold_n(x, bdim, B):
    """``[B, N, ...]`` (expanding an unbatched ``x``) -> ``[B*N, ...]``."""
    x = batched_front(x, bdim, B)
    return x.reshape((B * x.shape[1],) + tuple(x.shape[2:]))


def _unfold_n(out, B):
    return out.view((B, out.shape[0] // B) + tuple(out.shape[1:]))


def _fold_spatial(x, bdim, dim, B):
    """``x`` whose logical dim ``dim`` is the first output spatial dim, with the batch folded
    just before it: ``[..., B*S, ...]`` (an unbatched ``x`` is expanded)."""
    x = batched_front(x, bdim, B).movedim(0, dim)
    shape = tuple(x.shape)
    return x.reshape(shape[:dim] + (shape[dim] * shape[dim + 1],) + shape[dim + 2:])


def _unfold_spatial(out, dim, B):
    """Inverse of :func:`_fold_spatial`: the batch dim ends up at ``dim``."""
    shape = tuple(out.shape)
    return out.view(shape[:dim] + (B, shape[dim] // B) + shape[dim + 1:])


@register_present(aten_op("grid_sampler_2d"), aten_op("grid_sampler_3d"))
def grid_sampler_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    inp, grid, rest = args[0], args[1], args[2:]
    if bdims[0] is None:
        # grid [N, *S_out, k]: its dim 1 is the first output spatial dim; out [N, C, *S_out].
        out = func(inp, _fold_spatial(grid, bdims[1], 1, B), *rest, **kwargs)
        return _unfold_spatial(out, 2, B), 2
    out = func(_fold_n(inp, bdims[0], B), _fold_n(grid, bdims[1], B), *rest, **kwargs)
    return _unfold_n(out, B), 0


@register_present(aten_op("grid_sampler_2d_backward"), aten_op("grid_sampler_3d_backward"))
def grid_sampler_backward_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    go, inp, grid = args[0], args[1], args[2]
    rest = list(args[3:])
    mask = rest[3] if len(rest) > 3 else kwargs.get("output_mask", (True, True))
    if bdims[1] is None and not mask[0]:
        # A shared input whose gradient is not wanted: sample it once, batch in the grid.
        gi, gg = func(_fold_spatial(go, bdims[0], 2, B), inp,
                      _fold_spatial(grid, bdims[2], 1, B), *rest, **kwargs)
        return (gi, _unfold_spatial(gg, 1, B)), (None, 1)  # gi: None (not requested)
    gi, gg = func(_fold_n(go, bdims[0], B), _fold_n(inp, bdims[1], B),
                  _fold_n(grid, bdims[2], B), *rest, **kwargs)
    return ((None if gi is None else _unfold_n(gi, B)),
            (None if gg is None else _unfold_n(gg, B))), (None if gi is None else 0,
                                                           None if gg is None else 0)


# cuDNN's grid sampler (CUDA, 2-D, bilinear, zeros padding, align_corners) takes the same
# [N, C, H, W] / [N, H, W, 2] layout, so the fold into N applies unchanged.
@register_present(aten_op("cudnn_grid_sampler"))
def cudnn_grid_sampler_rule(level, func, args, bdims, kwargs):  # pragma: no cover - CUDA only
    B = level.batch_size
    out = func(_fold_n(args[0], bdims[0], B), _fold_n(args[1], bdims[1], B), **kwargs)
    return _unfold_n(out, B), 0


@register_present(aten_op("cudnn_grid_sampler_backward"))
def cudnn_grid_sampler_backward_rule(level, func, args, bdims, kwargs):  # pragma: no cover
    B = level.batch_size
    outs = func(*[_fold_n(a, d, B) for a, d in zip(args, bdims)], **kwargs)
    return tuple(_unfold_n(o, B) for o in outs), (0, 0)
