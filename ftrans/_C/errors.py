"""The error vocabulary of the core: :class:`VmapError`, the user's call form, torch.func's words.

Every refusal inside a transform starts with the user's call form (``vmap(f, in_dims=0)(x)``,
from :func:`call_form`), then torch.func's own message for the same refusal (code written
against torch.func matches it), then what to write instead.  Everything below the dispatcher
raises through this module, so it imports nothing of ftrans but :mod:`levels`.
"""
from __future__ import annotations

import torch

from .levels import SUMMING_EXITED as _SUMMING_EXITED

__all__ = ["VmapError", "call_form", "DATA_DEPENDENT_HINTS", "torch_data_dependent_msg",
           "data_dependent", "refuse_data_dependent", "refuse_out_variant", "refuse_inplace_view",
           "escaped", "ITEM_MSG", "CONTROL_FLOW_MSG", "INPLACE_UNBATCHED_MSG",
           "DivergentValueError"]


class VmapError(RuntimeError):
    """An operation that vmap cannot batch (data-dependent control flow, unsafe in-place)."""


def call_form(level) -> str:
    """The user's call form for error messages (``vmap(f, in_dims=...)(...)``), carried by
    ``level.origin`` (a string, or a callable that builds it only when an error needs it).

    ``vmap.py`` sets ``origin`` (built by ``_vmap_args._call_form``, or taken from the mapped
    function's ``_ftrans_origin`` when ``jacfwd`` runs the vmap for the user); the grad-family
    transforms, which raise outside dispatch, pass the same text around as ``form``."""
    origin = getattr(level, "origin", None)
    if origin:
        return origin() if callable(origin) else origin
    return "vmap"


# ----------------------------------------------------------------------------------------------
# Data-dependent operations
# ----------------------------------------------------------------------------------------------

# Ops whose *result* depends on tensor values in a way no batched kernel can express.
DATA_DEPENDENT_HINTS = {
    "aten::_local_scalar_dense": "`.item()`, `float(x)`, `int(x)`, `bool(x)` or a Python `if` "
    "on a per-example value. Use tensor ops instead: `torch.where(cond, a, b)` for a branch, "
    "keep scalars as 0-dim tensors",
    "aten::is_nonzero": "a Python `if`/`while` or `bool()` on a per-example value. Use "
    "`torch.where(cond, a, b)` to select per example",
    "aten::equal": "`torch.equal` returns one Python bool; compare with `torch.eq(a, b).all()` "
    "(a per-example 0-dim tensor) instead",
    "aten::nonzero": "`nonzero` / `argwhere` / boolean-mask indexing returns a different number "
    "of elements per example here (it is batched when every example has the same count). Use "
    "`torch.where(mask, x, 0)`, multiply by the mask, or pad with `ftrans.nonzero(x, size=...)`",
    "aten::masked_select": "`masked_select` / `x[mask]` returns a different number of elements per "
    "example. Use `torch.where(mask, x, 0)` instead",
    "aten::unique": "`unique` returns a different number of elements per example",
    "aten::_unique": "`unique` returns a different number of elements per example",
    "aten::_unique2": "`unique` returns a different number of elements per example",
    "aten::unique_dim": "`unique` returns a different number of elements per example",
    "aten::unique_consecutive": "`unique_consecutive` returns a different number of elements per "
    "example",
    "aten::unique_dim_consecutive": "`unique_consecutive` returns a different number of elements "
    "per example",
    "aten::allclose": "`allclose` returns one Python bool; use `torch.isclose(a, b).all()`",
    "aten::is_same_size": None,
}

# torch.func's own words for these refusals (code written against torch.func matches them).
ITEM_MSG = (
    "vmap: It looks like you're calling .item() on a Tensor. We don't support vmap over calling "
    ".item() on a Tensor, please try to rewrite what you're doing with other operations. If "
    "error is occurring somewhere inside PyTorch internals, please file a bug report."
)
CONTROL_FLOW_MSG = (
    "vmap: It looks like you're attempting to use a Tensor in some data-dependent control flow. "
    "We don't support that yet, please file an issue at https://github.com/pytorch/pytorch/issues ."
)


def torch_data_dependent_msg(name) -> str:
    """torch.func's message for data-dependent op ``name`` (``aten::...``)."""
    if name in ("aten::_local_scalar_dense", "aten::allclose"):
        return ITEM_MSG
    if name == "aten::is_nonzero":
        return CONTROL_FLOW_MSG
    if name in ("aten::equal", "aten::is_same_size"):
        return f"Batching rule not implemented for {name}. We could not generate a fallback."
    return (f"vmap: We do not support batching operators that can output dynamic shape. "
            f"Attempted to vmap over {name}. Please file an issue at "
            "https://github.com/pytorch/pytorch/issues if you need this feature.")


