"""Data-dependent control flow that vmap and grad see through: ``cond``, ``switch``,
``while_loop``, ``scan``.

Signatures and results are those of ``torch.cond`` and torch's ``while_loop`` / ``scan``
higher-order ops (a tuple of carried values; ``(final_carry, stacked_outputs)``), plus
``switch`` (``jax.lax.switch``).  Outside any transform they are plain eager Python control flow.

Under ``vmap`` ftrans runs eagerly, so it can *look* at the predicate, which compiler-first
systems cannot:

- a predicate whose value agrees across the batch runs that one branch on the whole batch
  (no select, no wasted work);
- a divergent one partitions the batch: each branch runs, under an inner ``vmap``, on just the
  examples that take it, and the results are scattered back (``_C/lanes.py``).  ``torch.cond``
  under ``torch.vmap`` and ``jax.lax.cond`` under ``jax.vmap`` run both branches on every
  example and select;
- ``while_loop`` retires examples as they finish: the body runs on the examples still looping,
  so the total work is the sum of the per-example trip counts, not ``batch * max``.

Everything is ordinary differentiable torch ops on the examples that actually ran, so ``grad``,
``vjp``, ``jvp``, ``jacrev``... work through all four, ``while_loop`` included (its trip count
is known once it has run).  Inside an ``ftrans.compile`` trace predicate values are unknown:
``cond``/``switch`` then run every branch and select, which keeps the trace static.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import torch

from . import _pytree
from ._C import lanes as _lanes, levels as _levels
from ._C.batched import BatchedTensor
from ._C.dispatch import only_vmap_mode as _only_vmap_mode
from .vmap import _vmap_once, vmap

__all__ = ["cond", "switch", "while_loop", "scan", "stats", "reset_stats"]

_NoPythonDispatch = torch._C._DisableTorchDispatch
_DisableTF = torch._C.DisableTorchFunctionSubclass
_NO_GUARD = contextlib.nullcontext()

_STATS = {"while_body_lanes": 0, "while_iterations": 0, "branch_lanes": 0}


def stats() -> dict:
    """Counters for tests and benchmarks: ``while_body_lanes`` (examples that ran a
    ``while_loop`` body, summed over iterations), ``while_iterations``, ``branch_lanes``
    (examples run through a partitioned ``cond``/``switch`` branch)."""
    return dict(_STATS)


def reset_stats() -> None:
    for k in _STATS:
        _STATS[k] = 0


# ----------------------------------------------------------------------------------------------
# Validation (torch.cond's messages and exception types)
# ----------------------------------------------------------------------------------------------

def _check_operands(form, operands, what="operands"):
    if not isinstance(operands, (tuple, list)):
        raise RuntimeError(
            f"{form}: Expect {what} to be a tuple of possibly nested dict/list/tuple of "
            f"tensors, but got {type(operands).__name__}."
        )


def _check_pred(form, pred):
    if isinstance(pred, torch.Tensor):
        with _DisableTF():  # (a batched pred's per-example numel, without the TF hop)
            numel = pred.numel()
        if numel != 1:
            raise RuntimeError(
                f"{form}: Expected pred to be bool or single-element tensor, but got a tensor "
                f"of shape {tuple(pred.shape)} (per example)."
            )
        return
    if not isinstance(pred, (bool, int, float)):
        raise RuntimeError(f"{form}: Expected pred to be bool or tensor, but got {pred!r}.")


def _is_traced(t) -> bool:
    # Under ftrans.compile (make_fx with fake tensors) predicate values are unknown.
    if type(t) is torch.Tensor:  # the common case, without the import
        return False
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor) or type(t).__name__ == "FunctionalTensor"


# ----------------------------------------------------------------------------------------------
# cond / switch
# ----------------------------------------------------------------------------------------------

def cond(pred, true_fn: Callable, false_fn: Callable, operands: Sequence = ()) -> Any:
    """``true_fn(*operands)`` if ``pred`` else ``false_fn(*operands)``, per example under vmap.

    Args:
        pred: a bool or a one-element tensor (per example under vmap).
        true_fn, false_fn: callables taking ``*operands`` and returning tensors (or pytrees of
            tensors) of the same structure, shapes and dtypes.
        operands: a tuple (or list) of pytrees of tensors.

    Example:
        >>> import torch, ftrans
        >>> f = lambda x: ftrans.cond(x.sum() > 0, lambda v: v.sin(), lambda v: v.cos(), (x,))
        >>> x = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
        >>> torch.allclose(ftrans.vmap(f)(x), torch.stack([x[0].sin(), x[1].cos()]))
        True
    """
    form = "ftrans.cond(pred, true_fn, false_fn, operands)"
    _check_pred(form, pred)
    if not callable(true_fn) or not callable(false_fn):
        raise RuntimeError(f"{form}: Expect both branches to be callable.")
    _check_operands(form, operands)
    if not isinstance(pred, torch.Tensor):
        return (true_fn if pred else false_fn)(*operands)
    if type(pred) is not BatchedTensor:
        if _is_traced(pred):
            return _select(pred.reshape(()).bool(), [true_fn, false_fn], operands, form, True)
        return (true_fn if bool(pred) else false_fn)(*operands)
    return _dispatch_branches(pred, [true_fn, false_fn], operands, form, True)


def switch(index, branches: Sequence[Callable], operands: Sequence = ()) -> Any:
    """``branches[index](*operands)``, per example under vmap (``jax.lax.switch``).

    ``index`` is an int or a one-element integer tensor, clamped to ``[0, len(branches) - 1]``.

    Example:
        >>> import torch, ftrans
        >>> fs = [lambda v: v + 1, lambda v: v * 10, lambda v: -v]
        >>> ftrans.vmap(lambda i, v: ftrans.switch(i, fs, (v,)))(torch.tensor([0, 2, 1]),
        ...                                                       torch.tensor([1., 2., 3.]))
        tensor([ 2., -2., 30.])
    """
    form = "ftrans.switch(index, branches, operands)"
    branches = list(branches) if isinstance(branches, (list, tuple)) else None
    if not branches or not all(callable(b) for b in branches):
        raise RuntimeError(f"{form}: branches must be a non-empty sequence of callables.")
    _check_operands(form, operands)
    k = len(branches)
    if isinstance(index, torch.Tensor):
        if index.numel() != 1 or index.is_floating_point() or index.is_complex():
            raise RuntimeError(
                f"{form}: index must be an int or a one-element integer tensor, got a "
                f"{index.dtype} tensor of shape {tuple(index.shape)} (per example)."
            )
        index = index.reshape(()).long().clamp(0, k - 1)
        if type(index) is BatchedTensor:
            return _dispatch_branches(index, branches, operands, form)
        if _is_traced(index):
            return _select(index, branches, operands, form, False)
        index = int(index)
    elif not isinstance(index, int) or isinstance(index, bool):
        raise RuntimeError(f"{form}: index must be an int or a tensor, got {index!r}.")
    return branches[min(max(index, 0), k - 1)](*operands)


def _dispatch_branches(index, branches, operands, form, is_pred=False):
    """``index``: a BatchedTensor of branch numbers (0-dim per example), or of ``cond``'s
    predicate (``is_pred``: branch 0 where it is true, branch 1 elsewhere)."""
    inner = index
    while type(inner) is BatchedTensor:
        inner = inner.value
    if _is_traced(inner):
        if is_pred:
            index = index.reshape(()).bool()
        return _select(index, branches, operands, form, is_pred)
    levels = _lanes.vmap_levels(index)
    flat = _lanes.gather(index, levels)
    with _quiet(flat):
        if flat.dim() != 1:
            flat = flat.reshape(-1)
        if is_pred:
            if flat.dtype != torch.bool:
                flat = flat.bool()
            idx = flat.nonzero().reshape(-1)
            n = flat.shape[0]
            if idx.shape[0] in (0, n):  # the batch agrees: one branch, no partition
                return branches[0 if idx.shape[0] else 1](*operands)
            takes = [idx, flat.logical_not().nonzero().reshape(-1)]
        else:
            first = flat[0]
            if bool((flat == first).all()):
                return branches[int(first)](*operands)  # the batch agrees: no partition
            takes = [(flat == k).nonzero().reshape(-1) for k in range(len(branches))]
    return _partitioned(levels, flat.shape[0], takes, branches, operands, form)


def _quiet(t):
    """Python dispatch off around bookkeeping on the plain tensor ``t`` and the lanes (branch
    indices, ``index_select``, the scatter) when only vmap's own mode could see those ops:
    each would otherwise pass through the vmap mode (several microseconds) to run as it is.
    Autograd still records (it sits above Python dispatch).  Anything else pushed (a tracing
    or user dispatch mode) must see the ops: no change then."""
    if type(t) is not torch.Tensor or not _only_vmap_mode():
        return _NO_GUARD
    return _NoPythonDispatch()


def _partitioned(levels, n, takes, branches, operands, form):
    """Each branch under an inner vmap on the lanes ``takes[k]`` (a 1-d index tensor each).

    Operands that are a flat tuple (or list) of tensors, and branches returning one tensor,
    skip the pytree round trips; a branch closing over no per-example value is entered as it
    is (no closure rebinding, no argument re-assembly)."""
    if all(isinstance(x, torch.Tensor) for x in operands):
        leaves, spec = list(operands), None  # passed positionally as they are
        tensor_pos = range(len(leaves))
    else:
        leaves, spec = _pytree.tree_flatten(tuple(operands))
        tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    lanes = [_lanes.gather(leaves[i], levels) for i in tensor_pos]
    only_vmap = _only_vmap_mode()
    quiet = only_vmap and all(type(v) is torch.Tensor for v in lanes)
    first = None  # the first branch's (output leaves, spec): the others must match it
    parts, perms = [], []  # per branch that ran: its output leaves, its lanes
    outs = plain = None  # per output leaf: the merged tensor, and whether every part is plain
    # Random ops draw per lane at the inner level (``_lanes_draw``, written out: most levels
    # refuse randomness and then nothing changes).
    rnd = _randomness(levels)
    saved = [lv.randomness for lv in levels] if rnd != "error" else None
    if saved:
        for lv in levels:
            lv.randomness = "same"
    try:
        for k, branch in enumerate(branches):
            idx = takes[k]
            m = idx.shape[0]
            if m == 0:
                continue
            _STATS["branch_lanes"] += m
            cells = _lanes.closure_tensors(branch) \
                if isinstance(branch, type(_partitioned)) else ()
            with _NoPythonDispatch() if quiet else _NO_GUARD:
                subset = [v.index_select(0, idx) for v in lanes]
            if cells:
                subset += [_lanes.gather(v, levels).index_select(0, idx) for _, v in cells]
            if spec is None and not cells:
                fn = branch  # called with the lanes as its arguments, as the caller wrote it
            else:
                fn = functools.partial(_call_branch, branch, cells, spec, leaves, tensor_pos)
            out_k = _branch_leaves(_run_lanes(fn, subset, m, rnd), first, form)
            del subset
            if first is None:  # (metadata only: the parts themselves are not kept)
                first = ([(t.shape[1:], t.dtype) for t in out_k[0]], out_k[1])
                outs, plain = [None] * len(out_k[0]), [True] * len(out_k[0])
            perms.append(idx)
            # Each example's result written once, in place into a fresh tensor (autograd
            # records the writes; half the traffic of concatenating and reordering), as soon
            # as its branch has run: the part is still in cache.
            parts.append(out_k[0])  # (plain parts dropped below once written)
            for j, part in enumerate(out_k[0]):
                _lanes.check_not_batched([part], levels, form)
                if type(part) is not torch.Tensor and plain[j]:
                    plain[j] = False  # out of place after all: the written parts are needed
                    for p, i in zip(parts, perms):
                        if p[j] is None:
                            p[j] = outs[j].index_select(0, i)
                    outs[j] = None
                if not plain[j]:
                    continue
                with _NoPythonDispatch() if only_vmap else _NO_GUARD:
                    if outs[j] is None:
                        out = part.new_empty((n,) + tuple(part.shape[1:]))
                        if type(out) is not torch.Tensor:  # vmap's FreshTensor (_C/fresh.py)
                            out = out.as_subclass(torch.Tensor)
                        outs[j] = out
                    outs[j].index_copy_(0, idx, part)
                out_k[0][j] = None  # the memory goes back now, not at the end
            out_k = part = None
    finally:
        if saved:
            for lv, r in zip(levels, saved):
                lv.randomness = r
    inverse = None
    merged = []
    for j, out in enumerate(outs):
        if not plain[j]:  # a part still batched at an outer level: out of place
            if inverse is None:
                perm = torch.cat(perms) if len(perms) > 1 else perms[0]
                inverse = torch.empty_like(perm)
                inverse[perm] = torch.arange(n, device=perm.device)
            out = torch.cat([p[j] for p in parts]).index_select(0, inverse)
        merged.append(_lanes.scatter(out, levels))
    if first[1] is None:
        return merged[0]
    return _pytree.tree_unflatten(first[1], merged)


def _randomness(levels) -> str:
    """The inner vmap's ``randomness`` for lanes of the vmaps ``levels``: ``"error"`` if any of
    them refuses random ops, else ``"different"`` if any draws per example, else ``"same"``."""
    modes = {lv.randomness for lv in levels}
    for m in ("error", "different"):
        if m in modes:
            return m
    return "same"


@contextlib.contextmanager
def _lanes_draw(levels):
    """While branches run under an inner vmap over the lanes of ``levels``, random ops draw
    per lane at the inner level (its ``randomness``, from :func:`_randomness`); the partitioned
    levels draw nothing of their own meanwhile (one shared draw: their examples are the inner
    level's lanes), so a draw is not batched twice."""
    rnd = _randomness(levels)
    saved = [lv.randomness for lv in levels]
    if rnd != "error":
        for lv in levels:
            lv.randomness = "same"
    try:
        yield rnd
    finally:
        for lv, r in zip(levels, saved):
            lv.randomness = r


def _run_lanes(fn, inputs, n, randomness="error"):
    """``fn(*inputs)`` under an inner vmap over ``n`` lanes, each input with the lanes at dim 0.
    Enters the vmap with its batch size and flat inputs already known (``vmap._vmap_once``):
    no ``in_dims`` to match, and a branch with no per-example input still gets ``n`` lanes."""
    if any(x.is_nested for x in inputs):  # nested tensors: vmap's own entry handles them
        return vmap(fn, randomness=randomness)(*inputs)
    k = len(inputs)
    spec = _FLAT_SPECS.get(k)
    if spec is None:
        spec = _FLAT_SPECS[k] = _pytree.tree_structure((0,) * k)
    return _vmap_once(fn, 0, 0, randomness, inputs, spec, [0] * k, n, {})


_FLAT_SPECS: dict = {}  # number of inputs -> the pytree spec of a flat tuple of that many


def _call_branch(fn, cells, spec, args, tensor_pos, *xs):
    """``fn`` on the operands ``args`` (flat leaves of ``spec``; None: positional as they are)
    with the tensors at ``tensor_pos`` replaced by the lanes ``xs``, and its closure cells
    ``cells`` (see :func:`_lanes.closure_tensors`) rebound to the lanes after them."""
    full = list(args)
    k = len(tensor_pos)
    for i, x in zip(tensor_pos, xs[:k]):
        full[i] = x
    if cells:
        fn = _lanes.rebind_closure(fn, dict(zip((i for i, _ in cells), xs[k:])))
    return fn(*(full if spec is None else _pytree.tree_unflatten(spec, full)))


def _with_rebound_closure(fn):
    """(factory: {cell index: value} -> function, [(cell index, batched value)])."""
    cells = _lanes.closure_tensors(fn) if isinstance(fn, type(_with_rebound_closure)) else []
    if not cells:
        return (lambda _: fn), []
    return functools.partial(_lanes.rebind_closure, fn), cells


def _branch_leaves(result, first, form):
    """(output leaves, pytree spec) of one branch's ``result`` (spec None for a single tensor),
    checked against ``first``: the first branch's (per leaf (per-example shape, dtype), spec),
    None when ``result`` is the first."""
    if isinstance(result, torch.Tensor):
        leaves, spec = [result], None
    else:
        leaves, spec = _pytree.tree_flatten(result)
    for b in leaves:
        if not isinstance(b, torch.Tensor):
            raise RuntimeError(f"{form}: branch outputs must be tensors, got {type(b).__name__}.")
    if first is None:
        return leaves, spec
    ref, ref_spec = first
    if spec != ref_spec:
        s0 = ref_spec if ref_spec is not None else _pytree.tree_structure(0)  # one leaf
        s1 = spec if spec is not None else _pytree.tree_structure(0)
        if s0 != s1:
            raise RuntimeError(
                f"{form}: the branches returned different structures: {s0} and {s1}."
            )
    for j, ((shape, dtype), b) in enumerate(zip(ref, leaves)):
        if shape != b.shape[1:] or dtype != b.dtype:
            raise RuntimeError(
                f"{form}: the branches returned output {j} with different metadata: shape "
                f"{tuple(shape)}, dtype {dtype} vs shape {tuple(b.shape[1:])}, dtype "
                f"{b.dtype} (per example). Both branches must return the same shapes and dtypes."
            )
    return leaves, spec


def _select(index, branches, operands, form, is_pred):
    """Every branch on the whole batch, then a per-example select (static shapes: traces)."""
    outs = [b(*operands) for b in branches]
    leaves = [_pytree.tree_flatten(o) for o in outs]
    spec = leaves[0][1]
    if any(s != spec for _, s in leaves[1:]):
        raise RuntimeError(f"{form}: the branches returned different structures.")
    merged = []
    for j in range(len(leaves[0][0])):
        acc = leaves[-1][0][j]
        for k in range(len(branches) - 2, -1, -1):
            take = index if is_pred and k == 0 else (index == k)
            acc = torch.where(take, leaves[k][0][j], acc)
        merged.append(acc)
    return _pytree.tree_unflatten(spec, merged)


# ----------------------------------------------------------------------------------------------
# while_loop
# ----------------------------------------------------------------------------------------------

def while_loop(cond_fn: Callable, body_fn: Callable, carried_inputs: Sequence) -> tuple:
    """Run ``carry = body_fn(*carry)`` while ``cond_fn(*carry)`` holds; return the carry tuple.

    Under vmap each example loops until its own predicate fails: finished examples retire and
    the body runs on the rest only.  Differentiable in reverse and forward mode.

    Example:
        >>> import torch, ftrans
        >>> halve = lambda v: ftrans.while_loop(lambda v: v > 1, lambda v: (v / 2,), (v,))[0]
        >>> ftrans.vmap(halve)(torch.tensor([0.5, 3.0, 100.0]))
        tensor([0.5000, 0.7500, 0.7812])
    """
    form = "ftrans.while_loop(cond_fn, body_fn, carried_inputs)"
    if not callable(cond_fn) or not callable(body_fn):
        raise RuntimeError(f"{form}: cond_fn and body_fn must be callable.")
    if not isinstance(carried_inputs, (tuple, list)):
        raise RuntimeError(
            f"{form}: carried_inputs must be a tuple or list, got "
            f"{type(carried_inputs).__name__}."
        )
    carry = tuple(carried_inputs)
    spec = _pytree.tree_structure(carry)
    while True:
        pred = cond_fn(*carry)
        _check_loop_pred(form, pred)
        if type(pred) is BatchedTensor:
            values = _lanes.raw(pred)
            if not bool(values.all()):
                if bool(values.any()):
                    return _while_partitioned(cond_fn, body_fn, carry, pred, spec, form)
                return carry
            batch = _lanes.lane_count(_lanes.vmap_levels(pred))
        elif not bool(pred):
            return carry
        else:
            batch = 1
        _STATS["while_iterations"] += 1
        _STATS["while_body_lanes"] += batch
        carry = _check_body(form, body_fn(*carry), spec)


def _check_loop_pred(form, pred):
    if isinstance(pred, torch.Tensor):
        if pred.numel() != 1 or pred.dtype != torch.bool:
            raise RuntimeError(
                f"{form}: cond_fn must return a boolean scalar tensor, got a {pred.dtype} tensor "
                f"of shape {tuple(pred.shape)} (per example)."
            )
    elif not isinstance(pred, bool):
        raise RuntimeError(f"{form}: cond_fn must return a bool or a boolean scalar tensor, got "
                           f"{type(pred).__name__}.")


def _check_body(form, out, spec):
    if isinstance(out, list):
        out = tuple(out)
    if not isinstance(out, tuple):
        out = (out,)
    if _pytree.tree_structure(out) != spec:
        raise RuntimeError(
            f"{form}: body_fn must return a tuple with the structure of carried_inputs "
            f"({spec}), got {_pytree.tree_structure(out)}."
        )
    return out


def _while_partitioned(cond_fn, body_fn, carry, pred, spec, form):
    """The loop over lanes: the body runs on the lanes still looping; finished lanes retire."""
    leaves, _ = _pytree.tree_flatten(carry)
    body, body_cells = _with_rebound_closure(body_fn)
    test, test_cells = _with_rebound_closure(cond_fn)
    # Every level the loop's state can vary along: the carry may pick up levels that the
    # first predicate did not have.
    seen = {}
    for t in [pred] + leaves + [v for _, v in body_cells + test_cells]:
        if isinstance(t, torch.Tensor):
            for level in _lanes.vmap_levels(t):
                seen[level.id] = level
    levels = [seen[i] for i in sorted(seen, reverse=True)]
    n = _lanes.lane_count(levels)
    tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    state = [_lanes.gather(leaves[i], levels) for i in tensor_pos]
    bcells = [_lanes.gather(v, levels) for _, v in body_cells]
    tcells = [_lanes.gather(v, levels) for _, v in test_cells]
    live = _lanes.gather(pred, levels).reshape(n)
    active = live.nonzero().reshape(-1)
    done_idx = [(~live).nonzero().reshape(-1)]
    done_state = [[s.index_select(0, done_idx[0]) for s in state]]
    state = [s.index_select(0, active) for s in state]
    bcells = [c.index_select(0, active) for c in bcells]
    tcells = [c.index_select(0, active) for c in tcells]

    def unflat(flat):
        full = list(leaves)
        for i, v in zip(tensor_pos, flat):
            full[i] = v
        return _pytree.tree_unflatten(spec, full)

    def run_body(lane, flat, cells):
        f = body(dict(zip((i for i, _ in body_cells), cells)))
        out = _check_body(form, f(*unflat(flat)), spec)
        out_leaves = _pytree.tree_leaves(out)
        return tuple(out_leaves[i] for i in tensor_pos)

    def run_test(lane, flat, cells):
        f = test(dict(zip((i for i, _ in test_cells), cells)))
        p = f(*unflat(flat))
        _check_loop_pred(form, p)
        return p.reshape(()) if isinstance(p, torch.Tensor) else torch.tensor(p)

    while active.numel():
        _STATS["while_iterations"] += 1
        _STATS["while_body_lanes"] += active.numel()
        with _lanes_draw(levels) as rnd:
            state = list(vmap(run_body, randomness=rnd)(active, tuple(state), tuple(bcells)))
            live = vmap(run_test, randomness=rnd)(active, tuple(state), tuple(tcells))
        if type(live) is BatchedTensor:
            _lanes.check_not_batched([live], _lanes.vmap_levels(live), form)
        if bool(live.all()):
            continue
        keep = live.nonzero().reshape(-1)
        gone = (~live).nonzero().reshape(-1)
        done_idx.append(active.index_select(0, gone))
        done_state.append([s.index_select(0, gone) for s in state])
        active = active.index_select(0, keep)
        state = [s.index_select(0, keep) for s in state]
        bcells = [c.index_select(0, keep) for c in bcells]
        tcells = [c.index_select(0, keep) for c in tcells]
    perm = torch.cat(done_idx)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(n, device=perm.device)
    final = list(leaves)
    for j, i in enumerate(tensor_pos):
        parts = [d[j] for d in done_state]
        _lanes.check_not_batched(parts, levels, form)
        final[i] = _lanes.scatter(torch.cat(parts).index_select(0, inverse), levels)
    return tuple(_pytree.tree_unflatten(spec, final))


# ----------------------------------------------------------------------------------------------
# scan
# ----------------------------------------------------------------------------------------------

def scan(combine_fn: Callable, init: Any, xs: Any, *, dim: int = 0,
         reverse: bool = False) -> tuple:
    """Inclusive scan: ``carry, y = combine_fn(carry, x)`` for each slice ``x`` of ``xs``
    along ``dim``; returns ``(final_carry, ys)`` with the ``y`` stacked along ``dim``.

    An unbatched ``init`` with batched ``xs`` works under vmap (the carry becomes batched on
    the first step).

    Example:
        >>> import torch, ftrans
        >>> step = lambda c, x: (c + x, (c + x).clone())
        >>> ftrans.scan(step, torch.zeros(()), torch.tensor([1., 2., 3.]))
        (tensor(6.), tensor([1., 3., 6.]))
    """
    form = "ftrans.scan(combine_fn, init, xs)"
    if not callable(combine_fn):
        raise RuntimeError(f"{form}: combine_fn must be callable.")
    x_leaves, x_spec = _pytree.tree_flatten(xs)
    if not x_leaves or not all(isinstance(x, torch.Tensor) for x in x_leaves):
        raise RuntimeError(f"{form}: xs must be a tensor or a non-empty pytree of tensors.")
    lengths = set()
    for x in x_leaves:
        if x.dim() == 0:
            raise RuntimeError(f"{form}: xs leaves must have at least one dimension to scan.")
        d = dim % x.dim()
        lengths.add(x.shape[d])
    if len(lengths) != 1:
        raise RuntimeError(f"{form}: all xs leaves must have the same size along dim={dim}, got "
                           f"{sorted(lengths)}.")
    length = lengths.pop()
    if length == 0:
        raise RuntimeError(f"{form}: xs is empty along dim={dim}; scan needs at least one slice.")
    init_spec = _pytree.tree_structure(init)
    carry, ys = init, []
    order = range(length - 1, -1, -1) if reverse else range(length)
    for t in order:
        x_t = _pytree.tree_unflatten(x_spec, [x.select(dim % x.dim(), t) for x in x_leaves])
        out = combine_fn(carry, x_t)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise RuntimeError(f"{form}: combine_fn must return a pair (next_carry, y).")
        carry, y = out
        if _pytree.tree_structure(carry) != init_spec:
            raise RuntimeError(
                f"{form}: combine_fn's next_carry has structure {_pytree.tree_structure(carry)}, "
                f"expected the structure of init ({init_spec})."
            )
        ys.append(y)
    if reverse:
        ys.reverse()
    y_leaves = [_pytree.tree_flatten(y)[0] for y in ys]
    y_spec = _pytree.tree_structure(ys[0])
    stacked = [torch.stack([yl[j] for yl in y_leaves], dim=dim) for j in range(len(y_leaves[0]))]
    return carry, _pytree.tree_unflatten(y_spec, stacked)


# ----------------------------------------------------------------------------------------------
# torch's own cond / while_loop / scan inside ftrans transforms
# ----------------------------------------------------------------------------------------------
# Eagerly, torch runs its control-flow operators through dynamo, which cannot trace ftrans's
# wrappers and levels.  While an ftrans transform is live on this thread (and dynamo is not
# compiling), the public functions run ftrans's versions instead; otherwise they are torch's,
# untouched.  The functions are replaced where torch exposes them, at ftrans's import.

def _ftrans_active() -> bool:
    if _compiling():  # first: under dynamo this folds to a constant, no thread-local is read
        return False
    return bool(_levels.current_stack())


_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _torch_while_loop(cond_fn, body_fn, carried_inputs):
    return while_loop(cond_fn, body_fn, carried_inputs)


def _route(original, ours):
    @functools.wraps(original)
    def routed(*args, **kwargs):
        if _ftrans_active():
            return ours(*args, **kwargs)
        return original(*args, **kwargs)

    routed._ftrans_original = original
    return routed


def _install_torch_routes():
    import importlib

    targets = [("torch", "cond", cond), ("torch._higher_order_ops.cond", "cond", cond),
               ("torch._higher_order_ops", "cond", cond),
               ("torch._higher_order_ops.while_loop", "while_loop", _torch_while_loop),
               ("torch._higher_order_ops", "while_loop", _torch_while_loop),
               ("torch._higher_order_ops.scan", "scan", scan),
               ("torch._higher_order_ops", "scan", scan)]
    for module_name, name, ours in targets:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - a torch without the operator
            continue
        original = getattr(module, name, None)
        if callable(original) and not hasattr(original, "_ftrans_original"):
            setattr(module, name, _route(original, ours))


_install_torch_routes()
