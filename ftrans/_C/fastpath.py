"""The torch-function fast path: ops that autograd will not record skip the C++ dispatcher.

A torch call on a BatchedTensor normally runs the argument parser, ``__torch_function__`` (the
per-use lift, ``torch_function.py``), the parser again, the autograd kernel and the Python key
before it reaches :func:`~ftrans._C.dispatch.dispatch`: about 5 us of a 15 us op.  When no
argument requires grad, autograd records nothing and the only layer that matters is the last
one, so ``__torch_function__`` can call ``dispatch`` itself, if it knows which aten overload
the torch function resolves to.

That mapping is learned, not guessed.  The first call of a torch function with a given
argument signature (per argument: type, and for tensors dtype, rank and device) runs the normal
way while the dispatch entry points record what reaches them.  The signature is cached as fast
only when that call was exactly ONE aten op, with the very same argument objects (scalars
equal), that returned the very object the torch function returned, and the op is functional
(no alias or mutation in its schema, not random, no tensor lists) with a batching rule (not a
decomposition or the loop fallback, which make torch calls of their own): a plain ``x.sin()``,
``x * 2``, ``torch.where(c, x, y)``, ``x @ w`` on matrices.  Composite functions that call
several ops, reshape their arguments, return views or metadata, and anything with keyword
arguments keep the normal path.

A cached call is taken only when nothing else could have changed the outcome: no argument
requires grad (or grad mode is off), no forward-AD level is open, no autocast, and no dispatch
mode other than vmap's own, which is stepped over exactly as torch steps over a mode while
running its handler.
"""
from __future__ import annotations

import threading
import types

import torch
import torch.autograd.forward_ad as _fwad

from .batched import BatchedTensor, make_batched
from .dispatch import MISS as _DMISS, NORMAL_ENTRIES, VmapMode, dispatch as _dispatch, \
    direct_pointwise as _direct_pointwise, prepared, set_dispatch_entries
from .registry import on_change
from .rules.pointwise import pointwise_rule
from .shapecheck import check as _check_shapes, explain as _explain_shapes

__all__ = ["fast_call", "run_rule", "MISS", "stats"]

MISS = object()

_Tensor = torch.Tensor
_DisableTF = torch._C.DisableTorchFunctionSubclass
_disabled_tf = torch._C._disabled_torch_function_impl
_grad_enabled = torch.is_grad_enabled
_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_stack_at = getattr(torch._C, "_get_dispatch_stack_at", None)
_pop = getattr(torch._C, "_pop_torch_dispatch_stack", None)
_push = getattr(torch._C, "_push_on_torch_dispatch_stack", None)
ENABLED = None not in (_autocast, _stack_len, _stack_at, _pop, _push)

_NoPythonDispatch = torch._C._DisableTorchDispatch
_C_BINDINGS = (types.BuiltinFunctionType, types.MethodDescriptorType)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_SCALARS = frozenset({int, float, bool, complex, type(None)})
# torch function -> {signature: (prepared op, pointwise?, the op's C++ callable), or None when
# that signature is not cacheable}, or False for functions that reached no aten op (metadata getters like ``.shape``).
_CACHE: dict = {}
on_change(_CACHE.clear)  # a new rule changes the handler a learned signature holds
_counts = {"recorded": 0}  # signatures learned (tests check that learning happened)

_tls = threading.local()


def stats() -> dict:
    """How many torch functions and signatures the fast path learned (for tests and reports)."""
    learned = [v for v in _CACHE.values() if v is not False]
    return {
        "functions": sum(1 for v in learned if any(o is not None for o in v.values())),
        "signatures": sum(1 for v in learned for o in v.values() if o is not None),
        "never": sum(1 for v in _CACHE.values() if v is False),
    }


def fast_call(func, types, args):
    """The result of ``func(*args)`` through the fast path, or :data:`MISS`."""
    entry = _CACHE.get(func)
    if entry is None:
        entry = _CACHE[func] = {}
    elif entry is False:
        return MISS
    if _autocast() or _fwad._current_level >= 0:  # autocast casts; dual tensors carry tangents
        return MISS
    # Subclass __torch_function__ is off from here on, as inside __torch_dispatch__: reading
    # metadata must not re-enter it, and neither must the torch calls a rule makes on the
    # values of lower levels (they dispatch like the rule's other physical calls).
    with _DisableTF():
        return _fast_call(func, types, args, entry)


def _fast_call(func, types, args, entry):
    # The signature (per argument: type, and dtype, rank, device for tensors) and the highest
    # level in one pass; a tensor that autograd would record on makes the call ineligible.
    grad = _grad_enabled()
    key = []
    level = None
    for a in args:
        t = type(a)
        if t is BatchedTensor:
            if grad and a.requires_grad:
                return MISS
            lv = a.level
            if level is None or lv.id > level.id:
                level = lv
            key.append((t, a.dtype, a.dim(), a.is_cuda))
        elif t in _SCALARS:
            key.append(t)
        elif isinstance(a, _Tensor):
            if grad and a.requires_grad:
                return MISS
            key.append((t, a.dtype, a.dim(), a.is_cuda))
        else:
            return MISS
    key = tuple(key)
    hit = entry.get(key, MISS)
    if hit is MISS:
        return _learn(func, types, args, entry, key)
    if hit is None or not level.alive:  # an escaped value: the normal path explains
        return MISS
    n = _stack_len()
    if n and (n != 1 or type(_stack_at(0)) is not VmapMode):
        return MISS  # another dispatch mode must see this op
    op, pointwise, call = hit
    if pointwise:
        # Every batched argument has the full logical rank (the signature says so); when they
        # are all batched at this level along dim 0 with plain real values, the physical call
        # is the op itself on the values: no padding, no promotion fix, no view-bit guard, and
        # no Python dispatch below (other tensor arguments are plain, the signature says so).
        vals = list(args)
        for i, a in enumerate(args):
            if type(a) is BatchedTensor:
                v = a.value
                if a.level is not level or a.bdim != 0 or type(v) is not _Tensor or v.is_neg():
                    if type(v) is BatchedTensor:  # nested levels: maybe one call on the values
                        out = _direct_pointwise(op.func._op, level, args, range(len(args)), {},
                                                True)
                        if out is not _DMISS:
                            return out
                    break
                vals[i] = v
        else:
            try:
                with _NoPythonDispatch():
                    return make_batched(call(*vals), 0, level)
            except Exception as e:  # eager's per-example error, not the physical one
                _explain_shapes(op, level, args, {}, e)
                raise
    return _handler_call(op, level, args, n)


