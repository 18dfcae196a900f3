"""Randomness inside vmap: 'error', 'same' or 'different', per vmap level.

Random factory calls with no tensor argument (``torch.randn(3)``) never reach a tensor
subclass, so the outermost vmap of a thread pushes :class:`_VmapMode`, a dispatch mode that
routes every op to :func:`~ftrans._C.dispatch.dispatch` (which it would reach anyway for batched
arguments) and lets dispatch see random ops whose arguments are all unbatched.  Random ops are
found generically by ``torch.Tag.nondeterministic_seeded``.

:func:`random_dispatch` peels the applicable vmap levels innermost first; each level decides
and hands the rest of the call to the levels below it (``call_rest``), so nested vmaps combine
per level (outer 'different' + inner 'same' varies along the outer batch only).  For one level:

- 'error': raise, naming the op.
- 'same', nothing batched at this level: draw once (the lower levels decide their own).
- 'same', a batched argument: the draws must not vary across examples.  Ops whose randomness is
  value-independent noise are rewritten as one draw of that noise on one example's shape,
  combined with the batched values by native ops: ``*_like`` and ``bernoulli.p`` (values are
  unused), in-place draws into a batched tensor (draw into one example, broadcast-copy),
  ``bernoulli`` with a tensor ``p`` (``rand < p``), ``normal`` with tensor mean/std
  (``mean + std * randn``), dropout (one mask), ``multinomial`` (shared uniforms through the
  inverse CDF, or shared Gumbel noise without replacement).  The few ops whose noise depends on
  the values (``poisson``, gamma...) run per example from the same generator state, which is the
  definition of 'same'.
- 'different', batched arguments: the physical call draws independently per element already.
- 'different', nothing batched: factories get the batch size prepended to their ``size``,
  ops with tensor arguments get those expanded to the batch, and an in-place draw into an
  unbatched tensor raises (it could not hold per-example values).

Dropout on CPU is a composite (``empty_like(x).bernoulli_(1 - p)``), so with an unbatched ``x``
the noise tensor is unbatched and 'different' could not draw into it.  Whenever a vmap with
randomness other than 'error' is live, :class:`_DropoutMode` (a torch-function mode) replaces
the dropout family by out-of-place draws (``native_dropout``, ``bernoulli`` of a ``p`` tensor)
that the rules above batch; with 'error' nothing is pushed, so the default costs nothing.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from . import levels as _levels
from .batched import add_batch_dim

__all__ = ["vmap_mode", "random_dispatch"]

aten = torch.ops.aten
_tls = threading.local()
_dispatch = None
_FACTORIES, _make_fresh = frozenset(), None


def _mode_dispatch(self, func, types, args=(), kwargs=None):
    # As inside a subclass's __torch_dispatch__ (which torch runs with subclass
    # __torch_function__ off), so that rules reading lower levels' wrappers do not re-enter it.
    with _DisableTF():
        if func in _FACTORIES:  # may become batched on its first batched write (fresh.py)
            return _make_fresh(_dispatch(func, args, kwargs, True))
        return _dispatch(func, args, kwargs, True)


_DisableTF = torch._C.DisableTorchFunctionSubclass


class _VmapMode(TorchDispatchMode):
    __torch_dispatch__ = _mode_dispatch


# TorchDispatchMode wraps subclasses' handlers in a dynamo-disable shim that costs microseconds
# per op; this mode never runs under dynamo, so install the plain function.
_VmapMode.__torch_dispatch__ = _mode_dispatch


@contextlib.contextmanager
def vmap_mode(randomness: str = "error"):
    """Push the vmap mode unless this thread already has it (nested vmaps share one); push the
    dropout mode for the first level that may draw random numbers."""
    global _dispatch, _FACTORIES, _make_fresh
    if _dispatch is None:
        from .dispatch import dispatch as _dispatch
        from .fresh import FACTORIES as _FACTORIES, make_fresh as _make_fresh
    with contextlib.ExitStack() as stack:
        if not getattr(_tls, "active", False):
            _tls.active = True
            stack.callback(setattr, _tls, "active", False)
            stack.enter_context(_VmapMode())
        if randomness != "error" and not getattr(_tls, "dropout", False):
            _tls.dropout = True
            stack.callback(setattr, _tls, "dropout", False)
            stack.enter_context(_DropoutMode())
        yield


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
    return _random(op, _applicable_levels(level, from_mode), args, kwargs)


def _op(func):
    from .dispatch import _OPS, _prepare

    op = _OPS.get(func)
    if op is None:
        op = _OPS[func] = _prepare(func)
    return op


def _draw(func, levels, *args, **kwargs):
    """Call random op ``func`` as if from user code running at ``levels`` (outermost first)."""
    return _random(_op(func), levels, args, kwargs)


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
            f"{describe(level)}: vmap: called random operation while in randomness error mode. "
            "Please either use the 'same' or 'different' randomness flags on vmap or perform the "
            f"randomness operation out of vmap (the random operation was {op.name})."
        )
    if any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
            for a in op.func._schema.arguments):
        raise VmapError(
            f"{describe(level)}: vmap: We do not support calling out variants of random "
            "operations inside of vmap. Please use non-out variants as a workaround "
            f"({op.name} with out=: use its result instead)."
        )
    pargs, bdims = unwrap_args(op, level, args)
    kwargs = dict(kwargs)
    if not any_batched(bdims):
        if level.randomness == "same":
            return call_rest(*args, **kwargs)
        return _different_unbatched(op, level, call_rest, list(args), kwargs)
    if op.mutable_pos and bdims[op.mutable_pos[0]] is None:
        raise VmapError(
            f"{describe(level)}: vmap: inplace {op.name[6:].rstrip('_')}(self, *extra_args) is "
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
    if level.randomness == "different":
        out, obd = _aligned_call(call_rest, pargs, bdims, kwargs, op)
    else:
        out, obd = _same_batched(op, level, rest, call_rest, pargs, bdims, kwargs)
    if op.returns_self:
        return args[0]
    return wrap_result(out, obd, level)


# ----------------------------------------------------------------------------------------------
# 'different'
# ----------------------------------------------------------------------------------------------

def _front(x, b):
    return x if b is None or b == 0 else x.movedim(b, 0)


def _aligned_call(call, pargs, bdims, kwargs, op):
    """Physical call with every batched arg front-batched and rank-aligned (elementwise ops)."""
    from .rules._util import pad_rank

    if op.name == "aten::multinomial":
        probs = _front(pargs[0], bdims[0])
        flat = probs.reshape(-1, probs.shape[-1])
        out = call(flat, *pargs[1:], **kwargs)
        return out.reshape(probs.shape[:-1] + out.shape[-1:]), 0
    rank = max((a.dim() - (b is not None) for a, b in zip(pargs, bdims)
                if isinstance(a, torch.Tensor)), default=0)
    batch = next(_front(a, b).shape[0] for a, b in zip(pargs, bdims)
                 if b is not None and not isinstance(b, tuple))
    new = list(pargs)
    for i, b in enumerate(bdims):
        if isinstance(b, tuple):
            continue
        if b is not None:
            new[i] = pad_rank(_front(new[i], b), rank)
        elif i in op.tensor_pos and isinstance(new[i], torch.Tensor):
            # Unbatched tensors are expanded to the batch, as torch.func does: kernels that take
            # their output's shape from one argument (binomial's count) must see the batch.
            x = new[i]
            new[i] = pad_rank(x.expand((batch,) + tuple(x.shape)), rank)
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
        return add_batch_dim(call_rest(*args, **kwargs), 0, level)
    tensor_pos = [i for i in op.tensor_pos if i < len(args) and args[i] is not None]
    if tensor_pos:
        for i in tensor_pos:
            x = args[i]
            args[i] = x.unsqueeze(0).expand((B,) + tuple(x.shape))
        if op.name == "aten::multinomial":
            probs = args[0]
            out = call_rest(probs.reshape(-1, probs.shape[-1]), *args[1:], **kwargs)
            return add_batch_dim(out.reshape(probs.shape[:-1] + out.shape[-1:]), 0, level)
        out = call_rest(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(add_batch_dim(o, 0, level) for o in out)
        return add_batch_dim(out, 0, level)
    # No size and no tensor (randperm): one draw per example, as torch.func does.
    return add_batch_dim(torch.stack([call_rest(*args, **kwargs) for _ in range(B)]), 0, level)


# ----------------------------------------------------------------------------------------------
# 'same' with batched arguments
# ----------------------------------------------------------------------------------------------

_VALUE_FREE_INPLACE = {
    "aten::uniform_", "aten::normal_", "aten::random_", "aten::exponential_", "aten::cauchy_",
    "aten::log_normal_", "aten::geometric_", "aten::bernoulli_",
}


def _example(x, b):
    """One example of a physical value (a view; still batched at lower levels)."""
    return x if b is None else x.select(b, 0)


def _same_batched(op, level, rest, call_rest, pargs, bdims, kwargs):
    from .rules._util import pad_rank

    name = op.name
    overload = op.func._overloadname
    tensor_bds = [b for i, b in enumerate(bdims) if i in op.tensor_pos]
    gen = {"generator": kwargs["generator"]} if kwargs.get("generator") is not None else {}

    if name.endswith("_like") and all(b is None for b in tensor_bds[1:]):
        # The values of `self` are unused: draw on one example's shape.
        return call_rest(_example(pargs[0], bdims[0]), *pargs[1:], **kwargs), None
    if name == "aten::bernoulli" and overload == "p":
        return call_rest(_example(pargs[0], bdims[0]), *pargs[1:], **kwargs), None

    if name in _VALUE_FREE_INPLACE and all(b is None for b in tensor_bds[1:]):
        # Draw into a copy of one example, then write it to every example.
        x = _front(pargs[0], bdims[0])
        one = call_rest(x[0].clone(), *pargs[1:], **kwargs)
        x.copy_(one)
        return x, 0

    if name in ("aten::bernoulli", "aten::bernoulli_"):
        # bernoulli(p) == (U < p) with one U shared by all examples.
        inplace = name.endswith("_")
        p, pb = (pargs[1], bdims[1]) if inplace or overload == "Tensor" else (pargs[0], bdims[0])
        like = _broadcast_example(pargs, bdims, (0, 1) if inplace or overload == "Tensor"
                                  else (0,))
        u = _rand(rest, like.shape, _float_dtype(p), like.device, gen)
        hit = u < (pad_rank(_front(p, pb), u.dim()) if pb is not None else p)
        if inplace:
            x = _front(pargs[0], bdims[0])
            x.copy_(hit.to(x.dtype))
            return x, 0
        return hit.to(pargs[0].dtype), 0

    if name == "aten::normal" and overload in ("Tensor_float", "float_Tensor", "Tensor_Tensor"):
        # normal(mean, std) == mean + std * Z with one Z shared by all examples.
        ms = [pargs[0], pargs[1] if len(pargs) > 1 else kwargs.get("std", 1.0)]
        bds = [bdims[0], bdims[1] if len(bdims) > 1 else None]
        tensors = [i for i in (0, 1) if isinstance(ms[i], torch.Tensor)]
        like = _broadcast_example(ms, bds, tensors)
        z = _rand(rest, like.shape, like.dtype, like.device, gen, normal=True)
        m, s = [pad_rank(_front(ms[i], bds[i]), z.dim()) if bds[i] is not None else ms[i]
                for i in (0, 1)]
        return m + s * z, 0

    if name == "aten::native_dropout" and bdims[0] is not None:
        x = _front(pargs[0], bdims[0])
        scaled, mask = call_rest(torch.ones_like(x[0]), *pargs[1:], **kwargs)
        return (x * scaled, mask.expand(x.shape)), (0, 0)

    if name == "aten::multinomial" and bdims[0] is not None:
        return _same_multinomial(rest, pargs, bdims, gen), 0

    return _same_by_forked_generator(op, level, call_rest, pargs, bdims, kwargs)


def _rand(levels, shape, dtype, device, gen, normal=False):
    """One uniform (or normal) draw of ``shape`` as user code at ``levels`` would make it."""
    base = aten.randn if normal else aten.rand
    func, kw = (base.generator, gen) if gen else (base.default, {})
    return _draw(func, levels, list(shape), dtype=dtype, device=device, **kw)


def _float_dtype(t):
    return t.dtype if t.dtype.is_floating_point else torch.get_default_dtype()


def _broadcast_example(pargs, bdims, positions):
    """A tensor with one example's broadcast shape of the tensors at ``positions``."""
    exs = [_example(pargs[i], bdims[i]) for i in positions if isinstance(pargs[i], torch.Tensor)]
    return exs[0] if len(exs) == 1 else torch.broadcast_tensors(*exs)[0]


