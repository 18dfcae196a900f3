"""Randomness rules: how each random op draws under vmap's ``randomness=`` policy.

The policy itself (which levels apply, 'error', the generic 'same' and 'different' treatments)
is in ``_C/random.py``; the registry's docstring gives the rule signature.  A rule here exists
where an op has a better form than the generic one:

- 'same' with a batched argument: the draws must not vary across examples.  Ops whose
  randomness is value-independent noise are rewritten as one draw of that noise on one
  example's shape, combined with the batched values by native ops: ``*_like`` and
  ``bernoulli.p`` (values are unused), in-place draws into a batched tensor (draw into one
  example, broadcast-copy), ``bernoulli`` with a tensor ``p`` (``rand < p``), ``normal`` with
  tensor mean/std (``mean + std * randn``), dropout (one mask), ``multinomial`` (shared uniforms
  through the inverse CDF, or shared Gumbel noise without replacement).
- 'different': ``multinomial`` takes at most 2-d probabilities, so the batch is folded into its
  rows.
"""
from __future__ import annotations

import torch

from ..random import broadcast_example, draw, example, float_dtype
from ..registry import register_random_rule
from ._util import aten_op, batched_front, pad_rank, to_front

aten = torch.ops.aten


def _gen(kwargs):
    return {"generator": kwargs["generator"]} if kwargs.get("generator") is not None else {}


def _others_unbatched(op, bdims) -> bool:
    return all(b is None for i, b in enumerate(bdims) if i in op.tensor_pos and i > 0)


# ----------------------------------------------------------------------------------------------
# 'same'
# ----------------------------------------------------------------------------------------------

@register_random_rule(aten.rand_like, aten.randn_like, aten.randint_like, randomness="same")
def like_same(op, level, rest, call_rest, pargs, bdims, kwargs):
    """The values of ``self`` are unused: draw on one example's shape."""
    if not _others_unbatched(op, bdims):
        return NotImplemented
    return call_rest(example(pargs[0], bdims[0]), *pargs[1:], **kwargs), None


@register_random_rule(aten.bernoulli.p, randomness="same")
def bernoulli_p_same(op, level, rest, call_rest, pargs, bdims, kwargs):
    """``bernoulli(x, p)`` with a float ``p``: the values of ``x`` are unused."""
    return call_rest(example(pargs[0], bdims[0]), *pargs[1:], **kwargs), None


def _draw_into_one_example(pargs, bdims, call_rest, kwargs):
    """Draw into a copy of one example, then write it to every example."""
    x = to_front(pargs[0], bdims[0])
    one = call_rest(x[0].clone(), *pargs[1:], **kwargs)
    x.copy_(one)
    return x, 0


_VALUE_FREE_INPLACE = [getattr(aten, name) for name in (
    "uniform_", "normal_", "random_", "exponential_", "cauchy_", "log_normal_", "geometric_")
    if hasattr(aten, name)]


@register_random_rule(*_VALUE_FREE_INPLACE, randomness="same")
def inplace_same(op, level, rest, call_rest, pargs, bdims, kwargs):
    """An in-place draw whose noise does not depend on the tensor's values."""
    if not _others_unbatched(op, bdims):
        return NotImplemented
    return _draw_into_one_example(pargs, bdims, call_rest, kwargs)


@register_random_rule(aten.bernoulli.default, aten.bernoulli.Tensor, aten.bernoulli_,
                      randomness="same")
