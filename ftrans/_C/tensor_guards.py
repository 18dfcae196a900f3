"""Tensor methods that cannot mean anything per example, refused above autograd.

``if x:`` never reaches ``__torch_dispatch__`` as itself: ``Tensor.__bool__`` arrives as
``aten::_local_scalar_dense`` (the same op as ``.item()``).  It is caught where it is still
recognisable, as a ``__torch_function__`` override of BatchedTensor (see
``torch_function.batched_torch_function``), with torch.func's message.  (``.data`` is refused the same
way, in ``aliasing.py``.)
"""
from __future__ import annotations

import torch

from .agree import agreeing_bool
from .batched import BatchedTensor
from .errors import VmapError, call_form, torch_data_dependent_msg

__all__ = ["OVERRIDES"]

_DisableTF = torch._C.DisableTorchFunctionSubclass


def _live(x) -> bool:
    return type(x) is BatchedTensor and x.level.alive


def _bool(x, *args, **kwargs):
    if not _live(x):
        raise NotImplementedError  # not per-example here: the ordinary path decides
    with _DisableTF():
        if x.numel() != 1:  # eager's own error comes first
            what = "no values" if x.numel() == 0 else "more than one value"
            raise RuntimeError(f"Boolean value of Tensor with {what} is ambiguous")
    return agreeing_bool(x)  # the truth value when every example agrees on it


def _where(*args, **kwargs):
    """``torch.where(condition)`` (one argument) is ``nonzero`` by another name: refused with
    torch.func's message, which names ``aten::where`` (the op decomposes before dispatch sees it,
    which would name ``nonzero``)."""
    if len(args) + len(kwargs) != 1:
        raise NotImplementedError  # where(cond, a, b): a pointwise select, batched as usual
    x = args[0] if args else next(iter(kwargs.values()))
    if not _live(x):
        raise NotImplementedError
    raise VmapError(
        f"{call_form(x.level)}: {torch_data_dependent_msg('aten::where')} `torch.where(condition)` "
        "returns the indices of each example's nonzero entries, a data-dependent size. Use "
        "`torch.where(condition, a, b)` to select per example, or `ftrans.nonzero(condition, "
        "size=...)` for a static-size result."
    )


def _bit(name):
    """``is_conj()``/``is_neg()`` of a batched value: the physical value's lazy bit (the wrapper
    carries none of its own, so ``x.conj().is_conj()`` read False inside vmap)."""
    def read(x, *args, **kwargs):
        if type(x) is not BatchedTensor:
            raise NotImplementedError
        with _DisableTF():
            while type(x) is BatchedTensor:
                x = x.value
            return getattr(x, name)()
    return read


OVERRIDES = {
    torch.Tensor.__bool__: _bool,
    torch.where: _where,
    torch.Tensor.is_conj: _bit("is_conj"),
    torch.Tensor.is_neg: _bit("is_neg"),
}
