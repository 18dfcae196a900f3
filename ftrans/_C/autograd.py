"""Where autograd meets the batching levels.

Autograd records on the *logical* tensors: inside ``vmap``, ``torch.autograd.grad`` works on
BatchedTensors and its backward formulas dispatch through the same batching rules.  Two things
need care at a vmap boundary:

1. Inputs that require grad (``grad(vmap(f))``, a user's ``.backward()`` through vmap) enter and
   leave through :class:`AddBatchDim` / :class:`RemoveBatchDim`, a pair of autograd Functions
   whose backwards call each other's ``apply``, so double backward stays differentiable.
2. Tensors a vmapped function *closes over* (captured parameters) receive per-example
   gradients, because autograd sees only logical shapes.  Once their vmap has exited, such a
   gradient must be summed over the exited level (pitfall 5).  ``ensure_sum_hook`` registers,
   once per captured tensor, a gradient hook that does exactly that, and leaves gradients of
   live levels alone (a vjp function called under a newer vmap is per-example on purpose).
"""
from __future__ import annotations

import torch

from .batched import BatchedTensor, add_batch_dim, remove_batch_dim

__all__ = ["AddBatchDim", "RemoveBatchDim", "sum_exited_levels", "ensure_sum_hook"]


class AddBatchDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bdim, level):
        ctx.bdim, ctx.level = bdim, level
        return add_batch_dim(x.detach(), bdim, level)

    @staticmethod
    def backward(ctx, grad):
        return RemoveBatchDim.apply(grad, ctx.level, ctx.level.batch_size, ctx.bdim), None, None


class RemoveBatchDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, level, batch_size, out_dim):
        ctx.level, ctx.out_dim = level, out_dim
        return remove_batch_dim(t.detach(), level, batch_size, out_dim)

    @staticmethod
    def backward(ctx, grad):
        return AddBatchDim.apply(grad, ctx.out_dim, ctx.level), None, None, None


def exited_levels(t) -> list:
    levels = []
    while type(t) is BatchedTensor:
        if not t.level.alive:
            levels.append(t.level)
        t = t.value
    return levels


def sum_exited_levels(g):
    """Sum a gradient over every batch level in it whose vmap has already returned."""
    if type(g) is not BatchedTensor:
        return g
    for level in exited_levels(g):
        g = remove_batch_dim(g, level, level.batch_size, 0).sum(0)
    return g


def _hook(g):
    return sum_exited_levels(g) if type(g) is BatchedTensor else g


def ensure_sum_hook(t) -> None:
    """Once per tensor: gradients reaching ``t`` get exited levels summed out."""
    try:
        if t.__dict__.get("_ftrans_sum_hook"):
            return
        t.register_hook(_hook)
        t._ftrans_sum_hook = True
    except RuntimeError:  # e.g. inference tensors; nothing can flow back to them anyway
        pass