def data_dependent(level, op_name, what=None):
    """Raise the refusal of data-dependent op ``op_name`` on a batched value; ``what`` names the
    construct that selects a different number of elements per example (``x[mask]``), when a
    rule found it in the arguments of an op that is otherwise batchable."""
    if what is not None:
        raise VmapError(
            f"{call_form(level)}: data-dependent operation {op_name} on a batched value is "
            f"not supported: {what} selects a different number of elements per example. Use "
            "`torch.where(mask, x, 0)` or multiply by the mask instead."
        )
    hint = DATA_DEPENDENT_HINTS.get(op_name) or (
        f"{op_name} has an output whose shape or value depends on the data of each example"
    )
    raise VmapError(
        f"{call_form(level)}: {torch_data_dependent_msg(op_name)} {op_name} is a data-dependent "
        f"operation, not supported on a batched value: {hint}."
    )


class DivergentValueError(VmapError):
    """A Python value (``if``, ``bool``, ``.item()``) read from a batched tensor whose examples
    disagree.  ``level`` and ``value`` say where (``vmap(..., control_flow="split")`` groups
    the examples by them)."""

    def __init__(self, level, op_name, value):
        hint = DATA_DEPENDENT_HINTS.get(op_name) or op_name
        super().__init__(
            f"{call_form(level)}: {torch_data_dependent_msg(op_name)} {op_name} is a "
            f"data-dependent operation on a batched value whose examples disagree: {hint}. "
            "A Python value is one value for the whole batch: it is "
            "allowed when every example agrees, but here they differ. Branch per example with "
            "`ftrans.cond(pred, true_fn, false_fn, operands)` (or `torch.where`), loop per "
            "example with `ftrans.while_loop`, or let vmap run the function once per group of "
            "agreeing examples with `vmap(f, control_flow=\"split\")` (f must be free of side "
            "effects)."
        )
        self.level = level
        self.value = value


# ----------------------------------------------------------------------------------------------
# Refusing handlers (the dispatcher's handler signature: op, level, args, kwargs)
# ----------------------------------------------------------------------------------------------

def refuse_data_dependent(op, level, args, kwargs):
    data_dependent(level, op.name)


def refuse_out_variant(op, level, args, kwargs):
    raise VmapError(
        f"{call_form(level)}: Batching rule not implemented for "
        f"{op.name}.{op.func._overloadname}; the fallback path doesn't work on out= or view "
        "ops. Call the op without `out=` and use its result (`y = torch.abs(x)` "
        "instead of `torch.abs(x, out=y)`)."
    )


def refuse_inplace_view(op, level, args, kwargs):
    raise VmapError(
        f"{call_form(level)}: {op.name} changes the shape or storage of a batched value in place, "
        "which vmap does not support; use the out-of-place op (e.g. `x = x.reshape(...)` or "
        "`torch.empty(...)` instead of `x.resize_(...)`)."
    )


# torch.func's message for an in-place write of a batched value into an unbatched tensor
# (after ftrans's call form, before its hint).
INPLACE_UNBATCHED_MSG = (
    "vmap: inplace arithmetic(self, *extra_args) is not possible because there exists a Tensor "
    "`other` in extra_args that has more elements than `self`. This happened due to `other` "
    "being vmapped over but `self` not being vmapped over in a vmap. Please try to use "
    "out-of-place operators instead of inplace arithmetic. If said operator is being called "
    "inside the PyTorch framework, please file a bug report instead."
)


# ----------------------------------------------------------------------------------------------
# Values that escaped their vmap
# ----------------------------------------------------------------------------------------------

# Outside a backward pass, a value batched at an exited vmap escaped it (stored in a global or a
# closure): batching it again would hand out per-example values with no batch in sight.  Inside
# a backward pass (graph task id >= 0) exited levels are legitimate: autograd replays the vmap's
# ops on its saved BatchedTensors.  Without the query (old torch), never refuse.
graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: 0)
# Harmless on an escaped value (the next real op still refuses), and what ftrans itself does to
# gradients that carry an exited level before summing it out (sum_exited_levels).
_ESCAPE_OK = frozenset({"aten::detach", "aten::alias"})


def escaped(op, level):
    """Refuse ``op`` on a value of exited ``level`` (the caller checked ``graph_task_id() < 0``)."""
    if op.name in _ESCAPE_OK or _SUMMING_EXITED[0]:
        return
    raise VmapError(
        f"{call_form(level)}: {op.name} was called on a per-example value (BatchedTensor) that "
        "escaped its vmap, which has already returned (it was saved to a global, a list or an "
        "attribute inside the vmapped function): your tensor may have escaped from inside a "
        "function being vmapped and this is a user error (see "
        "https://pytorch.org/functorch/stable/ux_limitations.html). Return the value from the "
        "vmapped function instead, so that vmap stacks it over the batch."
    )
