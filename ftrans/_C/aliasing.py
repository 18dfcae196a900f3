"""Views and in-place writes across a vmap boundary.

Inside ``vmap`` autograd records on the *logical* tensors (the BatchedTensors), so a view of a
mapped input is an autograd view of its wrapper and a write through it gives the wrapper a
``CopySlices`` history, exactly as in eager.  The caller's own tensor ``x`` is a different
matter: the wrapper's physical value shares ``x``'s memory, but the physical ops ran below
autograd, so ``x`` never hears of them.  Left alone, that gives silent wrong answers outside the
vmap: an output that is a slice of ``x`` and shares its memory but is no view of it for
autograd (an in-place op on it, or on ``x``, is invisible to the other), and an ``x`` written in
place inside the vmap whose autograd history and version counter still describe the old values.
torch.func runs the physical ops through autograd and has neither problem; here the boundary
repairs both, once per call, off the per-op hot path:

1. An input whose wrapper was written in place (its version moved) gets the write into its own
   history: ``x.copy_(result)`` where ``result`` is the wrapper's value with the batch dim back in
   place.  Both are the same memory with the same layout, so ``copy_`` moves no data, but
   autograd records it (and bumps the version counter, so tensors saved for backward notice the
   change) as it would have recorded the in-place op on ``x`` in eager mode.  Without autograd
   (``x`` does not require grad) only the version counter moves.
2. An output that is a mapped input itself, or an autograd view of it, comes back as a view of
   ``x``: ``x.as_strided`` with the output's physical geometry (``view_as_real`` /
   ``view_as_complex`` of ``x`` first where the dtype changed).  Its ``_base``, its version
   counter and in-place writes through it (``CopySlices`` on ``x``) then behave as in eager.  Its
   gradient is the as_strided gradient, which equals the logical one because a view's values are
   a fixed selection of ``x``'s memory (after step 1, ``x`` carries every write made in the vmap).
"""
from __future__ import annotations

import torch

from .batched import BatchedTensor
from .errors import call_form

__all__ = ["mutated_inputs_epilogue", "as_input_view", "physical"]

_DisableTF = torch._C.DisableTorchFunctionSubclass
_get_creation_meta = getattr(torch._C._autograd, "_get_creation_meta", None)
_set_creation_meta = getattr(torch._C._autograd, "_set_creation_meta", None)
_increment_version = getattr(getattr(torch.autograd, "graph", None), "increment_version", None) \
    or getattr(torch._C, "_increment_version", None)


# level id -> ids of the wrappers of mapped inputs that are leaves requiring grad.  Eager
# refuses an in-place write into such a leaf (or a view of it) before writing; so must vmap,
# whose wrapper is not a leaf for autograd (it is the output of AddBatchDim).
LEAVES: dict = {}


def check_leaf_write(op, level, args):
    ids = LEAVES.get(level.id)
    if not ids or not torch.is_grad_enabled():
        return
    n = len(args)
    with _DisableTF():
        for i in op.mutable_pos:
            a = args[i] if i < n else None
            if type(a) is not BatchedTensor or a.level is not level:
                continue
            if id(a) in ids:
                raise RuntimeError(
                    "a leaf Variable that requires grad is being used in an in-place operation.")
            if a._is_view() and id(a._base) in ids:
                raise RuntimeError("a view of a leaf Variable that requires grad is being used "
                                   "in an in-place operation.")


def physical(t):
    """The innermost plain tensor under nested wrappers."""
    while type(t) is BatchedTensor:
        t = t.value
    return t


def entry_state(w):
    """What step 1 compares at exit: the wrapper's version and grad_fn."""
    with _DisableTF():
        return w._version, w.grad_fn


def mutated_inputs_epilogue(inputs, level, batch_size, remove):
    """Step 1 of the module docstring.  ``inputs``: (x, wrapper, in_dim, version and grad_fn
    at entry);
    ``remove(w, level, batch_size, d)`` turns a wrapper back into ``x``'s layout (autograd-aware
    when ``w`` requires grad)."""
    for x, w, d, v0, fn0 in inputs:
        with _DisableTF():
            if w._version == v0:
                continue
            recorded = w.grad_fn is not fn0  # not written under no_grad
        if recorded:
            with torch.enable_grad():
                x.copy_(remove(w, level, batch_size, d))
        elif _increment_version is not None and not x.is_inference():
            _increment_version(x)


