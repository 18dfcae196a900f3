"""Tensor methods that cannot mean anything per example, refused above autograd.

``if x:`` and ``x.data`` never reach ``__torch_dispatch__`` as themselves: ``Tensor.__bool__``
arrives as ``aten::_local_scalar_dense`` (the same op as ``.item()``), and ``.data`` is not an
op at all, so its getter would hand out an alias and its setter would be silently lost on the
wrapper.  They are caught where they are still recognisable, as ``__torch_function__``
overrides of BatchedTensor (see ``autograd.batched_torch_function``), with torch.func's
messages.
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


def _data_get(x, *args, **kwargs):
    if not _live(x):
        raise NotImplementedError
    from .dispatch import describe

    raise RuntimeError(
        f"{describe(x.level)}: accessing `data` under vmap transform is not allowed. Use "
        "`x.detach()` for a value that autograd does not track."
    )


def _data_set(x, *args, **kwargs):
    if not _live(x):
        raise NotImplementedError
    from .dispatch import describe

    raise RuntimeError(
        f"{describe(x.level)}: mutating directly with `.data` under vmap transform is not "
        "allowed. Write into the tensor with an in-place op (`with torch.no_grad(): "
        "x.copy_(v)`) or return the new value instead."
    )


OVERRIDES = {
    torch.Tensor.__bool__: _bool,
    torch.Tensor.data.__get__: _data_get,
    torch.Tensor.data.__set__: _data_set,
}
