"""Fresh tensors that become batched on their first batched write.

``out = torch.zeros(n); out[i] = v`` inside ``vmap`` with a per-example ``v`` is an error in
torch.func and JAX: ``out`` has no batch dim, so it cannot hold one value per example.  But a
tensor the vmapped function *created itself* from a factory (``zeros``, ``ones``, ``empty``,
``full``, ``*_like`` / ``new_*`` of unbatched values) has no history the caller could see: it
can simply become batched, as if it had been created per example.

The vmap dispatch mode (``dispatch.py``) hands such factory results back as a
:class:`FreshTensor`, a plain tensor (torch-function disabled, no dispatch hook: it costs
nothing) tagged with the innermost live vmap level.  When an in-place op writes a value batched
at a level into an unbatched tensor, dispatch's usual error carries ``_ftrans_fresh = (tensor,
level)`` when the tensor is fresh for that level (created while the level was live).  The
``__torch_function__`` of BatchedTensor (above autograd) catches that error, expands the tensor to one
copy per example, swaps the batched version into the user's very object
(``torch.utils.swap_tensors``: FreshTensor has BatchedTensor's slots for that), and replays the
op.  Tensors created before the vmap, and views of fresh tensors, keep the clear error.
"""
from __future__ import annotations

import torch

from . import levels as _levels
from .autograd import AddBatchDim
from .batched import add_batch_dim

__all__ = ["FreshTensor", "FACTORIES", "make_fresh", "fresh_base", "materialize"]

aten = torch.ops.aten


class FreshTensor(torch.Tensor):
    """A factory result made inside vmap; behaves exactly as a plain tensor."""

    __slots__ = ("value", "bdim", "level")  # BatchedTensor's, so that the two can be swapped
    __torch_function__ = torch._C._disabled_torch_function_impl


FACTORIES = frozenset(
    getattr(getattr(aten, name), overload)
    for name, overload in (
        ("zeros", "default"), ("ones", "default"), ("empty", "memory_format"),
        ("full", "default"), ("zeros_like", "default"), ("ones_like", "default"),
        ("empty_like", "default"), ("full_like", "default"), ("new_zeros", "default"),
        ("new_ones", "default"), ("new_empty", "default"), ("new_full", "default"),
    )
    if hasattr(aten, name) and hasattr(getattr(aten, name), overload)
)


def make_fresh(out):
    """A factory's unbatched result, made inside vmap, as a FreshTensor of the innermost level."""
    if type(out) is not torch.Tensor:
        return out
    level = None
    for lv in reversed(_levels.current_stack()):
        if lv.kind == _levels.VMAP:
            level = lv
            break
    if level is None:
        return out
    # not a view (views of it then see it as their base); a factory result is a leaf
    fresh = torch.Tensor._make_subclass(FreshTensor, out, out.requires_grad)
    fresh.__dict__["_ftrans_fresh"] = level
    return fresh


def fresh_base(t, level):
    """The fresh tensor ``t`` is, or is a view of (``out[1] = v`` writes into ``out[1]``),
    when it was created while ``level`` was live; else None."""
    if not isinstance(t, torch.Tensor):
        return None
    base = t._base if t._is_view() else t
    if base is None:
        return None
    born = base.__dict__.get("_ftrans_fresh")
    return base if born is not None and born.id >= level.id else None


def materialize(t, level) -> bool:
    """Make fresh ``t`` batched at ``level`` in place (the same Python object); False if torch
    cannot swap it (it has views or weak references): the caller re-raises."""
    born = t.__dict__.get("_ftrans_fresh")
    with torch._C.DisableTorchFunctionSubclass():
        shape = tuple(t.shape)
        value = t.unsqueeze(0).expand((level.batch_size,) + shape).clone()
        if value.requires_grad and torch.is_grad_enabled():
            batched = AddBatchDim.apply(value, 0, level)
        else:
            batched = add_batch_dim(value, 0, level)
    try:
        torch.utils.swap_tensors(t, batched)
    except RuntimeError:
        return False
    t.__dict__["_ftrans_fresh"] = born  # a later write at a higher level may batch it again
    return True
