"""Where autograd meets the batching levels.

Autograd records on the *logical* tensors: inside ``vmap``, ``torch.autograd.grad`` works on
BatchedTensors and its backward formulas dispatch through the same batching rules.  Two things
need care at a vmap boundary:

1. Inputs that require grad (``grad(vmap(f))``, a user's ``.backward()`` through vmap) enter and
   leave through :class:`AddBatchDim` / :class:`RemoveBatchDim`, a pair of autograd Functions
   whose backwards call each other's ``apply``, so double backward stays differentiable.
2. Tensors a vmapped function *closes over* (captured parameters) receive per-example
   gradients, because autograd sees only logical shapes; once their vmap has exited, such a
   gradient must be summed over the exited level (see NOTE [exited levels] in ``levels.py``).  The sum has to happen per *use*
   (per autograd edge), not per tensor: a tensor hook sees the total gradient, and when a
   captured tensor is used both inside a vmap (batched contributions) and outside it, or its
   per-example contributions were already summed on another path (MAML, ``jacfwd(jacfwd)``),
   summing the total over the batch multiplies the unbatched part by the batch size.  So the
   ``__torch_function__`` of BatchedTensor (``torch_function.py``, which runs *above* autograd)
   replaces, through :func:`lift_args` here, every requires-grad argument that is not batched
   at the op's level by a fresh alias ``a.view_as(a)`` whose hook sums, out of the gradient flowing
   through that alias only, every exited level that ``a`` itself does not carry.  Saved
   tensors of the op's backward are the alias too, so higher-order contributions are summed
   on the same edge.  Live levels are left alone (a vjp function called under a newer vmap is
   per-example on purpose).
"""
from __future__ import annotations

import functools

import torch

from .batched import BatchedTensor, add_batch_dim, remove_batch_dim
from .levels import SUMMING_EXITED as _SUMMING_EXITED

__all__ = ["AddBatchDim", "AddBatchDims", "RemoveBatchDim", "sum_level", "sum_exited_levels",
           "saved_tensor_hooks_around_vmap", "lift", "needs_lift", "lift_args", "born_before"]


_NoPythonDispatch = torch._C._DisableTorchDispatch


def _detach(x):
    """``x.detach()``; for a plain tensor under no dispatch mode but vmap's own, without the
    Python dispatch hop (the mode would only pass it through: ~15 us per vmap input)."""
    if type(x) is torch.Tensor and _only_vmap_mode():
        with _NoPythonDispatch():
            return x.detach()
    return x.detach()


def _only_vmap_mode() -> bool:
    """Replaced by ``dispatch.only_vmap_mode`` when dispatch.py is imported (it sits above this
    module); until then, the plain detach."""
    return False


class AddBatchDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bdim, level):
        ctx.bdim, ctx.level = bdim, level
        return add_batch_dim(_detach(x), bdim, level)

    @staticmethod
    def backward(ctx, grad):
        return RemoveBatchDim.apply(grad, ctx.level, ctx.level.batch_size, ctx.bdim), None, None


class AddBatchDims(torch.autograd.Function):
    """:class:`AddBatchDim` for several inputs of one vmap call at once: one autograd node and
    one ``apply`` (about 10 us of Python each) instead of one per input (an ensemble's stacked
    parameters, a model's parameters mapped over tasks).  Call as ``apply(level, dims, *xs)``;
    the backward is each input's :class:`RemoveBatchDim`, ``None`` for an unused output."""

    @staticmethod
    def forward(ctx, level, dims, *xs):
        ctx.level, ctx.dims = level, dims
        ctx.set_materialize_grads(False)
        return tuple(add_batch_dim(_detach(x), d, level) for x, d in zip(xs, dims))

    @staticmethod
    def backward(ctx, *grads):
        level = ctx.level
        return (None, None) + tuple(
            None if g is None else RemoveBatchDim.apply(g, level, level.batch_size, d)
            for g, d in zip(grads, ctx.dims))


class RemoveBatchDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, level, batch_size, out_dim):
        ctx.level, ctx.out_dim = level, out_dim
        return remove_batch_dim(t.detach(), level, batch_size, out_dim)

    @staticmethod
    def backward(ctx, grad):
        level = ctx.level
        if not level.alive and level in _levels_of(grad):
            # The output had no batch dim at ``level``, but in a double backward through a vmap
            # that has returned, the autograd engine's own ops can hand it a gradient that is
            # still batched there (they mix batched and unbatched tensors without the per-use
            # lift): that is a per-use contribution of the exited level, summed as the lift does.
            grad = sum_level(grad, level)
        return AddBatchDim.apply(grad, ctx.out_dim, level), None, None, None


