"""Lanes: the examples of one or more live vmap levels, laid out as one flat physical dim.

Data-dependent control flow under vmap (``ftrans.cond``, ``while_loop``, the ``split`` policy)
has to look at every example's predicate and run each example only through its own branch.
It does so by leaving the vmap levels the predicate is batched at: :func:`gather` turns a
value into a tensor whose leading dim enumerates every combination of those levels' examples
(``N = B1 * ... * Bk``), :func:`scatter` puts such a tensor back under the levels.  In between,
the lanes are ordinary rows: select a subset with ``index_select``, run a branch on it under a
fresh inner ``vmap``, and reassemble with ``cat`` and one inverse permutation.

Every step is a differentiable torch op (``RemoveBatchDim`` / ``AddBatchDim`` at the level
boundaries), so autograd records through the partition: ``grad`` of a ``cond`` or of a
``while_loop`` is ordinary reverse mode over the ops that actually ran.

A branch may close over per-example values (``lambda: x.sin()`` with ``x`` batched).  Such a
value has the full batch, not the branch's subset, so :func:`rebind_closure` passes the branch
a copy of the function whose closure cells hold the subset (one level of closure: values
reached through other objects are not visible and are refused by :func:`check_not_batched`).
"""
from __future__ import annotations

import math
import types

import torch

from .autograd import AddBatchDim, RemoveBatchDim
from .batched import BatchedTensor, add_batch_dim, batched_at, remove_batch_dim

__all__ = ["vmap_levels", "raw", "gather", "scatter", "closure_tensors", "rebind_closure",
           "check_not_batched", "batched_at"]

_DisableTF = torch._C.DisableTorchFunctionSubclass


def vmap_levels(t) -> list:
    """The live vmap levels ``t`` is batched at, highest (outermost wrapper) first."""
    out = []
    while type(t) is BatchedTensor:
        if t.level.alive:
            out.append(t.level)
        t = t.value
    return out


def raw(t) -> torch.Tensor:
    """The fully unwrapped physical tensor (every batch dim, in wrapper order), detached."""
    while type(t) is BatchedTensor:
        t = t.value
    return t.detach()



def _differentiable(t) -> bool:
    if type(t) is BatchedTensor:  # read without the torch-function hop
        with _DisableTF():
            return t.requires_grad and torch.is_grad_enabled()
    return t.requires_grad and torch.is_grad_enabled()


def gather(t: torch.Tensor, levels) -> torch.Tensor:
    """``t`` with the examples of ``levels`` (highest id first) as one leading dim of size N.

    The result is batched only at levels not in ``levels``; a value not batched at one of them
    is expanded (its examples are all equal)."""
    for level in levels:
        if batched_at(t, level):
            if _differentiable(t):
                t = RemoveBatchDim.apply(t, level, level.batch_size, 0)
            else:
                t = remove_batch_dim(t, level, level.batch_size, 0)
        else:
            t = t.unsqueeze(0).expand((level.batch_size,) + tuple(t.shape))
    if len(levels) != 1:
        t = t.flatten(0, len(levels) - 1) if levels else t.unsqueeze(0)
    return t


def scatter(t: torch.Tensor, levels) -> torch.Tensor:
    """Inverse of :func:`gather`: the leading lane dim of ``t`` becomes the batch of ``levels``."""
    if len(levels) != 1:
        t = t.unflatten(0, tuple(level.batch_size for level in reversed(levels)))
    for level in reversed(levels):  # lowest level first: its dim leads
        if _differentiable(t):
            t = AddBatchDim.apply(t, 0, level)
        else:
            t = add_batch_dim(t, 0, level)
    return t


def lane_count(levels) -> int:
    return math.prod(level.batch_size for level in levels)


def closure_tensors(fn) -> list:
    """(cell index, tensor) for the closure cells of ``fn`` that hold BatchedTensors."""
    cells = getattr(fn, "__closure__", None) or ()
    out = []
    for i, cell in enumerate(cells):
        try:
            v = cell.cell_contents
        except ValueError:  # an empty cell (a name assigned later in the enclosing scope)
            continue
        if type(v) is BatchedTensor:
            out.append((i, v))
    return out


def rebind_closure(fn, replacements: dict):
    """A copy of function ``fn`` whose closure cells ``i`` hold ``replacements[i]``."""
    if not replacements:
        return fn
    cells = tuple(
        types.CellType(replacements[i]) if i in replacements else c
        for i, c in enumerate(fn.__closure__)
    )
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def check_not_batched(outputs, levels, form: str) -> None:
    """A branch's output still batched at a partitioned level read a per-example value that was
    not passed to it (through an object the closure rebinding cannot see)."""
    for o in outputs:
        if type(o) is BatchedTensor and any(batched_at(o, level) for level in levels):
            raise RuntimeError(
                f"{form}: a branch used a per-example (vmapped) value that it reached neither "
                "through its operands nor as a plain closure variable (e.g. through an object "
                "attribute, a list or a nested function). Pass that value in `operands` "
                "(`carried_inputs` for while_loop)."
            )
