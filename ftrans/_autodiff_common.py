"""What reverse mode (``autodiff.py``) and forward mode (``forward.py``) share.

Both are levels of the interpreter stack without a tensor wrapper of their own: torch's autograd
records on whatever tensors flow through ``func``, batched or not.  This module holds how an
input *enters* a level (:func:`enter`), when ``torch.autograd.grad`` must record its own graph
(:func:`outer_needs_graph`), the call itself with exited vmap levels summed out of the gradients
(:func:`autograd_grad`, :func:`sum_exited_per_edge`), and the argument and output checks with
torch.func's messages.

NOTE [entering a differentiation level]: an input that already requires grad enters as
``x.view_as(x)``: a new autograd node, still connected to the outer graph, so ``grad(grad(f))``
differentiates through the inner call and ``grad(lambda x: grad(lambda y: x * y)(x))`` keeps the
two roles of ``x`` apart (reusing ``x`` itself gives the perturbation-confused 2.0 instead of 1).
Any other input enters as a fresh leaf, ``x.detach().requires_grad_()``.  With the right entry
and ``create_graph=True`` when an outer level needs it, nesting needs no separate grad-level
bookkeeping.
"""
from __future__ import annotations

import functools

import torch

from . import _pytree
from ._C import levels as _levels
from ._C.autograd import _levels_of, lift, needs_lift, sum_exited_levels, sum_level
from ._C.batched import BatchedTensor
from ._C.guards import mark_input
from ._chunking import check_chunk_args

_DisableTF = torch._C.DisableTorchFunctionSubclass

__all__ = ["check_argnums", "select_argnums", "replace_argnums", "check_callable",
           "check_jacobian_args", "jacobian_form", "refuse_inside_torch_transforms",
           "call_watching_captures", "enter",
           "outer_needs_graph", "closes_over_grad", "zeros_for", "autograd_grad", "detach_tree",
           "torch_api", "func_error", "split_aux", "check_tensor_outputs", "refuse_complex",
           "sum_exited_per_edge", "edge_sums", "identity_basis"]


# ----------------------------------------------------------------------------------------------
# Entering a level, calling autograd, checking arguments and outputs
# ----------------------------------------------------------------------------------------------

def _name(func) -> str:
    return getattr(func, "__name__", None) or type(func).__name__


# One-line pytree wrappers, kept so that the call sites in autodiff.py and forward.py stayed
# unchanged when the helpers moved here; new code may use ``_pytree`` directly.
def _tree_flatten(tree):
    return _pytree.tree_flatten(tree)


def _tree_unflatten(spec, leaves):
    return _pytree.tree_unflatten(spec, leaves)


def _tree_map(fn, tree):
    return _pytree.tree_map(fn, tree)


def check_argnums(argnums, num_args: int, form: str):
    """Normalize ``argnums`` (int or non-empty tuple of distinct ints) against ``num_args``."""
    def one(a):
        if not isinstance(a, int) or isinstance(a, bool):
            raise RuntimeError(f"{form}: argnum must be int, got: {type(a)}")
        if -num_args <= a < num_args:
            return a % num_args
        raise RuntimeError(f"{form}: Got argnum={a}, but only {num_args} positional inputs")

    if isinstance(argnums, int) and not isinstance(argnums, bool):
        return one(argnums)
    if isinstance(argnums, tuple):
        if len(argnums) == 0:
            raise RuntimeError(f"{form}: argnums must be non-empty")
        wrapped = tuple(one(a) for a in argnums)
        if len(set(wrapped)) != len(wrapped):
            raise RuntimeError(f"{form}: argnums elements must be unique, got {argnums}")
        return wrapped
    raise RuntimeError(f"{form}: argnums must be int or Tuple[int, ...], got: {type(argnums)}")


def select_argnums(args, argnums):
    return args[argnums] if isinstance(argnums, int) else tuple(args[i] for i in argnums)


def replace_argnums(args, argnums, new):
    args = list(args)
    if isinstance(argnums, int):
        args[argnums] = new
    else:
        for i, v in zip(argnums, new):
            args[i] = v
    return tuple(args)


def _has_forward_tangent(x) -> bool:
    fwd = torch.autograd.forward_ad
    if getattr(fwd, "_current_level", -1) < 0:
        return False
    return fwd.unpack_dual(x).tangent is not None


