"""``ftrans.vmap``: validate -> push a level -> wrap inputs -> call -> unwrap outputs.

The flow is deliberately linear and the level is always popped in ``finally``, so an exception
at any depth leaves no state behind.  Everything per-op lives in ``ftrans._C``; this module only
touches pytrees once per call.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from . import _pytree

from ._C import levels as _levels
from ._C.autograd import AddBatchDim, RemoveBatchDim
from ._C.batched import BatchedTensor, add_batch_dim, remove_batch_dim
from ._C.random import vmap_mode

__all__ = ["vmap"]

_RANDOMNESS = ("error", "different", "same")


def _func_name(func) -> str:
    return getattr(func, "__name__", None) or repr(func)


def _call_form(func, in_dims, out_dims) -> str:
    parts = [_func_name(func)]
    if in_dims != 0:
        parts.append(f"in_dims={in_dims!r}")
    if out_dims != 0:
        parts.append(f"out_dims={out_dims!r}")
    return f"vmap({', '.join(parts)}, ...)(<inputs>)"


def vmap(
    func: Callable,
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: str = "error",
    *,
    chunk_size: int | None = None,
) -> Callable:
    """Vectorizing map: ``vmap(func)`` maps ``func`` over one dimension of its inputs.

    ``func`` is written for one example; the returned function takes inputs with an extra
    (batch) dimension at the positions given by ``in_dims`` and returns outputs with it at
    ``out_dims``.  The work runs as batched native torch ops, not a Python loop.

    Args:
        func: a callable taking tensors (or pytrees of tensors) and returning tensors.
        in_dims: int, None, or a pytree prefix of the positional arguments giving the mapped
            dim of each input (None: not mapped, broadcast to every example).
        out_dims: int or pytree prefix of the outputs (None for an output that is not batched).
        randomness: 'error' (random ops raise), 'same' (one draw shared by all examples) or
            'different' (independent draws per example).
        chunk_size: map at most this many examples at a time, to bound memory.

    Example:
        >>> import torch, ftrans
        >>> x, y = torch.randn(4, 3), torch.randn(4, 3)
        >>> ftrans.vmap(torch.dot)(x, y).shape
        torch.Size([4])
        >>> ftrans.vmap(torch.mul, in_dims=(0, None))(x, torch.ones(3)).shape
        torch.Size([4, 3])
    """
    if not callable(func):
        raise TypeError(f"vmap(func): expected `func` to be a callable, got {type(func).__name__}")
    if randomness not in _RANDOMNESS:
        raise RuntimeError(
            f"vmap({_func_name(func)}, randomness={randomness!r}): randomness must be one of "
            f"{_RANDOMNESS}, got {randomness!r}"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(
            f"vmap({_func_name(func)}, chunk_size={chunk_size!r}): chunk_size must be a positive "
            f"int or None (vmap: chunk_size should be None or greater than 0. (got "
            f"{chunk_size!r}))"
        )

    @functools.wraps(func)
    def vmapped(*args, **kwargs):
        return _vmap_call(func, in_dims, out_dims, randomness, chunk_size, args, kwargs)

    return vmapped


# ----------------------------------------------------------------------------------------------

def _flatten_in_dims(func, in_dims, out_dims, args):
    """Leaves of ``args`` and the in_dim of each, with torch.func's error messages."""
    leaves, treespec = _pytree.tree_flatten(args)
    if isinstance(in_dims, int) or in_dims is None:
        if isinstance(in_dims, bool):
            raise ValueError(
                f"{_call_form(func, in_dims, out_dims)}: expected `in_dims` to be int or a "
                f"(potentially nested) tuple matching the structure of inputs, got: {in_dims!r}."
            )
        return leaves, treespec, [in_dims] * len(leaves)
    if not isinstance(in_dims, tuple):
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: expected `in_dims` to be int or a "
            f"(potentially nested) tuple matching the structure of inputs, got: "
            f"{type(in_dims).__name__}."
        )
    if len(in_dims) != len(args):
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: in_dims is not compatible with the structure "
            f"of `inputs`. in_dims has {len(in_dims)} entries but there are {len(args)} "
            "positional inputs; give one in_dim per positional argument."
        )
    try:
        dims = _pytree.tree_broadcast_prefix(in_dims, args)
    except ValueError as e:
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: in_dims is not compatible with the structure "
            f"of `inputs`. in_dims has structure {_pytree.tree_structure(in_dims)} "
            f"but inputs has structure {treespec} ({e})."
        ) from None
    flat_dims = _pytree.tree_leaves(dims)
    return leaves, treespec, flat_dims


