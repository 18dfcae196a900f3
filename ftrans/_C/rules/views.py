"""View and shape ops.  Rules return *physical views*, so a write through a view mutates the
base for free; the batch dim is moved to the front (itself a view) before the logical op."""
from __future__ import annotations

import torch

from ..registry import register_batch_rule
from ._util import to_front, wrap_dim

aten = torch.ops.aten


@register_batch_rule(aten.unsqueeze.default, aten.unsqueeze_.default)
def unsqueeze_rule(level, func, args, bdims, kwargs):
    x, dim = args[0], args[1]
    x = to_front(x, bdims[0])
    dim = wrap_dim(dim, x.dim())  # logical rank + 1
    return func(x, dim + 1), 0


@register_batch_rule(aten.expand.default)
def expand_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    size = list(args[1])
    r = x.dim() - 1
    extra = len(size) - r
    if extra < 0:
        raise RuntimeError(
            f"expand: the number of sizes provided ({len(size)}) must be greater or equal to "
            f"the number of dimensions in the tensor ({r})"
        )
    x = x.view((x.shape[0],) + (1,) * extra + tuple(x.shape[1:]))
    return x.expand([x.shape[0]] + size, **kwargs), 0


@register_batch_rule(aten.detach.default, aten.alias.default, aten.clone.default,
                     aten.contiguous.default)
def same_layout_rule(level, func, args, bdims, kwargs):
    return func(args[0], *args[1:], **kwargs), bdims[0]