class _differentiating:
    """Grad mode on, and inference mode off: a transform differentiates even when the caller
    runs under ``torch.no_grad()`` or ``torch.inference_mode()`` (as torch.func does).  (A
    small class rather than a generator context manager: it is entered on every call.)"""

    __slots__ = ("prev", "inference")

    def __enter__(self):
        self.inference = None
        if torch.is_inference_mode_enabled():
            self.inference = torch.inference_mode(False)
            self.inference.__enter__()
        self.prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(True)

    def __exit__(self, *exc):
        torch._C._set_grad_enabled(self.prev)
        if self.inference is not None:
            self.inference.__exit__(*exc)
        return False


def check_callable(func, api: str) -> None:
    if not callable(func):
        raise TypeError(f"{api}(func): expected `func` to be a callable, got "
                        f"{type(func).__name__}")


def check_jacobian_args(func, api: str, chunk_size, memory_budget=None):
    """Validate; returns the chunk size to hand vmap (an ``AutoChunk`` for ``"auto"`` or a
    ``memory_budget``: one per transform, so its choice is cached across calls)."""
    check_callable(func, api)
    if chunk_size == "auto" or memory_budget is not None:
        return check_chunk_args(f"{api}({_name(func)}, ...)", chunk_size, memory_budget)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size <= 0):
        raise func_error(f"{api}({_name(func)}, chunk_size={chunk_size!r})",
                         f"{api}: `chunk_size` should be greater than 0.", ValueError)
    return chunk_size


def jacobian_form(api: str, func, argnums) -> str:
    return f"{api}({_name(func)}{'' if argnums == 0 else f', argnums={argnums!r}'})(*args)"


_torch_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def refuse_inside_torch_transforms(form: str) -> None:
    """ftrans's grad-family transforms record on torch's autograd; torch's own transforms
    (``torch.func.functionalize``, ``torch.func.vmap``/``grad`` around an ftrans call) rewrap
    every tensor at their levels and drop that history, so the gradient would silently be
    zero.  Refused instead (ftrans's transforms compose with each other, not with torch's)."""
    if _torch_transforms_active():
        raise RuntimeError(
            f"{form}: called inside one of torch.func's transforms (functionalize, vmap, grad, "
            "...). torch's transforms drop the autograd history ftrans's grad, vjp and jvp "
            "record, so the result would be wrong. Call the ftrans transform outside it, or use "
            "ftrans's transforms throughout (they compose with each other in any order)."
        )


def call_watching_captures(func, args, kwargs, form):
    """``func(*args, **kwargs)``, refusing (as torch.func does) an in-place write of a
    differentiated value into a tensor ``func`` closes over: afterwards that tensor would carry
    this level's autograd history (a ``grad_fn``) out of the transform.

    torch.func checks every in-place op against its level; ftrans records on plain autograd
    and has no per-op hook outside vmap, so it checks the tensors ``func`` names directly (its
    closure cells and the globals its code reads) after the call: one that had no ``grad_fn``
    and now has one was written with a differentiated value.  Tensors reached through objects
    (``self.buffer``) are not watched.  The write has happened; its history is cut
    (``detach_``) before the error propagates."""
    code = getattr(func, "__code__", None)
    if code is None:
        return func(*args, **kwargs)
    watched = []
    for cell in func.__closure__ or ():
        try:
            v = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if type(v) is torch.Tensor and v.grad_fn is None:
            watched.append(v)
    module = func.__globals__
    for name in code.co_names:
        v = module.get(name)
        if type(v) is torch.Tensor and v.grad_fn is None:
            watched.append(v)
    if not watched:
        return func(*args, **kwargs)
    out = func(*args, **kwargs)
    for t in watched:
        node = t.grad_fn
        if node is not None:
            try:
                t.detach_()
            except RuntimeError:  # a view: detach_ is refused; the error below says enough
                pass
            raise RuntimeError(
                f"{form}: During a grad (vjp, jvp, grad, etc) transform, the function provided "
                f"attempted to call in-place operation ({node.name()}) that would mutate a "
                "captured Tensor. This is not supported; please rewrite the function being "
                "transformed to explicitly accept the mutated Tensor(s) as inputs.")
    return out