def _same_multinomial(rest, pargs, bdims, gen):
    probs = _front(pargs[0], bdims[0])  # [B, (M,) S]
    n = pargs[1]
    replacement = pargs[2] if len(pargs) > 2 else False
    shape = probs.shape[1:-1] + (n,)
    if replacement:
        # Inverse CDF with one set of uniforms shared by all examples.
        cdf = probs.double().cumsum(-1)
        cdf = cdf / cdf[..., -1:]
        u = _rand(rest, shape, torch.double, probs.device, gen)
        u = u.expand(probs.shape[:1] + shape).contiguous()
        idx = torch.searchsorted(cdf.contiguous(), u, right=True)
        return idx.clamp_(max=probs.shape[-1] - 1)
    # Without replacement: Gumbel-top-k with one Gumbel draw shared by all examples.
    e = _rand(rest, probs.shape[1:], torch.double, probs.device, gen)
    g = -torch.log(-torch.log(e.clamp(min=1e-300)))
    keys = torch.log(probs.double()) + g
    return keys.topk(n, dim=-1).indices


def _same_by_forked_generator(op, level, call_rest, pargs, bdims, kwargs):
    """Run the op per example, each time from the same generator state (value-dependent noise
    such as ``poisson`` has no shared-noise form)."""
    from .fallback import _select

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
            [_select(x, d, i) for x, d in zip(a, bd)] if isinstance(bd, tuple) else _select(a, bd, i)
            for a, bd in zip(pargs, bdims)
        ]
        outs.append(call_rest(*call_args, **kwargs))
    if op.returns_self:
        return pargs[0], bdims[0]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


