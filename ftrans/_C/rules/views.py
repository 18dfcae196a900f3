"""View and shape ops.  Rules return *physical views*, so a write through a view mutates the
base for free; the batch dim is moved to the front (itself a view) before the logical op, which
then only needs its dim arguments shifted by one.

Most ops here differ only in which arguments are logical dims, so they share one builder,
:func:`dim_rule`, which reads those arguments *by schema name* (positional or keyword, default
filled in) and shifts them.  A logical 0-dim tensor is physically 1-dim (``[B]``): ops that accept
dim 0/-1 on a scalar (``transpose``, ``flip``, the scans) get a size-1 dim appended physically and
removed again, instead of a special case per op.

In-place view ops (``squeeze_``, ``unsqueeze_``, ``t_``, ``transpose_``, ``as_strided_``) cannot
use a moved copy of the metadata: they change the physical tensor's own sizes, by mapping each
logical dim to its physical position, and report where the batch dim ended up (the dispatcher
stores that and re-syncs the wrapper).

The ``*_copy`` variants are the view rule followed by a contiguous copy.  (The backward ops of
views, ``select_backward`` & co., live with the scatter rules.)  Argument helpers used by
``reduce.py`` and ``factory.py`` live here too.
"""
from __future__ import annotations

import math

import torch

from ..errors import VmapError, call_form
from ..registry import RULES, register_batch_rule
from ._util import overloads, to_front, wrap_dim

aten = torch.ops.aten


# ----------------------------------------------------------------------------------------------
# Argument access by schema name (shared with reduce.py and factory.py)
# ----------------------------------------------------------------------------------------------

_SPECS: dict = {}


def _spec(func, name):
    key = (func, name)
    spec = _SPECS.get(key)
    if spec is None:
        spec = (-1, None)  # no such argument: reads as None
        for i, a in enumerate(func._schema.arguments):
            if a.name == name:
                default = a.default_value if a.has_default_value() else None
                spec = (None if a.kwarg_only else i, default)
                break
        _SPECS[key] = spec
    return spec


def get_arg(func, args, kwargs, name):
    """The value of argument ``name`` of this call (its schema default if not passed)."""
    pos, default = _spec(func, name)
    if pos is not None and 0 <= pos < len(args):
        return args[pos]
    return kwargs.get(name, default)


def set_arg(func, args: list, kwargs: dict, name, value) -> None:
    pos, _ = _spec(func, name)
    if pos is not None and 0 <= pos < len(args):
        args[pos] = value
    else:
        kwargs[name] = value


def finish(out, unpad=False):
    """(out, out_bdims) with every tensor output batched at 0; ``unpad`` drops the size-1 dim
    that a logical 0-dim input was given (see the module docstring)."""
    if isinstance(out, torch.Tensor):
        return (_unpad(out) if unpad else out), 0
    outs = [(_unpad(o) if unpad else o) if isinstance(o, torch.Tensor) else o for o in out]
    bd = tuple(0 if isinstance(o, torch.Tensor) else None for o in outs)
    return (outs if isinstance(out, list) else tuple(outs)), bd


def _unpad(o):
    return aten.squeeze.dims(o, [1]) if o.dim() > 1 else o


def _shift(d, rank):
    if isinstance(d, (list, tuple)):
        return [wrap_dim(x, rank) + 1 for x in d]
    return wrap_dim(d, rank) + 1


def dim_rule(*names, rank_offset=0, scalar_ok=False):
    """Rule for ops whose arguments ``names`` are logical dims (ints or int lists).

    ``rank_offset``: the dims index the output, of rank ``rank + rank_offset`` (``unsqueeze``).
    ``scalar_ok``: the op accepts dim 0/-1 on a 0-dim tensor and keeps the rank (or reduces).
    """

    def rule(level, func, args, bdims, kwargs):
        x = to_front(args[0], bdims[0])
        args, kwargs = list(args), dict(kwargs)
        rank = x.dim() - 1 + rank_offset
        pad = scalar_ok and rank == 0
        if pad:
            x = aten.unsqueeze.default(x, 1)
        args[0] = x
        for name in names:
            d = get_arg(func, args, kwargs, name)
            if d is not None:
                set_arg(func, args, kwargs, name, _shift(d, rank))
        return finish(func(*args, **kwargs), pad)

    return rule