def enter(x, form: str):
    """Make ``x`` an input of a new differentiation level (see the module docstring)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"{form}: Thing passed to transform API must be Tensor, got {type(x)} (every leaf "
            "of the arguments selected by argnums must be a Tensor; pass other values through "
            "a non-differentiated argument)"
        )
    if not (x.is_floating_point() or x.is_complex()):
        raise RuntimeError(
            f"{form}: only floating point and complex Tensors can be differentiated, got a "
            f"Tensor of dtype {x.dtype}"
        )
    if x.is_inference():  # cannot carry autograd history: start from a normal copy
        x = x.clone()
    if x.requires_grad:
        stack = _levels.current_stack()  # [..., enclosing level, this new level]
        if len(stack) > 1 and needs_lift(x, stack[-2]):
            # Made outside the enclosing transform: what an outer backward sends through this
            # entry is summed over the enclosing levels that have returned (per-use lift, as
            # for an op's argument; ftrans/_C/autograd.py).  Below the entry alias, so this
            # level's own gradient is not touched.
            x = lift(x)
        return mark_input(x.view_as(x))
    if _has_forward_tangent(x):
        x = x.clone().requires_grad_()
    else:
        x = x.detach().requires_grad_()
    # A fresh leaf is differentiated only by this level, while every vmap around it is alive:
    # its uses need no per-use lift (ftrans/_C/autograd.py), which saves work on every op.
    x._ftrans_born = _levels.current_stack()[-1].id
    return mark_input(x)


def outer_needs_graph(grad_enabled: bool, tensors) -> bool:
    """Can anything outside this call still differentiate its results?

    Under ``torch.no_grad()`` only a forward-mode level can: as in torch.func, ``no_grad``
    around a transform call stops the reverse-mode levels *outside* it (the call still
    differentiates its own function), and forward mode ignores it.

    Callers keep the answer in a local named ``need`` ("an outer level needs the graph", so
    ``create_graph=need``); the short name is kept while autodiff.py and forward.py are being
    edited concurrently (a rename there is a follow-up)."""
    for level in _levels.current_stack():
        if level.kind == _levels.JVP or (grad_enabled and level.kind != _levels.VMAP):
            return True
    if grad_enabled:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                return True
    return False


def closes_over_grad(outputs, entered) -> bool:
    """Does the graph of ``outputs`` reach a tensor that requires grad other than the inputs
    ``entered`` at this level (parameters ``func`` closed over)?  Then, when the caller records
    gradients, results stay differentiable with respect to it, as under torch.func: a gradient
    penalty ``vmap(grad(critic))(x)`` backpropagates into the critic's parameters.  One walk of
    the graph, taken only when nothing else asks for it."""
    own = {id(t) for t in entered}
    seen = set()
    stack = []
    for o in outputs:
        if isinstance(o, torch.Tensor):
            n = o.grad_fn
            if n is not None and n not in seen:
                seen.add(n)
                stack.append(n)
    while stack:
        node = stack.pop()
        if type(node) is _AccumulateGrad:  # a leaf that requires grad
            if id(node.variable) not in own:
                return True
            continue
        for n, _ in node.next_functions:
            if n is not None and n not in seen:
                seen.add(n)
                stack.append(n)
    return False


_AccumulateGrad = torch._C._functions.AccumulateGrad


def zeros_for(x):
    # Unbatched zeros: the logical value is the same for every example, and vmap broadcasts it.
    # (In x's layout: a sparse input gets a sparse zero gradient, as in torch.func.)
    return torch.zeros(x.shape, dtype=x.dtype, device=x.device, layout=x.layout)


def autograd_grad(outputs, inputs, grad_outputs, create_graph: bool, retain_graph=None):
    """``torch.autograd.grad`` with torch.func's conventions: unconnected inputs get zeros."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs:
        return [zeros_for(x) for x in inputs]
    outs, gos = zip(*pairs)
    if _engine_ok(outs, gos, inputs):
        # What torch.autograd.grad would run after its checks, which _engine_ok has made
        # (its per-call validation is tens of microseconds with batched cotangents).
        grads = _engine_run_backward(
            outs, gos, create_graph if retain_graph is None else retain_graph, create_graph,
            tuple(inputs), True, accumulate_grad=False)
    else:  # anything unusual: torch's own checks, messages and torch-function handling
        grads = torch.autograd.grad(
            outs, inputs, gos, retain_graph=retain_graph, create_graph=create_graph,
            allow_unused=True,
        )
    return [zeros_for(x) if g is None else sum_exited_levels(g) for g, x in zip(grads, inputs)]


