"""Python indexing with per-example integer indices (``x[i]`` where ``i`` is batched).

torch's C++ indexing treats a 0-dim integer tensor index as a Python int and calls ``.item()``
on it, which no batched value can answer.  At the torch-function layer (above autograd) such an
index is rewritten: the position is first kept whole (``slice(None)``), then selected with a
batched ``index_select`` (or written with ``index_copy_``) along the dim it landed on.  Indices
that are not 0-dim integer BatchedTensors keep torch's own path.
"""
from __future__ import annotations

import torch

from .batched import BatchedTensor

__all__ = ["OVERRIDES"]

_DisableTF = torch._C.DisableTorchFunctionSubclass


def _is_batched_int_scalar(i) -> bool:
    if type(i) is not BatchedTensor:
        return False
    with _DisableTF():
        return i.dim() == 0 and not i.is_floating_point() and not i.is_complex() \
            and i.dtype != torch.bool


def _split(x, index):
    """(basic index with batched ints replaced by full slices, result dims of those ints)."""
    if not isinstance(index, tuple):
        index = (index,)
    if not any(_is_batched_int_scalar(i) for i in index):
        return None
    consuming = 0
    for i in index:
        if i is None or i is Ellipsis:
            continue
        if isinstance(i, (int, slice)) or _is_batched_int_scalar(i):
            consuming += 1
        else:
            return None  # another advanced index: keep torch's path (and its error)
    with _DisableTF():
        ndim = x.dim()
    basic, dims, d = [], [], 0
    for i in index:
        if i is Ellipsis:
            d += ndim - consuming
            basic.append(i)
        elif i is None or isinstance(i, slice):
            d += 1
            basic.append(i)
        elif isinstance(i, int):
            basic.append(i)
        else:
            dims.append((d, i))
            d += 1
            basic.append(slice(None))
    return tuple(basic), dims


def getitem(x, index):
    split = _split(x, index)
    if split is None:
        raise NotImplementedError
    basic, dims = split
    out = x[basic]
    for d, i in reversed(dims):  # highest dim first: squeezing it shifts nothing below
        out = torch.index_select(out, d, i.reshape(1)).squeeze(d)
    return out


def setitem(x, index, value):
    split = _split(x, index)
    if split is None or len(split[1]) != 1:
        raise NotImplementedError
    basic, ((d, i),) = split
    view = x[basic]
    slot_shape = view.select(d, 0).shape
    if not isinstance(value, torch.Tensor):
        value = torch.full((), value, dtype=view.dtype, device=view.device)
    value = value.to(view.dtype).expand(slot_shape)
    view.index_copy_(d, i.reshape(1), value.unsqueeze(d))
    return None


OVERRIDES = {
    torch.Tensor.__getitem__: getitem,
    torch.Tensor.__setitem__: setitem,
}
