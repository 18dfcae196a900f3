"""BatchedTensor: the level-tagged tensor that vmap hands to the user's function.

A BatchedTensor is a wrapper tensor subclass.  Its *logical* shape (what ``.shape`` reports and
what user code and autograd see) is one example's shape; it holds

- ``value``: the physical tensor, which has one extra dimension of size ``level.batch_size``;
- ``bdim``:  where that extra dimension sits in ``value``;
- ``level``: the :class:`~ftrans._C.levels.Level` of the vmap that made it.

Invariant: a wrapper's level is higher than any level inside its ``value`` (nested vmaps give
nested wrappers, innermost level outermost).  The wrapper's strides mirror the physical strides
minus the batch dim, so that torch's own view-vs-copy decisions (``reshape``) made on the logical
tensor agree with what the physical tensor allows: on fake (contiguous) strides ``reshape``
would pick a view where only a copy is right.

This module holds the data type only.  Its two entry points (``__torch_function__``, which runs
above autograd, and ``__torch_dispatch__``, which runs below it) are attached in one place,
``ftrans/_C/__init__.py``.

``add_batch_dim`` / ``remove_batch_dim`` are the only ways in and out; they understand nesting,
so a level can be added *under* a higher one (needed when a cotangent batched by an inner vmap
flows back through an outer vmap's boundary).
"""
from __future__ import annotations

import torch

__all__ = ["BatchedTensor", "make_batched", "add_batch_dim", "remove_batch_dim", "batched_at"]

_PYTHON_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.Python)


class BatchedTensor(torch.Tensor):
    __slots__ = ("value", "bdim", "level")

    @staticmethod
    def __new__(cls, value: torch.Tensor, bdim: int, level):
        return make_batched(value, bdim, level)

    def __init__(self, *args, **kwargs):
        pass

    def __repr__(self) -> str:
        # Printing a batched value is legitimate debugging; show the physical tensor.
        return (
            f"BatchedTensor(level={self.level.id}, bdim={self.bdim}, "
            f"logical_shape={tuple(self.shape)}, value={self.value!r})"
        )

    def __reduce_ex__(self, proto):
        raise RuntimeError(
            "ftrans: a BatchedTensor (a per-example value inside vmap) cannot be pickled or "
            "deep-copied; return it from the vmapped function instead."
        )

    def _sync_metadata(self) -> None:
        """After an in-place view op changed ``value``'s layout, make the wrapper agree.

        In-place view ops (``squeeze_``, ``t_``; ``matmul`` of 1-D by 2-D under autograd emits
        ``squeeze_``) change the physical value's sizes; a wrapper that kept its old ones would
        fail the next shape check."""
        value, bdim = self.value, self.bdim
        shape, strides = value.shape, value.stride()
        with torch._C._ExcludeDispatchKeyGuard(_PYTHON_KEY):
            torch.Tensor.as_strided_(
                self, shape[:bdim] + shape[bdim + 1:], strides[:bdim] + strides[bdim + 1:],
                value.storage_offset(),
            )


_make_wrapper = torch.Tensor._make_wrapper_subclass
_DisableTF = torch._C.DisableTorchFunctionSubclass
_tf_enabled = torch._C._is_torch_function_enabled
_strided = torch.strided


class _Probe(torch.Tensor):
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError


def _positional_ok() -> bool:
    try:
        t = _make_wrapper(_Probe, (2,), None, None, None, torch.float64, _strided,
                          torch.device("cpu"))
        return t.dtype == torch.float64 and tuple(t.shape) == (2,)
    except Exception:  # older torch: keyword-only
        return False


