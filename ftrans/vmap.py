"""``ftrans.vmap``: validate -> push a level -> wrap inputs -> call -> unwrap outputs.

The flow is deliberately linear and the level is always popped in ``finally``, so an exception
at any depth leaves no state behind.  Everything per-op lives in ``ftrans._C``; this module only
touches pytrees once per call.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable

import torch

from . import _pytree

from ._C import levels as _levels
from ._C import aliasing as _aliasing
from ._C.autograd import AddBatchDim, AddBatchDims, RemoveBatchDim, lift, needs_lift, \
    saved_tensor_hooks_around_vmap
from ._C.batched import BatchedTensor, add_batch_dim, batched_at, remove_batch_dim
from ._C.guards import mark_input
from ._C.dispatch import vmap_mode
from ._chunking import check_chunk_args
from ._split import split_call
from ._vmap_args import _batch_size, _call_form, _check_out_dims, _flat_out_dims, \
    _flatten_in_dims, _func_name

__all__ = ["vmap"]

_RANDOMNESS = ("error", "different", "same")
_NO_HOOKS = contextlib.nullcontext()


def vmap(
    func: Callable,
    in_dims: Any = 0,
    out_dims: Any = 0,
    randomness: str = "error",
    *,
    chunk_size: int | str | None = None,
    memory_budget: int | float | None = None,
    control_flow: str = "error",
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
        chunk_size: map at most this many examples at a time, to bound memory; ``"auto"``
            measures two small chunks and picks the chunk size (see ``memory_budget``).
        memory_budget: bytes (int), or a fraction of the free device memory (float in
            (0, 1]), that the chunks' workspace plus the result may use; implies automatic
            chunking.
        control_flow: ``"error"`` (a Python ``if`` / ``.item()`` on a value the examples
            disagree on raises) or ``"split"``: run ``func`` once per group of examples that
            agree and reassemble (``func`` must be free of side effects).

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
            f"vmap({_func_name(func)}, randomness={randomness!r}): Only allowed values for "
            f"randomness are 'error', 'different', or 'same'. Got {randomness}"
        )
    if chunk_size == "auto" or memory_budget is not None:
        # an AutoChunk: vmap picks the chunk size
        chunk_size = check_chunk_args(f"vmap({_func_name(func)}, ...)", chunk_size,
                                      memory_budget)
    if control_flow not in ("error", "split"):
        raise ValueError(f"vmap({_func_name(func)}, control_flow={control_flow!r}): "
                         "control_flow must be 'error' or 'split'")
    if chunk_size is not None and not _is_auto(chunk_size) and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(
            f"vmap({_func_name(func)}, chunk_size={chunk_size!r}): vmap: chunk_size should be "
            f"None or greater than 0. (got {chunk_size}): chunk_size must be a positive int or None"
        )

    if control_flow == "split":
        return functools.wraps(func)(functools.partial(
            split_call, _vmap_call, func, in_dims, out_dims, randomness, chunk_size))

    @functools.wraps(func)
    def vmapped(*args, **kwargs):
        return _vmap_call(func, in_dims, out_dims, randomness, chunk_size, args, kwargs)

    return vmapped


def _is_auto(chunk_size) -> bool:
    return type(chunk_size).__name__ == "AutoChunk"


# ----------------------------------------------------------------------------------------------


def _vmap_call(func, in_dims, out_dims, randomness, chunk_size, args, kwargs):
    if _is_compiling():
        return _vmap_call_eager(func, in_dims, out_dims, randomness, chunk_size, args, kwargs)
    return _vmap_call_impl(func, in_dims, out_dims, randomness, chunk_size, args, kwargs)


def _vmap_call_impl(func, in_dims, out_dims, randomness, chunk_size, args, kwargs):
    _check_out_dims(func, in_dims, out_dims)
    leaves, treespec, flat_dims = _flatten_in_dims(func, in_dims, out_dims, args)
    batch_size = _batch_size(func, in_dims, out_dims, leaves, flat_dims)
    if getattr(_nested_tls, "markers", None):
        _check_one_nested_level(func, in_dims, out_dims, leaves)
    if any(d is not None and x.is_nested for x, d in zip(leaves, flat_dims)):
        return _vmap_nested(func, in_dims, out_dims, randomness, leaves, treespec, flat_dims,
                            batch_size, kwargs)
    if _is_auto(chunk_size):
        return _auto_chunked(func, in_dims, out_dims, randomness, chunk_size, leaves, treespec,
                             flat_dims, batch_size, kwargs)
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
    stack = _levels.current_stack()
    outer = stack[-1] if stack else None
    with vmap_mode(randomness), saved_tensor_hooks_around_vmap() or _NO_HOOKS:
        _levels.push(level)
        try:
            wrapped = []
            inputs = []  # (x, wrapper, in_dim, version, grad_fn): see _C/aliasing.py
            diff = []  # (position, x, in_dim, x or its alias) of the inputs that require grad
            dims = []  # the in_dims made non-negative
            for x, d in zip(leaves, flat_dims):
                if d is None:
                    wrapped.append(x)
                    dims.append(None)
                else:
                    if type(x) is BatchedTensor:  # an outer level's value: no TF hop
                        with _DisableTF():
                            d, rg = d % x.dim(), x.requires_grad
                    else:
                        d, rg = d % x.dim(), x.requires_grad
                    dims.append(d)
                    if grad_on and rg:
                        # A tensor the enclosing transform did not make enters through an
                        # alias whose gradient is summed over the enclosing levels it is not
                        # batched at, as an op's argument would be (see lift_args).
                        diff.append((len(wrapped), x, d, lift(x) if outer is not None
                                     and needs_lift(x, outer) else x))
                        wrapped.append(None)
                    else:
                        wrapped.append(mark_input(add_batch_dim(x, d, level)))
            if diff:
                # One autograd node for every input that requires grad
                ws = ((AddBatchDim.apply(diff[0][3], diff[0][2], level),) if len(diff) == 1
                      else AddBatchDims.apply(level, tuple(d for _, _, d, _ in diff),
                                              *(x for _, _, _, x in diff)))
                for (i, x, _, _), w in zip(diff, ws):
                    wrapped[i] = mark_input(w)
                    if x.is_leaf:
                        _aliasing.LEAVES.setdefault(level.id, set()).add(id(w))
            for x, w, d in zip(leaves, wrapped, dims):
                if d is not None:
                    inputs.append((x, w, d, *_aliasing.entry_state(w)))
            out = func(*_pytree.tree_unflatten(treespec, wrapped), **kwargs)
            _aliasing.mutated_inputs_epilogue(inputs, level, batch_size, _remove)
            return _unwrap_outputs(func, in_dims, out_dims, out, level, batch_size, inputs)
        finally:
            _aliasing.LEAVES.pop(level.id, None)
            _levels.pop(level)


_DisableTF = torch._C.DisableTorchFunctionSubclass


def _requires_grad(o) -> bool:
    if type(o) is BatchedTensor:  # read without the torch-function hop (several us)
        with _DisableTF():
            return o.requires_grad
    return o.requires_grad


def _remove(o, level, batch_size, d):
    if _requires_grad(o) and torch.is_grad_enabled() and batched_at(o, level):
        return RemoveBatchDim.apply(o, level, batch_size, d)
    return remove_batch_dim(o, level, batch_size, d)


def _unwrap_outputs(func, in_dims, out_dims, out, level, batch_size, inputs=()):
    out_leaves, out_spec = _pytree.tree_flatten(out)
    flat_out_dims = _flat_out_dims(func, in_dims, out_dims, out, len(out_leaves), out_spec)
    by_wrapper = {id(w): (x, w, d) for x, w, d, *_ in inputs}
    results = []
    for o, d in zip(out_leaves, flat_out_dims):
        if d is None:
            if isinstance(o, BatchedTensor) and batched_at(o, level):
                raise ValueError(
                    f"{_call_form(func, in_dims, out_dims)}: `{_func_name(func)}` can not return "
                    "a BatchedTensor when out_dim is None: out_dim=None for an output that is "
                    "batched (it depends on the mapped inputs); give it an int out_dim."
                )
            results.append(o)
            continue
        if not isinstance(o, torch.Tensor):
            raise ValueError(
                f"{_call_form(func, in_dims, out_dims)}: `{_func_name(func)}` must only return "
                f"Tensors, got type {type(o)}. Did you mean to set out_dims= to None for output?"
            )
        if type(o) is BatchedTensor:
            with _DisableTF():
                nd = o.dim() + 1
        else:
            nd = o.dim() + 1
        if d < -nd or d >= nd:
            raise IndexError(
                f"{_call_form(func, in_dims, out_dims)}: Dimension out of range (expected to be "
                f"in range of [{-nd}, {nd - 1}], but got {d}): Got out_dim={d} for an output of "
                f"dimensionality {o.dim()} (with the batch dim: {nd}); expected "
                f"-{nd} <= out_dim < {nd}."
            )
        d = d % nd
        view = _aliasing.as_input_view(o, d, level, by_wrapper)
        if view is None:
            view = _remove(o, level, batch_size, d)
            if type(o) is BatchedTensor and o.level is level:
                by_wrapper.setdefault(id(o), (view, o, d))  # later outputs may be views of it
        results.append(view)
    return _pytree.tree_unflatten(out_spec, results)


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
    return _merge_outputs(func, in_dims, out_dims, chunk_outs,
                          lambda parts, d: torch.cat(parts, dim=d))


def _merge_outputs(func, in_dims, out_dims, outs, combine):
    """One result from the results of several calls (chunks, or single examples): unbatched
    outputs (out_dim None) are taken from the first, batched ones joined by
    ``combine(parts, out_dim)``."""
    flat0, spec = _pytree.tree_flatten(outs[0])
    flat_all = [_pytree.tree_leaves(o) for o in outs]
    dims = _flat_out_dims(func, in_dims, out_dims, outs[0], len(flat0), spec)
    merged = [flat0[j] if d is None else combine([f[j] for f in flat_all], d)
              for j, d in enumerate(dims)]
    return _pytree.tree_unflatten(spec, merged)


# ----------------------------------------------------------------------------------------------
# Nested tensors
# ----------------------------------------------------------------------------------------------

_nested_tls = threading.local()


def _vmap_nested(func, in_dims, out_dims, randomness, leaves, treespec, flat_dims, batch_size,
                 kwargs):
    """vmap over the batch dim of nested tensors, as torch.func supports it: each example is the
    dense component, ``func`` runs once per example (under a vmap level of size 1, so randomness
    and the refusals are vmap's), and tensor outputs are nested again.  torch.func's limits and
    messages: dim 0 only, dense arguments batched at dim 0 only, one vmap level."""
    form = _call_form(func, in_dims, out_dims)
    if any(d not in (0, None) for d in _pytree.tree_leaves(out_dims)):
        raise RuntimeError(
            f"{form}: Nested tensors can only be vmapped over dim=0 (out_dims={out_dims!r})")
    per_example = []
    layout = None
    for x, d in zip(leaves, flat_dims):
        if d is None:
            per_example.append(None)
        elif x.is_nested:
            layout = layout or x.layout
            per_example.append(x.unbind())
        elif d % x.dim() != 0:
            raise RuntimeError(
                f"{form}: Fallback not supported for mixed nested / non-nested arguments without "
                "bdim=0"
            )
        else:
            per_example.append(x.unbind(0))
    ex_dims = [None if d is None else 0 for d in flat_dims]
    rng = torch.get_rng_state() if randomness == "same" else None
    outs = []
    for i in range(batch_size):
        if rng is not None:  # 'same': every example draws from the same generator state
            torch.set_rng_state(rng)
        ex = [x if p is None else p[i].unsqueeze(0) for x, p in zip(leaves, per_example)]
        outs.append(_vmap_once_marked(func, in_dims, out_dims, randomness, ex, treespec,
                                      ex_dims, kwargs))
    return _merge_outputs(func, in_dims, out_dims, outs, lambda parts, d: (
        torch.nested.as_nested_tensor([p.select(0, 0) for p in parts], layout=layout)))


def _vmap_once_marked(func, in_dims, out_dims, randomness, leaves, treespec, flat_dims, kwargs):
    """One example of a nested-tensor vmap: a level of size 1, remembered (by its depth on the
    level stack) so that a vmap nested inside over its values is refused (torch.func supports
    one level)."""
    markers = getattr(_nested_tls, "markers", None)
    if markers is None:
        markers = _nested_tls.markers = []
    markers.append(len(_levels.current_stack()))
    try:
        return _vmap_once(func, in_dims, out_dims, randomness, leaves, treespec, flat_dims, 1,
                          kwargs)
    finally:
        markers.pop()


def _check_one_nested_level(func, in_dims, out_dims, leaves):
    stack = _levels.current_stack()
    nested = [stack[d] for d in _nested_tls.markers if d < len(stack)]
    if any(type(x) is BatchedTensor and any(batched_at(x, l) for l in nested) for x in leaves):
        raise RuntimeError(
            f"{_call_form(func, in_dims, out_dims)}: Only one level of vmap is supported when "
            "vmapping over nested tensors"
        )


def _auto_chunked(func, in_dims, out_dims, randomness, auto, leaves, treespec, flat_dims,
                  batch_size, kwargs):
    """``chunk_size="auto"`` / ``memory_budget``: ``auto`` (``_chunking.AutoChunk``) measures
    and picks the chunk size; the chunks are merged as in :func:`_chunked`."""
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    key = (treespec, tuple(flat_dims), tuple(
        (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else None
        for x in leaves))
    cuda = randomness == "same" and torch.cuda.is_initialized()
    rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None) \
        if randomness == "same" else None

    def run_chunk(s, n):
        if rng is not None:
            torch.set_rng_state(rng[0])
            if cuda:
                torch.cuda.set_rng_state_all(rng[1])
        chunk_leaves = [x if d is None else x.narrow(d, s, n) for x, d in zip(leaves, flat_dims)]
        return _vmap_once(func, in_dims, out_dims, randomness, chunk_leaves, treespec, flat_dims,
                          n, kwargs)

    chunk_outs = auto.run(run_chunk, key, batch_size, tensors[0].device)
    if len(chunk_outs) == 1:
        return chunk_outs[0]
    flat0, spec = _pytree.tree_flatten(chunk_outs[0])
    flat_all = [_pytree.tree_leaves(c) for c in chunk_outs]
    od = _flat_out_dims(func, in_dims, out_dims, chunk_outs[0], len(flat0), spec)
    merged = [flat0[j] if d is None else torch.cat([f[j] for f in flat_all], dim=d)
              for j, d in enumerate(od)]
    return _pytree.tree_unflatten(spec, merged)
