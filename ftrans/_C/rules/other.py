"""Rules for the ops of no bigger family, one section each (in file order):

``rsub.Tensor``, ``lu_unpack``, the grid samplers; ``renorm``, ``block_diag``, anti-aliased
bilinear upsampling, in-place ``addr_`` / ``floor_divide_`` and the tensor overloads of
``linspace`` / ``logspace`` (most of the second group were found on the loop fallback by
torch's OpInfo sweep).

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
- ``renorm`` clamps the norm of every slice along ``dim``.  With the vmap batch moved next to
  ``dim`` and the two flattened into one dim, every (example, slice) pair is a slice of one
  native ``renorm`` call: the kernel's own norm, threshold and epsilon apply unchanged.
- ``block_diag``'s output size is static per example, so the batched result is the same
  layout with a batch dim: each block is padded to the full width at its column offset and
  the padded rows are concatenated.  Pad+cat (not zeros + in-place copies) because an
  argument may be batched at an outer level, and writing it into a plain zeros tensor would be
  an in-place write of a batched value into an unbatched one.  The result dtype follows
  torch's list promotion, where 0-dim blocks count as scalars: it is read off a meta call.
- ``_upsample_bilinear2d_aa`` and its backward loop over ``N`` like every upsampling kernel:
  the batch folds into ``N`` (conv.py's :func:`fold_rule`, which also rescales the backward's
  ``input_size``).
- ``addr_`` reuses the out-of-place rule and copies into the physical self; ``floor_divide``
  is elementwise but torch does not tag it ``pointwise`` (and its out-of-place overload is
  ``default``, not ``Tensor``, so the in-place detection cannot pair them): it gets the
  generic pointwise rule explicitly.
- ``linspace``/``logspace`` with 0-dim tensor ends read the ends with ``.item()``, so no
  kernel takes a batch of them: the values are rebuilt with torch's own CPU formula (the first
  half counted up from ``start``, the second half down from ``end``) on ``[B, steps]``.
"""
from __future__ import annotations

import torch

from ._util import aten_op, batched_front, register_present, to_front, wrap_dim
from .conv import fold_rule
from .linalg import addr_rule
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


# ----------------------------------------------------------------------------------------------
# renorm
# ----------------------------------------------------------------------------------------------

@register_present(aten_op("renorm"))
def renorm_rule(level, func, args, bdims, kwargs):
    x, p, dim, maxnorm = args[0], args[1], args[2], args[3]
    rank = x.dim() - 1
    if rank < 2:  # the physical tensor has one more dim: the kernel would accept it
        raise RuntimeError(f"renorm: input needs at least 2 dimensions, got {rank} dimensions")
    dim = wrap_dim(dim, rank)
    x = to_front(x, bdims[0]).movedim(dim + 1, 1)
    B, S = x.shape[0], x.shape[1]
    out = func(x.reshape((B * S,) + tuple(x.shape[2:])), p, 0, maxnorm)
    return out.view(x.shape).movedim(1, dim + 1), 0


# ----------------------------------------------------------------------------------------------
# block_diag
# ----------------------------------------------------------------------------------------------

_block_dtype_cache: dict = {}


def _block_dtype(blocks, bds):
    """torch.block_diag's result dtype for these logical ranks and dtypes (0-dim blocks promote
    like scalars), and its error for invalid ranks, from one meta call per signature."""
    key = tuple((b.dtype, b.dim() - (d is not None)) for b, d in zip(blocks, bds))
    dtype = _block_dtype_cache.get(key)
    if dtype is None:
        meta = [torch.empty((1,) * r, dtype=dt, device="meta") for dt, r in key]
        dtype = _block_dtype_cache[key] = torch.block_diag(*meta).dtype
    return dtype


@register_present(aten_op("block_diag"))
def block_diag_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    blocks = list(args[0])
    bds = bdims[0] if bdims[0] is not None else (None,) * len(blocks)
    dtype = _block_dtype(blocks, bds)
    mats = []
    for b, d in zip(blocks, bds):
        b = batched_front(b, d, B)
        if b.dim() < 3:  # logical 0-d -> [1, 1], 1-d -> [1, n]
            b = b.reshape((B,) + (1,) * (3 - b.dim()) + tuple(b.shape[1:]))
        mats.append(b.to(dtype))
    cols = sum(m.shape[2] for m in mats)
    rows, left = [], 0
    for m in mats:
        c = m.shape[2]
        rows.append(aten.constant_pad_nd(m, [left, cols - left - c]))
        left += c
    return aten.cat(rows, 1), 0


# ----------------------------------------------------------------------------------------------
# anti-aliased bilinear upsampling
# ----------------------------------------------------------------------------------------------

