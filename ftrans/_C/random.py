"""The randomness policy inside vmap: 'error', 'same' or 'different', per vmap level.

Random ops are found generically by ``torch.Tag.nondeterministic_seeded``; the dispatcher hands
every call of one to :func:`random_dispatch`, with or without batched arguments (random factory
calls with no tensor argument, ``torch.randn(3)``, reach it through the vmap mode in
``dispatch.py``).

:func:`random_dispatch` peels the applicable vmap levels innermost first; each level decides
and hands the rest of the call to the levels below it (``call_rest``), so nested vmaps combine
per level (outer 'different' + inner 'same' varies along the outer batch only).  For one level:

- 'error': raise, naming the op.
- 'same', nothing batched at this level: draw once (the lower levels decide their own).
- 'same', a batched argument: the draws must not vary across examples.  The op's randomness
  rule (``rules/random.py``) rewrites value-independent noise as one draw on one example's
  shape, combined with the batched values by native ops; without one (the ops whose noise
  depends on the values: ``poisson``, gamma...) the op runs per example from the same generator
  state (:func:`same_by_forked_generator`), which is the definition of 'same'.
- 'different', batched arguments: the physical call draws independently per element already
  (:func:`aligned_call`), unless the op's 'different' rule says otherwise (``multinomial``).
- 'different', nothing batched: factories get the batch size prepended to their ``size``,
  ops with tensor arguments get those expanded to the batch, and an in-place draw into an
  unbatched tensor raises (it could not hold per-example values).

The helpers the randomness rules share (:func:`draw`, :func:`example`,
:func:`broadcast_example`, :func:`float_dtype`) live here too.
"""
from __future__ import annotations

import torch

from . import levels as _levels
from .batched import add_batch_dim
from .errors import VmapError, call_form
from .ops import any_batched, pad_rank, read_schema, select_example, to_front, unwrap_args, \
    wrap_result
from .registry import RANDOM_RULES

__all__ = ["random_dispatch", "draw", "example", "broadcast_example", "float_dtype",
           "aligned_call", "same_by_forked_generator"]

aten = torch.ops.aten


# ----------------------------------------------------------------------------------------------
# Level peeling
# ----------------------------------------------------------------------------------------------

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
    """Run random op ``op`` (an ``ops.Op``) at ``level``, the top level among its arguments
    (None: none batched); ``from_mode``: the call came through the vmap mode, so every live
    vmap level of this thread applies, batched arguments or not."""
    return _random(op, _applicable_levels(level, from_mode), args, kwargs)


_DRAW_OPS: dict = {}


def draw(levels, shape, dtype, device, gen, normal=False):
    """One uniform (or normal) draw of ``shape`` as user code running at ``levels`` (outermost
    first) would make it; ``gen``: ``{"generator": g}`` or ``{}``."""
    base = aten.randn if normal else aten.rand
    func, kw = (base.generator, gen) if gen else (base.default, {})
    op = _DRAW_OPS.get(func)
    if op is None:
        op = _DRAW_OPS[func] = read_schema(func)
    return _random(op, levels, (list(shape),), dict(dtype=dtype, device=device, **kw))


def _random(op, levels, args, kwargs):
    func = op.func
    if not levels:
        return func(*args, **kwargs)
    level, rest = levels[-1], levels[:-1]

    def call_rest(*a, **k):
        return _random(op, rest, a, k)

    if level.randomness == "error":
        raise VmapError(
            f"{call_form(level)}: vmap: called random operation while in randomness error mode. "
            "Please either use the 'same' or 'different' randomness flags on vmap or perform the "
            f"randomness operation out of vmap (the random operation was {op.name})."
        )
    if any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
            for a in op.func._schema.arguments):
        raise VmapError(
            f"{call_form(level)}: vmap: We do not support calling out variants of random "
            "operations inside of vmap. Please use non-out variants as a workaround "
            f"({op.name} with out=: use its result instead)."
        )
    pargs, bdims = unwrap_args(op, level, args)
    kwargs = dict(kwargs)
    if not any_batched(bdims):
        if level.randomness == "same":
            return call_rest(*args, **kwargs)
        return _different_unbatched(op, level, rest, call_rest, list(args), kwargs)
    if op.mutable_pos and bdims[op.mutable_pos[0]] is None:
        raise VmapError(
            f"{call_form(level)}: vmap: inplace {op.name[6:].rstrip('_')}(self, *extra_args) is "
            "not possible because there exists a Tensor `other` in extra_args that has more "
            "elements than `self`. This "
            "happened due to `other` being vmapped over but `self` not being vmapped over in a "
            f"vmap. Please try to use out-of-place operators instead of inplace "
            f"{op.name[6:].rstrip('_')}. "
            f"({op.name} draws random values in place into a tensor that is not batched, from "
            "batched arguments. Make the tensor batched first, e.g. "
            "`x = x.expand_as(batched).clone()`.)" + (
                " (torch.func refuses it too: Vmap does not currently support same randomness "
                "with a batched tensor input.)" if level.randomness == "same" else "")
        )
    rule = RANDOM_RULES.get((func, level.randomness))
    result = NotImplemented
    if rule is not None:
        result = rule(op, level, rest, call_rest, pargs, bdims, kwargs)
    if result is NotImplemented:
        generic = aligned_call if level.randomness == "different" else same_by_forked_generator
        result = generic(op, level, rest, call_rest, pargs, bdims, kwargs)
    out, obd = result
    if op.returns_self:
        return args[0]
    return wrap_result(out, obd, level)


