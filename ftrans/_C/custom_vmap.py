"""Custom operators' own vmap rules, honoured as ftrans batching rules.

``torch.library.custom_op`` operators can carry a vmap rule registered for ``torch.vmap``
(``op.register_vmap(fn)`` / ``torch.library.register_vmap(op, fn)``):
``fn(info, in_dims, *args, **kwargs) -> (outputs, out_dims)``, with ``info.batch_size`` and
``info.randomness``.  That is ftrans's rule signature in other words (physical arguments, one
batch dim or None per argument, outputs with their batch dims), so an op that works under
``torch.vmap`` through its author's rule works under ``ftrans.vmap`` through the same rule,
with no per-example loop and no registration on ftrans's side.  A rule registered with
``ftrans.register_batch_rule`` takes precedence.

torch keeps the function on the op's ``CustomOpDef`` (``_vmap_fn``); operators defined with a
raw ``torch.library.Library`` keep theirs inside a functorch kernel, out of reach: those need
``ftrans.register_batch_rule``.
"""
from __future__ import annotations

import torch

from torch._library.custom_ops import OPDEFS as _OPDEFS  # torch >= 2.4 (pyproject: >= 2.6)

from .. import _pytree
from .batched import make_batched

__all__ = ["vmap_fn_for", "registered_vmap_rule"]


class VmapInfo:
    """The ``info`` argument of a registered vmap function."""

    __slots__ = ("batch_size", "randomness")

    def __init__(self, batch_size: int, randomness: str):
        self.batch_size, self.randomness = batch_size, randomness


def vmap_fn_for(func):
    """The vmap function registered for custom op ``func`` (an OpOverload), or None."""
    if func.namespace in ("aten", "prim", "prims"):
        return None
    opdef = _OPDEFS.get(func._schema.name)
    return getattr(opdef, "_vmap_fn", None)


def registered_vmap_rule(level, func, args, bdims, kwargs):
    fn = vmap_fn_for(func)
    in_dims = tuple(list(b) if isinstance(b, tuple) else b for b in bdims)
    out, out_dims = fn(VmapInfo(level.batch_size, level.randomness), in_dims, *args, **kwargs)
    if isinstance(out, tuple) and any(isinstance(o, (list, tuple)) for o in out):
        # Nested outputs (``-> (Tensor[], int)``): out_dims is a pytree prefix of them; wrap
        # here, as the dispatcher's wrapping knows flat tuples only.
        return _wrap_nested(out, out_dims, func, level), None
    return out, _normalize(out, out_dims, func)


def _wrap_nested(out, out_dims, func, level):
    leaves, spec = _pytree.tree_flatten(out)
    try:
        dims = _pytree.tree_leaves(_pytree.tree_broadcast_prefix(out_dims, out))
    except ValueError:
        raise ValueError(f"the vmap rule registered for {func} returned outputs with structure "
                         f"{spec} and out_dims {out_dims!r}, which do not match") from None
    wrapped = [make_batched(o, d % max(o.dim(), 1), level)
               if isinstance(o, torch.Tensor) and d is not None else o
               for o, d in zip(leaves, dims)]
    return _pytree.tree_unflatten(spec, wrapped)


def _normalize(out, out_dims, func):
    """``out_dims`` in ftrans's convention: an int (or None) for a tensor, a tuple for a tuple."""
    if isinstance(out, torch.Tensor):
        if isinstance(out_dims, (tuple, list)):
            if len(out_dims) != 1:
                raise ValueError(f"the vmap rule registered for {func} returned one tensor and "
                                 f"out_dims {out_dims!r}")
            out_dims = out_dims[0]
        return None if out_dims is None else out_dims % max(out.dim(), 1)
    if isinstance(out_dims, int) or out_dims is None:
        out_dims = (out_dims,) * len(out)
    if len(out_dims) != len(out):
        raise ValueError(f"the vmap rule registered for {func} returned {len(out)} outputs and "
                         f"out_dims {out_dims!r}")
    return tuple(None if d is None or not isinstance(o, torch.Tensor) else d % max(o.dim(), 1)
                 for o, d in zip(out, out_dims))
