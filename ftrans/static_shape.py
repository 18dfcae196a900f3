"""Data-dependent ops with a static size, usable inside ``vmap``: ``nonzero``, ``argwhere``,
``unique``, ``masked_select``, ``bincount``.

Inside ``vmap`` each example of ``torch.nonzero(x)`` would have its own length, so torch.func
(and ftrans) refuse them.  Given ``size=`` (``length=`` for ``bincount``) the result is padded
with ``fill_value`` (or truncated) to that size, as ``jax.numpy`` does; ``return_count=True``
also returns how many entries are valid (per example under vmap).  The work is a few native
batched ops (a stable compaction by ``argsort``, ``gather``/``scatter_add``), never a loop.
Without ``size=`` they are torch's own functions (fine outside vmap).
"""
from __future__ import annotations

import torch

from ._C.rules.static_size import (bincount_padded, masked_select_padded, nonzero_padded,
                                   unique_padded)

__all__ = ["nonzero", "argwhere", "unique", "masked_select", "bincount"]


def _check_size(form, size, name="size"):
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise TypeError(f"{form}: {name} must be a non-negative int, got {size!r}")


def nonzero(input: torch.Tensor, *, size: int | None = None, fill_value: int = -1,
            as_tuple: bool = False, return_count: bool = False):
    """``torch.nonzero`` with an optional static ``size`` (rows past the count are
    ``fill_value``; extra nonzeros are dropped).

    Example:
        >>> import torch, ftrans
        >>> x = torch.tensor([[0., 1., 2.], [3., 0., 0.]])
        >>> ftrans.vmap(lambda r: ftrans.nonzero(r, size=2))(x)
        tensor([[[ 1],
                 [ 2]],
        <BLANKLINE>
                [[ 0],
                 [-1]]])
    """
    if size is None:
        out = torch.nonzero(input, as_tuple=as_tuple)
        if return_count:
            n = out[0].shape[0] if as_tuple else out.shape[0]
            return out, torch.tensor(n, device=input.device)
        return out
    _check_size("ftrans.nonzero(input, size=...)", size)
    out, count = nonzero_padded(input, size, fill_value)
    if as_tuple:
        out = tuple(out.unbind(-1))
    return (out, count) if return_count else out


def argwhere(input: torch.Tensor, *, size: int | None = None, fill_value: int = -1,
             return_count: bool = False):
    """``torch.argwhere`` with an optional static ``size`` (see :func:`nonzero`).

    Example:
        >>> import torch, ftrans
        >>> ftrans.argwhere(torch.tensor([0, 5, 0, 7]), size=3)
        tensor([[ 1],
                [ 3],
                [-1]])
    """
    return nonzero(input, size=size, fill_value=fill_value, return_count=return_count)


def masked_select(input: torch.Tensor, mask: torch.Tensor, *, size: int | None = None,
                  fill_value=0, return_count: bool = False):
    """``torch.masked_select`` with an optional static ``size`` (padded with ``fill_value``).

    Example:
        >>> import torch, ftrans
        >>> x = torch.tensor([[1., -2., 3.], [-4., 5., -6.]])
        >>> ftrans.vmap(lambda r: ftrans.masked_select(r, r > 0, size=2))(x)
        tensor([[1., 3.],
                [5., 0.]])
    """
    if size is None:
        out = torch.masked_select(input, mask)
        return (out, torch.tensor(out.numel(), device=out.device)) if return_count else out
    _check_size("ftrans.masked_select(input, mask, size=...)", size)
    out, count = masked_select_padded(input, mask, size, fill_value)
    return (out, count) if return_count else out


def unique(input: torch.Tensor, *, size: int | None = None, fill_value=None,
           return_inverse: bool = False, return_counts: bool = False,
           return_count: bool = False):
    """Sorted ``torch.unique`` (flattened) with an optional static ``size``.

    With ``size``, values past the number of distinct values are ``fill_value`` (default: the
    smallest value, as in ``jax.numpy.unique``) with count 0; ``return_inverse`` gives each
    element's index into the (unpadded) unique values, in ``input``'s shape.  Results come in
    torch's order (values, inverse, counts), then the valid count if ``return_count``.

    Example:
        >>> import torch, ftrans
        >>> x = torch.tensor([[3, 1, 3, 3], [2, 2, 2, 2]])
        >>> ftrans.vmap(lambda r: ftrans.unique(r, size=3, fill_value=-1, return_counts=True))(x)
        (tensor([[ 1,  3, -1],
                [ 2, -1, -1]]), tensor([[1, 3, 0],
                [4, 0, 0]]))
    """
    if size is None:
        out = torch.unique(input, sorted=True, return_inverse=return_inverse,
                           return_counts=return_counts)
        if not return_count:
            return out
        values = out[0] if isinstance(out, tuple) else out
        count = torch.tensor(values.numel(), device=values.device)
        return (*out, count) if isinstance(out, tuple) else (out, count)
    _check_size("ftrans.unique(input, size=...)", size)
    values, inverse, counts, count = unique_padded(input, size, fill_value)
    out = [values]
    if return_inverse:
        out.append(inverse)
    if return_counts:
        out.append(counts)
    if return_count:
        out.append(count)
    return out[0] if len(out) == 1 else tuple(out)


def bincount(input: torch.Tensor, weights: torch.Tensor | None = None, minlength: int = 0, *,
             length: int | None = None):
    """``torch.bincount`` with an optional static ``length`` (values outside ``[0, length)``
    are dropped; the result always has ``length`` bins).

    Example:
        >>> import torch, ftrans
        >>> ftrans.vmap(lambda r: ftrans.bincount(r, length=4))(torch.tensor([[0, 1, 1], [3, 3, 9]]))
        tensor([[1, 2, 0, 0],
                [0, 0, 0, 2]])
    """
    if length is None:
        return torch.bincount(input, weights, minlength)
    _check_size("ftrans.bincount(input, length=...)", length, "length")
    if input.dim() != 1:
        raise RuntimeError(
            f"ftrans.bincount(input, length=...): input must be 1-d (per example), got shape "
            f"{tuple(input.shape)}")
    if input.is_floating_point() or input.is_complex() or input.dtype == torch.bool:
        raise RuntimeError("ftrans.bincount(input, length=...): input must be an integer tensor, "
                           f"got {input.dtype}")
    if weights is not None and weights.shape != input.shape:
        raise RuntimeError("ftrans.bincount(input, weights, length=...): weights should have the "
                           "same shape as input")
    return bincount_padded(input, weights, length)