def make_batched(value: torch.Tensor, bdim: int, level) -> BatchedTensor:
    """The fast constructor (the dispatch hot path calls it once per output).

    Strides are passed only when they are not the contiguous default: parsing them costs about
    as much as the rest of the wrapper creation.
    """
    if type(value) is BatchedTensor and _tf_enabled():
        # A nested wrapper made outside dispatch (vmap's entry, autograd Functions): reading the
        # inner wrapper's metadata must not go through its __torch_function__.
        with _DisableTF():
            return make_batched(value, bdim, level)
    shape = value.shape
    if bdim == 0 and value.is_contiguous():
        # Positional (strides, offset, format, dtype, layout, device): parses faster than keywords
        if _POSITIONAL:
            out = _make_wrapper(BatchedTensor, shape[1:], None, None, None, value.dtype, _strided,
                                value.device)
        else:
            out = _make_wrapper(BatchedTensor, shape[1:], dtype=value.dtype, device=value.device)
    elif _POSITIONAL:
        strides = value.stride()
        out = _make_wrapper(BatchedTensor, shape[:bdim] + shape[bdim + 1:],
                            strides[:bdim] + strides[bdim + 1:], value.storage_offset(), None,
                            value.dtype, value.layout, value.device)
    else:
        strides = value.stride()
        out = _make_wrapper(
            BatchedTensor,
            shape[:bdim] + shape[bdim + 1:],
            strides=strides[:bdim] + strides[bdim + 1:],
            storage_offset=value.storage_offset(),
            dtype=value.dtype,
            device=value.device,
            layout=value.layout,
        )
    out.value = value
    out.bdim = bdim
    out.level = level
    return out


def add_batch_dim(t: torch.Tensor, bdim: int, level) -> torch.Tensor:
    """Mark logical dim ``bdim`` of ``t`` as the batch dim of ``level`` (nesting-aware)."""
    if type(t) is BatchedTensor and t.level.id > level.id:
        # The new level must go *inside* the higher one.  Logical dim ``bdim`` of t is physical
        # dim ``pdim`` of t.value; t's own bdim shifts by one if it came after.
        inner_bdim = t.bdim
        pdim = bdim if bdim < inner_bdim else bdim + 1
        new_inner = add_batch_dim(t.value, pdim, level)
        outer_bdim = inner_bdim if inner_bdim < pdim else inner_bdim - 1
        return BatchedTensor(new_inner, outer_bdim, t.level)
    if type(t) is BatchedTensor and t.level is level:
        raise RuntimeError(f"ftrans internal: tensor is already batched at {level}")
    return BatchedTensor(t, bdim, level)


def remove_batch_dim(t: torch.Tensor, level, batch_size: int, out_dim: int) -> torch.Tensor:
    """Turn a value batched at ``level`` into a tensor with the batch at logical ``out_dim``.

    A value that is not batched at ``level`` (it did not depend on the mapped inputs) is
    expanded, as torch.func does.
    """
    if type(t) is BatchedTensor:
        if t.level is level:
            return t.value.movedim(t.bdim, out_dim) if t.bdim != out_dim else t.value
        if t.level.id > level.id:
            # Peel the higher level, remove ours inside, re-wrap: the higher level's logical
            # shape gains the batch dim at ``out_dim``, so its bdim moves accordingly.
            return _rewrap_after_remove(t, level, batch_size, out_dim)
    # Not batched at this level: broadcast.
    t = t.unsqueeze(out_dim)
    shape = list(t.shape)
    shape[out_dim] = batch_size
    return t.expand(shape)


def _rewrap_after_remove(t, level, batch_size, out_dim):
    # t = BT(M, inner, ib) with logical shape L (rank r).  We want BT(M, v', ib') whose logical
    # shape is L with a batch dim inserted at out_dim.  Choose physical layout: insert the batch
    # at physical position p in inner's coordinates, keep M's dim at ib'.
    ib = t.bdim
    if out_dim <= ib:
        p, new_ib = out_dim, ib + 1
    else:
        p, new_ib = out_dim + 1, ib
    return BatchedTensor(remove_batch_dim(t.value, level, batch_size, p), new_ib, t.level)


_POSITIONAL = _positional_ok()


def batched_at(t, level) -> bool:
    """Whether ``t`` carries a batch dim of ``level`` (at any depth of its wrappers)."""
    while type(t) is BatchedTensor:
        if t.level is level:
            return True
        if t.level.id < level.id:
            return False
        t = t.value
    return False
