"""Reductions, scans, sort/topk: every rule moves the batch dim to 0 and shifts the logical dims.

Physical dim 0 is never reduced, so ``keepdim`` needs no care.  What needs care is "reduce
everything": ``sum(x)``, ``dim=None`` and, for most list-dim ops, ``dim=[]`` mean *all logical
dims*, i.e. physical dims 1..r, never the batch.  Ops with a list of dims get that list; ops with
a single int dim (``argmax``, ``median``, ``prod``) reduce the flattened example, which is what
their ``dim=None`` means.  Full-reduction overloads without a dim argument (``sum.default``) are
lowered onto their dim overload.

A logical 0-dim input is physically ``[B]``; it gets a size-1 dim appended so that dim 0/-1
exists, and the outputs (0-dim logically) drop it again.
"""
from __future__ import annotations

import math

import torch

from ..registry import register_batch_rule
from ._util import overloads, to_front, wrap_dim
from .views import finish, get_arg, set_arg

aten = torch.ops.aten


def _all_dims(x):
    """(x, physical dims standing for every logical dim, whether x got a size-1 dim appended)."""
    if x.dim() == 1:
        return aten.unsqueeze.default(x, 1), [1], True
    return x, list(range(1, x.dim())), False


def _flatten(x):
    """The front-batched x with each example flattened to one dim."""
    n = math.prod(x.shape[1:])
    return aten.reshape.default(x, [x.shape[0], n])


def reduction_rule(dim_name="dim", *, empty_means_all=True, keepdim_name="keepdim"):
    """Rule for ops whose argument ``dim_name`` is an int, an int list, or None.

    ``None`` (and ``[]`` if ``empty_means_all``) means every logical dim: a list-dim op gets
    physical dims 1..r, an int-dim op reduces the flattened example.
    """

    def rule(level, func, args, bdims, kwargs):
        x = to_front(args[0], bdims[0])
        r = x.dim() - 1
        args, kwargs = list(args), dict(kwargs)
        d = get_arg(func, args, kwargs, dim_name)
        is_list = isinstance(d, (list, tuple))
        if d is None or (is_list and not d and empty_means_all):
            if _dim_is_list(func, dim_name):
                x, dims, pad = _all_dims(x)
                args[0] = x
                set_arg(func, args, kwargs, dim_name, dims)
                return finish(func(*args, **kwargs), pad)
            args[0] = _flatten(x)
            set_arg(func, args, kwargs, dim_name, 1)
            out, bd = finish(func(*args, **kwargs))
            if get_arg(func, args, kwargs, keepdim_name):
                shape = [x.shape[0]] + [1] * r
                out = (aten.view.default(out, shape) if isinstance(out, torch.Tensor)
                       else type(out)(aten.view.default(o, shape) for o in out))
            return out, bd
        pad = r == 0
        if pad:
            x = aten.unsqueeze.default(x, 1)
        args[0] = x
        rank = max(r, 1)
        if is_list and not d and pad:
            # "[] means none" on a 0-dim example (masked.logsumexp passes dim=()): reduce the
            # padded size-1 dim, an identity; the physical [B, 1] would reduce everything.
            set_arg(func, args, kwargs, dim_name, [1])
        elif is_list:
            set_arg(func, args, kwargs, dim_name, [wrap_dim(i, rank) + 1 for i in d])
        else:
            set_arg(func, args, kwargs, dim_name, wrap_dim(d, rank) + 1)
        return finish(func(*args, **kwargs), pad)

    return rule


_LIST_DIM: dict = {}


def _dim_is_list(func, name) -> bool:
    key = (func, name)
    v = _LIST_DIM.get(key)
    if v is None:
        v = False
        for a in func._schema.arguments:
            if a.name == name:
                t = a.type
                if isinstance(t, torch._C.OptionalType):
                    t = t.getElementType()
                v = isinstance(t, torch._C.ListType)
        _LIST_DIM[key] = v
    return v