def _transpose_rule(*names):
    rule = dim_rule(*names, scalar_ok=True)

    def transpose_rule(level, func, args, bdims, kwargs):
        out, obd = rule(level, func, args, bdims, kwargs)  # checks the dims
        if args[0].dim() == 1:  # a logical scalar: the input itself, as torch.func returns it
            return args[0], bdims[0]
        return out, obd

    return transpose_rule


for _ops, _rule in [
    (overloads("transpose.int", "swapdims.default"), _transpose_rule("dim0", "dim1")),
    (overloads("swapaxes.default"), _transpose_rule("axis0", "axis1")),
    (overloads("select.int", "slice.Tensor", "narrow.default", "narrow_copy.default",
               "unbind.int", "split.Tensor", "split_with_sizes.default", "unsafe_split.Tensor",
               "unsafe_split_with_sizes.default", "chunk.default"), dim_rule("dim")),
    (overloads("diagonal.default"), dim_rule("dim1", "dim2")),
    (overloads("flip.default"), dim_rule("dims", scalar_ok=True)),
    (overloads("rot90.default"), dim_rule("dims")),
    (overloads("diag_embed.default"), dim_rule("dim1", "dim2", rank_offset=1)),
]:
    register_batch_rule(*_ops)(_rule)


@register_batch_rule(aten.unsqueeze.default)
def unsqueeze_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    return func(x, wrap_dim(args[1], x.dim()) + 1), 0  # x.dim() == logical rank + 1


@register_batch_rule(aten.unfold.default)
def unfold_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    dim, size, step = args[1:4]
    if x.dim() == 1:  # logical 0-dim: unfold gives shape [size] (size <= 1)
        return aten.select.int(func(aten.unsqueeze.default(x, 1), 1, size, step), 1, 0), 0
    return func(x, wrap_dim(dim, x.dim() - 1) + 1, size, step), 0


@register_batch_rule(aten.expand.default)
def expand_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    size = list(args[1])
    r = x.dim() - 1
    extra = len(size) - r
    if extra < 0:
        raise RuntimeError(
            f"expand: the number of sizes provided ({len(size)}) must be greater or equal to "
            f"the number of dimensions in the tensor ({r})"
        )
    x = x.view((x.shape[0],) + (1,) * extra + tuple(x.shape[1:]))
    return x.expand([x.shape[0]] + size, **kwargs), 0


@register_batch_rule(*overloads("view.default", "reshape.default", "_reshape_copy.default"))
def view_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    return func(x, [x.shape[0]] + list(args[1])), 0


@register_batch_rule(aten._unsafe_view.default)
def unsafe_view_rule(level, func, args, bdims, kwargs):
    # Composites (kron, ...) _unsafe_view a fresh result they assume is contiguous; the
    # physical one may not be (batch dim elsewhere), and a copy is allowed here.  So an
    # example's validity is its numel's alone, which reshape checks exactly as eager does: no
    # shape check on the example's strides (under vmap they are not eager's, and a check by
    # them refused vmap(kron) over a batch dim other than 0 unless a contiguous call with the
    # same shapes had come first).
    x = to_front(args[0], bdims[0])
    return aten.reshape.default(x, [x.shape[0]] + list(args[1])), 0


unsafe_view_rule.checks_shapes = True


@register_batch_rule(aten._reshape_alias.default)
def reshape_alias_rule(level, func, args, bdims, kwargs):
    # Torch only emits _reshape_alias where a view exists, and then the physical view exists too.
    x = to_front(args[0], bdims[0])
    return aten.view.default(x, [x.shape[0]] + list(args[1])), 0


@register_batch_rule(aten.view_as.default)
def view_as_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    other, ob = args[1], bdims[1]
    shape = list(other.shape)
    if ob is not None:
        del shape[ob]
    if bdims[0] is None:  # only `other` is batched: the result does not depend on the batch
        return aten.view.default(args[0], shape), None
    return aten.view.default(x, [x.shape[0]] + shape), 0


