"""One forward and one backward over the batch, with every parameter use captured.

:func:`run` is the engine under the clipping transforms.  It calls ``vmap`` over a per-example
function that

1. enters the differentiated inputs as a grad level does (fresh leaves),
2. runs ``func`` under :class:`_Tape`, a ``TorchFunctionMode`` that sees every torch call
   *above* autograd.  A call taking a differentiated parameter and having a norm rule runs the
   rule instead: the op is computed with the parameter detached (autograd will never form its
   per-example gradient), the rule's saved tensors are kept, and a gradient hook on the output
   records ``g``, the gradient of the loss w.r.t. that output, during the backward.  A call with
   no rule (or one the rule declines) runs as written with the differentiable leaf: that use's
   per-example gradient is instantiated by autograd (the fallback, counted);
3. runs ONE backward, ``autograd.grad(loss, [anchor, *leaves, *inputs])``: activation
   gradients only, plus the fallback parameters.  The hook of a rule's output must fire: when
   the op's input requires grad, that input is requested too (the hook's node is on the way);
   otherwise (the first layer) the output is offset by a zero ``anchor`` leaf.  The
   hook sits on the output as the op produced it: a later in-place op on it (``ReLU(inplace=
   True)``) does not change what the hook sees.

The per-example function returns the saved tensors and the ``g``'s; leaving ``vmap`` turns them
into physical batched tensors, from which each rule builds its factors (``factors.py``).
"""
from __future__ import annotations

import collections
import functools
import types

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import _pytree
from .._C import levels as _levels
from .._C.batched import remove_batch_dim
from .._C.dispatch import only_vmap_mode
from .._C.torch_function import OVERRIDES as _OVERRIDES
from .._autodiff_common import check_argnums, replace_argnums, select_argnums, split_aux
from ..autodiff import _grad_level
from ..vmap import vmap
from .factors import Dense, Outer, combine
from .norm_rules import Call, count_fallback, get_norm_rule

__all__ = ["run", "Captured"]

_DisableTF = torch._C.DisableTorchFunctionSubclass
_DisableTD = torch._C._DisableTorchDispatch  # (modes and subclasses; a C++ guard)


class _Tap:
    __slots__ = ("names", "saved", "factors", "out", "g", "anchored", "made", "early")

    def __init__(self, names, saved, factors, out):
        self.names, self.saved, self.factors, self.out, self.g = names, saved, factors, out, None
        self.made = None   # the factors, when formed in the backward (see _form_early)
        self.early = None  # the vmap level to form them at, if they may be


