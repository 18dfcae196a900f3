"""The batching-rule registry: the rule tables, their decorators, the rule signature.

A batching rule lowers one aten op applied to tensors batched at one vmap level onto native
torch ops on the physical tensors::

    @register_batch_rule(torch.ops.aten.mm)
    def mm_rule(level, func, args, bdims, kwargs):
        ...
        return out, out_bdim

- ``level``:  the vmap :class:`~ftrans._C.levels.Level` being processed (``level.batch_size``);
- ``func``:   the ``OpOverload`` being called;
- ``args``:   its positional arguments, with tensors batched at ``level`` replaced by their
              physical values (any other tensor is unbatched *at this level*; it may still be
              batched at a lower level, which the physical call handles by dispatching again);
- ``bdims``:  a list parallel to ``args``: the batch dim of each physical value, ``None`` for
              unbatched tensors and non-tensors; for a ``Tensor[]`` argument, a tuple with one
              entry per element (or ``None`` if no element is batched);
- ``kwargs``: keyword arguments, untouched.

It returns ``(out, out_bdims)``: ``out`` a tensor or tuple of tensors, ``out_bdims`` an int or
``None`` (for a tensor) or a tuple of those (for a tuple).  Returning ``None`` bdims means "this
output does not depend on the batch".

A rule function may carry flags (attributes set after its definition) that change how the
dispatcher calls it:

- ``rule.kw_bdims = True``: keyword-only tensor arguments (``attn_mask=`` of the attention
  kernels) reach the rule batched: ``kwargs`` then holds their physical values and ``bdims.kw``
  maps each batched one's name to its batch dim.  Unmarked rules never see a batched keyword
  tensor (such calls take the loop fallback).
- ``rule.checks_mutation = True``: the rule itself decides whether an in-place write of a
  batched value into an unbatched argument is an error (batch norm writes its running stats
  only in training mode); otherwise the dispatcher refuses such writes before the rule runs.
- ``rule.handles_randomness = True``: the op is tagged random but the rule batches it itself
  (attention with ``dropout_p=0`` draws nothing); otherwise random ops go to the randomness
  policy (``random.py``) and its rules, below.
- ``rule.checks_shapes = True``: the rule raises exactly where the op raises for one example,
  so the per-example shape check (``shapecheck.py``) is skipped.

Registering a rule for an ``OpOverloadPacket`` (``torch.ops.aten.mm``) registers it for every
overload; an ``OpOverload`` (``torch.ops.aten.sum.dim_IntList``) registers just that one.
Users register rules for their own ``torch.library`` ops with the same decorator.

**Randomness rules.**  Ops tagged ``nondeterministic_seeded`` are routed to the randomness
policy (``random.py``: vmap's ``randomness=`` per level).  How one op draws under a policy is a
rule in :data:`RANDOM_RULES`, keyed by ``(overload, randomness)``, registered with
:func:`register_random_rule` (the built-in ones are in ``rules/random.py``)::

    @register_random_rule(torch.ops.aten.bernoulli.default, randomness="same")
    def bernoulli_same(op, level, rest, call_rest, args, bdims, kwargs):
        ...
        return out, out_bdims

``op`` holds the schema facts (``ops.Op``), ``rest`` the vmap levels below ``level`` (for
``random.draw``), ``call_rest(*args, **kwargs)`` calls the op itself as those levels would;
``args`` / ``bdims`` / ``kwargs`` and the result are as for a batching rule.  A randomness rule
may return ``NotImplemented`` to leave the call to the policy's generic treatment.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["register_batch_rule", "register_random_rule", "RULES", "RANDOM_RULES", "on_change"]

RULES: dict = {}
RANDOM_RULES: dict = {}
_listeners: list = []


def _writes_out(overload) -> bool:
    return any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
               for a in overload._schema.arguments)


def _overloads(op):
    if isinstance(op, torch._ops.OpOverload):
        return [op]
    if isinstance(op, torch._ops.OpOverloadPacket):
        # A packet's out= overloads are left out: a rule written for the functional form would
        # drop `out` (the call fails or writes nowhere); dispatch refuses them with torch.func's
        # message unless a rule is registered on that overload itself.
        return [getattr(op, name) for name in op.overloads()
                if not _writes_out(getattr(op, name))]
    raise TypeError(
        f"register_batch_rule: expected a torch.ops OpOverload or OpOverloadPacket, got {op!r}"
    )


def register_batch_rule(*ops) -> Callable:
    """Decorator registering ``fn`` as the batching rule of each op in ``ops``.

    Example (a custom op whose batched form is the same kernel on the physical tensor):
        >>> import torch, ftrans
        >>> lib = torch.library.Library("ftrans_doc", "DEF")
        >>> _ = lib.define("twice(Tensor x) -> Tensor")
        >>> _ = lib.impl("twice", lambda x: x * 2, "CompositeExplicitAutograd")
        >>> @ftrans.register_batch_rule(torch.ops.ftrans_doc.twice)
        ... def twice_rule(level, func, args, bdims, kwargs):
        ...     return func(*args), bdims[0]
        >>> ftrans.vmap(torch.ops.ftrans_doc.twice)(torch.ones(2, 3)).shape
        torch.Size([2, 3])
        >>> ftrans.op_status(torch.ops.ftrans_doc.twice.default)
        'rule'
    """

    def decorator(fn):
        for op in ops:
            for overload in _overloads(op):
                RULES[overload] = fn
        for listener in _listeners:
            listener()
        return fn

    return decorator


def register_random_rule(*ops, randomness: str) -> Callable:
    """Decorator registering ``fn`` as how each op of ``ops`` draws under ``randomness``
    ('same' or 'different') when the policy meets it (see the module docstring)."""
    if randomness not in ("same", "different"):
        raise ValueError(f"register_random_rule: randomness must be 'same' or 'different', got "
                         f"{randomness!r}")

    def decorator(fn):
        for op in ops:
            for overload in _overloads(op):
                RANDOM_RULES[(overload, randomness)] = fn
        return fn

    return decorator


def on_change(callback) -> None:
    """``callback()`` runs whenever a rule is (re)registered: dispatch drops its per-op cache."""
    _listeners.append(callback)