# ----------------------------------------------------------------------------------------------
# Dropout: replace the composites that draw into a fresh unbatched tensor
# ----------------------------------------------------------------------------------------------

_ALPHA = 1.7580993408473766


def _dropout(x, p, train, inplace, feature=False, alpha=False):
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not train or p == 0 or x.numel() == 0:
        return x
    if p == 1:
        return x.mul_(0) if inplace else x * 0
    if not feature and not alpha:
        out = aten.native_dropout.default(x, p, True)[0]
        return x.copy_(out) if inplace else out
    if feature:
        if x.dim() < 2:
            raise RuntimeError(
                "Feature dropout requires at least 2 dimensions in the input")
        shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
    else:
        shape = tuple(x.shape)
    probs = torch.full(shape, 1 - p, dtype=x.dtype, device=x.device)
    noise = aten.bernoulli.default(probs)
    if alpha:
        a = 1.0 / math.sqrt((_ALPHA * _ALPHA * p + 1) * (1 - p))
        b = (noise - 1) * (_ALPHA * a) + _ALPHA * a * p
        noise = noise * a
        return x.mul_(noise).add_(b) if inplace else x * noise + b
    noise = noise / (1 - p)
    return x.mul_(noise) if inplace else x * noise


def _with_batch(fn, x, lo):
    """F.dropout1d/3d accept an input without its batch dim (rank ``lo``)."""
    if x.dim() == lo:
        return fn(x.unsqueeze(0)).squeeze(0)
    return fn(x)