class _Tape(TorchFunctionMode):
    def __init__(self, leaves, born, batch_norm="error", level=None):
        super().__init__()
        self.batch_norm, self.level = batch_norm, level
        self.index = {id(t): i for i, t in enumerate(leaves)}
        self.taps: list = []
        self.fallbacks: collections.Counter = collections.Counter()
        self.anchors: dict = {}
        self.born = born
        self.force_anchor = False
        self.via: list = []
        self.derived: dict = {}  # id(transposed view of a leaf) -> leaf index
        self._keep: list = []
        self.early = None  # the vmap level, when factors may be formed in the backward

    def _anchor(self, dtype, device):
        key = (dtype, device)
        a = self.anchors.get(key)
        if a is None:
            a = self.anchors[key] = torch.zeros((), dtype=dtype, device=device,
                                                requires_grad=True)
            a._ftrans_born = self.born
        return a

    def _hits(self, args, kwargs):
        index, derived = self.index, self.derived
        for a in args:
            if isinstance(a, torch.Tensor):
                if id(a) in index or id(a) in derived:
                    return True
            elif type(a) in (list, tuple):
                if any(id(x) in index or id(x) in derived for x in a
                       if isinstance(x, torch.Tensor)):
                    return True
        if kwargs:
            return any(isinstance(v, torch.Tensor) and (id(v) in index or id(v) in derived)
                       for v in kwargs.values())
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            args, kwargs = _bn_policy(self, args, kwargs)
        if not self._hits(args, kwargs):
            return func(*args, **kwargs)
        if func in _TRANSPOSES and len(args) == 1 + (func in _TRANSPOSE_DIMS) \
                and id(args[0]) in self.index and args[0].dim() == 2 and not kwargs \
                and (len(args) == 1 or sorted(d % 2 for d in args[1:]) == [0, 1]):
            # w.T / w.t() / w.mT of a 2-D parameter: the rule of the op that consumes the view
            # sees a transposed parameter (x @ w.T is a linear layer; tied output embeddings).
            out = func(*args)
            self.derived[id(out)] = self.index[id(args[0])]
            self._keep.append(out)
            return out
        rule = get_norm_rule(func)
        if rule is not None:
            out = self._apply(rule, args, kwargs)
            if out is not None:
                return out
        inner = _open(func)
        if inner is not None:
            # A composite written in Python (multi-head attention, the out-of-place RNNs):
            # run its body with this mode on, so that its own calls meet the norm rules.
            try:
                with self:
                    return inner(*args, **kwargs)
            except NotImplementedError:
                pass
        out = func(*args, **kwargs)
        if any(isinstance(o, torch.Tensor) and o.requires_grad
               for o in (out if isinstance(out, (tuple, list)) else (out,))):
            name = getattr(func, "__name__", str(func))
            self.fallbacks[name] += 1
            count_fallback(name)
        return out

    def _apply(self, rule, args, kwargs):
        bound = rule.bind(args, kwargs)
        if bound is None:
            return None
        names, flipped = {}, set()
        for k, v in bound.items():
            if isinstance(v, torch.Tensor) and (id(v) in self.index or id(v) in self.derived):
                if k not in rule.params:
                    return None
                if id(v) in self.derived:
                    names[k] = self.derived[id(v)]
                    flipped.add(k)
                else:
                    names[k] = self.index[id(v)]
                bound[k] = v.detach()
        res = rule.fn(Call(bound, frozenset(names)))
        if res is None:
            return None
        out, saved, factors = res
        with _DisableTF():  # (attribute reads: the BatchedTensor hop would only read them too)
            if not (out.is_floating_point() or out.is_complex()):
                return None
            via = [v for k, v in bound.items() if k not in names
                   and isinstance(v, torch.Tensor) and v.requires_grad]
            needs_anchor = self.force_anchor or not (out.requires_grad and via)
        if needs_anchor:
            out = out + self._anchor(out.dtype, out.device)
            via = []
        else:
            # The op's input is requested from the backward too: the hook's node lies on a
            # path to it, so it runs, without the anchor's extra pass over the output.
            self.via.extend(via)
        if flipped:
            factors = functools.partial(_flip, factors, flipped)
        tap = _Tap(names, tuple(saved), factors, out)
        tap.anchored = not via
        tap.early = self.early
        with _DisableTF():  # (the BatchedTensor hop would only call the same method)
            out.register_hook(functools.partial(_store, tap))
        self.taps.append(tap)
        return out


_TRANSPOSES = {torch.Tensor.T.__get__, torch.Tensor.mT.__get__, torch.Tensor.t, torch.t,
               torch.Tensor.transpose, torch.transpose}
_TRANSPOSE_DIMS = {torch.Tensor.transpose, torch.transpose}


def _flip(factors, flipped, *saved):
    """Factors of a rule that saw ``w.T``, as factors of ``w``."""
    made = factors(*saved)
    for k in flipped:
        f = made[k]
        if isinstance(f, Outer):
            made[k] = Outer(f._a, f.g, f.shape[::-1], not f.transpose)  # (Rows stay lazy)
        else:
            made[k] = Dense(f.materialize().mT)
    return made


_OPENED: dict = {}
_TF_CHECKS = ("has_torch_function", "has_torch_function_unary", "has_torch_function_variadic")


def _never(*args):
    return False


def _open(func):
    """A callable running ``func``'s body without its own torch-function hop, or None."""
    if func in _OVERRIDES:
        return _OVERRIDES[func]
    f = _OPENED.get(func, False)
    if f is not False:
        return f
    f = None
    if isinstance(func, types.FunctionType) and any(n in func.__globals__ for n in _TF_CHECKS):
        g = dict(func.__globals__)
        g.update({n: _never for n in _TF_CHECKS if n in g})
        f = types.FunctionType(func.__code__, g, func.__name__, func.__defaults__,
                               func.__closure__)
        f.__kwdefaults__ = func.__kwdefaults__
    _OPENED[func] = f
    return f


