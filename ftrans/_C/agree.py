"""A Python value read from a batched tensor: fine when the whole batch agrees on it.

``if x.sum() > 0:``, ``bool(x)``, ``x.item()``, ``float(x)`` inside vmap need ONE Python value.
torch.func refuses them all; but when every example has the same value (a shape or NaN check,
a flag computed from data that happens to agree, a loop counter), that value *is* the answer
and the function can go on.  ftrans looks at the values (it runs eagerly): agreeing values
proceed, and only a batch that really diverges raises, pointing to ``ftrans.cond`` (branch per
example) and ``vmap(..., control_flow="split")`` (run the function per group of examples).

Agreement is over every batch level at once (the physical tensor with all batch dims): a
Python ``if`` takes one path for the whole computation.
"""
from __future__ import annotations

from .batched import BatchedTensor
from .errors import DivergentValueError

__all__ = ["agreeing_scalar", "agreeing_bool"]

_TRUTH = "aten::is_nonzero"


def agreeing_scalar(op, level, args, kwargs):
    """Handler for ``is_nonzero`` / ``_local_scalar_dense`` on a batched value."""
    x = raw = args[0]
    lanes = 1
    while type(raw) is BatchedTensor:
        lanes *= raw.value.shape[raw.bdim]
        raw = raw.value
    raw = raw.detach()
    if raw.numel() != lanes:  # more than one element per example: torch's own error
        return op.func(raw)
    flat = raw.reshape(-1)
    if op.name == _TRUTH:
        truth = flat != 0
        if bool(truth.all()):
            return True
        if not bool(truth.any()):
            return False
    else:
        first = flat[0]
        same = flat == first
        if flat.is_floating_point() or flat.is_complex():
            same = same | (flat.isnan() & first.isnan())
        if bool(same.all()):
            return op.func(first)
    raise DivergentValueError(level, op.name, x)


def agreeing_bool(x):
    """``bool(x)`` of a live BatchedTensor (``Tensor.__bool__``, caught above autograd in
    ``tensor_guards.py``): the truth value when every example agrees on it."""
    raw = x
    while type(raw) is BatchedTensor:
        raw = raw.value
    truth = raw.detach() != 0
    if bool(truth.all()):
        return True
    if not bool(truth.any()):
        return False
    raise DivergentValueError(x.level, _TRUTH, x)