def _geometry(o, d):
    """(sizes, strides, storage offset) of ``o``'s value with the batch dim moved to ``d``."""
    v, b = o.value, o.bdim
    sizes, strides = list(v.shape), list(v.stride())
    sizes.insert(d, sizes.pop(b))
    strides.insert(d, strides.pop(b))
    return sizes, strides, v.storage_offset()


def _same_memory(a, b) -> bool:
    pa, pb = physical(a), physical(b)
    # (storage identity, not data_ptr: fake tensors under ftrans.compile's tracing have none)
    return pa.device == pb.device and torch._C._is_alias_of(pa, pb)


def _base_for(x, dtype):
    """``x`` seen with element type ``dtype`` as a differentiable view, or None."""
    if x.dtype == dtype:
        return x
    try:
        if x.is_complex() and not x.is_conj() and torch.view_as_real(x).dtype == dtype:
            return torch.view_as_real(x)
        if dtype.is_complex and type(x) is not BatchedTensor and \
                torch.view_as_real(torch.empty((), dtype=dtype)).dtype == x.dtype:
            # The whole storage as pairs (x's own last dim need not be the pair).
            n = x.untyped_storage().nbytes() // x.element_size()
            return torch.view_as_complex(x.as_strided((n // 2, 2), (2, 1), 0))
    except RuntimeError:
        return None
    return None


def as_input_view(o, d, level, by_wrapper):
    """Step 2 of the module docstring: ``o`` (an output batched at ``level``, out_dim ``d``) as a
    view of the caller's tensor it aliases, or None when it aliases no mapped input.
    ``by_wrapper``: id(wrapper) -> (x, wrapper, in_dim); earlier outputs are entered too (as
    (result, output, out_dim)), so an output that is a view of another comes back as a view of
    that one's result, as in torch.func."""
    if type(o) is not BatchedTensor or o.level is not level:
        return None
    with _DisableTF():
        entry = by_wrapper.get(id(o))
        if entry is None:
            if not o._is_view():
                return None
            entry = by_wrapper.get(id(o._base))
            if entry is None:
                return None
        x, w, in_dim = entry
        value = o.value
        if x.layout is not torch.strided or value.layout is not torch.strided:
            return None  # sparse and other layouts have no strided memory to view
        pv, pw = physical(value), physical(w)  # (a nested level's value is a wrapper: its own
        if pv.is_conj() != pw.is_conj() or pv.is_neg() != pw.is_neg():  # bits say nothing)
            return None
        if not _same_memory(value, x):
            return None  # a rule copied: the output owns its memory
        sizes, strides, offset = _geometry(o, d)
    if (o is w or value is w.value) and x.dtype == value.dtype and list(x.shape) == sizes and \
            list(x.stride()) == strides and x.storage_offset() == offset:
        return x
    base = _base_for(x, value.dtype)
    if base is None:
        return None
    out = base.as_strided(sizes, strides, offset)
    if o is not w and _get_creation_meta is not None:
        # A view of a multi-output op (unbind, split) or made under no_grad stays one: eager
        # refuses in-place writes into it, and so must the view it comes back as.
        with _DisableTF():
            meta = _get_creation_meta(o)
        if meta != _get_creation_meta(out):
            _set_creation_meta(out, meta)
    return out


# ----------------------------------------------------------------------------------------------
# ``.data`` under vmap: refused, as torch.func refuses it
# ----------------------------------------------------------------------------------------------
# ``x.data`` is the physical tensor's data with autograd cut off; on a BatchedTensor the logical
# result would have to be a detached wrapper, and ``x.data = y`` would have to swap the physical
# value of a wrapper autograd already recorded on.  torch.func refuses both; so does ftrans
# (same type and message, after the call form), instead of silently ignoring the assignment.

def _level_of(args):
    for a in args:
        if type(a) is BatchedTensor:
            return a.level
    return None


def _data_get(*args):
    level = _level_of(args)
    if level is None:
        raise NotImplementedError  # not batched: torch's own getter
    raise RuntimeError(
        f"{call_form(level)}: accessing `data` under vmap transform is not allowed. Use the "
        "tensor itself, or `x.detach()` for a value autograd does not record on."
    )


def _data_set(*args):
    level = _level_of(args)
    if level is None:
        raise NotImplementedError
    raise RuntimeError(
        f"{call_form(level)}: mutating directly with `.data` under vmap transform is not "
        "allowed. Write in place instead (`x.copy_(y)` under `torch.no_grad()`), or return the "
        "new value from the vmapped function."
    )


OVERRIDES = {torch.Tensor.data.__get__: _data_get, torch.Tensor.data.__set__: _data_set}
