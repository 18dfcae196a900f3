"""The slow but correct path: an op with no batching rule runs once per example.

``loop_fallback`` has the rule signature, so the dispatcher uses it as the rule of every op
it cannot lower otherwise.  It warns once per op (:class:`FallbackWarning`, a
``UserWarning``) and counts every call, so users can find what to write a rule for
(:func:`fallback_stats`) before a GPU turns one kernel into B of them.
"""
from __future__ import annotations

import collections
import threading
import warnings

import torch

from .batched import BatchedTensor
from .errors import VmapError, call_form
from .ops import select_example

__all__ = ["FallbackWarning", "fallback_stats", "reset_fallback_stats", "loop_fallback"]


class FallbackWarning(UserWarning):
    """An op had no batching rule and ran as a per-example loop (correct, but slow)."""



_fallback_counts: collections.Counter = collections.Counter()
_warned: set = set()
_lock = threading.Lock()


def fallback_stats() -> dict:
    """``{op name: number of calls}`` for every op that ran through the loop fallback.

    Example:
        >>> import torch, ftrans
        >>> ftrans.reset_fallback_stats()
        >>> _ = ftrans.vmap(torch.sin)(torch.randn(3, 2))   # sin has a rule
        >>> ftrans.fallback_stats()
        {}
    """
    return dict(_fallback_counts)


def reset_fallback_stats() -> None:
    """Clear :func:`fallback_stats` and re-arm the once-per-op :class:`FallbackWarning`.

    Example:
        >>> import ftrans
        >>> ftrans.reset_fallback_stats()
        >>> ftrans.fallback_stats()
        {}
    """
    _fallback_counts.clear()
    _warned.clear()



def loop_fallback(level, func, args, bdims, kwargs):
    name = str(func)
    if level.batch_size == 0:  # no example to run: the output's shape is unknown
        raise VmapError(
            f"{call_form(level)}: Batching rule not implemented for {func._schema.name}. The "
            "fallback path does not support vmap over dims of size 0. The op has no "
            "batching rule and runs per example; register one with ftrans.register_batch_rule."
        )
    with _lock:
        _fallback_counts[name] += 1
        first = name not in _warned
        _warned.add(name)
    if first:
        warnings.warn(
            f"ftrans.vmap: no batching rule for {name}; running it as a per-example loop "
            "(correct but slow). Register one with ftrans.register_batch_rule.",
            FallbackWarning,
            stacklevel=2,
        )
    results = []
    for b in range(level.batch_size):
        call_args = []
        for a, bd in zip(args, bdims):
            if isinstance(bd, tuple):
                call_args.append([select_example(x, d, b) for x, d in zip(a, bd)])
            else:
                call_args.append(select_example(a, bd, b))
        # Keyword-only tensors batched at this level (segment_reduce's `lengths=`): per example
        # too, or the call would re-dispatch here forever.
        call_kwargs = {k: v.value.select(v.bdim, b) if type(v) is BatchedTensor and v.level is level
                       else v for k, v in kwargs.items()}
        results.append(func(*call_args, **call_kwargs))
    first_out = results[0]
    if isinstance(first_out, torch.Tensor):
        return _stack(results, func, level), 0
    if isinstance(first_out, (tuple, list)):
        outs, obds = [], []
        for j, o in enumerate(first_out):
            if isinstance(o, torch.Tensor):
                outs.append(_stack([r[j] for r in results], func, level))
                obds.append(0)
            else:
                outs.append(o)
                obds.append(None)
        return (list(outs) if isinstance(first_out, list) else tuple(outs)), tuple(obds)
    if first_out is None:
        return None, None
    raise VmapError(
        f"{call_form(level)}: {func} returns a Python {type(first_out).__name__} that depends on "
        "each example's data; vmap cannot batch it."
    )


def _stack(results, func, level):
    shape = results[0].shape
    if any(r.shape != shape for r in results):
        raise VmapError(
            f"{call_form(level)}: {func} returned outputs of different shapes for different "
            "examples; vmap needs every example to produce the same shape."
        )
    return torch.stack(results)