def run_rule(op, level, args):
    """A learned call of ``op`` at ``level`` through its handler (the C entry's hand-off for
    the signatures it does not call directly), or :data:`MISS` when a dispatch mode other than
    vmap's own must see it.  Runs with subclass torch functions off, as ``_fast_call``."""
    n = _stack_len()
    if n and (n != 1 or type(_stack_at(0)) is not VmapMode):
        return MISS
    return _handler_call(op, level, args, n)


def _handler_call(op, level, args, n):
    if op.ok_shapes is not None:  # per-example shape validity, as in dispatch
        _check_shapes(op, level, args, {})
    # Step over vmap's own mode (if pushed), as torch does while a mode's handler runs.
    mode = _pop(None) if n else None
    try:
        return op.handler(op, level, args, {})
    except Exception as e:
        if op.explains:
            _explain_shapes(op, level, args, {}, e)
        raise
    finally:
        if n:
            _push(mode)


# ----------------------------------------------------------------------------------------------
# Learning a signature: run the call normally while the dispatch entry points record
# ----------------------------------------------------------------------------------------------

def _learn(func, types, args, entry, key):
    if getattr(_tls, "recording", None) is not None:  # a torch function inside a recorded call
        return MISS
    record = _tls.recording = []
    _recording_entries(True)
    try:
        out = _disabled_tf(func, types, args, {})
    finally:
        _tls.recording = None
        _recording_entries(False)
    _counts["recorded"] += 1
    if not record:
        _CACHE[func] = False
    else:
        entry[key] = _cacheable(func, record, args, out, key)
    return out


def _cacheable(func, record, args, out, key):
    if len(record) != 1:
        return None
    op, rargs, rkwargs, rout = record[0]
    if rkwargs or rout is not out or type(out) is not BatchedTensor or len(rargs) != len(args):
        return None
    for a, b in zip(args, rargs):
        if isinstance(a, _Tensor):
            if a is not b:
                return None
        elif type(a) is not type(b) or a != b:
            return None
    schema = op._schema
    if any(r.alias_info is not None for r in schema.returns) or any(
            a.alias_info is not None for a in schema.arguments):
        return None
    cached = prepared(op)
    # Only ops with a rule: a decomposition or the loop fallback runs torch calls of its own,
    # which (called from here, above the dispatcher) would come back through this path.
    if cached.status != "rule" or cached.needs_general_path or cached.is_random or \
            cached.inplace_view:
        return None
    # The physical call of the direct pointwise path: the torch function itself when it is
    # one of torch's C bindings (the argument parser picks the overload by argument types, the
    # ones just recorded; it costs less than the overload's boxed call), else the overload.
    call = func if type(func) in _C_BINDINGS else cached.func._op
    return cached, _simple_pointwise(cached, key), call


def _simple_pointwise(prepared, key):
    """Whether calls with this signature may take ``_run``'s direct pointwise path."""
    if getattr(prepared.handler, "rule", None) is not pointwise_rule:
        return False
    if len(prepared.func._schema.returns) != 1:
        return False
    tensors = [k for k in key if type(k) is tuple]
    rank = max(k[2] for k in tensors)
    return rank >= 1 and all(
        not k[1].is_complex and (k[2] == rank if k[0] is BatchedTensor else k[0] in _PLAIN)
        for k in tensors)


# While some thread records, both dispatch entry points (BatchedTensor's and vmap mode's) are
# swapped for recording ones (through dispatch.set_dispatch_entries, the one writer of both);
# the normal entries have no recording check on the hot path.
_lock = threading.Lock()
_active = 0


def _recorded(func, args, kwargs, from_mode):
    record = getattr(_tls, "recording", None)
    if record is None:  # another thread, or an op a rule runs inside the recorded one
        return _dispatch(func, args, kwargs, from_mode)
    _tls.recording = None
    try:
        out = _dispatch(func, args, kwargs, from_mode)
    finally:
        _tls.recording = record
    record.append((func, args, kwargs, out))
    return out


def _rec_subclass(cls, func, types, args=(), kwargs=None):
    return _recorded(func, args, kwargs, False)


def _rec_mode(self, func, types, args=(), kwargs=None):
    return _recorded(func, args, kwargs, True)


_RECORDING_ENTRIES = {"subclass": _rec_subclass, "mode": _rec_mode}


def _recording_entries(on):
    global _active
    with _lock:
        _active += 1 if on else -1
        if on and _active == 1:
            set_dispatch_entries(_RECORDING_ENTRIES)
        elif not on and _active == 0:
            set_dispatch_entries(NORMAL_ENTRIES)