BATCH_NORM_POLICIES = ("error", "eval", "per_sample", "batch")
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
            "eps")


def _bn_policy(tape, args, kwargs):
    """Rewrite a train-mode ``F.batch_norm`` call by the transform's ``batch_norm`` policy."""
    bound = dict(zip(_BN_ARGS, args), **kwargs)
    if not bound.get("training", False):
        return args, kwargs  # eval-mode BatchNorm is per-example already
    policy = tape.batch_norm
    if policy == "error":
        raise RuntimeError(
            "per-sample gradients of a model with BatchNorm in training mode: each example's "
            "normalisation depends on the other examples of the batch. Choose batch_norm="
            "'eval' (running statistics, DP-safe), 'per_sample' (each example normalised with "
            "its own statistics, DP-safe), or 'batch' (batch statistics: per-example "
            "contributions that sum to the batch gradient, not DP-safe); or replace BatchNorm "
            "by GroupNorm.")
    if policy == "eval":
        if bound.get("running_mean") is None:
            raise RuntimeError("batch_norm='eval': this BatchNorm keeps no running statistics "
                               "(track_running_stats=False)")
        bound["training"] = False
    elif policy == "per_sample":
        bound["running_mean"] = bound["running_var"] = None  # no batched write into buffers
    elif policy == "batch":
        x = bound["input"]
        C = x.shape[1]
        bound["input"] = _batch_normalized(tape.level, x, bound.get("eps", 1e-5))
        # An eval-mode batch_norm with mean 0, var 1, eps 0 is exactly the affine part.
        bound["running_mean"] = torch.zeros(C, dtype=x.dtype, device=x.device)
        bound["running_var"] = torch.ones(C, dtype=x.dtype, device=x.device)
        bound["training"], bound["eps"] = False, 0.0
    return (), bound


def _batch_normalized(level, x, eps):
    """``x`` normalised with statistics over the whole batch (every example, every position).
    The statistics stay differentiable through the vmap boundary functions, so a Jacobian of
    the batch's losses sees every example's dependence on the others."""
    from .._C.autograd import RemoveBatchDim
    from .._C.batched import BatchedTensor
    if not (type(x) is BatchedTensor and x.level is level):
        raise RuntimeError("batch_norm='batch': the BatchNorm input does not depend on the "
                           "mapped examples")
    xp = RemoveBatchDim.apply(x, level, level.batch_size, 0)  # [B, N, C, *S]
    dims = [0, 1] + list(range(3, xp.dim()))
    mean = xp.mean(dims)
    var = xp.var(dims, unbiased=False)
    shape = (-1,) + (1,) * (x.dim() - 2)
    return (x - mean.view(shape)) / (var + eps).sqrt().view(shape)