# ----------------------------------------------------------------------------------------------
# 'different'
# ----------------------------------------------------------------------------------------------

def aligned_call(op, level, rest, call_rest, pargs, bdims, kwargs):
    """'different' with batched arguments: the physical call with every batched arg
    front-batched and rank-aligned (random ops are elementwise in their tensor arguments)."""
    rank = max((a.dim() - (b is not None) for a, b in zip(pargs, bdims)
                if isinstance(a, torch.Tensor)), default=0)
    batch = next(to_front(a, b).shape[0] for a, b in zip(pargs, bdims)
                 if b is not None and not isinstance(b, tuple))
    new = list(pargs)
    for i, b in enumerate(bdims):
        if isinstance(b, tuple):
            continue
        if b is not None:
            new[i] = pad_rank(to_front(new[i], b), rank)
        elif i in op.tensor_pos and isinstance(new[i], torch.Tensor):
            # Unbatched tensors are expanded to the batch, as torch.func does: kernels that take
            # their output's shape from one argument (binomial's count) must see the batch.
            x = new[i]
            new[i] = pad_rank(x.expand((batch,) + tuple(x.shape)), rank)
    out = call_rest(*new, **kwargs)
    if isinstance(out, tuple):
        return out, (0,) * len(out)
    return out, 0


_SIZE_ARG = "size"


def _different_unbatched(op, level, rest, call_rest, args, kwargs):
    B = level.batch_size
    schema = op.func._schema
    if op.mutable_pos:
        raise VmapError(
            f"{call_form(level)}: vmap: Cannot ask for different inplace randomness on an "
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
        return add_batch_dim(call_rest(*args, **kwargs), 0, level)
    tensor_pos = [i for i in op.tensor_pos if i < len(args) and args[i] is not None]
    if tensor_pos:
        rule = RANDOM_RULES.get((op.func, "different"))
        if rule is not None:  # the rule expands what it needs (its bdims say: nothing batched)
            result = rule(op, level, rest, call_rest, args, [None] * len(args), kwargs)
            if result is not NotImplemented:
                return wrap_result(*result, level)
        for i in tensor_pos:
            x = args[i]
            args[i] = x.unsqueeze(0).expand((B,) + tuple(x.shape))
        out = call_rest(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(add_batch_dim(o, 0, level) for o in out)
        return add_batch_dim(out, 0, level)
    # No size and no tensor (randperm): one draw per example, as torch.func does.
    return add_batch_dim(torch.stack([call_rest(*args, **kwargs) for _ in range(B)]), 0, level)


# ----------------------------------------------------------------------------------------------
# 'same' with batched arguments: helpers of the randomness rules, and the generic treatment
# ----------------------------------------------------------------------------------------------

def example(x, b):
    """One example of a physical value (a view; still batched at lower levels)."""
    return x if b is None else x.select(b, 0)


def float_dtype(t):
    return t.dtype if t.dtype.is_floating_point else torch.get_default_dtype()


def broadcast_example(pargs, bdims, positions):
    """A tensor with one example's broadcast shape of the tensors at ``positions``."""
    exs = [example(pargs[i], bdims[i]) for i in positions if isinstance(pargs[i], torch.Tensor)]
    return exs[0] if len(exs) == 1 else torch.broadcast_tensors(*exs)[0]


def same_by_forked_generator(op, level, rest, call_rest, pargs, bdims, kwargs):
    """'same' for ops without a randomness rule: run the op per example, each time from the same
    generator state (value-dependent noise such as ``poisson`` has no shared-noise form)."""
    gen = kwargs.get("generator")
    if gen is None:
        gen = next((a for a in pargs if isinstance(a, torch.Generator)), None)
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
            [select_example(x, d, i) for x, d in zip(a, bd)] if isinstance(bd, tuple)
            else select_example(a, bd, i)
            for a, bd in zip(pargs, bdims)
        ]
        outs.append(call_rest(*call_args, **kwargs))
    if op.returns_self:
        return pargs[0], bdims[0]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0
