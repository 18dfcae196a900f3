"""vmap's arguments: ``in_dims`` / ``out_dims`` matched against the inputs and outputs, with
torch.func's error messages, and the call form those messages start with.

Shared by ``vmap.py`` and ``_split.py`` (the split policy re-runs vmap on groups of examples).
"""
from __future__ import annotations

import functools

import torch

from . import _pytree

__all__ = ["_func_name", "_call_form", "_flatten_in_dims", "_batch_size", "_check_out_dims",
           "_flat_out_dims"]


def _func_name(func) -> str:
    name = getattr(func, "__name__", None)
    if name:
        return name
    if isinstance(func, functools.partial):
        return f"functools.partial({_func_name(func.func)}, ...)"
    return repr(func)


def _call_form(func, in_dims, out_dims) -> str:
    parts = [_func_name(func)]
    if in_dims != 0:
        parts.append(f"in_dims={in_dims!r}")
    if out_dims != 0:
        parts.append(f"out_dims={out_dims!r}")
    return f"vmap({', '.join(parts)}, ...)(<inputs>)"


def _flatten_in_dims(func, in_dims, out_dims, args):
    """Leaves of ``args`` and the in_dim of each, with torch.func's error messages."""
    if isinstance(in_dims, bool) or not isinstance(in_dims, (int, tuple, type(None))):
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: expected `in_dims` to be int or a "
            f"(potentially nested) tuple matching the structure of inputs, got: "
            f"{type(in_dims)}."
        )
    if not args:
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: got no inputs. Maybe you forgot to add "
            "inputs, or you are trying to vmap over a function with no inputs. The latter is "
            "unsupported."
        )
    leaves, treespec = _pytree.tree_flatten(args)
    if not isinstance(in_dims, tuple):
        return leaves, treespec, [in_dims] * len(leaves)
    if len(in_dims) != len(args):
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: in_dims is not compatible with the structure "
            f"of `inputs`. in_dims has {len(in_dims)} entries but there are {len(args)} "
            "positional inputs; give one in_dim per positional argument."
        )
    if all(d is None or type(d) is int for d in in_dims):
        # The common case: one int or None per argument, which broadcasts over any argument;
        # each applies to that argument's leaves (no prefix tree to broadcast).
        children = treespec.children()
        if len(children) == len(in_dims):
            return leaves, treespec, [d for d, c in zip(in_dims, children)
                                      for _ in range(c.num_leaves)]
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
                f"is of type {type(x)}. We cannot vmap over non-Tensor arguments, please use None "
                "as the respective in_dim"
            )
        nd = x.dim()
        if d < -nd or d >= nd or nd == 0:
            raise ValueError(
                f"{_call_form(func, in_dims, out_dims)}: Got in_dim={d} for some input, but that "
                f"input is a Tensor of dimensionality {nd} so expected in_dim to satisfy "
                f"-{nd} <= in_dim < {nd}."
            )
        if x.is_nested:
            if d % nd != 0:
                raise RuntimeError(
                    f"{_call_form(func, in_dims, out_dims)}: Nested tensors can only be vmapped "
                    f"over dim=0, but got dim={d}"
                )
            sizes.append(x.size(0))
            continue
        sizes.append(x.shape[d])
    if not sizes:
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: vmap: Expected at least one Tensor to vmap "
            "over (in_dims are all None or inputs hold no Tensors): at least one input must be a "
            "Tensor mapped over a dimension. Pass a tensor with an int in_dim."
        )
    if any(s != sizes[0] for s in sizes):
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: Expected all tensors to have the same size "
            f"in the mapped dimension, got sizes {sizes} for the mapped dimension"
        )
    return sizes[0]


def _check_out_dims(func, in_dims, out_dims):
    """``out_dims`` is an int, None or a pytree (tuple, list, dict, ...) of those, checked before
    ``func`` runs, as torch.func does."""
    if out_dims is None or (isinstance(out_dims, int) and not isinstance(out_dims, bool)):
        return
    bad = [d for d in _pytree.tree_leaves(out_dims)
           if d is not None and (isinstance(d, bool) or not isinstance(d, int))]
    if bad or isinstance(out_dims, bool):
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: `out_dims` must be an int, None or a "
            "python collection of ints representing where in the outputs the vmapped dimension "
            f"should appear (got {bad[0] if bad else out_dims!r})."
        )


def _flat_out_dims(func, in_dims, out_dims, out, n_leaves, out_spec) -> list:
    """One out_dim per output leaf: ``out_dims`` is an int, None, or a pytree prefix of the
    outputs (a 1-tuple around a single tensor output is accepted, as torch.func does)."""
    if out_dims is None or (isinstance(out_dims, int) and not isinstance(out_dims, bool)):
        return [out_dims] * n_leaves
    tree = out_dims
    if isinstance(out, torch.Tensor) and isinstance(out_dims, tuple) and len(out_dims) == 1:
        tree = out_dims[0]
    try:
        if isinstance(out, torch.Tensor) and tree is out_dims:
            raise ValueError  # a container of out_dims for one tensor output (torch.func too)
        return _pytree.tree_leaves(_pytree.tree_broadcast_prefix(tree, out))
    except ValueError:
        n_dims = len(out_dims) if isinstance(out_dims, (tuple, list, dict)) else 1
        n_out = len(out) if isinstance(out, (tuple, list, dict)) else 1
        raise ValueError(
            f"{_call_form(func, in_dims, out_dims)}: out_dims is not compatible with the "
            f"structure of `outputs`. out_dims has structure {_pytree.tree_structure(out_dims)} "
            f"but outputs has structure {out_spec}: out_dims has {n_dims} entries but the "
            f"function returned {n_out} outputs."
        ) from None
