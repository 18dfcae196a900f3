"""Per-example shape validity: under vmap an op rejects exactly the shapes it rejects eagerly.

A batching rule runs the op's kernel on *physical* tensors, and the extra batch dim can turn a
call that is invalid for one example into a valid call on the batch: ``linalg.det`` of a vector
becomes the determinant of the ``[B, n]`` batch seen as one matrix, ``t()`` of a 3-d example is a
legal transpose of a 4-d tensor the rule built.  Rank and size checks in every rule would be a
second, drifting copy of torch's own checks, so dispatch asks the op itself instead.

The first time an op meets a signature (per tensor argument its logical size, plus every
non-tensor argument, which can decide validity: ``dim=2``, a size list), the op's meta
kernel runs on meta tensors with the logical sizes, strides and dtypes of one example.  If it
succeeds, the signature is valid and cached: later calls pay one dict lookup.  If it raises (or
the op has no meta kernel, or the meta kernel needs data), the op runs eagerly on example 0 of
the real arguments (arguments it writes into are cloned first; random ops draw from a forked
generator state), and only eager's verdict counts: an eager error is raised as eager raised it
(same type, eager's message first, then the vmap call form); an eager success is cached as valid.

Rules that raise exactly where the op raises (the pointwise rule: the physical op is the op
itself over a leading batch dim, with torch's broadcasting doing the per-example checks) are
marked ``rule.checks_shapes = True`` and skip the lookup.  When any rule raises, eager on example
0 is asked too, so that the error the user sees is eager's per-example one, not a message about
the physical shapes (this also covers meta kernels that check less than the eager ones).
"""
from __future__ import annotations

import torch

from .batched import BatchedTensor
from .errors import VmapError, call_form

__all__ = ["check", "explain", "signature"]

_Tensor = torch.Tensor
_NoPythonDispatch = torch._C._DisableTorchDispatch
_MAX_SIGNATURES = 1024  # per op; varying float arguments must not grow the cache without bound


def signature(args, kwargs):
    """The cache key: logical sizes of tensors, every other argument as it is.  (Dtypes are left
    out, for speed: validity by shape does not depend on them, and a dtype error is raised by
    the physical call itself.)"""
    key = []
    for a in args:
        if isinstance(a, _Tensor):
            key.append(a.shape)
        elif type(a) is list or type(a) is tuple:
            key.append(tuple([x.shape if isinstance(x, _Tensor) else x for x in a]))
        else:
            key.append(a)
    if kwargs:
        for k, v in kwargs.items():
            key.append(k)
            if isinstance(v, _Tensor):
                key.append(v.shape)
            elif type(v) is list or type(v) is tuple:
                key.append(tuple([x.shape if isinstance(x, _Tensor) else x for x in v]))
            else:
                key.append(v)
    return tuple(key)


def check(op, level, args, kwargs) -> None:
    """Raise eager's error if one example's shapes are invalid for ``op``; else return."""
    try:
        key = signature(args, kwargs)
        if key in op.ok_shapes:
            return
    except Exception:  # an unhashable argument, a tensor without sizes (nested): no verdict
        return
    error = _verdict(op, args, kwargs)
    if error is None:
        if len(op.ok_shapes) >= _MAX_SIGNATURES:
            op.ok_shapes.clear()
        op.ok_shapes[key] = True
        return
    _raise(op, level, args, error)


def explain(op, level, args, kwargs, exc) -> None:
    """``op``'s rule raised ``exc``: when eager raises on example 0 too, raise eager's error
    instead (eager's message, not the physical call's); else return.

    Also where the meta kernel let a signature through that eager refuses.  Every level the
    exception passes explains it again, so the user's own (highest) level has the last word.
    """
    if isinstance(exc, VmapError):  # ftrans's own refusals say what to do instead
        return
    error = _eager_error(op, args, kwargs)
    if error is not None:
        _raise(op, level, args, error)


# ----------------------------------------------------------------------------------------------
# The verdict (the first call of a signature, and every call of an invalid one)
# ----------------------------------------------------------------------------------------------

def _verdict(op, args, kwargs):
    """None when one example's shapes are valid for ``op``, else eager's exception."""
    try:
        meta_args, meta_kwargs = _map_tensors(_to_meta, args, kwargs)
    except _NoVerdict:
        return None
    try:
        with _NoPythonDispatch():
            op.func(*meta_args, **meta_kwargs)
        return None
    except Exception:
        pass
    # The meta kernel refused, has none, or needs data: eager on example 0 decides.
    return _eager_error(op, args, kwargs)


class _NoVerdict(Exception):
    pass


