"""Routing: every aten op on a BatchedTensor (or inside a vmap) lands in :func:`dispatch`.

``dispatch`` takes the highest level among the arguments, unwraps only that level (tensors
batched at lower levels are plain values here: the physical call dispatches them again), applies
the op's handler and re-wraps the result.  Per ``OpOverload`` it caches an :class:`~ops.Op`
holding the schema facts (``ops.py``) and the handler chosen for it, so the hot path does no
schema work and no pytree work.

Handler order for an op: a registered rule (or a custom op's own ``torch.library`` vmap rule);
a rule by tag (``pointwise``); the op's own CompositeImplicitAutograd decomposition; a
decomposition from ``torch._decomp.decompositions``; and last a correct but slow per-example
loop that warns once per op (:class:`FallbackWarning`) and is counted in
:func:`fallback_stats`.  Random ops (tagged ``nondeterministic_seeded``) go to the randomness
policy (``random.py``) and its rules (``rules/random.py``) instead.

NOTE [composite ops below autograd]: composite ops (``matmul``, ``reshape``, ``to``) normally
decompose above autograd and never reach a tensor subclass, but code that runs *below* autograd
(a rule, a decomposition) calls them with the Python key still on, so they do arrive here: they
are decomposed with ``OpOverload.decompose()``.

NOTE [prims decompositions]: most of ``torch._decomp.decomposition_table`` lowers to
``prims.*``, which have no batching rules (every prim would then take the loop); only the
entries written in ``torch._decomp.decompositions`` (which lower to aten ops) are used.

Pointwise ops whose batched arguments all sit along dim 0 at the full logical rank skip the
handler: :func:`direct_pointwise` makes the one physical call the rule would make, and across
nested or mixed levels makes it once on the innermost values instead of once per level.

The view ops backward graphs are mostly made of (``t``, ``transpose``, ``permute``,
``unsqueeze``, ``view``, ``_unsafe_view``, ``expand``, ``detach``, ``alias``) skip the shape check
and the rule too: :func:`direct_view` makes their one physical call (``rules/views.py``'s
``DIRECT`` table), a real view of the physical input as in the rule, and only for arguments
whose per-example validity that call decides exactly as eager would; anything else (and any
error) goes the usual way.

Three ways in, all defined here: BatchedTensor's ``__torch_dispatch__``
(:func:`subclass_entry`), and :class:`VmapMode`, the dispatch mode the outermost vmap of a thread
pushes (:func:`mode_entry`), which also sees random factory calls with no tensor argument
(``torch.randn(3)``) and factory results that may become batched (``fresh.py``).  The fast path
(``fastpath.py``) calls an op's handler directly.  :func:`set_dispatch_entries` is the one
writer of the two ``__torch_dispatch__`` hooks (``_C/__init__.py`` installs them at import).
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.autograd.forward_ad as _fwad
from torch.utils._python_dispatch import TorchDispatchMode

from . import aliasing as _aliasing
from . import autograd as _autograd
from .agree import agreeing_scalar
from .batched import BatchedTensor, make_batched
from .custom_vmap import registered_vmap_rule, vmap_fn_for
from .dropout import DropoutMode
from .errors import DATA_DEPENDENT_HINTS, VmapError, escaped as _escaped, \
    graph_task_id as _graph_task_id, refuse_data_dependent, refuse_inplace_view, \
    refuse_out_variant
from .fallback import (FallbackWarning, fallback_stats,  # noqa: F401 (re-exported)
                       loop_fallback as _loop_fallback, reset_fallback_stats)
from .fresh import FACTORIES as _FACTORIES, make_fresh as _make_fresh
from .ops import BDims, check_mutation as _check_mutation, needs_view_bits as _needs_view_bits, \
    read_schema, unwrap_args, wrap_result
from .random import random_dispatch
from .registry import RULES, on_change
from .rules import tag_rule
from .rules.pointwise import pointwise_rule
from .rules.views import direct_view as _direct_view_fn
from .shapecheck import check as _check_shapes, explain as _explain_shapes

__all__ = ["dispatch", "op_status", "prepared", "FallbackWarning", "fallback_stats",
           "reset_fallback_stats", "VmapError", "VmapMode", "vmap_mode", "subclass_entry",
           "mode_entry", "NORMAL_ENTRIES", "set_dispatch_entries"]

aten = torch.ops.aten
_Tensor = torch.Tensor
_SetExclude = getattr(torch._C, "_SetExcludeDispatchKeyGuard", None)
_DK = torch._C.DispatchKey
_DisableTF = torch._C.DisableTorchFunctionSubclass
_ADIOV = _DK.ADInplaceOrView
_is_excluded = getattr(torch._C, "_dispatch_tls_is_dispatch_key_excluded", None)
_set_excluded = getattr(torch._C, "_dispatch_tls_set_dispatch_key_excluded", None)
if _is_excluded is None:
    _set_excluded = None


# ----------------------------------------------------------------------------------------------
# Per-op cache: schema facts plus the chosen handler
# ----------------------------------------------------------------------------------------------

def _prepare(func):
    op = read_schema(func)
    op.direct = False
    tags = func.tags
    # A rule marked `handles_randomness` (attention with dropout_p=0 is deterministic) decides.
    op.is_random = (torch.Tag.nondeterministic_seeded in tags
                    and not getattr(RULES.get(func), "handles_randomness", False))
    if op.is_random:
        # dispatch() hands random ops to the randomness policy before any handler could run;
        # every draw is checked per example (shapecheck.py), none is explained by a rule.  The
        # policy refuses out= forms (as torch.func does).
        op.handler, op.ok_shapes, op.explains = None, {}, False
        op.view = None
        op.status = "error" if _writes_out(func) else "rule"
        return op
    op.handler, op.status = _choose_handler(func, tags)
    # Per-example shape validity (shapecheck.py): the signatures found valid, for rules that
    # do not raise exactly where the op does; every rule's errors are explained by eager on
    # one example.
    rule = getattr(op.handler, "rule", None) if op.status == "rule" else None
    faithful = getattr(rule, "checks_shapes", False)
    op.ok_shapes = {} if rule is not None and not faithful else None
    op.explains = rule is not None
    is_view = _SetExclude is not None and not op.inplace_view and any(
        r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
    if op.status == "rule" and is_view:
        op.handler = _tracking_views(op.handler)
    # The hot view ops of backward graphs may take one physical call (direct_view).
    op.view = _direct_view_fn(func, rule) if (
        rule is not None and _SetExclude is not None and len(op.tensor_pos) == 1
        and not op.needs_general_path) else None
    op.view_tracks = is_view
    # Pointwise ops with one result may take the direct physical call (_direct_pointwise).
    op.direct = (rule is pointwise_rule and not op.needs_general_path
                 and len(func._schema.returns) == 1)
    return op


def _tracking_views(handle):
    """A view op's rule runs below autograd, where torch also skips the ADInplaceOrView key:
    its physical result would share memory with the physical input without being a view of it
    (no ``_base``, its own version counter).  Turn that key back on for the rule, so the physical
    views are real ones at every level: a nested vmap's result stays a view of the outer input
    for the outer level's autograd, and vmap's outputs are views of the caller's tensors (see
    ``aliasing.py``).  Autograd itself stays off: nothing is recorded below the logical level."""
    def handle_view(op, level, args, kwargs):
        if _set_excluded is None:
            with _SetExclude(_ADIOV, False):
                return handle(op, level, args, kwargs)
        was = _is_excluded(_ADIOV)  # (as the guard above, at a third of its cost)
        _set_excluded(_ADIOV, False)
        try:
            return handle(op, level, args, kwargs)
        finally:
            _set_excluded(_ADIOV, was)

    handle_view.rule = getattr(handle, "rule", None)
    return handle_view


def _writes_out(func) -> bool:
    return any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
               for a in func._schema.arguments)


def _choose_handler(func, tags):
    name = func._schema.name
    rule = RULES.get(func)
    if rule is not None:  # a rule may handle the static cases of a data-dependent op
        return _rule_handler(rule), "rule"
    if vmap_fn_for(func) is not None:  # a custom op's own torch.library vmap rule
        return _rule_handler(registered_vmap_rule), "rule"
    if name in ("aten::is_nonzero", "aten::_local_scalar_dense"):
        return agreeing_scalar, "error"  # one value when the whole batch agrees on it
    if name in DATA_DEPENDENT_HINTS:
        return refuse_data_dependent, "error"
    if _writes_out(func):  # out=: a loop would return a new tensor, not out
        return refuse_out_variant, "error"
    rule = tag_rule(func, tags)
    if rule is not None:
        return _rule_handler(rule), "rule"
    if func.namespace == "prim":  # metadata queries (prim::device, prim::layout, ...): read
        return _metadata_query, "rule"  # off the physical value, exact, so reported as a rule
    if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
        return _decompose_composite, "decomposition"  # NOTE [composite ops below autograd]
    decomp = _decompositions().get(func)
    if decomp is not None:
        return _decomp_handler(decomp), "decomposition"
    if torch.Tag.data_dependent_output in tags:
        return refuse_data_dependent, "error"
    # dynamic_output_shape ops without a hint above (bincount, nonzero_static, lstsq...) run per
    # example: correct when every example's output has the same shape, a clear error otherwise.
    if torch.Tag.inplace_view in tags:  # a loop would resize each example's view, not the batch
        return refuse_inplace_view, "error"
    return _rule_handler(_loop_or_registered_vmap), "fallback"


def _loop_or_registered_vmap(level, func, args, bdims, kwargs):
    # A custom op's vmap rule may be registered after the op's first batched call was cached.
    if vmap_fn_for(func) is not None:
        return registered_vmap_rule(level, func, args, bdims, kwargs)
    return _loop_fallback(level, func, args, bdims, kwargs)


_DECOMPS = None


def _decompositions() -> dict:
    """Entries of torch's decomposition table written in ``torch._decomp.decompositions`` (see
    NOTE [prims decompositions])."""
    global _DECOMPS
    if _DECOMPS is None:
        from torch._decomp import decomposition_table  # torch's table: loaded on first need

        _DECOMPS = {
            op: fn for op, fn in decomposition_table.items()
            if getattr(fn, "__module__", "") == "torch._decomp.decompositions"
        }
    return _DECOMPS


_OPS: dict = {}
on_change(_OPS.clear)


def prepared(func):
    """The cached :class:`~ops.Op` of ``func`` (an OpOverload), with its handler."""
    op = _OPS.get(func)
    if op is None:
        op = _OPS[func] = _prepare(func)
    return op


def op_status(func) -> str:
    """How vmap handles ``func`` (an OpOverload): 'rule', 'decomposition', 'fallback', 'error'.

    Random ops report 'rule': the randomness policy and its rules (``rules/random.py``) run
    them.

    Example:
        >>> import torch, ftrans
        >>> ftrans.op_status(torch.ops.aten.mm.default)
        'rule'
        >>> ftrans.op_status(torch.ops.aten.unique_consecutive.default)
        'error'
        >>> ftrans.op_status(torch.ops.aten.rand.default)
        'rule'
    """
    op = _OPS.get(func) or _prepare(func)
    return op.status


# ----------------------------------------------------------------------------------------------
# The hot path
# ----------------------------------------------------------------------------------------------

def dispatch(func, args, kwargs, from_mode=False):
    """Run aten op ``func`` on ``args``/``kwargs`` at the highest level among them.

    ``from_mode``: the call came through the vmap mode, not a BatchedTensor (the two entries'
    only difference, kept as a flag so that both share this one body): every live vmap level
    of the thread then applies to a random op, batched arguments or not, and an unbatched op
    must honour lazy conj/neg bits itself."""
    op = _OPS.get(func)
    if op is None:
        op = _OPS[func] = _prepare(func)
    level = None
    n = len(args)
    for i in op.tensor_pos:
        if i < n:
            a = args[i]
            if type(a) is BatchedTensor and (level is None or a.level.id > level.id):
                level = a.level
    for i in op.list_pos:
        if i < n and args[i] is not None:
            for a in args[i]:
                if type(a) is BatchedTensor and (level is None or a.level.id > level.id):
                    level = a.level
    if kwargs and op.kw_tensor:
        for name in op.kw_tensor:
            a = kwargs.get(name)
            if type(a) is BatchedTensor and (level is None or a.level.id > level.id):
                level = a.level
    if level is not None and not level.alive and _graph_task_id() < 0:
        _escaped(op, level)
    if op.view is not None and level is not None and not kwargs:
        out = direct_view(op, level, args)
        if out is not MISS:
            return out
    if op.ok_shapes is not None and level is not None:
        _check_shapes(op, level, args, kwargs or {})
    if op.is_random:
        return random_dispatch(op, level, args, kwargs or {}, from_mode)
    if level is None:
        if from_mode and _needs_view_bits(args):
            # Under any dispatch mode torch turns lazy conj/neg handling off, as below the
            # Python key: an unbatched op inside vmap would read a conj() view as plain data.
            with _SetExclude(_DK.Conjugate, False), _SetExclude(_DK.Negative, False):
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
    if op.direct:
        out = direct_pointwise(op.func._op, level, args, op.tensor_pos, kwargs or {})
        if out is not MISS:
            return out
    try:
        return op.handler(op, level, args, kwargs or {})
    except Exception as e:
        if op.explains:
            _explain_shapes(op, level, args, kwargs or {}, e)
        raise


MISS = object()
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_NoPythonDispatch = torch._C._DisableTorchDispatch
_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_grad_enabled = torch.is_grad_enabled


def direct_pointwise(call, level, args, tensor_pos, kwargs, above=False):
    """A pointwise op's result as ONE physical call, or :data:`MISS` (the caller then runs the
    handler, which raises and explains any error the usual way).

    Taken when the pointwise rule's physical call would be the op itself on the values: every
    batched argument is batched along dim 0 with the full logical rank (>= 1, so type promotion
    cannot differ), values and other tensors are real with no neg bit, other tensors are plain.
    When arguments are wrapped by lower levels too (nested vmaps, or a value of an outer vmap
    meeting one of an inner vmap), all along dim 0, the call goes to the innermost values at
    once, with size-1 dims for the levels an argument lacks: each level's dispatch would run
    exactly that broadcast, one level at a time.  That shortcut is taken only when no one else
    could see the intermediate calls (autograd, autocast, forward AD, another dispatch mode).
    ``call``: the op's C++ callable.  ``above``: called from the torch-function fast path,
    which checked those conditions and whose vmap mode is still pushed."""
    vals = list(args)
    n = len(args)
    nested = None  # [(position, levels of the argument outermost first)] once any is nested
    brank = -1
    rank = 0
    for i in tensor_pos:
        if i >= n:
            continue
        a = args[i]
        t = type(a)
        if t is BatchedTensor:
            if a.bdim != 0:
                return MISS
            r = a.dim()
            if brank < 0:
                brank = r
            elif r != brank:
                return MISS
            v = a.value
            if a.level is level and type(v) is not BatchedTensor:
                lv = None
            else:  # wrappers of lower levels: their own ops would see these calls
                if a.level is not level:
                    v = a
                lv = [level] if v is not a else []
                while type(v) is BatchedTensor:
                    if v.bdim != 0 or not v.level.alive or (v.requires_grad
                                                             and _grad_enabled()):
                        return MISS
                    lv.append(v.level)
                    v = v.value
                if nested is None:
                    nested = []
                nested.append((i, lv))
            if type(v) is not _Tensor or v.is_complex() or v.is_neg():
                return MISS
            vals[i] = v
        elif t in _PLAIN:
            if a.is_complex() or a.is_neg():
                return MISS
            r = a.dim()
        elif isinstance(a, _Tensor):
            return MISS
        else:
            continue
        if r > rank:
            rank = r
    if brank != rank or rank < 1:
        return MISS
    if nested is not None:
        if not above and (
                _stack_len is None or _stack_len() or _autocast() or _fwad._current_level >= 0
                or (_grad_enabled() and any(type(a) in _PLAIN and a.requires_grad
                                            for a in args))):
            return MISS
        chain = _level_chain(level, args, tensor_pos, nested, vals)
        try:
            with _NoPythonDispatch():
                out = call(*vals, **kwargs)
        except Exception:
            return MISS
        for lv in chain:
            out = make_batched(out, 0, lv)
        return out
    try:
        if above:
            with _NoPythonDispatch():
                out = call(*vals, **kwargs)
        else:
            out = call(*vals, **kwargs)
    except Exception:
        return MISS
    return make_batched(out, 0, level)


def direct_view(op, level, args):
    """A view op's result as ONE physical call on the value (``rules/views.py``'s ``DIRECT``
    table says how, per op), or :data:`MISS` (the shape check and the rule then run, and raise
    and explain any error the usual way).

    Taken when the one tensor argument is batched at ``level`` with a real value free of the neg
    bit (a plain tensor, or a lower level's wrapper, whose own dispatch handles its value), and
    the op's direct call accepts the arguments.  As in the rule (``_tracking_views``), the
    physical result is a real view of the physical input."""
    a = args[0]
    if type(a) is not BatchedTensor or a.level is not level:
        return MISS
    v = a.value
    t = type(v)
    if t is not BatchedTensor and (t not in _PLAIN or v.is_complex() or v.is_neg()):
        return MISS
    try:
        if not op.view_tracks:
            res = op.view(v, a.bdim, args)
        elif _set_excluded is None:
            with _SetExclude(_ADIOV, False):
                res = op.view(v, a.bdim, args)
        else:  # as ``with _SetExclude(ADInplaceOrView, False)``, at a third of its cost
            was = _is_excluded(_ADIOV)
            _set_excluded(_ADIOV, False)
            try:
                res = op.view(v, a.bdim, args)
            finally:
                _set_excluded(_ADIOV, was)
    except Exception:
        return MISS
    if res is None:
        return MISS
    return make_batched(res[0], res[1], level)


def _level_chain(level, args, tensor_pos, nested, vals):
    """All levels of the arguments, lowest first; ``vals`` get size-1 dims for those they lack
    (an innermost value's batch dims are its levels', lowest first)."""
    chain = {level.id: level}
    for _, lv in nested:
        for x in lv:
            chain[x.id] = x
    chain = [chain[k] for k in sorted(chain)]
    full = len(chain)
    lists = dict(nested)
    for i in tensor_pos:
        if i < len(args) and type(args[i]) is BatchedTensor:
            lv = lists.get(i)
            if lv is None:
                lv = (level,)
            if len(lv) == full:
                continue
            v = vals[i]
            have = {x.id for x in lv}
            for d, x in enumerate(chain):
                if x.id not in have:
                    v = v.unsqueeze(d)
            vals[i] = v
    return chain


# ----------------------------------------------------------------------------------------------
# The entries: BatchedTensor's __torch_dispatch__ and the vmap mode
# ----------------------------------------------------------------------------------------------

def subclass_entry(cls, func, types, args=(), kwargs=None):
    """``BatchedTensor.__torch_dispatch__``."""
    return dispatch(func, args, kwargs)


def mode_entry(self, func, types, args=(), kwargs=None):
    """``VmapMode.__torch_dispatch__``: every op while a vmap is live in this thread."""
    # As inside a subclass's __torch_dispatch__ (which torch runs with subclass
    # __torch_function__ off), so that rules reading lower levels' wrappers do not re-enter it.
    with _DisableTF():
        if func in _FACTORIES:  # may become batched on its first batched write (fresh.py)
            return _make_fresh(dispatch(func, args, kwargs, True))
        return dispatch(func, args, kwargs, True)


class VmapMode(TorchDispatchMode):
    """The dispatch mode of a live vmap (its ``__torch_dispatch__`` is set by
    :func:`set_dispatch_entries`)."""


_stack_at = getattr(torch._C, "_get_dispatch_stack_at", None)


def only_vmap_mode() -> bool:
    """No dispatch mode is pushed but vmap's own: nothing else (a tracer, a user's mode) needs
    to see the ops, so bookkeeping and whole-function rules may skip Python dispatch."""
    n = _stack_len()
    return not n or (n == 1 and type(_stack_at(0)) is VmapMode)


_autograd._only_vmap_mode = only_vmap_mode  # (autograd.py sits below: see its _detach)


# The entries installed while no fast-path signature is being learned (fastpath.py swaps in
# recording ones; tests swap in counting ones).
NORMAL_ENTRIES = {"subclass": subclass_entry, "mode": mode_entry}


def set_dispatch_entries(entries) -> None:
    """Install ``entries["subclass"]`` as ``BatchedTensor.__torch_dispatch__`` and
    ``entries["mode"]`` as ``VmapMode.__torch_dispatch__``: the only code that sets them.

    Both are plain functions bound at install time, so an op pays no extra frame.
    (TorchDispatchMode would wrap a handler defined in the class body in a dynamo-disable shim
    that costs microseconds per op; this mode never runs under dynamo.)"""
    BatchedTensor.__torch_dispatch__ = classmethod(entries["subclass"])
    VmapMode.__torch_dispatch__ = entries["mode"]


_tls = threading.local()


_NOTHING_TO_PUSH = contextlib.nullcontext()


def vmap_mode(randomness: str = "error"):
    """Push the vmap mode unless this thread already has it (nested vmaps share one); push the
    dropout mode (``dropout.py``) for the first level that may draw random numbers.  A nested
    vmap that needs neither gets a shared no-op context (no generator, no exit stack)."""
    if getattr(_tls, "active", False) and (randomness == "error"
                                           or getattr(_tls, "dropout", False)):
        return _NOTHING_TO_PUSH
    if randomness == "error" and not getattr(_tls, "active", False):
        return _PushVmapMode()  # the common outermost case: a small class, no ExitStack
    return _push_modes(randomness)


class _PushVmapMode:
    """What :func:`_push_modes` does for the first level of a thread when it draws nothing:
    push the vmap mode, and mark the thread as having it until the mode is popped."""

    __slots__ = ("mode",)

    def __enter__(self):
        _tls.active = True
        try:
            self.mode = VmapMode()
            self.mode.__enter__()
        except BaseException:
            _tls.active = False
            raise

    def __exit__(self, *exc):
        try:
            self.mode.__exit__(*exc)
        finally:
            _tls.active = False
        return False


@contextlib.contextmanager
def _push_modes(randomness):
    with contextlib.ExitStack() as stack:
        if not getattr(_tls, "active", False):
            _tls.active = True
            stack.callback(setattr, _tls, "active", False)
            stack.enter_context(VmapMode())
        if randomness != "error" and not getattr(_tls, "dropout", False):
            _tls.dropout = True
            stack.callback(setattr, _tls, "dropout", False)
            stack.enter_context(DropoutMode())
        yield


# ----------------------------------------------------------------------------------------------
# Handlers: rules, and the other ways an op can be lowered
# ----------------------------------------------------------------------------------------------

def _call_rule(rule, level, func, args, bdims, kwargs):
    if _needs_view_bits(args):
        with _SetExclude(_DK.Conjugate, False), _SetExclude(_DK.Negative, False):
            return rule(level, func, args, bdims, kwargs)
    return rule(level, func, args, bdims, kwargs)


def _rule_handler(rule):
    def handle(op, level, args, kwargs):
        if op.needs_general_path:
            return _general_rule_call(rule, op, level, args, kwargs)
        # Fast path (most ops): flat tensor arguments, nothing written in place.  One pass
        # unwraps the arguments batched at ``level`` and decides whether the rule must run with
        # the conj/neg view bits honoured (NOTE [view bits below the Python key] in ops.py;
        # ``needs_view_bits`` there decides it for the general path).
        args = list(args)
        n = len(args)
        bdims = [None] * n
        bits = False
        for i in op.tensor_pos:
            if i < n:
                a = args[i]
                if type(a) is BatchedTensor:
                    if a.level is level:
                        bdims[i] = a.bdim
                        a = args[i] = a.value
                        if type(a) is BatchedTensor or a.is_complex() or a.is_neg():
                            bits = True
                    else:
                        bits = True  # a lower level's wrapper: its physical bits are unknown
                elif isinstance(a, _Tensor) and (a.is_complex() or a.is_neg()):
                    bits = True
        if bits and _SetExclude is not None:
            with _SetExclude(_DK.Conjugate, False), _SetExclude(_DK.Negative, False):
                out, obd = rule(level, op.func, args, bdims, kwargs)
        else:
            out, obd = rule(level, op.func, args, bdims, kwargs)
        if obd is None:
            return out
        if type(obd) is int:
            return make_batched(out, obd, level)
        return wrap_result(out, obd, level)

    handle.rule = rule
    return handle


def _general_rule_call(rule, op, level, args, kwargs):
    if op.mutable_pos and _aliasing.LEAVES:
        _aliasing.check_leaf_write(op, level, args)
    pargs, bdims = unwrap_args(op, level, args)
    # A rule marked `checks_mutation` (batch norm writes its stats only when training) decides.
    if op.mutable_pos and not getattr(rule, "checks_mutation", False):
        _check_mutation(op, level, pargs, bdims)
    batched_kw = [k for k in op.kw_tensor
                  if type(kwargs.get(k)) is BatchedTensor and kwargs[k].level is level]
    if batched_kw and getattr(rule, "kw_bdims", False):
        # The rule takes keyword-only tensors too: physical values, batch dims in bdims.kw.
        kwargs = dict(kwargs)
        bdims = BDims(bdims)
        for k in batched_kw:
            bdims.kw[k] = kwargs[k].bdim
            kwargs[k] = kwargs[k].value
        out, obd = _call_rule(rule, level, op.func, pargs, bdims, kwargs)
    elif batched_kw:
        out, obd = _loop_fallback(level, op.func, pargs, bdims, kwargs)
    else:
        out, obd = _call_rule(rule, level, op.func, pargs, bdims, kwargs)
    if op.returns_self:
        self = args[0]
        if op.inplace_view:
            if type(obd) is int:  # squeeze_ & co. may move the physical batch dim
                self.bdim = obd
            self._sync_metadata()
        return self
    return wrap_result(out, obd, level)


def _metadata_query(op, level, args, kwargs):
    return op.func(*[a.value if type(a) is BatchedTensor else a for a in args], **kwargs)


def _decompose_composite(op, level, args, kwargs):
    out = op.func.decompose(*args, **kwargs)
    if out is NotImplemented:  # pragma: no cover - kernel table said it had one
        return _LOOP(op, level, args, kwargs)
    return out


def _decomp_handler(fn):
    def handle(op, level, args, kwargs):
        return fn(*args, **kwargs)

    handle.decomposition = fn  # for ``python -m ftrans --where``
    return handle


_LOOP = _rule_handler(_loop_fallback)
