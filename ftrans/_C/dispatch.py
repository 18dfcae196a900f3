"""The one dispatch mechanism: every aten op on a BatchedTensor lands in :func:`dispatch`.

``dispatch`` takes the highest level among the arguments, unwraps only that level (tensors
batched at lower levels are plain values here: the physical call dispatches them again), applies
the op's batching rule and re-wraps the result.  Per ``OpOverload`` it caches an :class:`_Op`
holding what the schema says (which argument positions can hold tensors, which are written in
place) and which handler applies, so the hot path does no schema work and no pytree work:
aten arguments are flat except ``Tensor[]`` lists, whose positions are cached too.

Handler order for an op: a registered rule; a rule by tag (``pointwise``); the op's own
CompositeImplicitAutograd decomposition (pitfall 1: composite ops reach us when called below
autograd, from inside rules); a decomposition from ``torch._decomp.decompositions`` (not the
whole table: most of it lowers to ``prims.*``, pitfall 2); and last a correct but slow
per-example loop that warns once per op (:class:`FallbackWarning`) and is counted in
:func:`fallback_stats`.
"""
from __future__ import annotations

import torch

from .batched import BatchedTensor, make_batched
from .fallback import (FallbackWarning, fallback_stats,  # noqa: F401 (re-exported)
                       loop_fallback as _loop_fallback, reset_fallback_stats)
from . import aliasing as _aliasing, fastpath as _fastpath
from .custom_vmap import registered_vmap_rule, vmap_fn_for
from .random import _VmapMode, random_dispatch
from .registry import RULES, on_change
from . import shapecheck as _shapecheck
from .levels import SUMMING_EXITED as _SUMMING_EXITED
from .shapecheck import check as _check_shapes, explain as _explain_shapes

__all__ = ["dispatch", "FallbackWarning", "fallback_stats", "reset_fallback_stats", "op_status",
           "VmapError"]

aten = torch.ops.aten
_Tensor = torch.Tensor
_SetExclude = getattr(torch._C, "_SetExcludeDispatchKeyGuard", None)
_DK = torch._C.DispatchKey


class VmapError(RuntimeError):
    """An operation that vmap cannot batch (data-dependent control flow, unsafe in-place)."""


_shapecheck._VmapError = VmapError


# ----------------------------------------------------------------------------------------------
# Per-op cache
# ----------------------------------------------------------------------------------------------

_TensorType = torch._C.TensorType
_OptionalType = torch._C.OptionalType
_ListType = torch._C.ListType


def _is_tensor_type(t) -> bool:
    if isinstance(t, _OptionalType):
        t = t.getElementType()
    return isinstance(t, _TensorType)


def _is_tensor_list_type(t) -> bool:
    if isinstance(t, _OptionalType):
        t = t.getElementType()
    return isinstance(t, _ListType) and _is_tensor_type(t.getElementType())


# Ops whose *result* depends on tensor values in a way no batched kernel can express.
_DATA_DEPENDENT_HINTS = {
    "aten::_local_scalar_dense": "`.item()`, `float(x)`, `int(x)`, `bool(x)` or a Python `if` "
    "on a per-example value. Use tensor ops instead: `torch.where(cond, a, b)` for a branch, "
    "keep scalars as 0-dim tensors",
    "aten::is_nonzero": "a Python `if`/`while` or `bool()` on a per-example value. Use "
    "`torch.where(cond, a, b)` to select per example",
    "aten::equal": "`torch.equal` returns one Python bool; compare with `torch.eq(a, b).all()` "
    "(a per-example 0-dim tensor) instead",
    "aten::nonzero": "`nonzero` / boolean-mask indexing returns a different number of elements "
    "per example. Use `torch.where(mask, x, 0)` or multiply by the mask instead",
    "aten::masked_select": "`masked_select` / `x[mask]` returns a different number of elements per "
    "example. Use `torch.where(mask, x, 0)` instead",
    "aten::unique": "`unique` returns a different number of elements per example",
    "aten::_unique": "`unique` returns a different number of elements per example",
    "aten::_unique2": "`unique` returns a different number of elements per example",
    "aten::unique_dim": "`unique` returns a different number of elements per example",
    "aten::unique_consecutive": "`unique_consecutive` returns a different number of elements per "
    "example",
    "aten::unique_dim_consecutive": "`unique_consecutive` returns a different number of elements "
    "per example",
    "aten::allclose": "`allclose` returns one Python bool; use `torch.isclose(a, b).all()`",
    "aten::is_same_size": None,
}