@register_batch_rule(*overloads("view.dtype", "view_as_complex.default", "pixel_shuffle.default",
                                "pixel_unshuffle.default", "tril.default", "triu.default",
                                "tril_.default", "triu_.default"))
def front_rule(level, func, args, bdims, kwargs):
    """Ops that act on trailing dims and accept any number of leading ones."""
    return func(to_front(args[0], bdims[0]), *args[1:], **kwargs), 0


@register_batch_rule(*overloads("detach.default", "alias.default", "lift_fresh.default",
                                "_conj.default", "_neg_view.default",
                                "resolve_conj.default", "resolve_neg.default"))
def same_layout_rule(level, func, args, bdims, kwargs):
    return func(args[0], *args[1:], **kwargs), bdims[0]


@register_batch_rule(*overloads("view_as_real.default"))
def view_as_real_rule(level, func, args, bdims, kwargs):
    # The trailing dim of 2 leaves the batch dim where it was.  A lazy conj bit lives on the
    # physical value only (the wrapper's is clear, so torch's own resolve_conj() before
    # view_as_real, e.g. in fft_c2r's backward, skips it): resolve it here, or the kernel raises.
    x = args[0]
    return func(x.resolve_conj() if x.is_conj() else x), bdims[0]


@register_batch_rule(aten.permute.default)
def permute_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    r = x.dim() - 1
    return func(x, [0] + [wrap_dim(d, r) + 1 for d in args[1]]), 0


@register_batch_rule(*overloads("movedim.int", "movedim.intlist", "moveaxis.int",
                                "moveaxis.intlist"))
def movedim_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    r = x.dim() - 1
    src, dst = args[1], args[2]
    if isinstance(src, int):
        src, dst = [src], [dst]
    src = [wrap_dim(d, r) for d in src]
    dst = [wrap_dim(d, r) for d in dst]
    if len(src) != len(dst):
        raise RuntimeError(
            f"movedim: Invalid source or destination dims: source ({src} dims) should contain "
            f"the same number of dims as destination ({dst} dims)"
        )
    perm = [-1] * r
    for s, d in zip(src, dst):
        perm[d] = s
    rest = iter(i for i in range(r) if i not in src)
    perm = [p if p >= 0 else next(rest) for p in perm]
    return aten.permute.default(x, [0] + [p + 1 for p in perm]), 0


@register_batch_rule(aten.t.default)
def t_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    if x.dim() - 1 < 2:
        return aten.alias.default(x), 0
    return aten.transpose.int(x, 1, 2), 0


@register_batch_rule(*overloads("squeeze.default", "squeeze.dim", "squeeze.dims"))
def squeeze_rule(level, func, args, bdims, kwargs):
    x, b = args[0], bdims[0]
    pdims, nb = _squeeze_plan(x, b, args[1] if len(args) > 1 else None)
    return aten.squeeze.dims(x, pdims), nb


def _squeeze_plan(x, b, dims):
    """Physical dims to squeeze and the new batch dim, without moving the batch dim."""
    r = x.dim() - 1
    if dims is None or r == 0:  # squeezing a 0-dim tensor is a no-op
        logical = range(r)
    else:
        logical = [wrap_dim(d, r) for d in ([dims] if isinstance(dims, int) else dims)]
    pdims = sorted({d if d < b else d + 1 for d in logical} - {b})
    pdims = [p for p in pdims if x.shape[p] == 1]
    return pdims, b - sum(1 for p in pdims if p < b)


def _phys(d, b):
    return d if d < b else d + 1


# In-place view ops: change the physical tensor itself and report the new batch dim.

@register_batch_rule(*overloads("squeeze_.default", "squeeze_.dim", "squeeze_.dims"))
def squeeze__rule(level, func, args, bdims, kwargs):
    x, b = args[0], bdims[0]
    pdims, nb = _squeeze_plan(x, b, args[1] if len(args) > 1 else None)
    if pdims:
        aten.squeeze_.dims(x, pdims)
    return x, nb