def _f_dropout(input, p=0.5, training=True, inplace=False):
    return _dropout(input, p, training, inplace)


def _f_alpha_dropout(input, p=0.5, training=False, inplace=False):
    return _dropout(input, p, training, inplace, alpha=True)


def _f_feature_alpha_dropout(input, p=0.5, training=False, inplace=False):
    return _dropout(input, p, training, inplace, feature=True, alpha=True)


def _f_dropout_nd(lo, hi, name):
    def f(input, p=0.5, training=True, inplace=False):
        if name != "dropout2d" and input.dim() not in (lo, hi):
            raise RuntimeError(
                f"{name}: Expected {lo}D or {hi}D input, but received a {input.dim()}D input.")
        if name == "dropout2d":
            return _dropout(input, p, training, inplace, feature=True)
        return _with_batch(lambda t: _dropout(t, p, training, inplace, feature=True), input, lo)
    return f


def _intercepts():
    F = torch.nn.functional
    table = {
        F.dropout: _f_dropout,
        F.alpha_dropout: _f_alpha_dropout,
        F.feature_alpha_dropout: _f_feature_alpha_dropout,
        F.dropout1d: _f_dropout_nd(2, 3, "dropout1d"),
        F.dropout2d: _f_dropout_nd(3, 4, "dropout2d"),
        F.dropout3d: _f_dropout_nd(4, 5, "dropout3d"),
    }
    for name, feature, alpha in (("dropout", False, False), ("feature_dropout", True, False),
                                 ("alpha_dropout", False, True),
                                 ("feature_alpha_dropout", True, True)):
        for inplace in (False, True):
            fn = getattr(torch, name + ("_" if inplace else ""), None)
            if fn is not None:
                table[fn] = (lambda f, a, i: lambda input, p, train: _dropout(
                    input, p, train, i, feature=f, alpha=a))(feature, alpha, inplace)
    return table


_INTERCEPT = None


class _DropoutMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        global _INTERCEPT
        if _INTERCEPT is None:
            _INTERCEPT = _intercepts()
        try:
            handler = _INTERCEPT.get(func)
        except TypeError:  # an unhashable callable
            handler = None
        if handler is None:
            if kwargs and kwargs.get("out") is not None and func in _RANDOM_OUT:
                _refuse_out(func)
            return func(*args, **(kwargs or {}))
        return handler(*args, **(kwargs or {}))


# Random torch functions with an ``out=`` form: their out= kernels are composites that draw in
# place into ``out`` before any op reaches dispatch, where an unbatched ``out`` would then take
# one draw for the whole batch (torch.func refuses them; so do we).
_RANDOM_OUT = frozenset(getattr(torch, n) for n in (
    "rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial", "poisson",
    "binomial") if hasattr(torch, n))


def _refuse_out(func):
    from .dispatch import describe, VmapError

    stack = [l for l in _levels.current_stack() if l.kind == _levels.VMAP]
    raise VmapError(
        f"{describe(stack[-1]) if stack else 'vmap'}: vmap: We do not support calling out "
        "variants of random operations inside of vmap. Please use non-out variants as a "
        f"workaround (torch.{getattr(func, '__name__', func)}(..., out=): use its result "
        "instead)."
    )
