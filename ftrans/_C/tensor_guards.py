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
    from .dispatch import VmapError, describe

    with _DisableTF():
        if x.numel() != 1:  # eager's own error comes first
            what = "no values" if x.numel() == 0 else "more than one value"
            raise RuntimeError(f"Boolean value of Tensor with {what} is ambiguous")
    raise VmapError(
        f"{describe(x.level)}: {CONTROL_FLOW_MSG} It is data-dependent Python control flow "
        "(`if`/`while`/`bool()`) on a per-example value. Use `torch.where(cond, a, b)` to "
        "select per example."
    )


OVERRIDES = {
    torch.Tensor.__bool__: _bool,
}
