"""``torch.autograd.Function`` under vmap: its ``vmap`` staticmethod and ``generate_vmap_rule``.

ftrans needs neither: a Function applied to BatchedTensors runs its ``forward`` on them (the
aten ops inside are batched like any others) and autograd records the Function on the logical
tensors, so its ``backward`` is batched too.  That is what torch.func calls
``generate_vmap_rule = True``, and ftrans keeps doing it for a Function that says nothing.
But a Function that brings its own ``vmap`` staticmethod (because its forward leaves torch:
numpy, a C++ extension, a custom kernel) must be batched by that rule, and the rule's contract
is torch.func's: ``vmap(info, in_dims, *args) -> (outputs, out_dims)`` on the physical values
of the innermost level that batches an argument, with ``info.batch_size`` and
``info.randomness``.

Function.apply never reaches ``__torch_dispatch__`` or ``__torch_function__`` as itself, so
ftrans wraps ``torch.autograd.Function.apply`` once at import.  The wrapper steps aside at once
(one attribute test, one list test) for Functions without ``setup_context`` (the only style
torch.func transforms accept; older ``forward(ctx, ...)`` Functions keep working as they are)
and when no transform is running in this thread.  For a ``vmap`` staticmethod the Function is
applied as a generated subclass whose ``forward`` calls the rule: autograd records the user's
``setup_context``/``backward`` exactly as for the original class.
"""
from __future__ import annotations

import weakref
from typing import NamedTuple

import torch

from .. import _pytree
from . import levels as _levels
from .batched import BatchedTensor, make_batched
from .errors import call_form

__all__ = ["VmapInfo", "install"]

_Function = torch.autograd.Function
_orig_apply = _Function.__dict__["apply"].__func__
_BASE_SETUP = _Function.setup_context
_BASE_VMAP = _Function.vmap
_DOCS = "For more details, please see https://pytorch.org/docs/main/notes/extending.func.html"


class VmapInfo(NamedTuple):
    """The ``info`` argument of a ``vmap`` staticmethod."""

    batch_size: int
    randomness: str


def _apply(cls, *args, **kwargs):
    if cls.setup_context is _BASE_SETUP or not _levels.current_stack() \
            or "_ftrans_rule_of" in cls.__dict__:
        return _orig_apply(cls, *args, **kwargs)
    return _apply_under_transforms(cls, args, kwargs)


def _leaves(tree):
    return _pytree.tree_leaves(tree)


def _top_level(args):
    """The innermost live vmap level batching one of ``args``' tensors, or None."""
    top = None
    for a in _leaves(args):
        if type(a) is BatchedTensor and a.level.alive and (top is None or a.level.id > top.id):
            top = a.level
    return top


def _apply_under_transforms(cls, args, kwargs):
    import inspect

    if _top_level((args, kwargs)) is None:  # nothing batched: an ordinary Function call
        return _orig_apply(cls, *args, **kwargs)
    bound = inspect.signature(cls.forward).bind(*args, **kwargs)  # as torch.func binds them
    bound.apply_defaults()
    args, kwargs = bound.args, bound.kwargs
    level = _top_level((args, kwargs))
    name = cls.__name__
    if any(isinstance(v, torch.Tensor) for v in _leaves(kwargs)):
        raise NotImplementedError(
            f"{call_form(level)}: Run vmap on autograd.Function with kwarg-only Tensor args. "
            f"Please do not pass kwarg-only Tensors to autograd.Function. Got: {kwargs}"
        )
    has_rule = cls.vmap is not _BASE_VMAP
    if getattr(cls, "generate_vmap_rule", False):
        if has_rule:
            raise RuntimeError(
                f"{call_form(level)}: You tried to vmap over {name}, but it has both "
                "generate_vmap_rule=True and an overridden vmap staticmethod. Please set "
                "generate_vmap_rule=False or delete the overridden vmap staticmethod to avoid "
                f"ambiguity. {_DOCS}"
            )
        return _orig_apply(cls, *args, **kwargs)
    if has_rule:
        return _orig_apply(_with_rule(cls), *args, **kwargs)
    # Neither: run forward on the batched values (correct when forward is written in torch
    # ops).  torch.func refuses such a Function outright; when running it fails (forward left
    # torch), say what torch.func says and how to fix it.
    try:
        return _orig_apply(cls, *args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with the cause attached
        raise RuntimeError(
            f"{call_form(level)}: You tried to vmap over {name}, but it does not have vmap "
            "support. Please override and implement the vmap staticmethod or set "
            f"generate_vmap_rule=True. {_DOCS} (ftrans ran {name}.forward on the batched "
            f"values and it raised {type(e).__name__}: {e})"
        ) from e


_RULED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _with_rule(cls):
    """A subclass of ``cls`` whose forward is ``cls.vmap`` at the innermost batching level."""
    sub = _RULED.get(cls)
    if sub is None:
        def forward(*args, **kwargs):
            return _run_rule(cls, args, kwargs)

        sub = type(cls.__name__, (cls,), {
            "forward": staticmethod(forward), "_ftrans_rule_of": cls,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _RULED[cls] = sub
    return sub


def _unwrap(args, level):

    leaves, spec = _pytree.tree_flatten(args)
    values, dims = [], []
    for a in leaves:
        if type(a) is BatchedTensor and a.level is level:
            values.append(a.value)
            dims.append(a.bdim)
        else:
            values.append(a)
            dims.append(None)
    return _pytree.tree_unflatten(spec, values), _pytree.tree_unflatten(spec, dims)


def _run_rule(cls, args, kwargs):
    level = _top_level(args)
    values, in_dims = _unwrap(args, level)
    result = cls.vmap(VmapInfo(level.batch_size, level.randomness), in_dims, *values, **kwargs)
    form = call_form(level)
    base = ("Expected the vmap staticmethod to have two returns, an output and out_dims with "
            "pytree structure compatible with the output. ")
    if not isinstance(result, tuple):
        raise RuntimeError(f"{form}: {base}Got a {type(result)} instead")
    if len(result) != 2:
        raise RuntimeError(f"{form}: {base}Got {len(result)} returns instead")
    out, out_dims = result
    flat_out, spec = _pytree.tree_flatten(out)
    try:
        flat_dims = _pytree.tree_leaves(_pytree.tree_broadcast_prefix(out_dims, out))
    except ValueError:
        flat_dims = None
    if flat_dims is None or len(flat_dims) != len(flat_out):
        raise RuntimeError(
            f"{form}: The autograd.Function's vmap staticmethod returned an incompatible "
            f"(output, out_dims) tuple. Expected out_dims={out_dims} to be compatible with the "
            f"structure of `output`. out_dims has structure {_pytree.tree_structure(out_dims)} "
            f"but output has structure {spec}. {_DOCS}"
        )
    # An output that is one of the (unwrapped) inputs comes back as that very input (mark_dirty
    # and returned-as-is inputs keep their identity, as torch.func keeps it).
    originals = {id(v): a for v, a in zip(_leaves(values), _leaves(args))}
    wrapped = []
    for o, d in zip(flat_out, flat_dims):
        if not isinstance(o, torch.Tensor):
            wrapped.append(o)
        elif id(o) in originals:
            wrapped.append(originals[id(o)])
        elif d is None:
            wrapped.append(o)
        else:
            wrapped.append(make_batched(o, d % max(o.dim(), 1), level))
    return _pytree.tree_unflatten(spec, wrapped)


def install():
    """Route ``torch.autograd.Function.apply`` through :func:`_apply` (idempotent)."""
    if getattr(_Function.__dict__["apply"].__func__, "__name__", "") != "_apply":
        _Function.apply = classmethod(_apply)
