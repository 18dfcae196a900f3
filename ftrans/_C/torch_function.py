"""The ``__torch_function__`` of BatchedTensor: the first place a torch call on a batched value
reaches ftrans, above autograd.

In order, for every torch call with a BatchedTensor argument:

1. torch functions with their own meaning under transforms are swapped for an override: the
   fused RNN kernels (``rnn.py``), indexing (``indexing.py``), ``bool()``/``torch.where(cond)``
   (``tensor_guards.py``) and ``.data`` (``aliasing.py``);
2. calls autograd will not record take the fast path (``fastpath.py``), which calls the op's
   handler directly;
3. the rest lift captured requires-grad arguments per use (``autograd.lift_args``; why per use:
   ``autograd.py``'s docstring) and run the call normally: autograd records, and the aten ops
   reach ``dispatch.py`` through ``__torch_dispatch__``.

A batched in-place write into a tensor the vmapped function created comes back here as an error
carrying that tensor (``fresh.py``): it is made batched and the call replayed.

``_C/__init__.py`` installs :data:`TORCH_FUNCTION` on BatchedTensor: the C entry of the
optional extension ``_fastc.c`` (which serves the fast path's simplest hit, a learned pointwise
call at one level, and hands every other call to :func:`batched_torch_function` untouched) when it
was built, else :func:`batched_torch_function` itself.  ``FTRANS_NO_CEXT=1`` keeps the pure-Python
entry.
"""
from __future__ import annotations

import os

import torch

from . import aliasing, indexing, rnn, tensor_guards
from .autograd import born_before as _born_before, lift_args as _lift_args, \
    needs_lift as _needs_lift
from .batched import BatchedTensor
from . import fastpath as _fastpath
from .fastpath import ENABLED as _FAST_ENABLED, MISS as _MISS, fast_call as _fast_call
from .fresh import materialize
from .levels import AUTODIFF_DEPTH as _AUTODIFF_DEPTH
from .tfrules import MISS as _TF_MISS, RULES as _TF_RULES

__all__ = ["batched_torch_function", "OVERRIDES", "TORCH_FUNCTION", "C_ENTRY"]

_DisableTF = torch._C.DisableTorchFunctionSubclass
_disabled_tf = torch._C._disabled_torch_function_impl
_grad_enabled = torch.is_grad_enabled

# torch function -> its replacement under transforms (raises NotImplementedError to decline).
OVERRIDES: dict = {**rnn.OVERRIDES, **indexing.OVERRIDES, **tensor_guards.OVERRIDES,
                   **aliasing.OVERRIDES}

# FTRANS_NO_FASTPATH=1 turns the fast path and the torch-function rules (tfrules.py) off (to
# compare timings or rule them out).
_fast_enabled = _FAST_ENABLED and not os.environ.get("FTRANS_NO_FASTPATH")

# Autograd's own entry points take tensors to differentiate *with respect to*: aliasing those
# would disconnect them.
_NO_LIFT = {torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward}


def _any_lift(args, kwargs, top) -> bool:
    for a in args:
        t = type(a)
        if t is BatchedTensor:
            # Attribute access on a BatchedTensor would re-enter this function.
            if a.level is not top:
                with _DisableTF():
                    if _needs_lift(a, top):
                        return True
        elif t in (list, tuple):
            with _DisableTF():
                if any(_needs_lift(x, top) for x in a):
                    return True
        elif isinstance(a, torch.Tensor) and a.requires_grad and _born_before(a, top):
            return True
    if kwargs:
        with _DisableTF():
            return any(_needs_lift(a, top) for a in kwargs.values())
    return False


def batched_torch_function(cls, func, types, args=(), kwargs=None):
    """``__torch_function__`` of BatchedTensor: lift captured requires-grad args, then call.

    Every torch call on a BatchedTensor pays this hop.  Calls autograd will not record take the
    fast path (``fastpath.py``); for the rest, the common case (BatchedTensors of one level and
    Python scalars) costs one scan of the arguments.  torch functions with an out-of-place
    replacement under transforms (the fused RNN kernels, see ``rnn.py``; indexing, see
    ``indexing.py``) are swapped here, above autograd.
    """
    if func in OVERRIDES:
        try:
            return OVERRIDES[func](*args, **(kwargs or {}))
        except NotImplementedError:
            pass
        except RuntimeError as e:
            if not _fresh_batched(e):
                raise
            return batched_torch_function(cls, func, types, args, kwargs)
    if not kwargs and _fast_enabled and not _AUTODIFF_DEPTH[0]:
        rule = _TF_RULES.get(func)
        if rule is not None:  # a composite function batched whole (tfrules.py)
            out = rule(args)
            if out is not _TF_MISS:
                return out
        try:
            out = _fast_call(func, types, args)
        except RuntimeError as e:
            if not _fresh_batched(e):
                raise
            return batched_torch_function(cls, func, types, args, kwargs)
        if out is not _MISS:
            return out
    if _grad_enabled() and func not in _NO_LIFT:
        top = _lift_top(args, kwargs)
        if top is not None and _any_lift(args, kwargs, top):
            with _DisableTF():
                args, kwargs = _lift_args(func, args, kwargs, top)
    try:
        return _disabled_tf(func, types, args, kwargs or {})
    except RuntimeError as e:
        if not _fresh_batched(e):
            raise
    return batched_torch_function(cls, func, types, args, kwargs)


