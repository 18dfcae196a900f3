"""``ftrans.compile``: trace a transformed function once per input signature, replay flat aten.

Python dispatch costs microseconds per op; a per-sample-gradient step runs hundreds of ops.
``compile`` runs the function once under ``make_fx`` with fake tensors, which records the
*physical* aten ops that the batching rules emitted (no BatchedTensor survives tracing), and
caches the resulting ``GraphModule``.  Later calls with the same signature replay that flat graph
directly: no levels, no wrappers, no rules.  On CUDA the replay can be captured in a CUDA graph
(one launch for the whole step), and the flat graph can be handed to ``torch.compile``.

The cache key is the input signature: the pytree structure of the arguments; for every tensor
its shape, strides, dtype, device, layout and ``requires_grad``; for Python numbers their type;
other leaves by value (or identity if unhashable); plus the global torch state a trace depends
on (grad and inference mode, default dtype, autocast, deterministic algorithms).  Each trace of
a signature also carries a guard (``ftrans/_guards.py``): a check, generated once per trace, of
everything else the function read: module modes, parameters and buffers, Python values in
closures, globals and objects, ``.item()`` of tensors it closes over, the values of Python
number arguments it specialized on.  A failing guard retraces (at most ``RETRACE_LIMIT``
times per signature, then the signature runs eagerly with a ``CompileWarning``).  A Python
number argument whose value changes is tried once as a 0-dim tensor input of the replay; it
stays one when the trace only computes with it (a learning-rate schedule does not retrace).

Tracing leaves no trace: in-place updates that ran on real tensors during tracing (a BatchNorm
counter) are undone, so each call applies one eager call's updates.  A trace that changed Python
state (appended to a list, set an attribute: a side effect a replay would not repeat) is undone
and its signature runs eagerly with a ``CompileWarning``, as does one that reads the value of
a tensor it cannot guard (``.item()`` of an intermediate, or of a tensor it updates), and Python
control flow on traced values (fake tensors raise).  ``check=True`` compares each trace's first
replay with an eager call.  docs/compile.md lists what is guarded and what is not seen.

A signature whose inputs, or whose captured tensors, require grad (under grad mode) is traced
with its vjp and replayed inside one autograd node (``ftrans/_joint.py``): ``.backward()`` on
its results gives the eager ``.grad``; a double backward through it is refused.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch

from . import _joint, _pytree
from ._fastgraph import fast_graph
from ._C import levels as _levels
from ._guards import Reads, global_state
from ._statewatch import StateWatch

__all__ = ["compile", "CompileCheckError"]

RETRACE_LIMIT = 8  # traces per input signature before it runs eagerly


class CompileWarning(UserWarning):
    """ftrans.compile could not trace a signature and runs it eagerly."""


class CompileCheckError(AssertionError):
    """``ftrans.compile(fn, check=True)``: a replay differed from an eager call."""


class _TraceFailed(Exception):
    """Why a signature cannot be replayed (the message of its CompileWarning)."""


_NUMBERS = (int, float)


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.stride(), x.dtype, x.device, x.layout, x.requires_grad)
    if type(x) in _NUMBERS:  # its value is checked by the entry's guard, or an input of it
        return ("N", type(x))
    try:
        hash(x)
        return ("V", type(x), x)
    except TypeError:
        return ("I", id(x))


def _aliasing(leaves):
    """Which tensor inputs share memory, as ``((i, j), ...)`` (input ``i`` shares the storage of
    the earlier input ``j``); ``()`` for the usual call.  Part of the signature: a trace made
    with separate inputs assumed them separate (its simplifications, a CUDA graph's static
    input copies), and a function may refuse aliased inputs eagerly."""
    first, out = {}, None
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor) and x.layout is torch.strided:
            try:
                base = x.data_ptr() - x.storage_offset() * x.element_size()
            except RuntimeError:  # no memory (a tracer's tensor)
                continue
            if not base:
                continue
            j = first.setdefault(base, i)
            if j != i:
                out = out or []
                out.append((i, j))
    return tuple(out) if out else ()


def compile(
    fn: Callable,
    *,
    cuda_graph: Optional[bool] = None,
    backend: Optional[str] = None,
    clone_outputs: bool = True,
    reuse_outputs: bool = True,
    check: bool = False,
) -> Callable:
    """Trace ``fn`` once per input signature into a flat aten graph and replay it.

    A replay returns what ``fn`` returns eagerly, or the signature runs eagerly with a
    ``CompileWarning`` that says why: see the module docstring and docs/compile.md for what is
    guarded.

    Args:
        fn: any function of tensors (pytrees allowed), typically ``vmap(grad(loss))``.
        cuda_graph: capture the replay in a CUDA graph.  Default: on when every tensor input is
            on a CUDA device.
        backend: if given (e.g. ``"inductor"``), hand the flat graph to ``torch.compile`` with
            this backend.
        clone_outputs: with CUDA graphs, return copies of the graph's static output buffers
            (the next replay overwrites them).  Set False to get the buffers themselves.
        reuse_outputs: on CPU, write large outputs (>= 1 MiB) into the memory of the previous
            call's results once the caller has dropped them, instead of faulting in fresh
            pages (per-sample gradients: up to several times faster).  Results are never
            shared with a live tensor; the function keeps the last results' memory alive.
        check: a debugging aid.  The first replay of each trace is compared with an eager
            call (on the same state and random seed: the eager call's in-place updates are
            undone first); a difference in an output, or in a tensor the call updates in
            place, raises ``ftrans.CompileCheckError`` naming it.

    Example:
        >>> import torch, ftrans
        >>> w = torch.randn(3)
        >>> f = ftrans.compile(ftrans.vmap(lambda x: (x * w).sum()))
        >>> torch.allclose(f(torch.ones(4, 3)), torch.ones(4, 3) @ w)
        True
    """
    cache: dict = {}
    opts = (cuda_graph, backend, clone_outputs, reuse_outputs, check)

    @functools.wraps(fn)
    def compiled(*args, **kwargs):
        leaves, spec = _pytree.tree_flatten((args, kwargs))
        key = (spec, tuple(_leaf_key(x) for x in leaves), global_state(),
               bool(_levels.current_stack()), _aliasing(leaves))
        sig = cache.get(key)
        if sig is None:
            sig = cache[key] = _Signature(fn, spec, opts, key[-1])
        return sig(leaves)

    compiled.cache = cache  # introspection: one entry per input signature
    return compiled


class _Signature:
    """The traces of one input signature, each valid while its guard holds (at most
    ``RETRACE_LIMIT``), or the eager fallback."""

    def __init__(self, fn, spec, opts, aliasing=()):
        self.fn, self.spec, self.opts, self.aliasing = fn, spec, opts, aliasing
        self.entries: list = []
        self.eager = None
        self.dynamic_tried = False
        self.dynamic = ()  # Python number arguments that are replay inputs

    @property
    def runner(self):  # the newest trace's runner (introspection, tests)
        return (self.entries[-1] if self.entries else self.eager).runner

    def __call__(self, leaves):
        if self.eager is not None:
            return self.eager(leaves)
        failed = None
        for entry in self.entries:
            i = entry.guard(leaves)
            if i < 0:
                return entry(leaves)
            failed = (entry, i)
        if len(self.entries) >= RETRACE_LIMIT:
            what = failed[0].reads.describe(failed[1])
            return self._eager(
                f"retraced {RETRACE_LIMIT} times for one input signature (the last time because "
                f"{what} changed); running it eagerly. Pass values that change every call as "
                "tensor arguments, or as Python numbers that are only computed with.", leaves)
        try:
            entry = None
            if failed is not None and not self.dynamic_tried:
                entry = self._try_dynamic(failed[0], leaves)
            if entry is None:
                entry = _trace(self.fn, leaves, self.spec, self.opts, dynamic=self.dynamic,
                               aliasing=self.aliasing)
        except _TraceFailed as e:
            return self._eager(str(e), leaves)
        self.entries.append(entry)
        return entry(leaves)

    def _eager(self, why, leaves):
        self.eager = _eager(self.fn, self.spec, why)
        return self.eager(leaves)

    def _try_dynamic(self, last, leaves):
        """Python numbers whose value changed: try them as 0-dim tensor inputs of one trace."""
        changed = [i for i, v in last.numbers.items() if leaves[i] != v]
        if not changed:
            return None
        self.dynamic_tried = True
        try:
            entry = _trace(self.fn, leaves, self.spec, self.opts, dynamic=changed,
                           aliasing=self.aliasing)
        except _TraceFailed:  # used in Python control flow (or shapes): keep specializing
            return None
        if entry.out_meta != last.out_meta or entry.consts != last.consts:
            return None  # the number reached an output, or changed a dtype: not equivalent
        self.dynamic = tuple(changed)
        return entry


def _trace(fn, leaves, spec, opts, dynamic=(), aliasing=()):
    from torch.fx.experimental.proxy_tensor import make_fx

    backend, check = opts[1], opts[4]
    tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    example = [leaves[i] for i in tensor_pos]
    # On the inputs' device when they share one CUDA device: a CPU scalar would be read on the
    # host, and frozen into a CUDA graph at capture.
    devs = {t.device for t in example}
    dyn_dev = devs.pop() if len(devs) == 1 and example[0].device.type == "cuda" else None
    dyn = [(i, torch.float64 if type(leaves[i]) is float else torch.int64, dyn_dev)
           for i in dynamic]
    grad_on = torch.is_grad_enabled()
    diff_pos = [k for k, t in enumerate(example) if grad_on and t.requires_grad]

    name = getattr(fn, "__name__", "fn")
    reads = Reads()
    reads.function(fn, name)
    numbers = {}
    for i, x in enumerate(leaves):
        if type(x) in _NUMBERS and i not in dynamic:
            numbers[i] = x
            reads.leaf_value(i, x, f"the Python number argument {_leaf_name(spec, i)}")
        elif not isinstance(x, torch.Tensor):
            reads.leaf(i, x, _leaf_name(spec, i))
    reads.finish()
    if reads.unguardable:
        raise _TraceFailed(f"{reads.unguardable}; running it eagerly.")

    template = list(leaves)
    positions = tensor_pos + [i for i, _, _ in dyn]
    out_box = []
    watch = StateWatch()

    def flat_fn(*tensors):
        full = list(template)
        for i, t in zip(positions, tensors):
            full[i] = t
        args, kwargs = _pytree.tree_unflatten(spec, full)
        with watch:
            out = fn(*args, **kwargs)
        out_leaves, out_spec = _pytree.tree_flatten(out)
        out_box.append((out_spec, [isinstance(o, torch.Tensor) for o in out_leaves],
                        [None if isinstance(o, torch.Tensor) else o for o in out_leaves],
                        [(tuple(o.shape), o.dtype, o.device, o.requires_grad)
                         for o in out_leaves if isinstance(o, torch.Tensor)]))
        return [o for o in out_leaves if isinstance(o, torch.Tensor)]

    dyn_example = [torch.scalar_tensor(leaves[i], dtype=d, device=dev) for i, d, dev in dyn]
    try:
        gm = make_fx(flat_fn, tracing_mode="fake", _allow_non_fake_inputs=True)(
            *example, *dyn_example)
    except Exception as e:  # data-dependent control flow, or an op fake tensors cannot run
        reads.restore()  # what the partial trace stored (a fake loss in a log) is put back
        raise _TraceFailed(
            f"could not trace this input signature ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); running it eagerly. Python "
            "control flow on tensor values cannot be traced: use torch.where instead.") from None
    finally:
        watch.undo()  # tracing ran in-place updates of real tensors: put them back

    if aliasing:
        # The trace ran on separate (fake) inputs: a graph that updates one of the inputs
        # sharing memory would not see the update through the other.
        written = {tensor_pos[k] for k in _written_by(gm)[0] if k < len(tensor_pos)}
        for i, j in aliasing:
            if i in written or j in written:
                raise _TraceFailed(
                    f"its inputs {_leaf_name(spec, j)} and {_leaf_name(spec, i)} share memory "
                    "and it updates one of them in place (a trace assumes separate inputs); "
                    "running it eagerly.")
    guard = reads.compile()
    changed = guard(leaves)
    if changed >= 0:  # the trace changed Python state a replay would not change again
        reads.restore()
        raise _TraceFailed(
            f"it changed {reads.describe(changed)} while traced (a side effect a replay would "
            "not repeat, or a traced value stored outside the function); running it eagerly.")
    for t, how, value in watch.reads:
        if id(t) in watch.backups:
            raise _TraceFailed(_value_read(reads, t, "a tensor it also updates in place"))
        if not reads.value_read(t, how, value):
            raise _TraceFailed(_value_read(reads, t, "a tensor computed during the call"))
    if any(n.op == "call_function" and n.target in _OFFSET_OPS for n in gm.graph.nodes):
        for i in tensor_pos:  # the trace addresses memory: the storage offset matters too
            reads.leaf_offset(i, leaves[i].storage_offset(), _leaf_name(spec, i))
    guard = reads.compile()

    out_spec, is_tensor, consts, out_meta = out_box[-1]
    lifted = _joint.lifted_tensors(gm) if grad_on else []
    if (diff_pos or lifted) and _levels.current_stack():
        # Inside ftrans's transforms an outer level may differentiate the result again
        # (grad of grad, jvp, hessian), which a replay's backward cannot.
        raise _TraceFailed(
            "called inside an ftrans transform with inputs (or captured tensors) that require "
            "grad: a replay is differentiable only once, and the transform around it may "
            "differentiate it again; running it eagerly. Compile the outermost function.")
    if diff_pos or lifted:
        runner = _differentiable(flat_fn, example + dyn_example, diff_pos, lifted, out_meta,
                                 watch, reads, backend)
    else:
        runner = _plain_runner(gm, example + dyn_example, opts)
    entry = _Replay(runner, tensor_pos, dyn, out_spec, is_tensor, consts)
    entry.guard, entry.reads, entry.numbers, entry.out_meta = guard, reads, numbers, out_meta
    if check:
        entry.checker = _Checker(fn, spec, reads)
    return entry


def _plain_runner(gm, example, opts):
    """The runner of a signature nothing differentiates: the flat graph, compiled by
    ``backend``, captured in a CUDA graph, or writing into pooled outputs on CPU."""
    cuda_graph, backend, clone_outputs, reuse_outputs, _ = opts
    _simplify(gm)
    runner = gm
    if backend is not None:
        runner = torch.compile(gm, backend=backend)
    devices = {t.device.type for t in example}
    use_graph = cuda_graph
    if use_graph is None:
        use_graph = devices == {"cuda"}
    if use_graph:
        runner = _CudaGraphReplay(runner, gm, example, clone_outputs)
    elif reuse_outputs and backend is None and devices <= {"cpu"}:
        from ._outpool import OutputPool, plan

        planned = plan(gm)
        if planned is not None:
            plain, out, n_out = planned
            return OutputPool(fast_graph(plain), fast_graph(out), n_out)
    if runner is gm:
        runner = fast_graph(gm)
    return runner

_OFFSET_OPS = (torch.ops.aten.as_strided.default, torch.ops.aten.as_strided_.default,
               torch.ops.aten.as_strided_scatter.default)


def _differentiable(flat_fn, example, diff_pos, lifted, out_meta, watch, reads, backend):
    """The runner of a signature whose inputs or captured tensors require grad: the function
    traced with its vjp and replayed inside one autograd node (ftrans/_joint.py)."""
    try:
        runner = _joint.trace_joint(flat_fn, example, diff_pos, lifted, out_meta)
    except _joint.JointTraceFailed as e:
        reads.restore()
        raise _TraceFailed(f"{e}; running it eagerly.") from None
    except Exception as e:  # noqa: BLE001 (an op whose backward cannot be traced)
        reads.restore()
        raise _TraceFailed(
            f"could not trace its backward ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); running it eagerly.") from None
    finally:
        watch.undo()
    written, _ = _written_by(runner.fwd)
    if set(written) & set(diff_pos):
        raise _TraceFailed("it updates an input that requires grad in place; a replay "
                           "cannot (running it eagerly)")
    _simplify(runner.fwd)
    _simplify(runner.bwd)
    if backend is not None:
        runner.fwd = torch.compile(runner.fwd, backend=backend)
        runner.bwd = torch.compile(runner.bwd, backend=backend)
    else:
        runner.fwd, runner.bwd = fast_graph(runner.fwd), fast_graph(runner.bwd)
    return runner


def _value_read(reads, t, what):
    hit = reads.tensors.get(id(t))
    name = hit[2] if hit is not None and hit[0] is t else what
    return (f"it reads the value of {name} while traced (`.item()`, `float()`, `tolist()`), "
            "which cannot be guarded; running it eagerly.")


def _leaf_name(spec, i):
    try:
        paths = _leaf_name.cache.get(spec)
        if paths is None:
            paths = _leaf_name.cache[spec] = [
                (f"args[{p[1]}]" if p[0] == 0 else str(p[1])) + _path_str(p[2:])
                for p in spec.paths()]
        return paths[i]
    except Exception:  # noqa: BLE001 (a name for a message only)
        return f"#{i}"


_leaf_name.cache = {}


def _path_str(path):
    return "".join(f"[{k!r}]" for k in path)


def _eager(fn, spec, why):
    """Warn (``CompileWarning``, naming the call) and run this signature eagerly from now on."""
    warnings.warn(f"ftrans.compile({getattr(fn, '__name__', fn)}): {why}", CompileWarning,
                  stacklevel=5)
    return _Eager(fn, spec)


_aten = torch.ops.aten
_NO_OPS = (_aten.detach.default, _aten.alias.default)
# Ops whose result is a view of their first argument (the writes a graph makes through them
# reach that argument: ``_written_by``; chains of them fold into one view: ``_fold_views``).
_VIEW_OPS = frozenset((
    _aten.view.default, _aten._unsafe_view.default, _aten.select.int, _aten.slice.Tensor,
    _aten.transpose.int, _aten.t.default, _aten.permute.default, _aten.unsqueeze.default,
    _aten.squeeze.dim, _aten.squeeze.dims, _aten.squeeze.default, _aten.expand.default,
    _aten.alias.default, _aten.as_strided.default, _aten.diagonal.default,
    _aten.detach.default))


def _simplify(gm):
    """Drop what a replay need not run: nodes whose results are unused, and ``detach``/``alias``
    (no autograd graph is built on replay), which the autodiff transforms leave behind and
    which only cost a call each."""
    graph = gm.graph
    for node in list(graph.nodes):
        # (one applied to an input stays: an output must not BE the caller's tensor object)
        if (node.op == "call_function" and node.target in _NO_OPS
                and node.args[0].op != "placeholder"):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    outputs = {a for n in graph.nodes if n.op == "output" for a in _flat_nodes(n.args)}
    _drop_zero_adds(graph, outputs)
    _fold_views(graph, outputs)
    graph.eliminate_dead_code()
    gm.recompile()


# Ops that change a tensor's metadata in place: a graph holding one keeps its views as written.
_META_WRITES = frozenset((
    _aten.squeeze_.default, _aten.squeeze_.dim, _aten.unsqueeze_.default,
    _aten.transpose_.default, _aten.t_.default, _aten.as_strided_.default,
    _aten.resize_.default, _aten.set_.source_Tensor, _aten.swapdims_.default,
    _aten.swapaxes_.default))


def _static_layout(v):
    """(shape, strides, offset) of a traced value, or None unless they are all plain ints (a
    symbolic size must stay symbolic: ``int()`` on it would bake one size into the graph)."""
    if not isinstance(v, torch.Tensor) or v.layout is not torch.strided:
        return None
    shape, stride, off = tuple(v.shape), tuple(v.stride()), v.storage_offset()
    if type(off) is not int or any(type(d) is not int for d in shape + stride):
        return None
    return shape, stride, off


def _fold_views(graph, outputs):
    """A chain of view ops (the reshapes, transposes and unit dims the batching rules leave
    between two kernels) becomes ONE ``view`` of the chain's earliest tensor whose plain
    ``view`` gives exactly the same shape, strides and offset; a view whose layout equals its
    input's is dropped (unless it is an output: an output must stay a tensor of its own).
    Each view is a Python-level call on replay."""
    if any(n.op == "call_function" and n.target in _META_WRITES for n in graph.nodes):
        return
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target not in _VIEW_OPS:
            continue
        want = _static_layout(n.meta.get("val"))
        if want is None:
            continue
        shape, stride, offset = want
        chain, src = [], n.args[0]
        while isinstance(src, torch.fx.Node):
            chain.append(src)
            if not (src.op == "call_function" and src.target in _VIEW_OPS):
                break
            src = src.args[0]
        best = None
        for cand in chain:  # nearest first; keep the earliest that works
            have = _static_layout(cand.meta.get("val"))
            if have is None or have[2] != offset or cand.meta["val"].dtype != \
                    n.meta["val"].dtype:
                continue
            if have[:2] == (shape, stride):
                best = (cand, None)
                continue
            try:
                probe = torch.empty_strided(have[0], have[1], device="meta").view(shape)
            except RuntimeError:
                continue
            if tuple(probe.stride()) == stride:
                best = (cand, shape)
        if best is None:
            continue
        cand, view_shape = best
        if view_shape is None and n not in outputs:
            n.replace_all_uses_with(cand)
            graph.erase_node(n)
        elif not (n.target is _aten.view.default and n.args[0] is cand):
            with graph.inserting_before(n):
                new = graph.call_function(_aten.view.default, (cand, list(shape)))
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            graph.erase_node(n)


def _flat_nodes(args):
    out = []
    torch.fx.node.map_arg(args, out.append)
    return out


def _alias_roots(graph):
    """``{node: root}``: the node whose storage each node's result shares (itself unless it
    is a view), and the set of roots some op writes in place."""
    root, written = {}, set()
    for n in graph.nodes:
        schema = getattr(n.target, "_schema", None) if n.op == "call_function" else None
        base = n.args[0] if schema is not None and n.args else None
        aliases = (schema is not None and len(schema.returns) == 1
                   and schema.returns[0].alias_info is not None
                   and isinstance(base, torch.fx.Node))
        root[n] = root[base] if aliases else n
        if schema is not None:
            for a, v in zip(schema.arguments, n.args):
                if a.alias_info is not None and a.alias_info.is_write \
                        and isinstance(v, torch.fx.Node):
                    written.add(root[v])
            for k, v in n.kwargs.items():
                a = next((a for a in schema.arguments if a.name == k), None)
                if a is not None and a.alias_info is not None and a.alias_info.is_write \
                        and isinstance(v, torch.fx.Node):
                    written.add(root[v])
    return root, written


def _drop_zero_adds(graph, outputs):
    """``x + zeros(())`` -> ``x`` where nothing can tell them apart: same shape, strides, dtype
    and device, ``x`` not an input, the sum not an output, and neither written in place anywhere
    in the graph (the clipping transforms offset a first layer's output by a zero leaf so that
    its gradient hook fires; a replay need not pay a pass over that output)."""
    adds = [n for n in graph.nodes if n.op == "call_function"
            and n.target is _aten.add.Tensor and len(n.args) == 2 and not n.kwargs
            and isinstance(n.args[1], torch.fx.Node)
            and n.args[1].target is _aten.zeros.default
            and tuple(n.args[1].args[0]) == () and isinstance(n.args[0], torch.fx.Node)
            and n.args[0].op != "placeholder"]
    if not adds:
        return
    root, written = _alias_roots(graph)
    for n in adds:
        if n in outputs:  # (its caller may write into it without touching ``x``)
            continue
        x, xv, v = n.args[0], n.args[0].meta.get("val"), n.meta.get("val")
        layout = _static_layout(v)
        if layout is None or _static_layout(xv) != layout or (xv.dtype, xv.device) != (
                v.dtype, v.device):
            continue
        if root[x] in written or root[n] in written:  # (views of n share its root)
            continue
        n.replace_all_uses_with(x)
        graph.erase_node(n)


class _Replay:
    def __init__(self, runner, tensor_pos, dyn, out_spec, is_tensor, consts):
        self.runner, self.tensor_pos, self.dyn = runner, tensor_pos, dyn
        self.out_spec, self.is_tensor, self.consts = out_spec, is_tensor, consts
        self.checker = None

    def __call__(self, leaves):
        if self.checker is not None:
            checker, self.checker = self.checker, None
            return checker(self, leaves)
        return self.replay(leaves)

    def replay(self, leaves):
        inputs = [leaves[i] for i in self.tensor_pos]
        for i, dtype, device in self.dyn:
            inputs.append(torch.scalar_tensor(leaves[i], dtype=dtype, device=device))
        outs = iter(self.runner(*inputs))
        flat = [next(outs) if t else c for t, c in zip(self.is_tensor, self.consts)]
        return _pytree.tree_unflatten(self.out_spec, flat)


class _Eager:
    def __init__(self, fn, spec):
        self.fn, self.spec = fn, spec
        self.runner = None

    def __call__(self, leaves):
        args, kwargs = _pytree.tree_unflatten(self.spec, leaves)
        return self.fn(*args, **kwargs)


class _Checker:
    """``check=True``: run ``fn`` eagerly, undo its in-place updates and random draws, replay,
    and compare outputs and updated tensors."""

    def __init__(self, fn, spec, reads):
        self.fn, self.spec, self.reads = fn, spec, reads

    def __call__(self, entry, leaves):
        names = {id(t): name for t, _, name in self.reads.tensors.values()}
        for i, x in enumerate(leaves):
            if isinstance(x, torch.Tensor):
                names.setdefault(id(x), f"the argument {_leaf_name(self.spec, i)}")
        rng = _rng_state()
        watch = StateWatch(only=set(names))
        args, kwargs = _pytree.tree_unflatten(self.spec, leaves)
        with watch:
            expected = self.fn(*args, **kwargs)
        with torch.no_grad():
            after = [(t, t.clone()) for t in watch.mutated()]
        watch.undo()
        _set_rng_state(rng)
        got = entry.replay(leaves)
        bad = []
        exp_leaves = _paths(expected)
        got_leaves = _paths(got)
        if [p for p, _ in exp_leaves] != [p for p, _ in got_leaves]:
            bad.append("the output structure")
        else:
            bad += [f"output{p}" for (p, e), (_, g) in zip(exp_leaves, got_leaves)
                    if not _same(e, g)]
        bad += [names[id(t)] for t, value in after if not _same(value, t)]
        if bad:
            raise CompileCheckError(
                f"ftrans.compile({getattr(self.fn, '__name__', self.fn)}, check=True): the "
                f"replay differs from an eager call in {', '.join(bad)}")
        return got


def _paths(tree):
    import optree

    paths, leaves, _ = optree.tree_flatten_with_path(tree, none_is_leaf=True,
                                                     namespace=_pytree.NAMESPACE)
    return [(_path_str(p), x) for p, x in zip(paths, leaves)]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return False
    if not isinstance(a, torch.Tensor):
        return a == b
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    try:
        torch.testing.assert_close(b, a, equal_nan=True)
        return True
    except AssertionError:
        return False


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class _CudaGraphReplay:
    """Replays ``runner`` inside one captured CUDA graph with static input/output buffers.

    Warm-up runs (and the capture) execute the graph's in-place updates of the tensors it
    closes over (a BatchNorm's running statistics) and of its inputs: those are put back
    afterwards, so that each call applies them exactly once, as eager would.
    """

    def __init__(self, runner, gm, example, clone_outputs):
        self.clone_outputs = clone_outputs
        self.static_in = [t.detach().clone() for t in example]
        written_inputs, written_consts = _written_by(gm)
        self.written_inputs = written_inputs
        with torch.no_grad():
            saved = [(t, t.clone()) for t in written_consts]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the capture (allocator, cuBLAS handles)
                runner(*self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = runner(*self.static_in)
        with torch.no_grad():
            for t, copy in saved:
                t.copy_(copy)

    def __call__(self, *tensors):
        for buf, t in zip(self.static_in, tensors):
            if buf.data_ptr() != t.data_ptr():
                buf.copy_(t)
        self.graph.replay()
        for i in self.written_inputs:  # the function updates an input in place: so does this
            t = tensors[i]
            if t.data_ptr() != self.static_in[i].data_ptr():
                with torch.no_grad():
                    t.copy_(self.static_in[i])
        if self.clone_outputs:
            return [o.clone() for o in self.static_out]
        return list(self.static_out)


def _written_by(gm):
    """(indices of inputs, tensors closed over) that the graph updates in place."""
    from ._statewatch import written

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs, consts = set(), {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for pos in written(node.target):
            arg = node.args[pos] if isinstance(pos, int) and pos < len(node.args) \
                else node.kwargs.get(pos)
            while isinstance(arg, torch.fx.Node) and arg.op == "call_function" \
                    and arg.target in _VIEW_OPS:
                arg = arg.args[0]
            if not isinstance(arg, torch.fx.Node):
                continue
            if arg.op == "placeholder":
                inputs.add(placeholders.index(arg))
            elif arg.op == "get_attr":
                t = getattr(gm, arg.target)
                consts[id(t)] = t
    return sorted(inputs), list(consts.values())



