"""What every handler needs about an op call: the op's schema facts, and the unwrap/wrap plumbing.

:class:`Op` holds what an ``OpOverload``'s schema says, read once (:func:`read_schema`): which
argument positions can hold tensors and tensor lists, which keyword-only arguments are tensors,
which positions are written in place.  aten arguments are flat except ``Tensor[]`` lists, so the
hot path needs no pytree work.  The dispatcher (``dispatch.py``) caches one Op per overload and
adds its routing fields (handler, status, shape checks); handlers below it (rules, randomness,
fallback) read only the schema facts.

:func:`unwrap_args` replaces the tensors batched at one level by their physical values and
returns the batch dims beside them; :func:`wrap_result` re-wraps a rule's outputs.
"""
from __future__ import annotations

import torch

from .batched import BatchedTensor, make_batched
from .errors import INPLACE_UNBATCHED_MSG, VmapError, call_form
from .fresh import fresh_base

__all__ = ["Op", "read_schema", "unwrap_args", "wrap_result", "BDims", "needs_view_bits",
           "check_mutation", "select_example", "any_batched", "pad_rank", "to_front"]

_SetExclude = getattr(torch._C, "_SetExcludeDispatchKeyGuard", None)
_TensorType = torch._C.TensorType
_OptionalType = torch._C.OptionalType
_ListType = torch._C.ListType


class Op:
    """One ``OpOverload``: its schema facts (set by :func:`read_schema`) and the routing fields
    the dispatcher fills in (``handler``, ``status``, ``is_random``, ``ok_shapes``,
    ``explains``, ``direct``, ``view``, ``view_tracks``)."""

    __slots__ = (
        # schema facts
        "func", "name", "tensor_pos", "list_pos", "kw_tensor", "mutable_pos", "returns_self",
        "inplace_view", "needs_general_path",
        # routing (dispatch.py)
        "is_random", "handler", "status", "ok_shapes", "explains", "direct", "view",
        "view_tracks",
    )


def _is_tensor_type(t) -> bool:
    if isinstance(t, _OptionalType):
        t = t.getElementType()
    return isinstance(t, _TensorType)


def _is_tensor_list_type(t) -> bool:
    if isinstance(t, _OptionalType):
        t = t.getElementType()
    return isinstance(t, _ListType) and _is_tensor_type(t.getElementType())


def read_schema(func) -> Op:
    """An :class:`Op` with ``func``'s schema facts filled in."""
    op = Op()
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
    op.needs_general_path = bool(op.list_pos or op.mutable_pos or op.kw_tensor)
    op.inplace_view = torch.Tag.inplace_view in func.tags
    return op


# ----------------------------------------------------------------------------------------------
# Unwrap and wrap
# ----------------------------------------------------------------------------------------------

def unwrap_args(op, level, args):
    """Replace tensors batched at ``level`` by their physical values; return (args, bdims)."""
    args = list(args)
    n = len(args)
    bdims = [None] * n
    for i in op.tensor_pos:
        if i < n:
            a = args[i]
            if type(a) is BatchedTensor and a.level is level:
                args[i] = a.value
                bdims[i] = a.bdim
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
    """A rule's ``(out, out_bdims)`` as the logical result: outputs with a batch dim wrapped."""
    if out_bdims is None:
        return out
    if type(out_bdims) is int:
        return make_batched(out, out_bdims, level)
    wrapped = [o if b is None else make_batched(o, b, level) for o, b in zip(out, out_bdims)]
    return wrapped if isinstance(out, list) else tuple(wrapped)


class BDims(list):
    """``bdims`` for a rule marked ``kw_bdims = True``: also ``.kw``, the batch dims of the
    keyword-only tensor arguments batched at this level (their physical values are in kwargs)."""

    def __init__(self, bdims):
        super().__init__(bdims)
        self.kw = {}


def select_example(x, bdim, i):
    """Example ``i`` of a physical value (``x`` itself when it has no batch dim)."""
    return x if bdim is None else x.select(bdim, i)


# ----------------------------------------------------------------------------------------------
# Lazy conj/neg view bits
# ----------------------------------------------------------------------------------------------
# NOTE [view bits below the Python key]: below the Python key (and under any dispatch mode) torch
# turns the Conjugate/Negative fallbacks off, so a kernel handed a lazy ``conj()``/``neg()`` view,
# or a complex kernel that makes such views internally (``linalg_pinv``'s ``mH``), reads them as
# plain data: silently wrong complex results (gradients of ``fft.ifft`` and ``polar`` were the
# first seen).  Rules run with the two fallbacks back on whenever an argument is complex, carries
# a bit, or is a lower level's wrapper whose physical bits are unknown here; the guard costs about
# a microsecond, so real-valued ops without view bits skip it.

def needs_view_bits(args) -> bool:
    """True when an op on ``args`` must run with the view bits honoured (see the NOTE above)."""
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


# ----------------------------------------------------------------------------------------------
# In-place writes
# ----------------------------------------------------------------------------------------------

def check_mutation(op, level, args, bdims):
    """Refuse an in-place write of a batched value into an argument that is not batched."""
    for i in op.mutable_pos:
        if i < len(bdims) and bdims[i] is None and args[i] is not None and any(
            b is not None for b in bdims
        ):
            err = VmapError(
                f"{call_form(level)}: {INPLACE_UNBATCHED_MSG} {op.name} writes in place into an "
                "argument that is not "
                "batched (it has no per-example dimension) from a batched value; the result "
                "cannot fit. Write into a batched tensor instead, e.g. replace "
                "`y.add_(x)` by `y = y + x`, or pass `y` to vmap as a mapped input.\n"
                # torch.func's words, so that code matching torch.func's message keeps working.
                "(vmap: inplace arithmetic(self, *extra_args) is not possible because there "
                "exists a Tensor `other` in extra_args that has more elements than `self`.)"
            )
            base = fresh_base(args[i], level)  # made inside the function: it can become batched
            if base is not None:  # caught above autograd, which batches it (fresh.py)
                err._ftrans_fresh = (base, level)
            raise err


# ----------------------------------------------------------------------------------------------
# Batch-dim helpers every handler uses (rules/_util.py re-exports them for rule files)
# ----------------------------------------------------------------------------------------------

def to_front(x: torch.Tensor, bdim):
    """``x`` with its batch dim moved to 0 (a view); unbatched tensors are returned as they are."""
    if bdim is None or bdim == 0:
        return x
    return x.movedim(bdim, 0)


def any_batched(bdims) -> bool:
    for b in bdims:
        if b is not None:
            if isinstance(b, tuple):
                if any(x is not None for x in b):
                    return True
            else:
                return True
    return False


def pad_rank(x: torch.Tensor, rank: int) -> torch.Tensor:
    """A front-batched ``x`` viewed with size-1 dims after the batch dim up to logical ``rank``."""
    missing = rank - (x.dim() - 1)
    if missing <= 0:
        return x
    shape = x.shape
    return x.view((shape[0],) + (1,) * missing + tuple(shape[1:]))