# (a private helper of torch.autograd.grad, feature-tested: without it every call takes torch's
# path)
_engine_run_backward = getattr(torch.autograd.graph, "_engine_run_backward", None)
_has_torch_function = torch._C._has_torch_function


def _engine_ok(outs, gos, inputs) -> bool:
    """May ``torch.autograd.grad(outs, inputs, gos, allow_unused=True)`` skip straight to the
    engine?  Only when nothing could make torch.autograd.grad do anything but run it: no
    torch-function override or mode on the outputs and inputs, plain dense outputs and tensor
    cotangents of the same shape and complexness (what its ``_make_grads`` checks; any
    mismatch takes torch's path, which raises torch's error)."""
    if _engine_run_backward is None or not inputs or _has_torch_function(outs) \
            or _has_torch_function(inputs):
        return False
    with _DisableTF():  # (a batched cotangent's logical shape, without the TF hop)
        for o, g in zip(outs, gos):
            if type(o) is not torch.Tensor or o.is_nested or type(g) not in _COTANGENTS \
                    or g.shape != o.shape or g.dtype.is_complex != o.dtype.is_complex:
                return False
    return True


_COTANGENTS = (torch.Tensor, BatchedTensor)


def detach_tree(tree):
    return _tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def torch_api(form: str) -> str:
    """How torch.func's own messages name the transform that ``form`` calls (they name the
    underlying vjp or jvp, also for jacrev and jacfwd)."""
    if form.startswith("grad"):
        return "grad_and_value(f)(*args)"
    if form.startswith(("vjp", "jacrev")):
        return "vjp(f, *primals)"
    return "jvp(f, primals, tangents)"


def func_error(form: str, torch_msg: str, exc=RuntimeError):
    """The user's call, then torch.func's message for the same mistake, verbatim: ``except``
    clauses and regexes written against torch.func keep matching."""
    return exc(f"{form}: {torch_msg}")


def split_aux(out, has_aux: bool, form: str):
    if not has_aux:
        return out, None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise func_error(form, f"{torch_api(form)}: output of function f should be a tuple: "
                         "(output, aux) if has_aux is True")
    return out  # aux may hold non-tensors, returned as they are (torch.func refuses them)


def check_tensor_outputs(flat_out, form: str, float_only: bool = True):
    """torch.func's checks of ``f``'s outputs.  ``float_only``: reverse mode refuses integer
    outputs; forward mode gives them zero tangents."""
    api = torch_api(form)
    if not flat_out or (len(flat_out) == 1 and flat_out[0] is None):
        raise func_error(form, f"{api}: Expected f to be a function that has non-empty output "
                         f"(got output = {list(flat_out)})")
    for o in flat_out:
        if not isinstance(o, torch.Tensor):
            raise func_error(form, f"{api}: expected f(*primals) to return only tensors, got "
                             f"unsupported type {type(o)}")
        if float_only and not (o.is_floating_point() or o.is_complex()):
            raise func_error(form, "vjp(f, ...): All outputs of f must be floating-point or "
                             f"complex Tensors, got Tensor with dtype {o.dtype}")


def refuse_complex(api: str, flat, what: str, form: str):
    """jacrev and jacfwd refuse complex inputs and outputs, as torch.func does (it defines no
    Jacobian of a complex function, so code that runs on ftrans must not depend on one)."""
    for idx, t in enumerate(flat):
        if isinstance(t, torch.Tensor) and t.is_complex():
            raise func_error(form, f"{api}: Expected all {what} to be real but received complex "
                             f"tensor at flattened input idx: {idx}")


