"""``ftrans.compile``: trace a transformed function once per input signature, replay flat aten.

Python dispatch costs microseconds per op; a per-sample-gradient step runs hundreds of ops.
``compile`` runs the function once under ``make_fx`` with fake tensors, which records the
*physical* aten ops that the batching rules emitted (no BatchedTensor survives tracing), and
caches the resulting ``GraphModule``.  Later calls with the same signature replay that flat graph
directly: no levels, no wrappers, no rules.  On CUDA the replay can be captured in a CUDA graph
(one launch for the whole step), and the flat graph can be handed to ``torch.compile``.

The cache key is the input signature: the pytree structure of the arguments, and for every
tensor its shape, dtype, device, layout and ``requires_grad``; other leaves by value (or
identity if unhashable); plus the grad mode.  Any change retraces.  What a trace cannot see is
Python control flow on tensor *values*: tracing with fake tensors makes it fail loudly
(``.item()``, ``bool(t)`` raise), in which case ``compile`` warns once and runs the function
eagerly from then on for that signature.  Tensors the function closes over are read at replay
time (they are graph constants by reference, so in-place updates to them are seen), but a
closure rebound to a *new* tensor object is not: pass changing tensors as arguments.

A replay is not differentiable with respect to its inputs (the trace records aten ops, not the
autograd graph around them): differentiate *inside* the compiled function.  A signature whose
inputs, or whose captured tensors, require grad (under grad mode) warns once and runs eagerly,
so that gradients flowing to them stay correct.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch

from . import _pytree

__all__ = ["compile"]


class CompileWarning(UserWarning):
    """ftrans.compile could not trace a signature and runs it eagerly."""


def _leaf_key(x):
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.dtype, x.device, x.layout, x.requires_grad)
    try:
        hash(x)
        return ("V", type(x), x)
    except TypeError:
        return ("I", id(x))


def compile(
    fn: Callable,
    *,
    cuda_graph: Optional[bool] = None,
    backend: Optional[str] = None,
    clone_outputs: bool = True,
    reuse_outputs: bool = True,
) -> Callable:
    """Trace ``fn`` once per input signature into a flat aten graph and replay it.

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

    Example:
        >>> import torch, ftrans
        >>> w = torch.randn(3)
        >>> f = ftrans.compile(ftrans.vmap(lambda x: (x * w).sum()))
        >>> torch.allclose(f(torch.ones(4, 3)), torch.ones(4, 3) @ w)
        True
    """
    cache: dict = {}

    @functools.wraps(fn)
    def compiled(*args, **kwargs):
        leaves, spec = _pytree.tree_flatten((args, kwargs))
        key = (spec, tuple(_leaf_key(x) for x in leaves), torch.is_grad_enabled())
        entry = cache.get(key)
        if entry is None:
            entry = cache[key] = _trace(fn, leaves, spec, cuda_graph, backend, clone_outputs,
                                           reuse_outputs)
        return entry(leaves)

    compiled.cache = cache  # introspection: one entry per traced signature
    return compiled


def _trace(fn, leaves, spec, cuda_graph, backend, clone_outputs, reuse_outputs):
    from torch.fx.experimental.proxy_tensor import make_fx

    tensor_pos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    template = list(leaves)
    out_spec_box = []

    def flat_fn(*tensors):
        full = list(template)
        for i, t in zip(tensor_pos, tensors):
            full[i] = t
        args, kwargs = _pytree.tree_unflatten(spec, full)
        out = fn(*args, **kwargs)
        out_leaves, out_spec = _pytree.tree_flatten(out)
        out_spec_box.append((out_spec, [isinstance(o, torch.Tensor) for o in out_leaves],
                             [None if isinstance(o, torch.Tensor) else o for o in out_leaves]))
        return [o for o in out_leaves if isinstance(o, torch.Tensor)]

    example = [leaves[i] for i in tensor_pos]
    grad_on = torch.is_grad_enabled()
    if grad_on and any(t.requires_grad for t in example):  # known before tracing
        return _eager(fn, spec, _NEEDS_GRAD)
    try:
        gm = make_fx(flat_fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*example)
    except Exception as e:  # data-dependent control flow, or an op fake tensors cannot run
        return _eager(fn, spec, (
            f"could not trace this input signature ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); running it eagerly. Python control flow on "
            "tensor values cannot be traced: use torch.where instead."))
    out_spec, is_tensor, consts = out_spec_box[-1]
    if grad_on and any(getattr(getattr(gm, n.target, None), "requires_grad", False)
                       for n in gm.graph.nodes if n.op == "get_attr"):
        return _eager(fn, spec, _NEEDS_GRAD)
    _simplify(gm)
    runner = gm
    if backend is not None:
        runner = torch.compile(gm, backend=backend)
    devices = {t.device.type for t in example}
    use_graph = cuda_graph
    if use_graph is None:
        use_graph = devices == {"cuda"}
    if use_graph:
        runner = _CudaGraphReplay(runner, example, clone_outputs)
    elif reuse_outputs and backend is None and devices <= {"cpu"}:
        from ._outpool import OutputPool, plan

        planned = plan(gm)
        if planned is not None:
            runner = OutputPool(*planned)
    return _Replay(runner, tensor_pos, out_spec, is_tensor, consts)


_NEEDS_GRAD = (
    "an input or a tensor the function closes over requires grad, and a replay is not "
    "differentiable with respect to them; running this signature eagerly. Pass detached "
    "tensors (e.g. parameters as `{k: v.detach() for k, v in model.named_parameters()}`) to "
    "get a replay, or differentiate inside the compiled function (ftrans.grad / vjp).")


def _eager(fn, spec, why):
    """Warn (``CompileWarning``, naming the call) and run this signature eagerly from now on."""
    warnings.warn(f"ftrans.compile({getattr(fn, '__name__', fn)}): {why}", CompileWarning,
                  stacklevel=4)
    return _Eager(fn, spec)


_aten = torch.ops.aten
_NO_OPS = (_aten.detach.default, _aten.alias.default)


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
    graph.eliminate_dead_code()
    gm.recompile()


class _Replay:
    def __init__(self, runner, tensor_pos, out_spec, is_tensor, consts):
        self.runner, self.tensor_pos = runner, tensor_pos
        self.out_spec, self.is_tensor, self.consts = out_spec, is_tensor, consts

    def __call__(self, leaves):
        outs = iter(self.runner(*[leaves[i] for i in self.tensor_pos]))
        flat = [next(outs) if t else c for t, c in zip(self.is_tensor, self.consts)]
        return _pytree.tree_unflatten(self.out_spec, flat)


class _Eager:
    def __init__(self, fn, spec):
        self.fn, self.spec = fn, spec

    def __call__(self, leaves):
        args, kwargs = _pytree.tree_unflatten(self.spec, leaves)
        return self.fn(*args, **kwargs)


class _CudaGraphReplay:
    """Replays ``runner`` inside one captured CUDA graph with static input/output buffers."""

    def __init__(self, runner, example, clone_outputs):
        self.clone_outputs = clone_outputs
        self.static_in = [t.detach().clone() for t in example]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up outside the capture (allocator, cuBLAS handles)
                runner(*self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = runner(*self.static_in)

    def __call__(self, *tensors):
        for buf, t in zip(self.static_in, tensors):
            if buf.data_ptr() != t.data_ptr():
                buf.copy_(t)
        self.graph.replay()
        if self.clone_outputs:
            return [o.clone() for o in self.static_out]
        return list(self.static_out)