@register_batch_rule(aten.unsqueeze_.default)
def unsqueeze__rule(level, func, args, bdims, kwargs):
    x, b = args[0], bdims[0]
    d = wrap_dim(args[1], x.dim())
    if d < b:
        func(x, d)
        return x, b + 1
    func(x, d + 1)
    return x, b


@register_batch_rule(aten.transpose_.default, aten.t_.default)
def transpose__rule(level, func, args, bdims, kwargs):
    x, b = args[0], bdims[0]
    r = x.dim() - 1
    if func is aten.t_.default:
        if r < 2:
            return x, b
        d0, d1 = 0, 1
    else:
        d0, d1 = wrap_dim(args[1], r), wrap_dim(args[2], r)
        if r == 0 or d0 == d1:  # a 0-dim example (dims 0/-1 name itself) or a no-op swap
            return x, b
    aten.transpose_.default(x, _phys(d0, b), _phys(d1, b))  # the batch dim stays put
    return x, b


def _as_strided_args(level, args, bdims):
    # Each example starts ``stride(bdim)`` elements after the previous one in storage, and the
    # default storage offset is the example's own, so per-example semantics match the loop.
    x, b = args[0], bdims[0]
    size, stride = list(args[1]), list(args[2])
    off = args[3] if len(args) > 3 and args[3] is not None else x.storage_offset()
    _check_as_strided_slice(level, x, b, size, stride, off)
    return x, [x.shape[b]] + size, [x.stride(b)] + stride, off


def _storage_span(sizes, strides):
    return 0 if 0 in sizes else 1 + sum((n - 1) * s for n, s in zip(sizes, strides))


def _check_as_strided_slice(level, x, b, size, stride, off):
    """The as_strided view of one example must stay inside that example's memory: beyond it
    lies the next example's (a silently wrong answer).  torch.func's checks and messages."""
    msg = None
    if len(size) != len(stride):
        msg = (f"Tensor.as_strided(size, stride, ...): size and stride must have the same "
               f"length! Got size {size} and stride {stride}")
    else:
        span = _storage_span(size, stride)
        shape, strides = list(x.shape), list(x.stride())
        del shape[b], strides[b]
        base, own = x.storage_offset(), _storage_span(shape, strides)
        head = (f"result = tensor.as_strided({size}, {stride}, {off}) can access memory outside "
                "of `tensor`. ")
        tail = ("This is not supported inside of vmap, please try to rewrite the `as_strided` "
                "call as a sequence of PyTorch view operations")
        if span and not own:
            msg = (head + "`tensor` has no storage but the passed-in (size, stride, "
                   "storage_offset) imply a result with some storage. " + tail)
        elif span and (span + off > own + base or off < base):
            msg = (head + f"`result` can access some memory in range [{off}, {span + off}], but "
                   f"`tensor` can only access some memory in range [{base}, {own + base}]. " + tail)
    if msg is not None:
        raise VmapError(f"{call_form(level)}: {msg}")


@register_batch_rule(aten.as_strided.default)
def as_strided_rule(level, func, args, bdims, kwargs):
    return func(*_as_strided_args(level, args, bdims)), 0


@register_batch_rule(aten.as_strided_.default)
def as_strided__rule(level, func, args, bdims, kwargs):
    x, size, stride, off = _as_strided_args(level, args, bdims)
    func(x, size, stride, off)
    return x, 0


# The per-example checks (with torch.func's messages) are the rules' own: see shapecheck.py.
as_strided_rule.checks_shapes = as_strided__rule.checks_shapes = True


@register_batch_rule(aten.roll.default)
def roll_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    shifts = args[1]
    dims = list(args[2]) if len(args) > 2 else list(kwargs.get("dims", []))
    if not dims:  # roll of the flattened example
        flat = aten.reshape.default(x, [x.shape[0], math.prod(x.shape[1:])])
        return aten.view.default(func(flat, shifts, [1]), list(x.shape)), 0
    r = x.dim() - 1
    if r == 0:
        return finish(func(aten.unsqueeze.default(x, 1), shifts, _shift(dims, 0)), True)
    return func(x, shifts, _shift(dims, r)), 0