def sum_level(g, level):
    """``g`` summed over batch level ``level``.  Under create_graph the sum stays
    differentiable (forward-over-reverse differentiates through it, with the cotangent as the
    variable)."""
    if g.requires_grad and torch.is_grad_enabled():
        return RemoveBatchDim.apply(g, level, level.batch_size, 0).sum(0)
    return remove_batch_dim(g, level, level.batch_size, 0).sum(0)


def sum_exited_levels(g, keep=()):
    """Sum a gradient over every batch level in it whose vmap has returned (except ``keep``)."""
    if type(g) is not BatchedTensor:
        return g
    exited = [l for l in _levels_of(g) if not l.alive and l not in keep]
    if exited:
        _SUMMING_EXITED[0] += 1
        try:
            for level in exited:
                g = sum_level(g, level)
        finally:
            _SUMMING_EXITED[0] -= 1
    return g



# ----------------------------------------------------------------------------------------------
# Saved-tensor hooks around a vmap (torch.utils.checkpoint, save_on_cpu)
# ----------------------------------------------------------------------------------------------

_top_saved_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


class _SavedBatched:
    __slots__ = ("packed", "bdim", "level")

    def __init__(self, packed, bdim, level):
        self.packed, self.bdim, self.level = packed, bdim, level


def saved_tensor_hooks_around_vmap():
    """Hooks for the tensors autograd saves inside a vmap when the caller has saved-tensor
    hooks on (``torch.utils.checkpoint``, ``save_on_cpu``); None otherwise (no cost).

    The caller's hooks see the *physical* tensor, and unpacking re-wraps it at the level it was
    saved at.  A non-reentrant checkpoint recomputes the forward in the backward pass, where the
    vmap inside is a new level: without this, the original graph's nodes would get tensors of
    that other (exited) level and mix two batch levels (wrong gradients, a BatchedTensor left
    in ``.grad``).
    """
    outer = _top_saved_hooks(False) if _top_saved_hooks is not None else None
    if outer is None:
        return None
    outer_pack, outer_unpack = outer

    def pack(t):
        if type(t) is BatchedTensor:
            return _SavedBatched(outer_pack(t.value), t.bdim, t.level)
        return outer_pack(t)

    def unpack(p):
        if type(p) is _SavedBatched:
            return BatchedTensor(outer_unpack(p.packed), p.bdim, p.level)
        return outer_unpack(p)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


# ----------------------------------------------------------------------------------------------
# Per-use lift of captured tensors (torch_function.py decides when; these make the aliases)
# ----------------------------------------------------------------------------------------------

def _levels_of(t) -> tuple:
    out = []
    while type(t) is BatchedTensor:
        out.append(t.level)
        t = t.value
    return tuple(out)


def _sum_hook(keep, g):
    return sum_exited_levels(g, keep) if type(g) is BatchedTensor else g


def lift(a):
    """A fresh alias of captured ``a`` whose hook sums the exited levels out of the gradient
    that flows through this use only."""
    b = a.view_as(a)
    if not b.requires_grad:  # below autograd (a rule's own torch calls): nothing is recorded
        return a
    b.register_hook(functools.partial(_sum_hook, _levels_of(a)))
    return b


def needs_lift(a, top) -> bool:
    return isinstance(a, torch.Tensor) and a.requires_grad and not (
        type(a) is BatchedTensor and a.level is top) and born_before(a, top)


def lift_args(func, args, kwargs, top):
    """``(args, kwargs)`` with every argument that needs a lift replaced by its alias."""
    name = getattr(func, "__name__", "")
    # Never alias the tensor an in-place op writes into (the write must reach the original).
    skip0 = name.endswith("_") or name.startswith("__i") or name == "__setitem__"
    new_args = list(args)
    changed = False
    for i, a in enumerate(args):
        if i == 0 and skip0:
            continue
        if type(a) in (list, tuple):
            if any(needs_lift(x, top) for x in a):
                new_args[i] = type(a)(lift(x) if needs_lift(x, top) else x for x in a)
                changed = True
        elif needs_lift(a, top):
            new_args[i] = lift(a)
            changed = True
    if kwargs:
        for k, a in kwargs.items():
            if k != "out" and needs_lift(a, top):
                kwargs = dict(kwargs)
                kwargs[k] = lift(a)
    return (tuple(new_args) if changed else args), kwargs


def born_before(a, top) -> bool:
    # Inputs that a grad level made for itself inside ``top`` are differentiated while ``top``
    # is alive: their per-example gradients are wanted as they are.
    born = a.__dict__.get("_ftrans_born") if type(a) is not BatchedTensor else None
    return born is None or born < top.id