def _batch_size(func, in_dims, out_dims, leaves, flat_dims):
    sizes = []
    for i, (x, d) in enumerate(zip(leaves, flat_dims)):
        if d is None:
            continue
        if not isinstance(d, int) or isinstance(d, bool):
            raise ValueError(
                f"{_call_form(func, in_dims, out_dims)}: Got in_dim={d!r} for an input but in_dim "
                "must be either an integer dimension or None."
            )
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"{_call_form(func, in_dims, out_dims)}: Got in_dim={d} for an input but the input "
                f"is of type {type(x).__name__}. We cannot vmap over non-Tensor arguments, please "
                "use None as the respective in_dim."
            )
        nd = x.dim()
        if d < -nd or d >= nd or nd == 0:
            raise ValueError(
                f"{_call_form(func, in_dims, out_dims)}: Got in_dim={d} for some input, but that "
                f"input is a Tensor of dimensionality {nd} so expected in_dim to satisfy "
                f"-{nd} <= in_dim < {nd}."
            )
        sizes.append(x.shape[d])
    if not sizes:
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: at least one input must be a Tensor mapped "
            "over a dimension (in_dims are all None or inputs hold no Tensors). Pass a tensor "
            "with an int in_dim."
        )
    if any(s != sizes[0] for s in sizes):
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: Expected all tensors to have the same size "
            f"in the mapped dimension, got sizes {sizes} for the mapped dimension"
        )
    return sizes[0]


def _vmap_call(func, in_dims, out_dims, randomness, chunk_size, args, kwargs):
    if _is_compiling():
        return _vmap_call_eager(func, in_dims, out_dims, randomness, chunk_size, args, kwargs)
    return _vmap_call_impl(func, in_dims, out_dims, randomness, chunk_size, args, kwargs)


def _vmap_call_impl(func, in_dims, out_dims, randomness, chunk_size, args, kwargs):
    leaves, treespec, flat_dims = _flatten_in_dims(func, in_dims, out_dims, args)
    batch_size = _batch_size(func, in_dims, out_dims, leaves, flat_dims)
    if chunk_size is not None and chunk_size < batch_size:
        return _chunked(func, in_dims, out_dims, randomness, chunk_size, leaves, treespec,
                        flat_dims, batch_size, kwargs)
    return _vmap_once(func, in_dims, out_dims, randomness, leaves, treespec, flat_dims,
                      batch_size, kwargs)


# Under torch.compile, dynamo must not trace into the Python dispatch machinery (its optree
# polyfills fail on in_dims pytrees): it graph-breaks here and runs vmap eagerly.  Eager calls
# skip the disable shim (tens of microseconds per call): the check above is folded by dynamo.
_vmap_call_eager = torch.compiler.disable(_vmap_call_impl)
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _vmap_once(func, in_dims, out_dims, randomness, leaves, treespec, flat_dims, batch_size,
               kwargs):
    if torch.is_inference_mode_enabled():
        # Wrappers and any transform inside need ordinary tensors (version counters, autograd).
        with torch.inference_mode(False):
            return _vmap_once(func, in_dims, out_dims, randomness, leaves, treespec, flat_dims,
                              batch_size, kwargs)
    level = _levels.Level(_levels.VMAP, batch_size, randomness)
    level.origin = getattr(func, "_ftrans_origin", None) or functools.partial(
        _call_form, func, in_dims, out_dims)
    grad_on = torch.is_grad_enabled()
    with vmap_mode(randomness):
        _levels.push(level)
        try:
            wrapped = []
            for x, d in zip(leaves, flat_dims):
                if d is None:
                    wrapped.append(x)
                else:
                    d = d % x.dim()
                    if grad_on and x.requires_grad:
                        wrapped.append(AddBatchDim.apply(x, d, level))
                    else:
                        wrapped.append(add_batch_dim(x, d, level))
            out = func(*_pytree.tree_unflatten(treespec, wrapped), **kwargs)
            return _unwrap_outputs(func, in_dims, out_dims, out, level, batch_size)
        finally:
            _levels.pop(level)


