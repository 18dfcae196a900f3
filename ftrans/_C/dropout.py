"""Dropout under a vmap that may draw random numbers: out-of-place draws the randomness rules batch.

Dropout on CPU is a composite (``empty_like(x).bernoulli_(1 - p)``), so with an unbatched ``x``
the noise tensor is unbatched and randomness='different' could not draw into it.  Whenever a
vmap with randomness other than 'error' is live, the vmap mode (``dispatch.vmap_mode``) pushes
:class:`DropoutMode`, a torch-function mode that replaces the dropout family by out-of-place
draws (``native_dropout``, ``bernoulli`` of a ``p`` tensor) that the randomness rules
(``rules/random.py``) batch; with 'error' nothing is pushed, so the default costs nothing.  The
mode also refuses the ``out=`` forms of random torch functions, which would draw in place into
an unbatched ``out`` before any op reaches dispatch.
"""
from __future__ import annotations

import math

import torch
from torch.overrides import TorchFunctionMode

from . import levels as _levels
from .errors import VmapError, call_form

__all__ = ["DropoutMode"]

aten = torch.ops.aten

_ALPHA = 1.7580993408473766


def _dropout(x, p, train, inplace, feature=False, alpha=False):
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not train or p == 0 or x.numel() == 0:
        return x
    if p == 1:
        return x.mul_(0) if inplace else x * 0
    if not feature and not alpha:
        out = aten.native_dropout.default(x, p, True)[0]
        return x.copy_(out) if inplace else out
    if feature:
        if x.dim() < 2:
            raise RuntimeError(
                "Feature dropout requires at least 2 dimensions in the input")
        shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
    else:
        shape = tuple(x.shape)
    probs = torch.full(shape, 1 - p, dtype=x.dtype, device=x.device)
    noise = aten.bernoulli.default(probs)
    if alpha:
        a = 1.0 / math.sqrt((_ALPHA * _ALPHA * p + 1) * (1 - p))
        b = (noise - 1) * (_ALPHA * a) + _ALPHA * a * p
        noise = noise * a
        return x.mul_(noise).add_(b) if inplace else x * noise + b
    noise = noise / (1 - p)
    return x.mul_(noise) if inplace else x * noise


def _with_batch(fn, x, lo):
    """F.dropout1d/3d accept an input without its batch dim (rank ``lo``)."""
    if x.dim() == lo:
        return fn(x.unsqueeze(0)).squeeze(0)
    return fn(x)


def _f_dropout(input, p=0.5, training=True, inplace=False):
    return _dropout(input, p, training, inplace)


def _f_alpha_dropout(input, p=0.5, training=False, inplace=False):
    return _dropout(input, p, training, inplace, alpha=True)


def _f_feature_alpha_dropout(input, p=0.5, training=False, inplace=False):
    return _dropout(input, p, training, inplace, feature=True, alpha=True)


def _f_dropout_nd(lo, hi, name):
    def f(input, p=0.5, training=True, inplace=False):
        if name != "dropout2d" and input.dim() not in (lo, hi):
            raise RuntimeError(
                f"{name}: Expected {lo}D or {hi}D input, but received a {input.dim()}D input.")
        if name == "dropout2d":
            return _dropout(input, p, training, inplace, feature=True)
        return _with_batch(lambda t: _dropout(t, p, training, inplace, feature=True), input, lo)
    return f


def _intercepts():
    F = torch.nn.functional
    table = {
        F.dropout: _f_dropout,
        F.alpha_dropout: _f_alpha_dropout,
        F.feature_alpha_dropout: _f_feature_alpha_dropout,
        F.dropout1d: _f_dropout_nd(2, 3, "dropout1d"),
        F.dropout2d: _f_dropout_nd(3, 4, "dropout2d"),
        F.dropout3d: _f_dropout_nd(4, 5, "dropout3d"),
    }
    for name, feature, alpha in (("dropout", False, False), ("feature_dropout", True, False),
                                 ("alpha_dropout", False, True),
                                 ("feature_alpha_dropout", True, True)):
        for inplace in (False, True):
            fn = getattr(torch, name + ("_" if inplace else ""), None)
            if fn is not None:
                table[fn] = (lambda f, a, i: lambda input, p, train: _dropout(
                    input, p, train, i, feature=f, alpha=a))(feature, alpha, inplace)
    return table


_INTERCEPT = None


class DropoutMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        global _INTERCEPT
        if _INTERCEPT is None:
            _INTERCEPT = _intercepts()
        try:
            handler = _INTERCEPT.get(func)
        except TypeError:  # an unhashable callable
            handler = None
        if handler is None:
            if kwargs and kwargs.get("out") is not None and func in _RANDOM_OUT:
                _refuse_out(func)
            return func(*args, **(kwargs or {}))
        return handler(*args, **(kwargs or {}))


# Random torch functions with an ``out=`` form: their out= kernels are composites that draw in
# place into ``out`` before any op reaches dispatch, where an unbatched ``out`` would then take
# one draw for the whole batch (torch.func refuses them; so do we).
_RANDOM_OUT = frozenset(getattr(torch, n) for n in (
    "rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson",
    "binomial") if hasattr(torch, n))


def _refuse_out(func):
    stack = [l for l in _levels.current_stack() if l.kind == _levels.VMAP]
    raise VmapError(
        f"{call_form(stack[-1]) if stack else 'vmap'}: vmap: We do not support calling out "
        "variants of random operations inside of vmap. Please use non-out variants as a "
        f"workaround (torch.{getattr(func, '__name__', func)}(..., out=): use its result "
        "instead)."
    )