@register_batch_rule(aten.repeat.default)
def repeat_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    reps = list(args[1])
    extra = len(reps) - (x.dim() - 1)
    if extra < 0:
        raise RuntimeError(
            "Number of dimensions of repeat dims can not be smaller than number of dimensions "
            "of tensor"
        )
    x = x.view((x.shape[0],) + (1,) * extra + tuple(x.shape[1:]))
    return func(x, [1] + reps), 0


@register_batch_rule(aten.channel_shuffle.default, *overloads("native_channel_shuffle.default"))
def channel_shuffle_rule(level, func, args, bdims, kwargs):
    # The channel dim is logical dim 1: fold the batch into logical dim 0.
    x = to_front(args[0], bdims[0])
    shape = list(x.shape)
    out = func(aten.reshape.default(x, [shape[0] * shape[1]] + shape[2:]), *args[1:])
    return aten.view.default(out, shape), 0


# ----------------------------------------------------------------------------------------------
# *_copy variants: the view, then a contiguous copy of each output
# ----------------------------------------------------------------------------------------------

def _copy_variant(view_op):
    def rule(level, func, args, bdims, kwargs):
        out, obd = RULES[view_op](level, view_op, args, bdims, kwargs)
        if isinstance(out, torch.Tensor):
            return aten.clone.default(to_front(out, obd), memory_format=torch.contiguous_format), (
                None if obd is None else 0)
        outs = [aten.clone.default(to_front(o, d), memory_format=torch.contiguous_format)
                for o, d in zip(out, obd)]
        return (outs if isinstance(out, list) else tuple(outs)), tuple(
            None if d is None else 0 for d in obd)

    return rule


for _name in ("expand", "permute", "squeeze", "unsqueeze", "select", "slice", "t", "transpose",
              "view", "diagonal", "unfold", "alias", "detach", "split", "split_with_sizes",
              "unbind", "as_strided", "view_as_real", "view_as_complex", "_reshape_alias"):
    _copy_packet = getattr(aten, _name + "_copy", None)
    _view_packet = getattr(aten, _name, None)
    if _copy_packet is None or _view_packet is None:
        continue
    for _ov in _copy_packet.overloads():
        if "out" in _ov or _ov not in _view_packet.overloads():
            continue
        _view_op = getattr(_view_packet, _ov)
        if _view_op in RULES:
            register_batch_rule(getattr(_copy_packet, _ov))(_copy_variant(_view_op))


# ----------------------------------------------------------------------------------------------
# Direct physical calls: the view ops backward graphs are made of (dispatch.py, "direct view")
# ----------------------------------------------------------------------------------------------
# ``direct(v, b, args)``: the op's ONE physical call on ``v`` (the value, batch dim ``b``) as
# (out, out_bdim), or None when the call is not one of the plain cases below; the rule then runs
# (after the per-example shape check).  Each takes only calls whose per-example validity it can
# read off the arguments, and where the physical call raises exactly when eager raises on one
# example, so that skipping the shape check changes no verdict: an error goes the rule's way.
# Only a batch dim at 0 (where the rule's ``to_front`` is a no-op): the result has the very
# layout the rule gives, so later ops see what they saw before (a batch dim left elsewhere
# would change the layout of every result computed from it, and take ops off their fast paths).

def _t_direct(v, b, args):
    if b or v.dim() != 3:  # logical rank 2 only (rank < 2 is an alias; > 2 raises: the rule's)
        return None
    return v.transpose(1, 2), 0


def _phys_dim(d, r):
    """Logical dim ``d`` of rank ``r`` (0 < r) -> physical (batch dim 0), or None."""
    if type(d) is not int or d < -r or d >= r:
        return None
    return d + r + 1 if d < 0 else d + 1


def _transpose_direct(v, b, args):
    r = v.dim() - 1
    if b or r == 0 or len(args) != 3:
        return None
    p0, p1 = _phys_dim(args[1], r), _phys_dim(args[2], r)
    if p0 is None or p1 is None:
        return None
    return v.transpose(p0, p1), 0


