"""Ops that make or fill fresh memory: copies (``clone``, ``_to_copy``, ``copy_``), fills, and
the ``new_*`` / ``*_like`` factories.

Factories called on a batched tensor return batched tensors (``*_like`` with the layout of
their input), even though their *values* do not depend on the batch: code routinely fills them
in place from batched values afterwards.  That includes torch's own backward formulas, e.g.
``as_strided``'s gradient is ``grad.new_zeros(...)`` followed by an in-place ``copy_(grad)``,
which an unbatched buffer could not hold.  torch.func batches ``new_*`` the same way.

Memory formats are *logical* promises: ``clone(memory_format=torch.contiguous_format)`` must
make each example contiguous, so the batch dim goes to the front first (a contiguous physical
tensor with the batch elsewhere would give a non-contiguous logical tensor).  ``channels_last``
on a logical 4-D tensor is a physical 5-D tensor, which torch's formats do not cover: we permute
the logical channel dim last, make that contiguous, and permute back, which yields exactly the
channels-last strides per example.  ``preserve_format`` keeps the physical layout and bdim.
"""
from __future__ import annotations

import torch

from ..registry import register_batch_rule
from ._util import overloads, pad_rank, to_front

aten = torch.ops.aten

_CHANNELS_LAST = {torch.channels_last: (4, [0, 2, 3, 1]),
                  torch.channels_last_3d: (5, [0, 2, 3, 4, 1])}


def with_format(make, x, bdim, memory_format):
    """``make(physical, memory_format)`` with ``memory_format`` applied to the logical tensor.

    Returns (out, out_bdim).
    """
    if memory_format is None or memory_format == torch.preserve_format:
        return make(x, memory_format), bdim
    x = to_front(x, bdim)
    if memory_format == torch.contiguous_format:
        return make(x, torch.contiguous_format), 0
    rank, perm = _CHANNELS_LAST.get(memory_format, (None, None))
    if rank is None:
        return make(x, memory_format), 0  # let torch raise for an unknown format
    if x.dim() - 1 != rank:
        raise RuntimeError(
            f"required rank {rank} tensor to use {str(memory_format).split('.')[-1]} format"
        )
    phys = [0] + [p + 1 for p in perm]
    inverse = [phys.index(i) for i in range(len(phys))]
    out = make(aten.permute.default(x, phys), torch.contiguous_format)
    return aten.permute.default(out, inverse), 0


@register_batch_rule(aten.clone.default, *overloads("lift_fresh_copy.default"))
def clone_rule(level, func, args, bdims, kwargs):
    kwargs = dict(kwargs)
    mf = kwargs.pop("memory_format", None)

    def make(x, fmt):
        return func(x, memory_format=fmt, **kwargs) if fmt is not None else func(x, **kwargs)

    return with_format(make, args[0], bdims[0], mf)


@register_batch_rule(*overloads("contiguous.default"))
def contiguous_rule(level, func, args, bdims, kwargs):
    mf = args[1] if len(args) > 1 else kwargs.get("memory_format", torch.contiguous_format)
    x, b = args[0], bdims[0]
    if _logically_contiguous(x, b, mf):
        return x, b
    return with_format(lambda t, fmt: aten.clone.default(t, memory_format=fmt), x, b, mf)


def _logically_contiguous(x, b, mf) -> bool:
    shape, strides = list(x.shape), list(x.stride())
    del shape[b], strides[b]
    probe = torch.empty_strided(shape, strides, dtype=torch.uint8, device="meta")
    return probe.is_contiguous(memory_format=mf)


@register_batch_rule(aten._to_copy.default)
def to_copy_rule(level, func, args, bdims, kwargs):
    kwargs = dict(kwargs)
    mf = kwargs.pop("memory_format", None)

    def make(x, fmt):
        return func(x, memory_format=fmt, **kwargs) if fmt is not None else func(x, **kwargs)

    return with_format(make, args[0], bdims[0], mf)


@register_batch_rule(*overloads("empty_like.default", "zeros_like.default", "ones_like.default",
                                "full_like.default"))