def _flat_out_dims(func, in_dims, out_dims, out, n_leaves, out_spec) -> list:
    """One out_dim per output leaf: ``out_dims`` is an int, None, or a pytree prefix of the
    outputs (a 1-tuple around a single tensor output is accepted, as torch.func does)."""
    if out_dims is None or (isinstance(out_dims, int) and not isinstance(out_dims, bool)):
        return [out_dims] * n_leaves
    if not isinstance(out_dims, (tuple, list)):
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: expected `out_dims` to be int or a "
            f"(potentially nested) tuple matching the structure of outputs, got "
            f"{type(out_dims).__name__}."
        )
    tree = out_dims[0] if isinstance(out, torch.Tensor) and len(out_dims) == 1 else out_dims
    try:
        return _pytree.tree_leaves(_pytree.tree_broadcast_prefix(tree, out))
    except ValueError:
        n_out = len(out) if isinstance(out, (tuple, list)) else 1
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: out_dims is not compatible with the "
            f"structure of `outputs`. out_dims has {len(out_dims)} entries but the function "
            f"returned {n_out} outputs (structure {out_spec})."
        ) from None


def _unwrap_outputs(func, in_dims, out_dims, out, level, batch_size):
    out_leaves, out_spec = _pytree.tree_flatten(out)
    flat_out_dims = _flat_out_dims(func, in_dims, out_dims, out, len(out_leaves), out_spec)
    results = []
    for o, d in zip(out_leaves, flat_out_dims):
        if d is None:
            if isinstance(o, BatchedTensor) and _batched_at(o, level):
                raise ValueError(
                    f"{_call_form(func, in_dims, out_dims)}: out_dim=None for an output that is "
                    "batched (it depends on the mapped inputs); give it an int out_dim."
                )
            results.append(o)
            continue
        if not isinstance(o, torch.Tensor):
            raise ValueError(
                f"{_call_form(func, in_dims, out_dims)}: `{_func_name(func)}` must only return "
                f"Tensors, got type {type(o).__name__}. Did you mean to set out_dims= to None for "
                "that output?"
            )
        if not isinstance(d, int) or isinstance(d, bool):
            raise ValueError(
                f"{_call_form(func, in_dims, out_dims)}: out_dims entries must be int or None, "
                f"got {d!r}."
            )
        nd = o.dim() + 1
        if d < -nd or d >= nd:
            raise ValueError(
                f"{_call_form(func, in_dims, out_dims)}: Got out_dim={d} for an output of "
                f"dimensionality {o.dim()} (with the batch dim: {nd}); expected "
                f"-{nd} <= out_dim < {nd}."
            )
        d = d % nd
        if o.requires_grad and torch.is_grad_enabled() and _batched_at(o, level):
            results.append(RemoveBatchDim.apply(o, level, batch_size, d))
        else:
            results.append(remove_batch_dim(o, level, batch_size, d))
    return _pytree.tree_unflatten(out_spec, results)


def _batched_at(t, level) -> bool:
    while type(t) is BatchedTensor:
        if t.level is level:
            return True
        if t.level.id < level.id:
            return False
        t = t.value
    return False


def _chunked(func, in_dims, out_dims, randomness, chunk_size, leaves, treespec, flat_dims,
             batch_size, kwargs):
    starts = range(0, batch_size, chunk_size)
    chunk_outs = []
    # 'same' is one draw for the whole batch, so every chunk replays the same generator state.
    cuda = randomness == "same" and torch.cuda.is_initialized()
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None) \
        if randomness == "same" else None
    for s in starts:
        if rng is not None:
            torch.set_rng_state(rng[0])
            if cuda:
                torch.cuda.set_rng_state_all(rng[1])
        n = min(chunk_size, batch_size - s)
        chunk_leaves = [
            x if d is None else x.narrow(d, s, n) for x, d in zip(leaves, flat_dims)
        ]
        chunk_outs.append(
            _vmap_once(func, in_dims, out_dims, randomness, chunk_leaves, treespec, flat_dims, n,
                       kwargs)
        )
    flat0, spec = _pytree.tree_flatten(chunk_outs[0])
    flat_all = [_pytree.tree_leaves(c) for c in chunk_outs]
    od = _flat_out_dims(func, in_dims, out_dims, chunk_outs[0], len(flat0), spec)
    merged = []
    for j, d in enumerate(od):
        if d is None:
            merged.append(flat0[j])
        else:
            merged.append(torch.cat([f[j] for f in flat_all], dim=d))
    return _pytree.tree_unflatten(spec, merged)