for _ops, _rule in [
    # list dims; [] means all
    (overloads("sum.dim_IntList", "nansum.default", "mean.dim", "amax.default", "amin.default",
               "var.correction", "std.correction", "var_mean.correction", "std_mean.correction",
               "norm.ScalarOpt_dim", "norm.ScalarOpt_dim_dtype", "linalg_vector_norm.default",
               "count_nonzero.dim_IntList"), reduction_rule()),
    # list dims; [] means none
    (overloads("any.dims", "all.dims", "logsumexp.default"),
     reduction_rule(empty_means_all=False)),
    # one int dim; None means the flattened example
    (overloads("prod.dim_int", "max.dim", "min.dim", "argmax.default", "argmin.default",
               "aminmax.default", "all.dim", "any.dim", "median.dim", "nanmedian.dim",
               "mode.default", "kthvalue.default", "topk.default", "sort.default", "sort.stable",
               "cumsum.default", "cumsum_.default", "cumprod.default", "cumprod_.default",
               "logcumsumexp.default", "_logcumsumexp.default", "cummax.default",
               "cummin.default", "count_nonzero.default", "var.dim", "std.dim"),
     reduction_rule()),
]:
    register_batch_rule(*_ops)(_rule)


# Full reductions without a dim argument, lowered onto a dim overload: ``call(x, dims, args)``
# gets the front-batched x and either the physical dims 1..r or, for ``flat`` ones, dim 1 of the
# flattened example.

def _full(call, *, flat=False):
    def rule(level, func, args, bdims, kwargs):
        x = to_front(args[0], bdims[0])
        if flat:
            return finish(call(_flatten(x), 1, args, kwargs))
        x, dims, pad = _all_dims(x)
        return finish(call(x, dims, args, kwargs), pad)

    return rule


def _arg(args, i, default):
    return args[i] if len(args) > i else default


_FULL = [
    ("sum.default", lambda x, d, a, k: aten.sum.dim_IntList(x, d, **k), False),
    ("mean.default", lambda x, d, a, k: aten.mean.dim(x, d, **k), False),
    ("max.default", lambda x, d, a, k: aten.amax.default(x, d), False),
    ("min.default", lambda x, d, a, k: aten.amin.default(x, d), False),
    ("norm.Scalar", lambda x, d, a, k: aten.norm.ScalarOpt_dim(x, _arg(a, 1, 2), d), False),
    ("norm.ScalarOpt_dtype",
     lambda x, d, a, k: aten.norm.ScalarOpt_dim_dtype(x, a[1], d, False, **k), False),
    ("var.default", lambda x, d, a, k: aten.var.dim(x, d, _arg(a, 1, True)), False),
    ("std.default", lambda x, d, a, k: aten.std.dim(x, d, _arg(a, 1, True)), False),
    ("prod.default", lambda x, d, a, k: aten.prod.dim_int(x, d, **k), True),
    ("median.default", lambda x, d, a, k: aten.median.dim(x, d)[0], True),
    ("nanmedian.default", lambda x, d, a, k: aten.nanmedian.dim(x, d)[0], True),
    ("all.default", lambda x, d, a, k: aten.all.dim(x, d), True),
    ("any.default", lambda x, d, a, k: aten.any.dim(x, d), True),
]
for _name, _call, _flat in _FULL:
    register_batch_rule(*overloads(_name))(_full(_call, flat=_flat))


# segment_reduce: ``lengths`` / ``offsets`` have shape ``data.shape[:axis] + [segments]``, so
# with the batch dim in front of everything the per-example segmentations are one N-D call.
def _segment_rule(tensor_pos):
    def rule(level, func, args, bdims, kwargs):
        B = level.batch_size
        args = list(args)
        for p in tensor_pos:
            args[p] = _front(args[p], bdims[p], B)
        kwargs = dict(kwargs)
        kw = getattr(bdims, "kw", {})
        for k in ("lengths", "offsets", "indices"):
            if isinstance(kwargs.get(k), torch.Tensor):
                kwargs[k] = _front(kwargs[k], kw.get(k), B)
        rank = args[tensor_pos[-1]].dim() - 1
        kwargs["axis"] = wrap_dim(kwargs.get("axis", 0), rank) + 1
        return func(*args, **kwargs), 0

    rule.kw_bdims = True
    return rule