def _lift_top(args, kwargs):
    """The highest level among the arguments when some argument may need a lift, else None.

    One pass: the usual op (BatchedTensors of one level and Python scalars) returns None at
    once; ``_any_lift`` then makes the precise decision for the rest."""
    top = None
    maybe = bool(kwargs)
    for a in args:
        t = type(a)
        if t is BatchedTensor:
            if top is None:
                top = a.level
            elif a.level is not top:
                maybe = True  # several levels: a lower one may require grad
                if a.level.id > top.id:
                    top = a.level
        elif t is list or t is tuple:
            maybe = True
            for x in a:
                if type(x) is BatchedTensor and (top is None or x.level.id > top.id):
                    top = x.level
        elif isinstance(a, torch.Tensor) and a.requires_grad:
            maybe = True
    if not maybe:
        return None
    if kwargs:
        for a in kwargs.values():
            if type(a) is BatchedTensor and (top is None or a.level.id > top.id):
                top = a.level
    return top


def _fresh_batched(err) -> bool:
    """A batched write into a tensor the vmapped function created: batch that tensor (the
    caller replays the op).  See fresh.py."""
    fresh = getattr(err, "_ftrans_fresh", None)
    if fresh is None:
        return False
    err.__traceback__ = None  # its frames hold the view written through (swap needs it gone)
    if materialize(*fresh):
        return True
    err.args = (err.args[0] + " (The tensor was created inside the vmapped function, but a "
                "view of it is alive, so it cannot become batched in place: write into the "
                "tensor itself, e.g. `out[i] = v`, `out.copy_(v)`.)",)
    return False


def _c_entry():
    """The compiled entry (``_fastc.c``), configured with the objects the Python path uses, or
    None where the extension was not built (no compiler at install) or ``FTRANS_NO_CEXT`` is set.
    """
    if os.environ.get("FTRANS_NO_CEXT"):
        return None
    try:
        from . import _fastc
    except ImportError:
        return None
    if not all(hasattr(torch._C, name) for name in (
            "_dispatch_tls_is_dispatch_key_excluded", "_dispatch_tls_set_dispatch_key_excluded")) \
            or not all(hasattr(torch._C.DispatchKey, k) for k in ("Python", "PythonTLSSnapshot")):
        return None  # (feature-tested: the Python entry serves every call)
    from . import batched as _batched, dispatch as _dispatch
    import torch.autograd.forward_ad as _fwad
    _fastc.init({
        "fallback": batched_torch_function, "cache": _fastpath._CACHE, "overrides": OVERRIDES,
        "tf_rules": _TF_RULES, "autodiff_depth": _AUTODIFF_DEPTH, "fwad": _fwad,
        "autocast": _fastpath._autocast, "grad_enabled": torch.is_grad_enabled,
        "stack_len": _fastpath._stack_len, "stack_at": _fastpath._stack_at,
        "is_excluded": torch._C._dispatch_tls_is_dispatch_key_excluded,
        "set_excluded": torch._C._dispatch_tls_set_dispatch_key_excluded,
        "python_key": torch._C.DispatchKey.Python,
        "snapshot_key": torch._C.DispatchKey.PythonTLSSnapshot,
        "run_rule": _fastpath.run_rule, "miss": _MISS, "matmul": torch.matmul,
        "matmuls": (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__),
        "parameter": torch.nn.Parameter,
        "disable_tf": torch._C.DisableTorchFunctionSubclass,
        "make_wrapper": torch.Tensor._make_wrapper_subclass, "strided": torch.strided,
        "make_batched": _batched.make_batched, "batched_tensor": BatchedTensor,
        "tensor": torch.Tensor, "vmap_mode": _dispatch.VmapMode,
        "enabled": _fast_enabled, "positional": _batched._POSITIONAL,
    })
    return _fastc


_FASTC = _c_entry() if _fast_enabled else None
C_ENTRY = _FASTC is not None  # whether BatchedTensor's torch-function entry is the compiled one
TORCH_FUNCTION = _FASTC.tf_entry if C_ENTRY else batched_torch_function