def sum_exited_per_edge(results, roots, cotangents, marked=False):
    """After ``results = autograd.grad(roots, ..., cotangents, create_graph=True)``: where the
    cotangents are batched at levels the graph of ``roots`` does not carry, sum those levels per
    edge once they exit (:func:`_sum_where_old_graph_is_reached`).  ``marked``: the graph of
    ``roots`` was recorded while :func:`edge_sums` changed, so it may hold nodes that predate
    a level, whose new feeders must sum it too."""
    graph_levels = {lv.id for lv in _levels_of_all(roots)}
    newer = frozenset(lv for lv in _levels_of_all(cotangents) if lv.id not in graph_levels)
    if newer or marked:
        _sum_where_old_graph_is_reached(results, roots, newer)


_EDGE_SUMS = [0]  # how many graphs _sum_where_old_graph_is_reached has marked


def edge_sums() -> int:
    return _EDGE_SUMS[0]


def _levels_of_all(tensors):
    out = {}
    for t in tensors:
        for lv in _levels_of(t):
            out[lv.id] = lv
    return list(out.values())


def _sum_where_old_graph_is_reached(results, old_roots, levels):
    """Per-use sums for a create_graph backward, under a newer vmap, through an older graph.

    A vjp function called under a vmap newer than its graph (``jacrev``'s vmap over basis
    cotangents; ``J v`` of the double-vjp trick under ``jacfwd``'s vmap over tangents) is
    computed by the autograd engine from a graph recorded *before* that vmap.  The engine's
    create_graph ops mix the batched (co)tangents with tensors of that older graph without
    passing ``__torch_function__``, where captured tensors are normally lifted
    (``_C/autograd.py``).  So when an outer transform differentiates the result, the gradient that
    reaches an older tensor through one of these ops is batched at a level its tensor never had
    and is added to that tensor's other, unbatched, gradient contributions: once the vmap has
    exited, summing the total over it would count the unbatched part ``B`` times.  Instead, each
    new node that feeds the older graph sums the exited levels out of what it sends along that
    edge: the same per-use sum, placed on the graph's edges.

    Each older node also remembers (in its ``metadata``) the levels it predates: when this
    backward is itself differentiated later (``jacrev(jacrev(f))``), the new nodes that feed it
    carry these levels too, and their edges into it sum them as well.
    """
    if levels:
        _EDGE_SUMS[0] += 1
    old = set()
    stack = [r.grad_fn for r in old_roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in old:
            continue
        old.add(node)
        meta = getattr(node, "metadata", None)
        if levels and meta is not None:
            meta[_PREDATES] = meta.get(_PREDATES, frozenset()).union(levels)
        stack.extend(n for n, _ in node.next_functions if n is not None and n not in old)
    seen = set()
    stack = [r.grad_fn for r in results if isinstance(r, torch.Tensor) and r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen or node in old:
            continue
        seen.add(node)
        edges = [(i, n) for i, (n, _) in enumerate(node.next_functions)
                 if n is not None and n in old and (levels or _PREDATES in _meta(n))]
        if edges:
            node.register_hook(functools.partial(_sum_exited_on_edges, tuple(edges), levels))
        stack.extend(n for n, _ in node.next_functions if n is not None and n not in seen)


_PREDATES = "ftrans_predates"  # node metadata: vmap levels newer than the node


def _meta(node):
    return getattr(node, "metadata", None) or {}


def _sum_exited_on_edges(edges, levels, grad_inputs, grad_outputs):
    out = list(grad_inputs)
    for i, target in edges:
        g = out[i]
        if g is not None:
            meta = getattr(target, "metadata", None)
            for lv in levels.union(meta.get(_PREDATES, ())) if meta else levels:
                if not lv.alive and lv in _levels_of(g):
                    g = sum_level(g, lv)
            out[i] = g
    return tuple(out)


def identity_basis(flat):
    """One standard-basis cotangent batch per tensor in ``flat``: shapes ``(total, *t.shape)``."""
    numels = [t.numel() for t in flat]
    total = sum(numels)
    ref = flat[0]
    eye = torch.eye(total, dtype=ref.dtype, device=ref.device)
    if len(flat) == 1:  # one output: the identity itself, reshaped
        return [eye.reshape((total,) + ref.shape)], numels, total
    out, start = [], 0
    for t, n in zip(flat, numels):
        out.append(eye[:, start:start + n].to(t.dtype).reshape((total,) + t.shape))
        start += n
    return out, numels, total