class _Op:
    __slots__ = ("func", "name", "tensor_pos", "list_pos", "kw_tensor", "mutable_pos",
                 "returns_self", "inplace_view", "random", "handler", "kind", "general",
                 "ok_shapes", "explains")


def _prepare(func) -> _Op:
    from .rules import tag_rule  # late: rules import this module

    op = _Op()
    schema = func._schema
    op.func = func
    op.name = schema.name
    op.tensor_pos, op.list_pos, op.kw_tensor, op.mutable_pos = [], [], [], []
    for i, arg in enumerate(schema.arguments):
        is_t, is_l = _is_tensor_type(arg.type), _is_tensor_list_type(arg.type)
        if arg.kwarg_only:
            if is_t or is_l:
                op.kw_tensor.append(arg.name)
            continue
        if is_t:
            op.tensor_pos.append(i)
        elif is_l:
            op.list_pos.append(i)
        if arg.alias_info is not None and arg.alias_info.is_write:
            op.mutable_pos.append(i)
    rets = schema.returns
    op.returns_self = bool(
        op.mutable_pos == [0] and len(rets) == 1 and rets[0].alias_info is not None
        and rets[0].alias_info.is_write
    )
    # Tensor lists, in-place writes or keyword tensors take the general (slower) path.
    op.general = bool(op.list_pos or op.mutable_pos or op.kw_tensor)
    tags = func.tags
    op.inplace_view = torch.Tag.inplace_view in tags
    # A rule marked `handles_randomness` (attention with dropout_p=0 is deterministic) decides.
    op.random = (torch.Tag.nondeterministic_seeded in tags
                 and not getattr(RULES.get(func), "handles_randomness", False))
    op.handler, op.kind = _choose_handler(func, tags, tag_rule)
    # Per-example shape validity (shapecheck.py): the signatures found valid, for rules that
    # do not raise exactly where the op does (and random ops); every rule's errors are
    # explained by eager on one example.
    rule = getattr(op.handler, "rule", None) if op.kind == "rule" else None
    faithful = getattr(rule, "checks_shapes", False)
    op.ok_shapes = {} if (rule is not None and not faithful) or op.random else None
    op.explains = rule is not None
    if op.kind == "rule" and _SetExclude is not None and not op.inplace_view and any(
            r.alias_info is not None and not r.alias_info.is_write for r in rets):
        op.handler = _tracking_views(op.handler)
    return op


def _tracking_views(handle):
    """A view op's rule runs below autograd, where torch also skips the ADInplaceOrView key:
    its physical result would share memory with the physical input without being a view of it
    (no ``_base``, its own version counter).  Turn that key back on for the rule, so the physical
    views are real ones at every level: a nested vmap's result stays a view of the outer input
    for the outer level's autograd, and vmap's outputs are views of the caller's tensors (see
    ``aliasing.py``).  Autograd itself stays off: nothing is recorded below the logical level."""
    def handle_view(op, level, args, kwargs):
        with _SetExclude(_DK.ADInplaceOrView, False):
            return handle(op, level, args, kwargs)

    handle_view.rule = getattr(handle, "rule", None)
    return handle_view


