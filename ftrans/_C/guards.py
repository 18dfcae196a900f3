"""Autograd-state calls that a transformed function may not make, refused as torch.func does.

torch.func refuses ``Tensor.requires_grad_()`` and ``Tensor.retain_grad()`` anywhere inside a
transformed function (and so ``torch.autograd.functional``, which calls ``requires_grad_``).
ftrans refuses, with torch.func's message, the calls whose result it cannot vouch for:

- ``requires_grad_()`` on an input the transform made (a vmap input, a grad input): after it the
  output is differentiable w.r.t. a per-example wrapper nobody can reach;
- ``requires_grad_()`` from ``torch.autograd.functional``: its results are detached from every
  transform around it, so a ``grad`` around it would silently see a constant;
- ``retain_grad()`` on a tensor that requires grad (``.grad`` is never filled inside a
  transform).

``requires_grad_()`` on a tensor the function made itself (``w.detach().requires_grad_()``, then
``torch.autograd.grad``: per-example autograd inside ``vmap``) stays supported: that is ordinary
eager autograd on a fresh leaf, batched.

torch.func checks its own C++ transform stack inside these two methods.  ftrans has no hook
there, so it wraps the two methods of ``torch.Tensor`` once, at import: the wrapper checks this
thread's level stack and then calls torch's method.  Outside transforms the cost is one Python
call; calls made by ftrans itself are let through.
"""
from __future__ import annotations

import sys

import torch

from . import levels as _levels
from .errors import call_form

__all__ = ["install", "mark_input"]

_MESSAGES = {
    "requires_grad_": (
        "You are attempting to call Tensor.requires_grad_() (or perhaps using "
        "torch.autograd.functional.* APIs) inside of a function being transformed by a functorch "
        "transform. This is unsupported, please attempt to use the functorch transforms (e.g. "
        "grad, vjp, jacrev, jacfwd, hessian) or call requires_grad_() outside of a function "
        "being transformed instead."
    ),
    "retain_grad": (
        "You are attempting to call Tensor.retain_grad() inside of a function being transformed "
        "by a functorch transform. This is unsupported, please attempt to use the functorch "
        "transforms (e.g. grad, vjp, jacrev, jacfwd, hessian) or call retain_grad() outside of a "
        "function being transformed instead."
    ),
}
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _refuse(name: str, tensor) -> None:
    stack = _levels.current_stack()
    if not stack or _is_compiling():
        return
    caller = sys._getframe(2).f_globals.get("__name__", "")
    if caller == "ftrans" or caller.startswith("ftrans."):
        return
    if name == "requires_grad_" and caller != "torch.autograd.functional" and not \
            tensor.__dict__.get("_ftrans_input"):
        return
    level = stack[-1]
    if level.kind == _levels.VMAP:
        where = call_form(level)
    else:
        where = f"a {level.kind} transform"
    raise RuntimeError(
        f"{_MESSAGES[name]} (ftrans: called inside {where}; pass the tensor as an input of the "
        "transform instead, e.g. `grad(f, argnums=...)`)"
    )


def mark_input(t):
    """Mark ``t`` as an input a transform made (see the module docstring)."""
    t._ftrans_input = True
    return t


def _guarded(name: str):
    original = getattr(torch.Tensor, name)

    def method(self, *args, **kwargs):
        if name != "retain_grad" or self.requires_grad:  # torch's own error comes first
            _refuse(name, self)
        return original(self, *args, **kwargs)

    method.__name__ = name
    method.__qualname__ = f"Tensor.{name}"
    method.__doc__ = original.__doc__
    method._ftrans_original = original
    return method


def install() -> None:
    for name in _MESSAGES:
        if not hasattr(getattr(torch.Tensor, name), "_ftrans_original"):
            setattr(torch.Tensor, name, _guarded(name))