def bernoulli_same(op, level, rest, call_rest, pargs, bdims, kwargs):
    """``bernoulli(p) == (U < p)`` with one ``U`` shared by all examples."""
    inplace = op.name.endswith("_")
    if inplace and _others_unbatched(op, bdims):  # p unbatched: value-free noise
        return _draw_into_one_example(pargs, bdims, call_rest, kwargs)
    overload = op.func._overloadname
    two = inplace or overload == "Tensor"
    p, pb = (pargs[1], bdims[1]) if two else (pargs[0], bdims[0])
    like = broadcast_example(pargs, bdims, (0, 1) if two else (0,))
    u = draw(rest, like.shape, float_dtype(p), like.device, _gen(kwargs))
    hit = u < (pad_rank(to_front(p, pb), u.dim()) if pb is not None else p)
    if inplace:
        x = to_front(pargs[0], bdims[0])
        x.copy_(hit.to(x.dtype))
        return x, 0
    return hit.to(pargs[0].dtype), 0


@register_random_rule(*[o for o in (aten_op("normal", "Tensor_float"),
                                    aten_op("normal", "float_Tensor"),
                                    aten_op("normal", "Tensor_Tensor")) if o is not None],
                      randomness="same")
def normal_same(op, level, rest, call_rest, pargs, bdims, kwargs):
    """``normal(mean, std) == mean + std * Z`` with one ``Z`` shared by all examples."""
    ms = [pargs[0], pargs[1] if len(pargs) > 1 else kwargs.get("std", 1.0)]
    bds = [bdims[0], bdims[1] if len(bdims) > 1 else None]
    tensors = [i for i in (0, 1) if isinstance(ms[i], torch.Tensor)]
    like = broadcast_example(ms, bds, tensors)
    z = draw(rest, like.shape, like.dtype, like.device, _gen(kwargs), normal=True)
    m, s = [pad_rank(to_front(ms[i], bds[i]), z.dim()) if bds[i] is not None else ms[i]
            for i in (0, 1)]
    return m + s * z, 0


@register_random_rule(aten.native_dropout.default, randomness="same")
def native_dropout_same(op, level, rest, call_rest, pargs, bdims, kwargs):
    """One dropout mask for all examples."""
    if bdims[0] is None:
        return NotImplemented
    x = to_front(pargs[0], bdims[0])
    scaled, mask = call_rest(torch.ones_like(x[0]), *pargs[1:], **kwargs)
    return (x * scaled, mask.expand(x.shape)), (0, 0)


@register_random_rule(aten.multinomial.default, randomness="same")
def multinomial_same(op, level, rest, call_rest, pargs, bdims, kwargs):
    if bdims[0] is None:
        return NotImplemented
    gen = _gen(kwargs)
    probs = to_front(pargs[0], bdims[0])  # [B, (M,) S]
    n = pargs[1]
    replacement = pargs[2] if len(pargs) > 2 else False
    shape = probs.shape[1:-1] + (n,)
    if replacement:
        # Inverse CDF with one set of uniforms shared by all examples.
        cdf = probs.double().cumsum(-1)
        cdf = cdf / cdf[..., -1:]
        u = draw(rest, shape, torch.double, probs.device, gen)
        u = u.expand(probs.shape[:1] + shape).contiguous()
        idx = torch.searchsorted(cdf.contiguous(), u, right=True)
        return idx.clamp_(max=probs.shape[-1] - 1), 0
    # Without replacement: Gumbel-top-k with one Gumbel draw shared by all examples.
    e = draw(rest, probs.shape[1:], torch.double, probs.device, gen)
    g = -torch.log(-torch.log(e.clamp(min=1e-300)))
    keys = torch.log(probs.double()) + g
    return keys.topk(n, dim=-1).indices, 0


# ----------------------------------------------------------------------------------------------
# 'different'
# ----------------------------------------------------------------------------------------------

@register_random_rule(aten.multinomial.default, randomness="different")
def multinomial_different(op, level, rest, call_rest, pargs, bdims, kwargs):
    """The kernel takes at most 2-d probabilities: fold the batch into the rows."""
    probs = batched_front(pargs[0], bdims[0], level.batch_size)
    flat = probs.reshape(-1, probs.shape[-1])
    out = call_rest(flat, *pargs[1:], **kwargs)
    return out.reshape(probs.shape[:-1] + out.shape[-1:]), 0