class _BatchNormOnly(_Tape):
    """Only the BatchNorm policy (the 'batch' policy differentiates the batch as a whole)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            args, kwargs = _bn_policy(self, args, kwargs)
        return func(*args, **kwargs)


def _store(tap, g):
    if tap.made is not None:  # (a tensor's hook runs once per backward; never sum into it)
        raise RuntimeError("ftrans.dp internal error: a tap's gradient hook ran twice after its "
                           "factors were formed")
    tap.g = g if tap.g is None else tap.g + g
    if tap.early is not None:
        _form_early(tap)


def _form_early(tap):
    """Form the tap's factors as its gradient arrives, and instantiate the per-example gradients
    of the layers whose norms are not taken by the Gram identity (long rows: ``2 T^2 > p d``):
    ``[B, p, d]`` is then usually smaller than the layer input and output gradient it replaces,
    which the step would otherwise hold until the end of the backward (its peak: the
    transformer's FFN hidden activation, the CNN's second convolution)."""
    level = tap.early
    B = level.batch_size
    phys = [remove_batch_dim(t, level, B, 0) if isinstance(t, torch.Tensor) else t
            for t in (*tap.saved, tap.g)]
    if only_vmap_mode() and all(type(t) is torch.Tensor for t in phys
                                if isinstance(t, torch.Tensor)):
        # Plain tensors and no mode but vmap's own (no tracer): the factors' ops skip the
        # Python dispatch hop, which would only pass them through.
        with _DisableTD():
            made = tap.factors(*phys)
    else:
        made = tap.factors(*phys)
    for f in made.values():
        if isinstance(f, Outer) and not f.use_ghost() and f.raw_bytes() <= f.held_bytes():
            f._instantiated()
    tap.made, tap.saved, tap.g, tap.factors = made, (), None, None


class _Unreached(Exception):
    pass


class Captured:
    """What one capture run produced: ``factors[i]`` is the Factor of the i-th differentiated
    leaf (None if the loss does not depend on it), ``spec`` their pytree structure."""

    def __init__(self, factors, leaves, spec, losses, aux, fallbacks, batch_size):
        self.factors, self.leaves, self.spec = factors, leaves, spec
        self.losses, self.aux, self.fallbacks, self.batch_size = losses, aux, fallbacks, batch_size


def normalize_in_dims(in_dims, argnums, nargs, form):
    """The clipping transforms map every argument but the differentiated ones: an int (the
    default 0) applies to the others; a tuple gives one entry per argument and must hold None
    at each position of ``argnums``."""
    nums = (argnums,) if isinstance(argnums, int) else argnums
    if in_dims is None or (isinstance(in_dims, int) and not isinstance(in_dims, bool)):
        return tuple(None if i in nums else in_dims for i in range(nargs))
    if not isinstance(in_dims, tuple) or len(in_dims) != nargs:
        raise ValueError(f"{form}: in_dims must be an int or a tuple with one entry per "
                         f"positional argument ({nargs}), got {in_dims!r}")
    for i in nums:
        if any(d is not None for d in _pytree.tree_leaves(in_dims[i])):
            raise ValueError(
                f"{form}: argument {i} is differentiated (argnums) and must not be mapped: "
                f"in_dims[{i}] must be None, got {in_dims[i]!r}. Per-example gradients are "
                "taken w.r.t. inputs shared by all examples")
    return in_dims


def run(func, argnums, in_dims, has_aux, args, kwargs, form, batch_norm="error") -> Captured:
    if batch_norm not in BATCH_NORM_POLICIES:
        raise ValueError(f"{form}: batch_norm must be one of {BATCH_NORM_POLICIES}, got "
                         f"{batch_norm!r}")
    argnums = check_argnums(argnums, len(args), form)
    dims = normalize_in_dims(in_dims, argnums, len(args), form)
    if batch_norm == "batch":
        return _run_batch(func, argnums, dims, has_aux, args, kwargs, form)
    flat_diff, spec = _pytree.tree_flatten(select_argnums(args, argnums))
    state = {}

    def per_example(*ex):
        tapes = []
        try:
            return _per_example(tapes, *ex)
        finally:
            # A tap's hook is kept by the autograd node of the output it watches, and the tap
            # keeps that output (and its gradient): a cycle through C++ that Python's garbage
            # collector cannot see.  Break it, or every call keeps its batch's activations.
            for tape in tapes:
                for tap in tape.taps:
                    tap.out = tap.g = tap.early = None
                tape.via, tape.anchors, tape.derived, tape._keep = [], {}, {}, []

    def _per_example(tapes, *ex):
        with _grad_level(select_argnums(ex, argnums), form) as (entered, _, espec, need):
            ex = replace_argnums(ex, argnums, _pytree.tree_unflatten(espec, entered))
            stack = _levels.current_stack()
            tape = _Tape(entered, stack[-1].id, batch_norm, stack[-2])
            tape.force_anchor = state.get("force_anchor", False)
            if not need:  # (a differentiable result keeps every factor on the vmap's path)
                tape.early = stack[-2]
            tapes.append(tape)
            with tape:
                out = func(*ex, **kwargs)
            loss, aux = split_aux(out, has_aux, form)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise RuntimeError(f"{form}: Expected f(*args) to return a scalar Tensor (the "
                                   f"loss of one example), got {_describe(loss)}")
            wrt = list(tape.anchors.values()) + list(entered)
            seen = {id(t) for t in wrt}
            for t in tape.via:
                if id(t) not in seen:
                    seen.add(id(t))
                    wrt.append(t)
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, wrt, allow_unused=True, create_graph=need)
            else:
                grads = [None] * len(wrt)
            if any(tap.g is None and tap.made is None and not tap.anchored
                   for tap in tape.taps):
                # Not reached (the input was written in place after the op, or the output is
                # unused): only an anchored run can tell zero from unreached.
                raise _Unreached
            fb = list(grads[len(tape.anchors):len(tape.anchors) + len(entered)])
            state["tape"] = tape
            state["fallback"] = [g is not None for g in fb]
            late = [tap for tap in tape.taps if tap.made is None]
            gs = [tap.g if tap.g is not None else torch.zeros_like(tap.out) for tap in late]
            saved = [s for tap in late for s in tap.saved]
            if not need:
                loss, aux = loss.detach(), _pytree.tree_map(
                    lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux)
                # The saved inputs of all but the first layer depend on the internal anchor:
                # their graph would make the clipped sums require grad and keep every factor
                # temporary alive for as long as the result lives (and a training loop's
                # ``params - lr * g`` would chain each step's graph to the next).
                saved = [t.detach() if isinstance(t, torch.Tensor) else t for t in saved]
                gs = [t.detach() for t in gs]
                fb = [t.detach() if isinstance(t, torch.Tensor) else t for t in fb]
            rest = (aux,) if has_aux else ()
            return (loss, saved, gs, [g for g in fb if g is not None]) + rest

    try:
        losses, saved, gs, fb, *aux = vmap(per_example, in_dims=dims)(*args)
    except _Unreached:
        state["force_anchor"] = True
        losses, saved, gs, fb, *aux = vmap(per_example, in_dims=dims)(*args)
    aux = aux[0] if has_aux else None
    tape = state["tape"]
    B = losses.shape[0]
    parts = [[] for _ in flat_diff]
    pos = 0
    gs = iter(gs)
    for tap in tape.taps:
        if tap.made is not None:
            made, tap.made = tap.made, None  # (see per_example: hooks outlive the call)
        else:
            n = len(tap.saved)
            made = tap.factors(*saved[pos:pos + n], next(gs))
            pos += n
            tap.saved, tap.factors = (), None
        for name, i in tap.names.items():
            if name in made:
                parts[i].append(made[name])
    it = iter(fb)
    for i, used in enumerate(state["fallback"]):
        if used:
            parts[i].append(Dense(next(it)))
    factors = [combine(p) if p else None for p in parts]
    return Captured(factors, flat_diff, spec, losses, aux, dict(tape.fallbacks), B)


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"a Tensor with {x.dim()} dims"
    return f"{type(x).__name__}"


def _run_batch(func, argnums, dims, has_aux, args, kwargs, form):
    """batch_norm='batch': per-example contributions ``d loss_i / d params`` of the batch
    computed with batch statistics (BackPACK's option 3), as the Jacobian of the ``[B]``
    losses; they sum to the batch gradient.  Instantiated: this policy is for non-private
    per-example work, and the clipping layer refuses it."""
    from ..autodiff import jacrev
    diff = select_argnums(args, argnums)
    nums = (argnums,) if isinstance(argnums, int) else argnums

    def losses_of(*d):
        full = replace_argnums(args, argnums, d[0] if isinstance(argnums, int) else d)

        def one(*ex):
            tape = _BatchNormOnly([], 0, "batch", _levels.current_stack()[-1])
            with tape:
                loss, aux = split_aux(func(*ex, **kwargs), has_aux, form)
            return (loss, aux) if has_aux else loss
        out = vmap(one, in_dims=dims)(*full)
        losses, aux = out if has_aux else (out, None)
        return losses, (losses.detach(), aux)

    diff_args = (diff,) if isinstance(argnums, int) else diff
    jac, (losses, aux) = jacrev(losses_of, argnums=tuple(range(len(nums))), has_aux=True)(
        *diff_args)
    flat_diff, spec = _pytree.tree_flatten(diff)
    flat_jac = _pytree.tree_leaves(jac[0] if isinstance(argnums, int) else jac)
    factors = [Dense(j) for j in flat_jac]
    return Captured(factors, flat_diff, spec, losses, aux, {}, losses.shape[0])
