"""Small helpers every rule file uses: moving batch dims, materializing them, logical dims."""
from __future__ import annotations

import torch

from ..ops import any_batched, pad_rank, to_front  # noqa: F401 (re-exported for rule files)
from ..registry import register_batch_rule

__all__ = ["to_front", "batched_front", "to_channels", "logical_rank", "wrap_dim", "any_batched",
           "pad_rank", "aten_op", "aten_ops", "overloads", "register_present"]


def batched_front(x: torch.Tensor, bdim, batch_size: int) -> torch.Tensor:
    """``x`` with a batch dim at 0, expanding an unbatched tensor (no copy)."""
    if bdim is None:
        return x.unsqueeze(0).expand((batch_size,) + tuple(x.shape))
    return x if bdim == 0 else x.movedim(bdim, 0)


def to_channels(x: torch.Tensor, bdim, batch_size: int) -> torch.Tensor:
    """Activation ``[N, C, *]`` -> ``[N, B*C, *]`` (example-major channel groups): how conv and
    batch norm fold a per-example dimension into channels."""
    if bdim is None:
        x = x.unsqueeze(1).expand((x.shape[0], batch_size) + tuple(x.shape[1:]))
    else:
        x = x.movedim(bdim, 1)
    return x.reshape((x.shape[0], batch_size * x.shape[2]) + tuple(x.shape[3:]))


def logical_rank(x: torch.Tensor, bdim) -> int:
    return x.dim() - (bdim is not None)


def wrap_dim(dim: int, rank: int) -> int:
    """Normalize a possibly negative logical dim (rank 0 tensors accept -1 and 0)."""
    r = max(rank, 1)
    if dim < -r or dim >= r:
        raise IndexError(
            f"Dimension out of range (expected to be in range of [{-r}, {r - 1}], but got {dim})"
        )
    return dim + r if dim < 0 else dim


def aten_op(name, overload="default"):
    """``aten.<name>.<overload>`` if this torch has it (older releases lack some), else None."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None or overload not in packet.overloads():
        return None
    return getattr(packet, overload)


def overloads(*names):
    """``aten_op`` for a list with one string per op: the overloads among ``names``
    (``"squeeze.dims"``; a bare ``"squeeze"`` is the whole packet) that this torch has."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = aten_op(packet, overload) if overload else getattr(torch.ops.aten, packet, None)
        if op is not None:
            found.append(op)
    return found


def aten_ops(*names, overload="default"):
    """The ``aten.<name>.<overload>`` of ``names`` that this torch has."""
    return [op for op in (aten_op(n, overload) for n in names) if op is not None]


def register_present(*ops):
    """``register_batch_rule`` for the ops of ``ops`` that exist (None entries are skipped)."""
    present = [op for op in ops if op is not None]
    return register_batch_rule(*present) if present else (lambda fn: fn)
