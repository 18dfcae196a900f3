"""Tensor methods that cannot mean anything per example, refused above autograd.

``if x:`` never reaches ``__torch_dispatch__`` as itself: ``Tensor.__bool__`` arrives as
``aten::_local_scalar_dense`` (the same op as ``.item()``).  It is caught where it is still
recognisable, as a ``__torch_function__`` override of BatchedTensor (see
``autograd.batched_torch_function``), with torch.func's message.  (``.data`` is refused the same
way, in ``aliasing.py``.)
"""
from __future__ import annotations

import torch

from .batched import BatchedTensor

__all__ = ["OVERRIDES", "CONTROL_FLOW_MSG"]

CONTROL_FLOW_MSG = (
    "vmap: It looks like you're attempting to use a Tensor in some data-dependent control flow. "
    "We don't support that yet, please file an issue at https://github.com/pytorch/pytorch/issues ."
)
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
    from .agree import agreeing_bool  # the truth value when every example agrees on it
    return agreeing_bool(x)


def _where(*args, **kwargs):
    """``torch.where(condition)`` (one argument) is ``nonzero`` by another name: refused with
    torch.func's message, which names ``aten::where`` (the op decomposes before dispatch sees it,
    which would name ``nonzero``)."""
    if len(args) + len(kwargs) != 1:
        raise NotImplementedError  # where(cond, a, b): a pointwise select, batched as usual
    x = args[0] if args else next(iter(kwargs.values()))
    if not _live(x):
        raise NotImplementedError
    from .dispatch import VmapError, _torch_data_dependent_msg, describe

    raise VmapError(
        f"{describe(x.level)}: {_torch_data_dependent_msg('aten::where')} `torch.where(condition)` "
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
