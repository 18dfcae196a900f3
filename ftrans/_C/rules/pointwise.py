"""Pointwise ops: one generic rule for every op torch tags ``pointwise``.

Batched arguments get their batch dim moved to the front and are padded with size-1 dims up to
the largest logical rank, so torch's own broadcasting lines up the example dims; unbatched
arguments broadcast as they are.  The batched op is the same native kernel on bigger tensors.

Type promotion needs one care: a batched *logical* 0-dim tensor is physically 1-dim, and torch
promotes dimensioned tensors over 0-dim ones.  When that changes the result dtype, the 0-dim
argument is cast to the logical result dtype first (found once per signature on meta tensors).
"""
from __future__ import annotations

import torch

from ._util import pad_rank

aten = torch.ops.aten

_promotion_cache: dict = {}


_Tensor = torch.Tensor


def pointwise_rule(level, func, args, bdims, kwargs):
    # One pass: the largest logical rank, and whether dtypes could promote differently.
    rank = 0
    batched_0dim = False
    dtype = None
    mixed = False
    for a, b in zip(args, bdims):
        if isinstance(a, _Tensor):
            r = a.dim()
            if b is not None:
                r -= 1
                if r == 0:
                    batched_0dim = True
            if r > rank:
                rank = r
            if dtype is None:
                dtype = a.dtype
            elif a.dtype != dtype:
                mixed = True
    new_args = list(args)
    for i, b in enumerate(bdims):
        if b is not None:
            x = new_args[i]
            if b != 0:
                x = x.movedim(b, 0)
            if x.dim() - 1 < rank:
                x = pad_rank(x, rank)
            new_args[i] = x
    if batched_0dim and mixed:
        _fix_promotion(func, args, bdims, kwargs, new_args)
    out = func._op(*new_args, **kwargs)  # the C++ callable: no OpOverload.__call__ frame
    if type(out) is tuple:
        return out, (0,) * len(out)
    return out, 0


# The physical call is the op itself over a leading batch dim with every example's dims aligned:
# torch's broadcasting raises exactly where it raises for one example (shapecheck.py).
pointwise_rule.checks_shapes = True


def _fix_promotion(func, args, bdims, kwargs, new_args):
    key = (func,) + tuple(
        (a.dtype, a.dim() - (b is not None), b is not None) if isinstance(a, torch.Tensor)
        else type(a) for a, b in zip(args, bdims)
    )
    expected = _promotion_cache.get(key)
    if expected is None:
        meta = [
            torch.empty((1,) * (a.dim() - (b is not None)), dtype=a.dtype, device="meta")
            if isinstance(a, torch.Tensor) else a
            for a, b in zip(args, bdims)
        ]
        try:
            out = func(*meta, **kwargs)
            expected = out[0].dtype if isinstance(out, tuple) else out.dtype
        except Exception:
            expected = False
        _promotion_cache[key] = expected
    if expected is False:
        return
    for i, (a, b) in enumerate(zip(args, bdims)):
        if (b is not None and a.dim() == 1 and a.dtype != expected and a.dtype != torch.bool
                and a.dtype.is_floating_point == expected.is_floating_point
                and a.dtype.is_complex == expected.is_complex):
            new_args[i] = new_args[i].to(expected)


# Elementwise ops torch forgot to tag ``pointwise`` (found by the ModuleInfo sweep).
_UNTAGGED = {getattr(aten, n).default for n in ("hardshrink_backward", "softshrink_backward",
                                                "complex", "polar") if hasattr(aten, n)}


def is_pointwise(func, tags) -> bool:
    if torch.Tag.pointwise in tags or func in _UNTAGGED:
        return True
    return _inplace_of_pointwise(func)


def _inplace_of_pointwise(func) -> bool:
    """``abs_``, ``eq_``, ``threshold_``...: torch tags only their out-of-place overloads."""
    name = func._schema.name.split("::")[-1]
    if not name.endswith("_") or name.startswith("_"):
        return False
    packet = getattr(aten, name[:-1], None)
    functional = getattr(packet, func._overloadname, None) if packet is not None else None
    return functional is not None and (torch.Tag.pointwise in functional.tags
                                       or functional in _UNTAGGED)
