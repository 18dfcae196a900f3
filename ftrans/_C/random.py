"""Randomness inside vmap: 'error', 'same' or 'different', per vmap level.

Random factory calls with no tensor argument (``torch.randn(3)``) never reach a tensor
subclass, so the outermost vmap of a thread pushes :class:`_VmapMode`, a dispatch mode that
routes every op to :func:`~ftrans._C.dispatch.dispatch` (which it would reach anyway for batched
arguments) and lets dispatch see random ops whose arguments are all unbatched.  Random ops are
found generically by ``torch.Tag.nondeterministic_seeded``.

:func:`random_dispatch` peels the applicable vmap levels innermost first.  For one level:

- 'error': raise.
- 'same', nothing batched at this level: draw once (the lower levels decide their own).
- 'same', a batched argument: the draws must not vary across examples.  Ops whose randomness is
  a value-independent noise (``*_like``, dropout, bernoulli with a tensor ``p``) draw the noise
  on one example's shape; any other op runs per example from the same generator state, which is
  the definition of 'same'.
- 'different', batched arguments: the physical call draws independently per element already.
- 'different', nothing batched: factories get the batch size prepended to their ``size``,
  ops with tensor arguments get those expanded to the batch, and an in-place draw into an
  unbatched tensor raises (it could not hold per-example values).
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import levels as _levels
from .batched import BatchedTensor, add_batch_dim

__all__ = ["vmap_mode", "random_dispatch"]

_tls = threading.local()
_dispatch = None


def _mode_dispatch(self, func, types, args=(), kwargs=None):
    return _dispatch(func, args, kwargs, True)


class _VmapMode(TorchDispatchMode):
    __torch_dispatch__ = _mode_dispatch


# TorchDispatchMode wraps subclasses' handlers in a dynamo-disable shim that costs microseconds
# per op; this mode never runs under dynamo, so install the plain function.
_VmapMode.__torch_dispatch__ = _mode_dispatch


@contextlib.contextmanager
def vmap_mode():
    """Push the vmap mode unless this thread already has it (nested vmaps share one)."""
    global _dispatch
    if _dispatch is None:
        from .dispatch import dispatch as _dispatch
    if getattr(_tls, "active", False):
        yield
        return
    _tls.active = True
    try:
        with _VmapMode():
            yield
    finally:
        _tls.active = False


def _applicable_levels(level, from_mode):
    stack = [l for l in _levels.current_stack() if l.kind == _levels.VMAP]
    if from_mode:
        return stack
    if level is None:
        return []
    below = [l for l in stack if l.id <= level.id]
    if not below or below[-1] is not level:
        below.append(level)  # another thread (autograd's) or an exited level: its tag decides
    return below


def random_dispatch(op, level, args, kwargs, from_mode=False):
    return _random(op, _applicable_levels(level, from_mode), args, kwargs)


def _random(op, levels, args, kwargs):
    func = op.func
    if not levels:
        return func(*args, **kwargs)
    from .dispatch import describe, unwrap_args, wrap_result, VmapError
    from .rules._util import any_batched

    level, rest = levels[-1], levels[:-1]

    def call_rest(*a, **k):
        return _random(op, rest, a, k)

    if level.randomness == "error":
        raise VmapError(
            f"{describe(level)}: called random operation {op.name} while in randomness error "
            "mode. Please either use the 'same' or 'different' randomness flags on vmap or "
            "perform the randomness operation out of vmap"
        )
    pargs, bdims = unwrap_args(op, level, args)
    kwargs = dict(kwargs)
    if not any_batched(bdims):
        if level.randomness == "same":
            return call_rest(*args, **kwargs)
        return _different_unbatched(op, level, call_rest, list(args), kwargs)
    if op.mutable_pos and bdims[op.mutable_pos[0]] is None:
        raise VmapError(
            f"{describe(level)}: {op.name} draws random values in place into a tensor that is not "
            "batched, from batched arguments. Make the tensor batched first (e.g. "
            "`x = x.expand_as(batched).clone()`)."
        )
    if level.randomness == "different":
        out, obd = _aligned_call(call_rest, pargs, bdims, kwargs, op)
    else:
        out, obd = _same_batched(op, level, call_rest, pargs, bdims, kwargs)
    if op.returns_self:
        return args[0]
    return wrap_result(out, obd, level)


def _aligned_call(call, pargs, bdims, kwargs, op):
    """Physical call with every batched arg front-batched and rank-aligned (elementwise ops)."""
    from .rules._util import pad_rank

    rank = max((a.dim() - (b is not None) for a, b in zip(pargs, bdims)
                if isinstance(a, torch.Tensor)), default=0)
    new = list(pargs)
    for i, b in enumerate(bdims):
        if b is not None and not isinstance(b, tuple):
            x = new[i] if b == 0 else new[i].movedim(b, 0)
            new[i] = pad_rank(x, rank)
    if op.name == "aten::multinomial":
        probs = new[0]
        flat = probs.reshape(-1, probs.shape[-1])
        out = call(flat, *new[1:], **kwargs)
        return out.reshape(probs.shape[:-1] + out.shape[-1:]), 0
    out = call(*new, **kwargs)
    if isinstance(out, tuple):
        return out, (0,) * len(out)
    return out, 0


_SIZE_ARG = "size"


def _different_unbatched(op, level, call_rest, args, kwargs):
    from .dispatch import describe, VmapError

    B = level.batch_size
    schema = op.func._schema
    if op.mutable_pos:
        raise VmapError(
            f"{describe(level)}: vmap: Cannot ask for different inplace randomness on an "
            f"unbatched tensor ({op.name}). This will appear like same randomness. Make the "
            "tensor batched first, or use an out-of-place op (e.g. torch.rand_like)."
        )
    names = [a.name for a in schema.arguments]
    if _SIZE_ARG in names:
        i = names.index(_SIZE_ARG)
        if i < len(args):
            args[i] = [B] + list(args[i])
        else:
            kwargs[_SIZE_ARG] = [B] + list(kwargs[_SIZE_ARG])
        out = call_rest(*args, **kwargs)
        return add_batch_dim(out, 0, level)
    tensor_pos = [i for i in op.tensor_pos if i < len(args) and args[i] is not None]
    if tensor_pos:
        for i in tensor_pos:
            x = args[i]
            args[i] = x.unsqueeze(0).expand((B,) + tuple(x.shape))
        out = call_rest(*args, **kwargs)
        if op.name == "aten::multinomial" and args[tensor_pos[0]].dim() > 2:
            raise VmapError(f"{describe(level)}: multinomial takes 1-D or 2-D probabilities")
        if isinstance(out, tuple):
            return tuple(add_batch_dim(o, 0, level) for o in out)
        return add_batch_dim(out, 0, level)
    # No size and no tensor (randperm): one draw per example.
    return add_batch_dim(torch.stack([call_rest(*args, **kwargs) for _ in range(B)]), 0, level)


def _same_batched(op, level, call_rest, pargs, bdims, kwargs):
    name = op.name
    if name.endswith("_like"):
        x, b = pargs[0], bdims[0]
        stand_in = x.select(b, 0)
        return call_rest(stand_in, *pargs[1:], **kwargs), None
    if name == "aten::native_dropout" and bdims[0] is not None:
        x = pargs[0].movedim(bdims[0], 0)
        ones = torch.ones(x.shape[1:], dtype=x.dtype, device=x.device)
        scaled, mask = call_rest(ones, *pargs[1:], **kwargs)
        return (x * scaled, mask.expand(x.shape)), (0, 0)
    if name == "aten::bernoulli" and len(pargs) == 1 and op.func._overloadname == "default":
        p = pargs[0].movedim(bdims[0], 0)
        u = torch.rand(p.shape[1:], dtype=p.dtype, device=p.device)
        return (u < p).to(p.dtype), 0
    return _same_by_forked_generator(op, level, call_rest, pargs, bdims, kwargs)


def _same_by_forked_generator(op, level, call_rest, pargs, bdims, kwargs):
    """Run the op per example, each time from the same generator state."""
    from .dispatch import _select

    gen = kwargs.get("generator")
    device = next((a.device for a in pargs if isinstance(a, torch.Tensor)), torch.device("cpu"))

    def get_state():
        if gen is not None:
            return gen.get_state()
        if device.type == "cuda":
            return torch.cuda.get_rng_state(device)
        return torch.get_rng_state()

    def set_state(s):
        if gen is not None:
            gen.set_state(s)
        elif device.type == "cuda":
            torch.cuda.set_rng_state(s, device)
        else:
            torch.set_rng_state(s)

    start = get_state()
    outs = []
    for i in range(level.batch_size):
        set_state(start)
        call_args = [
            [_select(x, d, i) for x, d in zip(a, bd)] if isinstance(bd, tuple) else _select(a, bd, i)
            for a, bd in zip(pargs, bdims)
        ]
        outs.append(call_rest(*call_args, **kwargs))
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0
