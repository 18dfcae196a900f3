"""``vmap(func, control_flow="split")``: run ``func`` once per group of examples that agree.

By default a Python ``if`` / ``.item()`` on a value the examples disagree on raises
(``_C/agree.py``, with :class:`~ftrans._C.errors.DivergentValueError`).  Under the split policy vmap catches that error, reads the value of every
example at its own level, groups the examples with equal values, and re-runs the whole function
on each group (each group may split again at a later ``if``), then puts the outputs back in
example order.  The function runs more than once, so it must be free of side effects; gradients
flow through the ``index_select`` / ``cat`` that regroup the examples.
"""
from __future__ import annotations

import torch

from . import _pytree
from ._C.errors import DivergentValueError
from ._C.batched import BatchedTensor
from ._vmap_args import _batch_size, _flat_out_dims, _flatten_in_dims

__all__ = ["split_call"]


def _our_level(value):
    """The outermost vmap level in ``value`` that has exited (the split call's own)."""
    ours, phys = None, None
    t = value
    while type(t) is BatchedTensor:
        if not t.level.alive:
            ours, phys = t.level, t
        t = t.value
    return ours, phys


def _groups(err, batch_size):
    level, wrapper = _our_level(err.value)
    if level is None or level.batch_size != batch_size:
        return None
    phys, bdim = wrapper.value, wrapper.bdim
    keys = {}
    for j in range(batch_size):
        lane = phys.select(bdim, j)
        while type(lane) is BatchedTensor:
            lane = lane.value
        keys.setdefault(tuple(lane.detach().reshape(-1).tolist()), []).append(j)
    if len(keys) < 2:
        return None
    return list(keys.values())


def split_call(vmap_call, func, in_dims, out_dims, randomness, chunk_size, *args, **kwargs):
    try:
        return vmap_call(func, in_dims, out_dims, randomness, chunk_size, args, kwargs)
    except DivergentValueError as err:
        leaves, treespec, flat_dims = _flatten_in_dims(func, in_dims, out_dims, args)
        batch_size = _batch_size(func, in_dims, out_dims, leaves, flat_dims)
        groups = _groups(err, batch_size)
        if groups is None:
            raise
    device = next(x.device for x, d in zip(leaves, flat_dims) if d is not None)
    outs, order = [], []
    for lanes in groups:
        idx = torch.tensor(lanes, device=device)
        sub = [x if d is None else x.index_select(d % x.dim(), idx)
               for x, d in zip(leaves, flat_dims)]
        outs.append(split_call(vmap_call, func, in_dims, out_dims, randomness, chunk_size,
                               *_pytree.tree_unflatten(treespec, sub), **kwargs))
        order.append(idx)
    perm = torch.cat(order)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(batch_size, device=device)
    flat0, spec = _pytree.tree_flatten(outs[0])
    flat_all = []
    for o in outs:
        leaves_o, spec_o = _pytree.tree_flatten(o)
        if spec_o != spec:
            raise RuntimeError(
                f"vmap({getattr(func, '__name__', func)}, control_flow='split'): the groups of "
                f"examples returned different output structures ({spec} and {spec_o}); every "
                "path through the function must return the same structure."
            )
        flat_all.append(leaves_o)
    od = _flat_out_dims(func, in_dims, out_dims, outs[0], len(flat0), spec)
    merged = []
    for j, d in enumerate(od):
        if d is None:
            merged.append(flat0[j])
            continue
        d = d % flat0[j].dim()
        merged.append(torch.cat([f[j] for f in flat_all], dim=d).index_select(d, inverse))
    return _pytree.tree_unflatten(spec, merged)