def _choose_handler(func, tags, tag_rule):
    name = func._schema.name
    rule = RULES.get(func)
    if rule is not None:  # a rule may handle the static cases of a data-dependent op
        return _rule_handler(rule), "rule"
    if vmap_fn_for(func) is not None:  # a custom op's own torch.library vmap rule
        return _rule_handler(registered_vmap_rule), "rule"
    if name in ("aten::is_nonzero", "aten::_local_scalar_dense"):
        from .agree import agreeing_scalar  # one value when the whole batch agrees on it
        return agreeing_scalar, "error"
    if name in _DATA_DEPENDENT_HINTS:
        return _data_dependent, "error"
    if any(a.kwarg_only and a.alias_info is not None and a.alias_info.is_write
           for a in func._schema.arguments):  # out=: a loop would return a new tensor, not out
        return _out_variant_unsupported, "error"
    rule = tag_rule(func, tags)
    if rule is not None:
        return _rule_handler(rule), "rule"
    if func.namespace == "prim":  # metadata queries (prim::device, prim::layout, ...)
        return _metadata_query, "rule"
    if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
        return _decompose_composite, "decomposition"
    decomp = _decompositions().get(func)
    if decomp is not None:
        return _decomp_handler(decomp), "decomposition"
    if torch.Tag.data_dependent_output in tags:
        return _data_dependent, "error"
    # dynamic_output_shape ops without a hint above (bincount, nonzero_static, lstsq...) run per
    # example: correct when every example's output has the same shape, a clear error otherwise.
    if torch.Tag.inplace_view in tags:  # a loop would resize each example's view, not the batch
        return _inplace_view_unsupported, "error"
    return _rule_handler(_loop_or_registered_vmap), "fallback"


def _loop_or_registered_vmap(level, func, args, bdims, kwargs):
    # A custom op's vmap rule may be registered after the op's first batched call was cached.
    if vmap_fn_for(func) is not None:
        return registered_vmap_rule(level, func, args, bdims, kwargs)
    return _loop_fallback(level, func, args, bdims, kwargs)


_DECOMPS = None


def _decompositions() -> dict:
    """Entries of torch's decomposition table written in ``torch._decomp.decompositions``.

    The rest of the table lowers to ``prims.*`` (pitfall 2), which have no batching rules.
    """
    global _DECOMPS
    if _DECOMPS is None:
        from torch._decomp import decomposition_table

        mods = ("torch._decomp.decompositions", "torch._refs.nn.functional")
        _DECOMPS = {
            op: fn for op, fn in decomposition_table.items()
            if getattr(fn, "__module__", "") in mods[:1]
        }
    return _DECOMPS


_OPS: dict = {}
on_change(_OPS.clear)


def op_status(func) -> str:
    """How vmap handles ``func`` (an OpOverload): 'rule', 'decomposition', 'fallback', 'error'.

    Example:
        >>> import torch, ftrans
        >>> ftrans.op_status(torch.ops.aten.mm.default)
        'rule'
        >>> ftrans.op_status(torch.ops.aten.nonzero.default)
        'error'
    """
    op = _OPS.get(func) or _prepare(func)
    return op.kind


# ----------------------------------------------------------------------------------------------
# The hot path
# ----------------------------------------------------------------------------------------------

def dispatch(func, args, kwargs, from_mode=False):
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
    if op.ok_shapes is not None and level is not None:
        _check_shapes(op, level, args, kwargs or {})
    if op.random:
        return random_dispatch(op, level, args, kwargs or {}, from_mode)
    if level is None:
        if from_mode and _needs_view_bits(args):
            # Under any dispatch mode torch turns lazy conj/neg handling off, as below the
            # Python key: an unbatched op inside vmap would read a conj() view as plain data.
            with _SetExclude(_DK.Conjugate, False), _SetExclude(_DK.Negative, False):
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
    try:
        return op.handler(op, level, args, kwargs or {})
    except Exception as e:
        if op.explains:
            _explain_shapes(op, level, args, kwargs or {}, e)
        raise


def _torch_dispatch(cls, func, types, args=(), kwargs=None):
    return dispatch(func, args, kwargs)


BatchedTensor.__torch_dispatch__ = classmethod(_torch_dispatch)
_fastpath.install(dispatch, BatchedTensor.__dict__["__torch_dispatch__"], _VmapMode)


def _unwrap_flat(op, level, args):
    """Physical values for the single-tensor positions batched at ``level``; (args, bdims)."""
    args = list(args)
    n = len(args)
    bdims = [None] * n
    for i in op.tensor_pos:
        if i < n:
            a = args[i]
            if type(a) is BatchedTensor and a.level is level:
                args[i] = a.value
                bdims[i] = a.bdim
    return args, bdims


