"""Differentiable replays: ``ftrans.compile`` of a function whose inputs, or the tensors it
closes over, require grad.

A plain trace records the aten ops a call ran, not the autograd graph around them, so its
replay would cut every gradient.  Here the function is traced together with its vjp (the
*joint* graph: ``fn`` on the inputs, then ``torch.autograd.grad`` of its differentiable outputs
with respect to every tensor that requires grad, the cotangents being extra inputs), and the
graph is split in two:

- forward: the nodes the outputs (and in-place updates of state) need; it returns the outputs
  and the values the backward reads, and only those are saved;
- backward: every node that depends on a cotangent, plus the cotangent-free helpers only the
  backward uses (a ``weight.t()`` recorded by a backward formula), run from the saved values.

A replay runs the forward inside one autograd node (:class:`_Node`) whose backward runs the
backward graph, so ``compiled(params, x).sum().backward()`` fills ``.grad`` as an eager call
does.  Tensors the function closes over that require grad (a model's parameters, used in a
fine-tuning step) are lifted into inputs of the joint trace: a torch-function mode hands the
traced function a stand-in for each of them, and every replay passes the real tensors, so
gradients reach them and in-place optimizer steps between calls are seen.  A double backward
through a replay is refused with a clear error (its backward is a replay too, not recorded).
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node
from torch.overrides import TorchFunctionMode

__all__ = ["JointTraceFailed", "lifted_tensors", "trace_joint"]


class JointTraceFailed(Exception):
    """Why a differentiable signature cannot be replayed."""


def lifted_tensors(gm) -> list:
    """The tensors a trace closes over (``get_attr``) that require grad: lifted to inputs."""
    seen, out = set(), []
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = getattr(gm, n.target, None)
            if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


class _Lift(TorchFunctionMode):
    """While the joint is traced: every use of a lifted tensor gets its stand-in."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def _sub(self, a):
        if isinstance(a, torch.Tensor):
            return self.table.get(id(a), a)
        if type(a) in (list, tuple):
            return type(a)(self._sub(x) for x in a)
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.table:
            name = getattr(func, "__name__", "")
            if (name.endswith("_") and not name.endswith("__")) or name == "__setitem__":
                raise JointTraceFailed(
                    f"it updates a tensor that requires grad in place ({name}); a "
                    "differentiable replay cannot")
        args = tuple(self._sub(a) for a in args)
        kwargs = {k: self._sub(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def trace_joint(flat_fn, example, diff_pos, lifted, out_meta):
    """Trace ``flat_fn`` (tensors -> list of tensors) with its vjp and split the result.

    ``example``: the tensor inputs; ``diff_pos``: which of them require grad; ``lifted``: real
    tensors ``flat_fn`` closes over that require grad; ``out_meta``: per output (shape, dtype,
    device, requires_grad) from a plain trace.  Returns the runner (tensors -> outputs).
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    n_in, n_lift = len(example), len(lifted)
    out_diff = [m[3] for m in out_meta]
    d_out = [i for i, d in enumerate(out_diff) if d]
    grad_mask: list = []

    def joint(*flat):
        ins = list(flat[:n_in])
        stand = [t.detach().requires_grad_() for t in flat[n_in:n_in + n_lift]]
        cots = flat[n_in + n_lift:]
        for i in diff_pos:
            ins[i] = ins[i].detach().requires_grad_()
        wrt = [ins[i] for i in diff_pos] + stand
        with torch.enable_grad(), _Lift({id(r): s for r, s in zip(lifted, stand)}):
            outs = flat_fn(*ins)
        if [o.requires_grad for o in outs] != out_diff:
            raise JointTraceFailed("its outputs' requires_grad changed between two traces")
        grads = torch.autograd.grad([outs[i] for i in d_out], wrt, list(cots),
                                    allow_unused=True) if d_out else [None] * len(wrt)
        grad_mask[:] = [g is not None for g in grads]
        return [*outs, *(g for g in grads if g is not None)]

    cots = [torch.zeros(shape, dtype=dtype, device=device)
            for shape, dtype, device, _ in (out_meta[i] for i in d_out)]
    gm = make_fx(joint, tracing_mode="fake", _allow_non_fake_inputs=True)(
        *example, *lifted, *cots)
    fwd, bwd = split(gm, n_in, n_lift, len(out_diff))
    wrt_pos = list(diff_pos) + list(range(n_in, n_in + n_lift))
    grad_pos = [p for p, m in zip(wrt_pos, grad_mask) if m]
    return JointReplay(fwd, bwd, lifted, out_diff, n_in, grad_pos)


def split(gm, n_in, n_lift, n_out):
    """Split a joint graph (inputs, lifted, cotangents -> outputs, grads) into a forward graph
    (inputs, lifted -> outputs, saved) and a backward graph (saved, cotangents -> grads)."""
    graph = gm.graph
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    cot_ph = set(placeholders[n_in + n_lift:])
    returned = list(nodes[-1].args[0])
    fwd_outs, grad_outs = returned[:n_out], returned[n_out:]

    needed = set()  # what the forward must run: its outputs, state updates, and their inputs
    stack = [a for a in fwd_outs if isinstance(a, Node)]
    stack += [n for n in nodes if n.op == "call_function" and n.is_impure()]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        if n in cot_ph:
            raise JointTraceFailed("the forward part of its trace reads a cotangent")
        needed.add(n)
        stack.extend(n.all_input_nodes)

    for n in nodes:  # a multi-output op's items: in the forward, not the tuple saved whole
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in needed:
            needed.add(n)

    in_bwd = set()  # what the backward runs: the rest of what the gradients need
    stack = [a for a in grad_outs if isinstance(a, Node)]
    while stack:
        n = stack.pop()
        if n in in_bwd or n in needed or n.op in ("placeholder", "get_attr"):
            continue
        in_bwd.add(n)
        stack.extend(n.all_input_nodes)

    saved = []  # forward values (and inputs) the backward reads
    seen = set()
    for n in nodes:
        uses = n.all_input_nodes if n in in_bwd else ()
        for a in uses:
            if a not in seen and a not in in_bwd and a not in cot_ph and a.op != "get_attr":
                seen.add(a)
                saved.append(a)
    for a in grad_outs:  # a gradient that is a forward value or an input as it is
        if isinstance(a, Node) and a not in seen and a not in in_bwd and a not in cot_ph \
                and a.op != "get_attr":
            seen.add(a)
            saved.append(a)

    fg, env = Graph(), {}
    for n in nodes:
        if n.op == "placeholder" and n not in cot_ph:
            env[n] = fg.node_copy(n)
        elif n in needed:
            env[n] = fg.node_copy(n, lambda a: env[a])
    fg.output([env[a] for a in fwd_outs] + [env[s] for s in saved])

    bg, benv = Graph(), {}
    for i, s in enumerate(saved):
        benv[s] = bg.placeholder(f"saved_{i}")
    for n in placeholders:
        if n in cot_ph:
            benv[n] = bg.node_copy(n)
    for n in nodes:
        if n.op == "get_attr":
            benv[n] = bg.node_copy(n)
        elif n in in_bwd:
            benv[n] = bg.node_copy(n, lambda a: benv[a])
    bg.output([benv[a] if isinstance(a, Node) else a for a in grad_outs])

    return GraphModule(gm, fg), GraphModule(gm, bg)  # (ftrans.compile simplifies both)

_DOUBLE = (
    "ftrans.compile: a replay's backward is not differentiable (double backward, or "
    "create_graph=True through a compiled call). Differentiate inside the compiled function "
    "(ftrans.grad / vjp / hessian) or call the function without ftrans.compile.")


class _Node(torch.autograd.Function):
    """One autograd node per replay: forward graph forward, backward graph backward."""

    @staticmethod
    def forward(ctx, replay, *tensors):
        res = replay.fwd(*tensors)
        n = replay.n_out
        outs, saved = res[:n], res[n:]
        ctx.replay = replay
        ctx.kinds = kinds = [isinstance(v, torch.Tensor) for v in saved]
        ctx.save_for_backward(*(v for v, k in zip(saved, kinds) if k))
        ctx.others = [v for v, k in zip(saved, kinds) if not k]
        frozen = [o for o, d in zip(outs, replay.out_diff) if not d]
        if frozen:
            ctx.mark_non_differentiable(*frozen)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gouts):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE)
        replay = ctx.replay
        cots = [g for g, d in zip(gouts, replay.out_diff) if d]
        tensors, others = iter(ctx.saved_tensors), iter(ctx.others)
        saved = [next(tensors) if k else next(others) for k in ctx.kinds]
        grads = replay.bwd(*saved, *cots)
        result = [None] * replay.n_inputs
        for pos, g in zip(replay.grad_pos, grads):
            result[pos] = g
        return (None, *result)


class JointReplay:
    """The runner of a differentiable replay: ``runner(*inputs) -> outputs``."""

    def __init__(self, fwd, bwd, lifted, out_diff, n_in, grad_pos):
        self.fwd, self.bwd, self.lifted = fwd, bwd, lifted
        self.out_diff = list(out_diff)
        self.n_out = len(out_diff)
        self.n_inputs = n_in + len(lifted)
        self.grad_pos = grad_pos

    def __call__(self, *tensors):
        return _Node.apply(self, *tensors, *self.lifted)
