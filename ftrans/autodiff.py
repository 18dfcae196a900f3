"""Reverse-mode transforms: ``grad``, ``grad_and_value``, ``vjp``, ``jacrev``.

They are levels of the same interpreter stack as ``vmap``, but they need no tensor wrapper of
their own: torch's autograd already records on whatever tensors flow through ``func``, batched
or not.  What makes the nesting correct is how inputs *enter* a level (see NOTE [entering a
differentiation level] in ``_autodiff_common.py``, which holds what this module shares with
forward mode).

``torch.autograd.grad`` is then called with ``create_graph=True`` only when something outside
can still differentiate the result (an outer grad/jvp level is alive, or the caller has grad
mode on and differentiable inputs): recording the backward graph costs time for nothing
otherwise.  Gradients leaving autograd may carry the batch dim of a vmap that ran *inside*
``func`` and has since returned; those are summed out (NOTE [exited levels] in ``_C/levels.py``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from ._autodiff_common import (_differentiating, _name, _tree_flatten, _tree_unflatten,
                               autograd_grad, call_watching_captures, check_argnums,
                               check_callable, check_jacobian_args, check_tensor_outputs,
                               closes_over_grad, detach_tree, edge_sums, enter, identity_basis,
                               jacobian_form, outer_needs_graph, refuse_complex,
                               refuse_inside_torch_transforms, replace_argnums, select_argnums,
                               split_aux, sum_exited_per_edge)
from ._C import levels as _levels
from .vmap import _vmap_call

__all__ = ["grad", "grad_and_value", "vjp", "jacrev"]


# ----------------------------------------------------------------------------------------------
# grad / grad_and_value
# ----------------------------------------------------------------------------------------------

def _grad_form(func, argnums, has_aux, api="grad"):
    extra = "" if argnums == 0 else f", argnums={argnums!r}"
    extra += ", has_aux=True" if has_aux else ""
    return f"{api}({_name(func)}{extra})(*args)"


class _grad_level:
    """A GRAD level around the body: ``with _grad_level(diff, form) as (entered, leaves, spec,
    need)`` gives the entered leaves of ``diff``, the original leaves, their spec, and whether an
    outer level needs the graph; the level is popped however the body exits (or if entering
    an input fails).  A small class rather than a generator: it is entered on every call."""

    __slots__ = ("diff", "form", "level", "grad_mode")

    def __init__(self, diff, form):
        self.diff, self.form = diff, form

    def __enter__(self):
        flat_diff, spec = _tree_flatten(self.diff)
        need = outer_needs_graph(torch.is_grad_enabled(), flat_diff)
        refuse_inside_torch_transforms(self.form)
        self.level = _levels.push(_levels.Level(_levels.GRAD))
        try:
            grad_mode = _differentiating()
            grad_mode.__enter__()
            try:
                entered = [enter(x, self.form) for x in flat_diff]
            except BaseException:
                grad_mode.__exit__(None, None, None)
                raise
        except BaseException:
            _levels.pop(self.level)
            raise
        self.grad_mode = grad_mode
        return entered, flat_diff, spec, need

    def __exit__(self, *exc):
        try:
            self.grad_mode.__exit__(*exc)
        finally:
            _levels.pop(self.level)
        return False


def _grad_and_value_impl(func, argnums, has_aux, args, kwargs, form):
    argnums = check_argnums(argnums, len(args), form)
    grad_on, marks = torch.is_grad_enabled(), edge_sums()
    with _grad_level(select_argnums(args, argnums), form) as (entered, _, spec, need):
        args = replace_argnums(args, argnums, _tree_unflatten(spec, entered))
        output, aux = split_aux(call_watching_captures(func, args, kwargs, form), has_aux,
                                form)
        need = need or (grad_on and closes_over_grad([output], entered))
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(
                f"{form}: Expected f(*args) to return a Tensor, got {type(output)}"
            )
        if output.dim() != 0:
            raise RuntimeError(
                f"{form}: Expected f(*args) to return a scalar Tensor, got tensor with "
                f"{output.dim()} dims. Maybe you wanted to use the vjp or jacrev APIs "
                "instead?"
            )
        ones = torch.ones_like(output)
        grads = autograd_grad([output], entered, [ones], create_graph=need)
        if need and edge_sums() != marks:
            sum_exited_per_edge(grads, [output], [ones], marked=True)
    grads = _tree_unflatten(spec, grads)
    if not need:
        output, aux = output.detach(), detach_tree(aux)
    return grads, ((output, aux) if has_aux else output)


def grad_and_value(func: Callable, argnums: Any = 0, has_aux: bool = False) -> Callable:
    """Like :func:`grad`, but the returned function gives ``(gradient, value)``.

    With ``has_aux=True`` it gives ``(gradient, (value, aux))``.

    Example:
        >>> import torch, ftrans
        >>> g, v = ftrans.grad_and_value(lambda x: (x ** 2).sum())(torch.tensor([1., 2.]))
        >>> g, v
        (tensor([2., 4.]), tensor(5.))
    """
    check_callable(func, "grad_and_value")
    form = _grad_form(func, argnums, has_aux, "grad_and_value")  # once, not per call

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return _grad_and_value_impl(func, argnums, has_aux, args, kwargs, form)

    return wrapper


def grad(func: Callable, argnums: Any = 0, has_aux: bool = False) -> Callable:
    """Gradient transform: ``grad(f)(x)`` is the gradient of the scalar ``f(x)`` w.r.t. ``x``.

    ``argnums`` (int or tuple of ints) picks which positional arguments to differentiate; each
    may be a pytree of tensors, and the gradient has the same structure.  With ``has_aux=True``
    ``f`` returns ``(scalar, aux)`` and the transform returns ``(gradient, aux)``.  Outputs
    that do not depend on an input give zero gradients; inside ``torch.no_grad()`` nothing is
    tracked.  Composes with every other transform (``vmap(grad(f))``, ``grad(grad(f))``...).

    Example:
        >>> import torch, ftrans
        >>> ftrans.grad(torch.sin)(torch.tensor(0.))
        tensor(1.)
        >>> ftrans.grad(ftrans.grad(lambda x: x ** 3))(torch.tensor(2.))
        tensor(12.)
        >>> dot = lambda x, y: (x * y).sum()
        >>> ftrans.grad(dot, argnums=(0, 1))(torch.ones(2), torch.ones(2) * 3)
        (tensor([3., 3.]), tensor([1., 1.]))
    """
    check_callable(func, "grad")
    form = _grad_form(func, argnums, has_aux)  # once, not per call

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        g, value = _grad_and_value_impl(func, argnums, has_aux, args, kwargs, form)
        return (g, value[1]) if has_aux else g

    return wrapper


# ----------------------------------------------------------------------------------------------
# vjp
# ----------------------------------------------------------------------------------------------

class _VjpFn:
    """The pullback returned by :func:`vjp`; may be called many times, and under a newer vmap."""

    def __init__(self, outputs, out_spec, entered, primals, primal_spec, form, captured=False,
                 marked=False):
        self._captured = captured  # the graph reaches a closed-over tensor that requires grad
        self._marked = marked  # see sum_exited_per_edge
        self._outputs = outputs
        self._out_spec = out_spec
        self._entered = entered
        self._primals = primals
        self._primal_spec = primal_spec
        self._form = form

    def __call__(self, cotangents, retain_graph: bool = True, create_graph: bool | None = None):
        if _is_compiling():
            # dynamo's pytree polyfill builds specs that never equal the ones recorded here
            # (and autograd.grad breaks the graph anyway): the pullback runs eagerly.
            return _vjp_call_eager(self, cotangents, retain_graph, create_graph)
        return self._call(cotangents, retain_graph, create_graph)

    def _call(self, cotangents, retain_graph, create_graph):
        flat_ct, ct_spec = _tree_flatten(cotangents)
        if ct_spec != self._out_spec:
            raise RuntimeError(
                f"{self._form} vjp_fn: Expected pytree structure of cotangents to be the same as "
                f"pytree structure of outputs to the function. cotangents: {ct_spec}, primal "
                f"output: {self._out_spec}"
            )
        for i, (c, o) in enumerate(zip(flat_ct, self._outputs)):
            if not isinstance(c, torch.Tensor):
                raise RuntimeError(
                    f"{self._form} vjp_fn: Expected cotangents to only contain Tensors, got "
                    f"{type(c)}"
                )
            if c.shape != o.shape:
                raise RuntimeError(
                    f"{self._form} vjp_fn: cotangent {i} has shape {tuple(c.shape)} but the "
                    f"output it pairs with has shape {tuple(o.shape)}"
                )
        if create_graph is None:
            create_graph = outer_needs_graph(torch.is_grad_enabled(),
                                             list(self._primals) + list(flat_ct)) or (
                self._captured and torch.is_grad_enabled())
        with _differentiating():
            grads = autograd_grad(self._outputs, self._entered, flat_ct,
                                  create_graph=create_graph, retain_graph=retain_graph)
        if create_graph:
            sum_exited_per_edge(grads, self._outputs, flat_ct, self._marked)
        return _tree_unflatten(self._primal_spec, grads)


_vjp_call_eager = torch.compiler.disable(_VjpFn._call)
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def vjp_impl(func, primals, argnums, has_aux, form, kwargs=None):
    """Run ``func`` at a new GRAD level; return (output, vjp_fn, aux, need).

    ``vjp_fn`` gives gradients for ``primals[argnums]`` (all primals when argnums is None,
    as a tuple).
    """
    diff = tuple(primals) if argnums is None else select_argnums(primals, argnums)
    grad_on, marks = torch.is_grad_enabled(), edge_sums()
    with _grad_level(diff, form) as (entered, flat_diff, spec, need):
        diff_in = _tree_unflatten(spec, entered)
        args = diff_in if argnums is None else replace_argnums(primals, argnums, diff_in)
        output, aux = split_aux(call_watching_captures(func, args, kwargs or {}, form),
                                has_aux, form)
        flat_out, out_spec = _tree_flatten(output)
        check_tensor_outputs(flat_out, form)
        captured = not need and grad_on and closes_over_grad(flat_out, entered)
    vjp_fn = _VjpFn(flat_out, out_spec, entered, flat_diff, spec, form, captured,
                    edge_sums() != marks)
    need = need or captured
    if not need:
        output, aux = detach_tree(output), detach_tree(aux)
    return output, vjp_fn, aux, need


def vjp(func: Callable, *primals, has_aux: bool = False):
    """Vector-Jacobian product: returns ``(func(*primals), vjp_fn)``.

    ``vjp_fn(cotangents)`` (cotangents shaped like the output) returns a tuple with one
    gradient per primal.  It may be called several times, and inside a later ``vmap`` (that is
    how :func:`jacrev` works).  With ``has_aux=True``: ``(output, vjp_fn, aux)``.

    Example:
        >>> import torch, ftrans
        >>> out, vjp_fn = ftrans.vjp(torch.sin, torch.zeros(3))
        >>> vjp_fn(torch.ones(3))
        (tensor([1., 1., 1.]),)
    """
    form = f"vjp({_name(func)}, *primals)"
    output, vjp_fn, aux, _ = vjp_impl(func, primals, None, has_aux, form)
    return (output, vjp_fn, aux) if has_aux else (output, vjp_fn)


# ----------------------------------------------------------------------------------------------
# jacrev
# ----------------------------------------------------------------------------------------------



def jacrev(func: Callable, argnums: Any = 0, *, has_aux: bool = False,
           chunk_size: int | str | None = None, memory_budget: int | float | None = None,
           _preallocate_and_copy: bool = False) -> Callable:
    """Jacobian by reverse mode: vmap of the vjp function over an identity basis.

    For each output leaf ``o`` and differentiated input leaf ``x`` the block has shape
    ``o.shape + x.shape``; the result has the output's pytree structure, each entry the
    input's structure (a tuple over ``argnums`` when it is a tuple).  ``chunk_size`` bounds
    how many basis rows are pushed back at once; ``"auto"`` or a ``memory_budget`` (bytes, or a
    fraction of free device memory) lets ftrans measure and choose it (see ``vmap``).  Complex
    inputs and outputs are refused, as in torch.func.  (``_preallocate_and_copy`` is accepted
    for torch.func compatibility: it picks how torch.func assembles chunks, which does not change
    the result.)

    Example:
        >>> import torch, ftrans
        >>> ftrans.jacrev(torch.sin)(torch.zeros(2))
        tensor([[1., 0.],
                [0., 1.]])
    """
    chunk_size = check_jacobian_args(func, "jacrev", chunk_size, memory_budget)
    form = jacobian_form("jacrev", func, argnums)  # once, not per call

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        refuse_complex("jacrev", _tree_flatten(args)[0], "inputs", form)
        nums = check_argnums(argnums, len(args), form)
        output, vjp_fn, aux, _ = vjp_impl(func, args, nums, has_aux, form, kwargs)
        flat_out, out_spec = _tree_flatten(output)
        refuse_complex("jacrev", flat_out, "outputs", form)
        flat_vjp_out = vjp_fn._outputs
        basis, numels, total = identity_basis(flat_vjp_out)

        def push(*cts):
            return vjp_fn(_tree_unflatten(out_spec, list(cts)))

        if chunk_size == 1 and total > 0:
            # One row at a time, as in torch.func: a plain loop, free of vmap's constraints
            # (a backward with data-dependent shapes works).
            flat_each = [_tree_flatten(push(*(b[i] for b in basis))) for i in range(total)]
            in_spec = flat_each[0][1]
            flat_rows = [torch.stack(col) for col in zip(*(f for f, _ in flat_each))]
        else:
            # vmap(push, chunk_size=chunk_size)(*basis), without building the vmapped function
            # (chunk_size was checked above): the structure of the diff args
            rows = _vmap_call(push, 0, 0, "error", chunk_size, basis, {})
            flat_rows, in_spec = _tree_flatten(rows)
        per_output, start = [], 0
        for o, n in zip(flat_vjp_out, numels):
            blocks = [r[start:start + n].reshape(o.shape + r.shape[1:]) for r in flat_rows]
            per_output.append(_tree_unflatten(in_spec, blocks))
            start += n
        jac = _tree_unflatten(out_spec, per_output)
        return (jac, aux) if has_aux else jac

    return wrapper