def _to_meta(t):
    if t.layout != torch.strided or t.is_nested or t.is_quantized:
        raise _NoVerdict
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _map_tensors(fn, args, kwargs):
    def one(a):
        if isinstance(a, _Tensor):
            return fn(a)
        if type(a) is list or type(a) is tuple:
            return type(a)(fn(x) if isinstance(x, _Tensor) else x for x in a)
        return a

    return [one(a) for a in args], {k: one(v) for k, v in kwargs.items()}


def _example(t):
    """Example 0 of ``t`` at every level it is batched at: a plain tensor of its logical shape."""
    bdims = []
    while type(t) is BatchedTensor:
        bdims.append(t.bdim)
        t = t.value
    for bdim in reversed(bdims):
        if t.shape[bdim] == 0:  # no example to run: zeros of the example's shape
            shape = list(t.shape)
            del shape[bdim]
            t = torch.zeros(shape, dtype=t.dtype, device=t.device)
        else:
            t = t.select(bdim, 0)
    return t


def _eager_error(op, args, kwargs):
    schema = op.func._schema
    written = {i for i, a in enumerate(schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write}
    written_kw = {a.name for i, a in enumerate(schema.arguments) if i in written and a.kwarg_only}
    with _NoPythonDispatch():
        ex_args, ex_kwargs = _map_tensors(_example, args, kwargs)
        # Never write into the user's data, never advance a generator the batched call uses.
        for i in written:
            if i < len(ex_args) and isinstance(ex_args[i], _Tensor):
                ex_args[i] = ex_args[i].clone()
        for k in written_kw:
            if isinstance(ex_kwargs.get(k), _Tensor):
                ex_kwargs[k] = ex_kwargs[k].clone()
        gens = [g for g in list(ex_args) + list(ex_kwargs.values())
                if isinstance(g, torch.Generator)]
        states = [g.get_state() for g in gens]
        devices = sorted({t.device.index or 0 for t in _tensors(ex_args, ex_kwargs)
                          if t.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=devices):
                op.func(*ex_args, **ex_kwargs)
        except Exception as e:  # noqa: BLE001 - eager's error, whatever it is, is the verdict
            return e
        finally:
            for g, s in zip(gens, states):
                g.set_state(s)
    return None


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, _Tensor):
            yield a
        elif type(a) is list or type(a) is tuple:
            yield from (x for x in a if isinstance(x, _Tensor))


def _raise(op, level, args, error):
    shapes = ", ".join(
        str(list(a.shape)) for a in args if isinstance(a, _Tensor)) or "no tensors"
    hint = (f"\n\n{call_form(level)}: {op.name} rejects the shapes of one example ({shapes}); "
            "under vmap each example is checked as the op checks it eagerly.")
    try:
        new = _as_runtime_error(type(error))(f"{error}{_torch_func_wording(op, args)}{hint}")
    except Exception:  # an exception type with another constructor: eager's error as it is
        new = error
    raise new from None


_BOTH: dict = {}


def _as_runtime_error(cls):
    """Eager's exception type, also a ``RuntimeError``: torch.func's batch rules raise
    ``RuntimeError`` where eager raises ``IndexError``/``ValueError`` (``squeeze(x, dim=1)`` of a
    vector), so code written against either keeps catching it."""
    if issubclass(cls, RuntimeError) or not issubclass(cls, Exception):
        return cls
    both = _BOTH.get(cls)
    if both is None:
        both = _BOTH[cls] = type(cls.__name__, (cls, RuntimeError), {"__module__": cls.__module__})
    return both


# torch.func's batch rules check some shapes before the kernel does (the matmul family's ranks,
# as_strided's lengths), in their own words; code written against torch.func matches them, so
# they follow eager's message.
_RANKS = {"aten::mm": (2, 2), "aten::mv": (2, 1), "aten::bmm": (3, 3)}


def _torch_func_wording(op, args):
    if op.name == "aten::dot":
        return "\nGot wrong shapes for dot"
    if op.name == "aten::as_strided" and len(args) > 2 and len(args[1]) != len(args[2]):
        return "\nsize and stride must have the same length"
    expected = _RANKS.get(op.name)
    if expected is None or len(args) < 2:
        return ""
    ranks = tuple(a.dim() if isinstance(a, _Tensor) else -1 for a in args[:2])
    if ranks == expected:
        return ""
    return (f"\nShape mismatch: Got incorrect dims for {op.name[6:]}(a, b). a has dim "
            f"{ranks[0]}and b has dim {ranks[1]}but expected them to have dim {expected[0]} "
            f"and dim {expected[1]}")