def _front(x, bdim, B):
    if bdim is None:
        return x.unsqueeze(0).expand((B,) + tuple(x.shape)).contiguous()
    return to_front(x, bdim).contiguous()


if hasattr(aten, "segment_reduce"):
    register_batch_rule(aten.segment_reduce.default)(_segment_rule([0]))
if hasattr(aten, "_segment_reduce_backward"):
    register_batch_rule(aten._segment_reduce_backward.default)(_segment_rule([0, 1, 2]))


@register_batch_rule(aten.histc.default)
def histc_rule(level, func, args, bdims, kwargs):
    """Per-example histograms in one scatter_add over ``[B, bins]``.

    Mirrors torch's kernel: the range is ``[min, max]``, or the example's own data range when
    ``min == max`` (widened by 1 each way when that is empty); bin ``((x - lo) * bins) /
    (hi - lo)`` in the input dtype, truncated; the top edge falls into the last bin; values
    outside the range (and NaN) are not counted.  Where torch raises for an example whose data
    range is not finite (inf in the data), that example's histogram is NaN instead: raising
    would need a host sync on a per-example value.
    """
    names = ("bins", "min", "max")
    rest = list(args[1:]) + [kwargs.get(n, d) for n, d in zip(names, (100, 0, 0))][len(args) - 1:]
    bins, lo, hi = rest
    x = to_front(args[0], bdims[0])
    if not x.dtype.is_floating_point:  # torch's kernel: floating types only
        func(x.new_zeros((0,)), bins, lo, hi)
    B = x.shape[0]
    x = x.reshape(B, -1)
    if bins <= 0:
        raise RuntimeError(f"torch.histc: bins must be > 0, but got {bins} for dimension 0")
    out = x.new_zeros((B, bins))
    if lo == hi and x.shape[1] > 0:
        lo_t, hi_t = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    else:
        if lo == hi:
            lo, hi = lo - 1, hi + 1
        if not math.isfinite(lo) or not math.isfinite(hi):
            raise RuntimeError(f"torch.histc: range of [{lo}, {hi}] is not finite")
        if lo > hi:
            raise RuntimeError("torch.histc: max must be larger than min")
        lo_t = torch.full((B, 1), lo, dtype=x.dtype, device=x.device)
        hi_t = torch.full((B, 1), hi, dtype=x.dtype, device=x.device)
    empty = lo_t == hi_t
    lo_t, hi_t = torch.where(empty, lo_t - 1, lo_t), torch.where(empty, hi_t + 1, hi_t)
    finite = torch.isfinite(lo_t) & torch.isfinite(hi_t)
    keep = (x >= lo_t) & (x <= hi_t) & finite
    pos = ((x - lo_t) * bins / (hi_t - lo_t))
    pos = torch.where(keep, pos, torch.zeros((), dtype=pos.dtype, device=pos.device))
    pos = pos.to(torch.int64).clamp_max(bins - 1)
    out = out.scatter_add(1, pos, keep.to(x.dtype))
    return torch.where(finite, out, torch.full((), float("nan"), dtype=x.dtype,
                                               device=x.device)), 0


# `_is_all_true`/`_is_any_true` back `torch._check_tensor_all` (TORCH_CHECK_TENSOR_ALL) and the
# autograd engine's anomaly check (``isnan(g)._is_any_true().item()`` on a per-example gradient):
# as in torch.func, the answer is for the whole batch, unbatched, so that its ``.item()`` works
# and one bad example raises.
@register_batch_rule(aten._is_any_true.default, aten._is_all_true.default)
def _whole_batch_truth_rule(level, func, args, bdims, kwargs):
    return func(args[0]), None