register_present(aten_op("_upsample_bilinear2d_aa"))(fold_rule(3, [0]))
register_present(aten_op("_upsample_bilinear2d_aa_backward"))(fold_rule(3, [0], size_pos=2))


# ----------------------------------------------------------------------------------------------
# in-place addr_, floor_divide
# ----------------------------------------------------------------------------------------------

@register_present(aten_op("addr_"))
def addr_inplace_rule(level, func, args, bdims, kwargs):
    out, od = addr_rule(level, aten.addr.default, args, bdims, kwargs)
    # The dispatcher raised already if self is unbatched while the vectors are batched.
    to_front(args[0], bdims[0]).copy_(to_front(out, od))
    return args[0], bdims[0]


register_present(aten_op("floor_divide"), aten_op("floor_divide", "Scalar"),
                 aten_op("floor_divide_", "Tensor"), aten_op("floor_divide_", "Scalar"))(
    pointwise_rule)


# ----------------------------------------------------------------------------------------------
# linspace / logspace with tensor ends
# ----------------------------------------------------------------------------------------------

def _sample_scalar(x):
    """A Python number of ``x``'s kind: the dtype inference of linspace depends only on it."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.dtype.is_complex:
        return 0j
    if x.dtype.is_floating_point:
        return 0.0
    return False if x.dtype == torch.bool else 0


def _space_rule(log):
    def rule(level, func, args, bdims, kwargs):
        B = level.batch_size
        start, end, steps = args[0], args[1], args[2]
        base = (args[3] if len(args) > 3 else kwargs.get("base", 10.0)) if log else None
        ranks = [t.dim() - (d is not None) if isinstance(t, torch.Tensor) else 0
                 for t, d in ((start, bdims[0]), (end, bdims[1]))]
        if any(ranks):
            raise RuntimeError(f"{'logspace' if log else 'linspace'} only supports 0-dimensional "
                               f"start and end tensors, but got start with {ranks[0]} "
                               f"dimension(s) and end with {ranks[1]} dimension(s).")
        # dtype/device as torch infers them from the two Scalars the kernel reads.
        extra = {k: kwargs[k] for k in ("dtype", "layout", "device", "pin_memory") if k in kwargs}
        factory = torch.logspace if log else torch.linspace
        proto = factory(_sample_scalar(start), _sample_scalar(end), 0,
                        **({"base": base} if log else {}), **{**extra, "device": "meta"})
        dtype = proto.dtype
        device = kwargs.get("device") or _default_device()
        out = _batched_space(B, start, bdims[0], end, bdims[1], steps, dtype, device, log, base)
        return out, 0

    return rule


def _default_device():
    get = getattr(torch, "get_default_device", None)  # torch >= 2.3
    return get() if get is not None else torch.device("cpu")


def _as_column(v, d, B, dtype, device):
    """An end point as ``[B, 1]`` in ``dtype`` (the kernel's ``Scalar.to<scalar_t>()``)."""
    if isinstance(v, torch.Tensor):
        return batched_front(v, d, B).to(device=device, dtype=dtype).reshape(B, 1)
    return torch.tensor(v, device=device).to(dtype).expand(B, 1)


def _batched_space(B, start, ds, end, de, steps, dtype, device, log, base):
    if steps < 0:
        raise RuntimeError("number of steps must be non-negative")
    # Integral results step in double (truncated at the end), others in their own dtype.
    integral = not (dtype.is_floating_point or dtype.is_complex)
    step_dtype = torch.float64 if integral else dtype
    s = _as_column(start, ds, B, dtype, device).to(step_dtype)
    e = _as_column(end, de, B, dtype, device).to(step_dtype)
    if steps <= 1:
        vals = s[:, :steps]
    else:
        step = (e - s) / (steps - 1)
        # The kernel converts the int index to the step type (arange has no complex kernel).
        idx = torch.arange(steps, device=device, dtype=torch.float64).to(step_dtype)
        half = steps // 2
        vals = torch.cat([s + step * idx[:half],
                          e - step * (steps - 1 - idx[half:])], dim=1)
    if log:
        # The kernel raises base to the power in double (complex double for complex results).
        pdt = torch.complex128 if dtype.is_complex else torch.float64
        vals = torch.pow(torch.tensor(base, dtype=pdt, device=device), vals.to(pdt))
    return vals.to(dtype)


for _name, _log in (("linspace", False), ("logspace", True)):
    _overloads = ("Tensor_Tensor", "Tensor_Scalar", "Scalar_Tensor")
    register_present(*[aten_op(_name, o) for o in _overloads])(_space_rule(_log))
