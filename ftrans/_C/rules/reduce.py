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
from ._util import to_front, wrap_dim
from .views import finish, get_arg, overloads, set_arg

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
        if is_list:
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