def unwrap_args(op, level, args):
    """Replace tensors batched at ``level`` by their physical values; return (args, bdims)."""
    args, bdims = _unwrap_flat(op, level, args)
    n = len(args)
    for i in op.list_pos:
        if i < n and args[i] is not None:
            lst = args[i]
            if any(type(a) is BatchedTensor and a.level is level for a in lst):
                vals, bds = [], []
                for a in lst:
                    if type(a) is BatchedTensor and a.level is level:
                        vals.append(a.value)
                        bds.append(a.bdim)
                    else:
                        vals.append(a)
                        bds.append(None)
                args[i] = vals
                bdims[i] = tuple(bds)
    return args, bdims


def wrap_result(out, out_bdims, level):
    if out_bdims is None:
        return out
    if type(out_bdims) is int:
        return make_batched(out, out_bdims, level)
    wrapped = [o if b is None else make_batched(o, b, level) for o, b in zip(out, out_bdims)]
    return wrapped if isinstance(out, list) else tuple(wrapped)


# torch.func's message for the same refusal (after ftrans's call form, before its hint).
_INPLACE_UNBATCHED = (
    "vmap: inplace arithmetic(self, *extra_args) is not possible because there exists a Tensor "
    "`other` in extra_args that has more elements than `self`. This happened due to `other` "
    "being vmapped over but `self` not being vmapped over in a vmap. Please try to use "
    "out-of-place operators instead of inplace arithmetic. If said operator is being called "
    "inside the PyTorch framework, please file a bug report instead."
)


def _check_mutation(op, level, args, bdims):
    for i in op.mutable_pos:
        if i < len(bdims) and bdims[i] is None and args[i] is not None and any(
            b is not None for b in bdims
        ):
            err = VmapError(
                f"{describe(level)}: {_INPLACE_UNBATCHED} {op.name} writes in place into an "
                "argument that is not "
                "batched (it has no per-example dimension) from a batched value; the result "
                "cannot fit. Write into a batched tensor instead, e.g. replace "
                "`y.add_(x)` by `y = y + x`, or pass `y` to vmap as a mapped input.\n"
                # torch.func's words, so that code matching torch.func's message keeps working.
                "(vmap: inplace arithmetic(self, *extra_args) is not possible because there "
                "exists a Tensor `other` in extra_args that has more elements than `self`.)"
            )
            from .fresh import fresh_base  # made inside the function: it can become batched
            base = fresh_base(args[i], level)
            if base is not None:  # caught above autograd, which batches it (fresh.py)
                err._ftrans_fresh = (base, level)
            raise err


def _needs_view_bits(args) -> bool:
    """Pitfall 8: below the Python key (and under any dispatch mode) torch turns the
    Conjugate/Negative fallbacks off, so a kernel handed a lazy ``conj()``/``neg()`` view, or a
    complex kernel that makes such views internally (``linalg_pinv``'s ``mH``), reads them as
    plain data: silently wrong complex results.  True when an op must run with them back on
    (the guard costs about a microsecond, so real-valued ops without view bits skip it)."""
    if _SetExclude is None:
        return False
    for a in args:
        if isinstance(a, torch.Tensor):
            # A lower level's BatchedTensor: its physical bits are unknown here, be safe.
            if type(a) is BatchedTensor or a.is_complex() or a.is_conj() or a.is_neg():
                return True
        elif type(a) in (list, tuple) and any(
                isinstance(x, torch.Tensor) and (type(x) is BatchedTensor or x.is_complex()
                                                 or x.is_neg()) for x in a):
            return True
    return False


def _call_rule(rule, level, func, args, bdims, kwargs):
    if _needs_view_bits(args):
        with _SetExclude(_DK.Conjugate, False), _SetExclude(_DK.Negative, False):
            return rule(level, func, args, bdims, kwargs)
    return rule(level, func, args, bdims, kwargs)