def like_rule(level, func, args, bdims, kwargs):
    kwargs = dict(kwargs)
    mf = kwargs.pop("memory_format", None)

    def make(x, fmt):
        if fmt is not None:
            return func(x, *args[1:], memory_format=fmt, **kwargs)
        return func(x, *args[1:], **kwargs)

    return with_format(make, args[0], bdims[0], mf)


@register_batch_rule(*overloads("new_empty.default", "new_zeros.default", "new_ones.default",
                                "new_full.default"))
def new_rule(level, func, args, bdims, kwargs):
    x = args[0]
    return func(x, [x.shape[bdims[0]]] + list(args[1]), *args[2:], **kwargs), 0


@register_batch_rule(*overloads("new_empty_strided.default"))
def new_empty_strided_rule(level, func, args, bdims, kwargs):
    # Examples are laid out one after the other, each spanning what its strides reach.
    x, size, stride = args[0], list(args[1]), list(args[2])
    span = 0 if 0 in size else 1 + sum((n - 1) * st for n, st in zip(size, stride))
    return func(x, [x.shape[bdims[0]]] + size, [span] + stride, *args[3:], **kwargs), 0


# ----------------------------------------------------------------------------------------------
# Copies and fills into existing memory
# ----------------------------------------------------------------------------------------------

def _aligned_src(src, sb, rank):
    """A batched ``src`` front-batched and padded to broadcast against a ``rank``-dim example."""
    return pad_rank(to_front(src, sb), rank)


@register_batch_rule(aten.copy_.default)
def copy__rule(level, func, args, bdims, kwargs):
    self, src = args[0], args[1]
    b, sb = bdims[0], bdims[1]
    dst = to_front(self, b)  # a view: writing it writes self
    if sb is not None:
        src = _aligned_src(src, sb, dst.dim() - 1)
    func(dst, src, *args[2:], **kwargs)
    return self, b


@register_batch_rule(aten.copy.default)
def copy_rule(level, func, args, bdims, kwargs):
    self, src = args[0], args[1]
    b, sb = bdims[0], bdims[1]
    if sb is None:  # values come from src alone: self only lends shape, dtype and device
        if b is not None:  # front first, so that src broadcasts against the example dims
            return func(to_front(self, b), src, *args[2:], **kwargs), 0
        return func(self, src, *args[2:], **kwargs), None
    if b is None:
        shape = list(self.shape)
        src = _aligned_src(src, sb, len(shape))
        out = aten.expand.default(src, [src.shape[0]] + shape)
        return aten._to_copy.default(out, dtype=self.dtype, device=self.device,
                                     memory_format=torch.contiguous_format), 0
    dst = aten.clone.default(to_front(self, b))
    dst.copy_(_aligned_src(src, sb, dst.dim() - 1))
    return dst, 0


@register_batch_rule(aten.fill_.Scalar, aten.zero_.default)
def fill_scalar__rule(level, func, args, bdims, kwargs):
    func(*args, **kwargs)
    return args[0], bdims[0]


@register_batch_rule(aten.fill.Scalar, aten.zero.default)
def fill_scalar_rule(level, func, args, bdims, kwargs):
    return func(*args, **kwargs), bdims[0]


@register_batch_rule(aten.fill_.Tensor)
def fill_tensor__rule(level, func, args, bdims, kwargs):
    self, value = args[0], args[1]
    b, vb = bdims[0], bdims[1]
    if vb is None:
        func(self, value)
        return self, b
    dst = to_front(self, b)
    dst.copy_(_aligned_src(value, vb, dst.dim() - 1))
    return self, b


@register_batch_rule(aten.fill.Tensor)
def fill_tensor_rule(level, func, args, bdims, kwargs):
    self, value = args[0], args[1]
    b, vb = bdims[0], bdims[1]
    if vb is None:
        return func(self, value), b
    value = to_front(value, vb)
    if b is None:
        shape = list(self.shape)
    else:
        shape = list(self.shape)
        del shape[b]
    out = aten.expand.default(pad_rank(value, len(shape)), [value.shape[0]] + shape)
    return aten._to_copy.default(out, dtype=self.dtype, memory_format=torch.contiguous_format), 0