def _permute_direct(v, b, args):
    r = v.dim() - 1
    dims = args[1] if len(args) == 2 else ()
    if b or len(dims) != r or r == 0:
        return None
    perm = [_phys_dim(d, r) for d in dims]
    if None in perm or len(set(perm)) != r:
        return None
    return v.permute([0, *perm]), 0


def _unsqueeze_direct(v, b, args):
    r = v.dim()  # the output's logical rank
    d = args[1] if len(args) == 2 else None
    if b or type(d) is not int or d < -r or d >= r:
        return None
    return v.unsqueeze(d + r + 1 if d < 0 else d + 1), 0


def _view_direct(v, b, args):
    # A logically contiguous example views as any size of its numel, and so does the batch
    # (its dim 0 in front, B > 0): the physical view fails exactly when eager's would.
    if b or len(args) != 2 or not v.shape[0] or not _logically_contiguous(v):
        return None
    return v.view([v.shape[0], *args[1]]), 0


def _unsafe_view_direct(v, b, args):
    if b or len(args) != 2 or not v.shape[0] or not _logically_contiguous(v):
        return None
    return aten._unsafe_view.default(v, [v.shape[0], *args[1]]), 0


def _logically_contiguous(v):
    """Whether one example of ``v`` (batch dim 0) is contiguous: its dims are one chunk."""
    if v.is_contiguous():
        return True
    expected = 1
    for n, s in zip(reversed(v.shape[1:]), reversed(v.stride()[1:])):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _expand_direct(v, b, args):
    if b or len(args) != 2:
        return None
    size = args[1]
    extra = len(size) - (v.dim() - 1)
    if extra < 0:
        return None
    for s in size[:extra]:
        if type(s) is not int or s < 0:  # eager refuses -1 in a new leading dim
            return None
    for _ in range(extra):
        v = v.unsqueeze(1)
    return v.expand([v.shape[0], *size]), 0


def _select_direct(v, b, args):
    # x[i] and x.select(d, i): an index in range (eager's IndexError is the rule's to raise).
    r = v.dim() - 1
    if b or r == 0 or len(args) != 3 or type(args[2]) is not int:
        return None
    p = _phys_dim(args[1], r)
    if p is None or not -v.shape[p] <= args[2] < v.shape[p]:
        return None
    return v.select(p, args[2]), 0


def _slice_direct(v, b, args):
    # x[a:b:s] (clamped as eager clamps): plain int or None bounds, a positive int step.
    r = v.dim() - 1
    if b or r == 0 or not 1 <= len(args) <= 5:
        return None
    dim, start, end, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1:])[:4]
    if type(step) is not int or step < 1 or any(
            a is not None and type(a) is not int for a in (start, end)):
        return None
    p = _phys_dim(dim, r)
    if p is None:
        return None
    return aten.slice.Tensor(v, p, start, end, step), 0


def _detach_direct(v, b, args):
    return (v.detach(), b) if len(args) == 1 else None


def _alias_direct(v, b, args):
    return (aten.alias.default(v), b) if len(args) == 1 else None


DIRECT = {
    aten.t.default: (t_rule, _t_direct),
    aten.transpose.int: (RULES[aten.transpose.int], _transpose_direct),
    aten.permute.default: (permute_rule, _permute_direct),
    aten.unsqueeze.default: (unsqueeze_rule, _unsqueeze_direct),
    aten.view.default: (view_rule, _view_direct),
    aten._unsafe_view.default: (unsafe_view_rule, _unsafe_view_direct),
    aten.expand.default: (expand_rule, _expand_direct),
    aten.select.int: (RULES[aten.select.int], _select_direct),
    aten.slice.Tensor: (RULES[aten.slice.Tensor], _slice_direct),
    aten.detach.default: (same_layout_rule, _detach_direct),
    aten.alias.default: (same_layout_rule, _alias_direct),
}


def direct_view(func, rule):
    """The direct call of ``func`` when ``rule`` is the view rule it belongs to, else None."""
    entry = DIRECT.get(func)
    return entry[1] if entry is not None and entry[0] is rule else None