def _rule_handler(rule):
    def handle(op, level, args, kwargs):
        if op.general:
            return _general_rule_call(rule, op, level, args, kwargs)
        # Fast path (most ops): flat tensor arguments, nothing written in place.  One pass
        # unwraps the arguments batched at ``level`` and decides whether the rule must run with
        # the conj/neg view bits honoured (what ``_needs_view_bits`` does for the general path).
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


class BDims(list):
    """``bdims`` for a rule marked ``kw_bdims = True``: also ``.kw``, the batch dims of the
    keyword-only tensor arguments batched at this level (their physical values are in kwargs)."""

    def __init__(self, bdims):
        super().__init__(bdims)
        self.kw = {}


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
        return _rule_handler(_loop_fallback)(op, level, args, kwargs)
    return out


def _decomp_handler(fn):
    def handle(op, level, args, kwargs):
        return fn(*args, **kwargs)

    return handle


# torch.func's own words for these refusals (code written against torch.func matches them).
_ITEM_MSG = (
    "vmap: It looks like you're calling .item() on a Tensor. We don't support vmap over calling "
    ".item() on a Tensor, please try to rewrite what you're doing with other operations. If "
    "error is occurring somewhere inside PyTorch internals, please file a bug report."
)


def _torch_data_dependent_msg(name) -> str:
    if name in ("aten::_local_scalar_dense", "aten::allclose"):
        return _ITEM_MSG
    if name == "aten::is_nonzero":
        from .tensor_guards import CONTROL_FLOW_MSG
        return CONTROL_FLOW_MSG
    if name in ("aten::equal", "aten::is_same_size"):
        return f"Batching rule not implemented for {name}. We could not generate a fallback."
    return (f"vmap: We do not support batching operators that can output dynamic shape. "
            f"Attempted to vmap over {name}. Please file an issue at "
            "https://github.com/pytorch/pytorch/issues if you need this feature.")


def _data_dependent(op, level, args, kwargs):
    hint = _DATA_DEPENDENT_HINTS.get(op.name) or (
        f"{op.name} has an output whose shape or value depends on the data of each example"
    )
    raise VmapError(
        f"{describe(level)}: {_torch_data_dependent_msg(op.name)} {op.name} is a data-dependent "
        f"operation, not supported on a batched value: {hint}."
    )


def _out_variant_unsupported(op, level, args, kwargs):
    raise VmapError(
        f"{describe(level)}: Batching rule not implemented for "
        f"{op.name}.{op.func._overloadname}; the fallback path doesn't work on out= or view "
        "ops. Call the op without `out=` and use its result (`y = torch.abs(x)` "
        "instead of `torch.abs(x, out=y)`)."
    )


def _inplace_view_unsupported(op, level, args, kwargs):
    raise VmapError(
        f"{describe(level)}: {op.name} changes the shape or storage of a batched value in place, "
        "which vmap does not support; use the out-of-place op (e.g. `x = x.reshape(...)` or "
        "`torch.empty(...)` instead of `x.resize_(...)`)."
    )


# Outside a backward pass, a value batched at an exited vmap escaped it (stored in a global or a
# closure): batching it again would hand out per-example values with no batch in sight.  Inside
# a backward pass (graph task id >= 0) exited levels are legitimate: autograd replays the vmap's
# ops on its saved BatchedTensors.  Without the query (old torch), never refuse.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: 0)
# Harmless on an escaped value (the next real op still refuses), and what ftrans itself does to
# gradients that carry an exited level before summing it out (sum_exited_levels).
_ESCAPE_OK = frozenset({"aten::detach", "aten::alias"})


def _escaped(op, level):
    if op.name in _ESCAPE_OK or _SUMMING_EXITED[0]:
        return
    raise VmapError(
        f"{describe(level)}: {op.name} was called on a per-example value (BatchedTensor) that "
        "escaped its vmap, which has already returned (it was saved to a global, a list or an "
        "attribute inside the vmapped function). Return the value from the vmapped function "
        "instead, so that vmap stacks it over the batch."
    )


def describe(level) -> str:
    """The user's call form for error messages (``vmap(f, in_dims=...)(...)``)."""
    origin = getattr(level, "origin", None)
    if origin:
        return origin() if callable(origin) else origin
    return "vmap"
