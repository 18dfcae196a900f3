"""Per-example gradient norms, clipped sums and dot products, as transforms.

``func`` is the loss of ONE example, exactly as in ``vmap(grad(func, argnums), in_dims)``;
the transforms return what a clipping step needs from the ``B`` per-example gradients without
materialising them (see ``capture.py`` for how, ``factors.py`` for the arithmetic).

``in_dims``: the differentiated arguments (``argnums``) are shared by every example and never
mapped; an int ``in_dims`` (default 0) applies to the other positional arguments, a tuple gives
one entry per argument (None at the ``argnums`` positions).

Groups (per-layer / per-parameter-group clipping): ``groups=None`` clips the whole gradient
(one norm per example); ``groups="leaf"`` gives each leaf of the ``argnums`` inputs its own
norm; a callable maps each leaf's path (``"0.weight"``, ``"[1]"``, as
``torch.utils._pytree.keystr`` without the brackets of dict keys) to a group label; a pytree
prefix of the ``argnums`` inputs gives the labels directly.  ``max_norm`` is then a number (the
same bound for every group) or a dict ``{label: bound}``.

BatchNorm in training mode (``batch_norm=``, BEYOND.md section 6): ``"error"`` (default: the
message lists the choices), ``"eval"`` (running statistics, not updated), ``"per_sample"`` (each
example normalised with its own statistics, as torch.func's ``replace_all_batch_norm_modules_``),
``"batch"`` (batch statistics; each example's *contribution* ``d loss_i / d params`` with the
cross-example terms, so that the contributions sum to the batch gradient; instantiated, and not
differentially private: an example's contribution depends on the others).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .. import _pytree
from .._autodiff_common import _name
from .capture import run

__all__ = ["per_sample_grad_norms", "clipped_grad", "per_sample_grad_dots",
           "per_sample_grad_cross", "clip_factors", "group_labels"]


def _form(api, func, argnums, extra=""):
    a = "" if argnums == 0 else f", argnums={argnums!r}"
    return f"{api}({_name(func)}{extra}{a})(*args)"


def _check_func(func, api):
    if not callable(func):
        raise TypeError(f"{api}(func): expected `func` to be a callable, got "
                        f"{type(func).__name__}")


def group_labels(groups, diff, n_leaves, form):
    """One label per differentiated leaf (None: all one group)."""
    if groups is None:
        return [0] * n_leaves
    if isinstance(groups, str):
        if groups != "leaf":
            raise ValueError(f"{form}: groups must be None, 'leaf', a callable or a pytree of "
                             f"labels, got {groups!r}")
        return list(range(n_leaves))
    if callable(groups):
        import optree
        paths = optree.tree_paths(diff, none_is_leaf=True, namespace=_pytree.NAMESPACE)
        return [groups(".".join(str(k) for k in p)) for p in paths]
    try:
        labels = _pytree.tree_leaves(_pytree.tree_broadcast_prefix(groups, diff))
    except ValueError as e:
        raise ValueError(f"{form}: groups is not a prefix of the differentiated inputs ({e})") \
            from None
    return labels


def _bounds(max_norm, labels, form):
    uniq = list(dict.fromkeys(labels))
    if isinstance(max_norm, dict):
        missing = [l for l in uniq if l not in max_norm]
        if missing:
            raise ValueError(f"{form}: max_norm has no bound for groups {missing}")
        bounds = {l: float(max_norm[l]) for l in uniq}
    else:
        bounds = {l: float(max_norm) for l in uniq}
    for l, b in bounds.items():
        if not b > 0:
            raise ValueError(f"{form}: max_norm must be > 0, got {b} (group {l!r})")
    return bounds


def group_norms(cap, labels):
    """``{label: [B] norms}``."""
    sq: dict = {}
    for f, l in zip(cap.factors, labels):
        if f is not None:
            n2 = f.norm2()
            sq[l] = n2 if l not in sq else sq[l] + n2
    out = {}
    for l in dict.fromkeys(labels):
        out[l] = sq[l].clamp_min(0).sqrt() if l in sq else cap.losses.new_zeros(
            cap.batch_size).detach()
    return out


def clip_factors(cap, labels, bounds, sample_weights=None, into=None):
    """Clipped sums (one tensor per leaf), the per-group norms and the per-group clip factors.
    Consumes ``cap.factors`` (each is dropped once its sum is formed, freeing what it held).
    ``into``: one tensor per leaf (checked by the caller) that the sums are added into, in
    place; they are the sums returned."""
    norms = group_norms(cap, labels)
    scale = {l: (bounds[l] / n).clamp(max=1.0) for l, n in norms.items()}
    if sample_weights is not None:
        scale = {l: s * sample_weights.to(s.dtype) for l, s in scale.items()}
    # The sums whose factors hold the most beyond their result go first: what they hold is
    # freed before the larger results are formed (the step's peak memory).
    order = sorted(range(len(cap.factors)), key=lambda i: 0 if cap.factors[i] is None else
                   cap.leaves[i].numel() * cap.leaves[i].element_size()
                   - cap.factors[i].held_bytes())
    grads = [None] * len(cap.factors)
    for i in order:
        f, x, l = cap.factors[i], cap.leaves[i], labels[i]
        if into is not None:
            buf = into[i]
            if f is not None:
                if f.dtype == buf.dtype:
                    f.weighted(scale[l], buf)
                else:
                    buf.add_(f.weighted(scale[l]).reshape(buf.shape).to(buf.dtype))
            grads[i] = buf
            cap.factors[i] = f = None
        elif f is None:
            grads[i] = torch.zeros_like(x)
        else:
            g = f.weighted(scale[l])
            if g.shape != x.shape:
                g = g.reshape(x.shape)
            grads[i] = g if g.dtype == x.dtype else g.to(x.dtype)
            cap.factors[i] = f = None
    return grads, norms, scale


_is_alias_of = torch._C._is_alias_of
_REAL = (torch.Tensor, torch.nn.Parameter)


def _add_to_leaves(add_to, cap, form):
    """The leaves of ``add_to=``, checked against the differentiated inputs' (``cap.leaves``):
    the same structure, and per leaf the same shape, device and dtype."""
    leaves, spec = _pytree.tree_flatten(add_to)
    if spec != cap.spec:
        raise ValueError(f"{form}: add_to must have the structure of the differentiated "
                         f"inputs ({cap.spec}), got {spec}")
    for i, (t, x) in enumerate(zip(leaves, cap.leaves)):
        if not isinstance(t, torch.Tensor) or t.shape != x.shape or t.device != x.device \
                or t.dtype != x.dtype:
            got = (f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"{form}: add_to leaf {i} must be a tensor of shape "
                             f"{tuple(x.shape)}, {x.dtype} on {x.device} (like the input it "
                             f"accumulates the gradient of), got {got}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{form}: add_to leaf {i} requires grad; the sums are added into "
                             "it in place (pass a tensor that does not, or use torch.no_grad())")
    # Written in place while the inputs are read: no add_to leaf may share memory with an
    # input of the gradient or with another add_to leaf.  (Real tensors only: a tracer's are
    # not checked here; ftrans.compile runs a call whose inputs share memory eagerly when the
    # function writes one of them, which add_to does.)
    others = [(f"input {j}", x) for j, x in enumerate(cap.leaves) if type(x) in _REAL]
    for i, t in enumerate(leaves):
        if type(t) not in _REAL:
            continue
        for name, x in others:
            if _is_alias_of(t, x):
                raise ValueError(f"{form}: add_to leaf {i} shares memory with {name}; the "
                                 "sums are added into it in place (pass separate buffers)")
        others.append((f"add_to leaf {i}", t))
    return leaves


def _weights(kwargs, batch_form):
    w = kwargs.pop("sample_weights", None)
    if w is not None and (not isinstance(w, torch.Tensor) or w.dim() != 1):
        raise ValueError(f"{batch_form}: sample_weights must be a 1-D tensor of per-example "
                         f"weights, got {w!r}")
    return w


def per_sample_grad_norms(func: Callable, argnums: Any = 0, *, in_dims: Any = 0,
                          has_aux: bool = False, groups: Any = None,
                          batch_norm: str = "error") -> Callable:
    """``[B]`` L2 norms of the per-example gradients, without materialising them.

    Equal to ``vmap(grad(func, argnums), in_dims)(*args)`` flattened over every leaf and
    normed per example.  With ``groups``, a dict ``{label: [B] norms}``; with ``has_aux``,
    ``(norms, aux)`` where aux is batched like ``vmap``'s outputs.

    Example:
        >>> import torch, ftrans
        >>> w = torch.randn(3, 4)
        >>> loss = lambda w, x: (x @ w.T).square().sum()
        >>> x = torch.randn(5, 4)
        >>> norms = ftrans.per_sample_grad_norms(loss)(w, x)
        >>> ref = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0))(w, x).flatten(1).norm(dim=1)
        >>> torch.allclose(norms, ref, atol=1e-4)
        True
    """
    _check_func(func, "per_sample_grad_norms")
    form = _form("per_sample_grad_norms", func, argnums)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        cap = run(func, argnums, in_dims, has_aux, args, kwargs, form, batch_norm)
        labels = group_labels(groups, _pytree.tree_unflatten(cap.spec, cap.leaves),
                              len(cap.leaves), form)
        norms = group_norms(cap, labels)
        out = norms[0] if groups is None else norms
        return (out, cap.aux) if has_aux else out

    return wrapper


def clipped_grad(func: Callable, max_norm: Any, argnums: Any = 0, *, in_dims: Any = 0,
                 has_aux: bool = False, groups: Any = None,
                 batch_norm: str = "error") -> Callable:
    """``sum_i g_i * min(1, max_norm / ||g_i||)``, shaped like the ``argnums`` inputs.

    ``g_i`` is the gradient of ``func`` for example ``i`` (as ``vmap(grad(func, argnums),
    in_dims)`` gives it).  Computed in one forward and one backward over the batch, per-example
    gradients of covered ops never formed (see ``ftrans.dp``).  The returned function accepts
    ``sample_weights=`` (a ``[B]`` tensor): the sum becomes ``sum_i w_i c_i g_i`` (clip first,
    then weight; a weight of 0 removes an example exactly), and ``add_to=`` (tensors shaped
    like the ``argnums`` inputs, in the same structure): the sum is added into them in place
    and they are returned, with no buffer of its own (gradient accumulation over micro-batches;
    ``DPSGD`` adds the clipped sum into noise drawn ahead).  ``groups`` clips per group (see
    the module docstring).  With ``has_aux``: ``(grads, aux)``.

    Example:
        >>> import torch, ftrans
        >>> w = torch.randn(3, 4)
        >>> loss = lambda w, x: (x @ w.T).square().sum()
        >>> x = torch.randn(5, 4)
        >>> g = ftrans.clipped_grad(loss, max_norm=1.0)(w, x)
        >>> per = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0))(w, x)
        >>> c = (1.0 / per.flatten(1).norm(dim=1)).clamp(max=1)
        >>> torch.allclose(g, (per * c[:, None, None]).sum(0), atol=1e-4)
        True
    """
    _check_func(func, "clipped_grad")
    form = _form("clipped_grad", func, argnums, f", max_norm={max_norm!r}")

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        kwargs = dict(kwargs)
        w = _weights(kwargs, form)
        add_to = kwargs.pop("add_to", None)
        cap = run(func, argnums, in_dims, has_aux, args, kwargs, form, batch_norm)
        diff = _pytree.tree_unflatten(cap.spec, cap.leaves)
        labels = group_labels(groups, diff, len(cap.leaves), form)
        into = None if add_to is None else _add_to_leaves(add_to, cap, form)
        grads, _, _ = clip_factors(cap, labels, _bounds(max_norm, labels, form), w, into)
        out = _pytree.tree_unflatten(cap.spec, grads)
        return (out, cap.aux) if has_aux else out

    return wrapper


def per_sample_grad_dots(func: Callable, argnums: Any = 0, *, in_dims: Any = 0,
                         batch_norm: str = "error") -> Callable:
    """``(vector, *args) -> [B]``: ``<g_i, vector>`` for every example, ``vector`` shaped like
    the ``argnums`` inputs (e.g. a validation-set gradient, for data attribution).

    Example:
        >>> import torch, ftrans
        >>> w, v = torch.randn(3, 4), torch.randn(3, 4)
        >>> loss = lambda w, x: (x @ w.T).square().sum()
        >>> x = torch.randn(5, 4)
        >>> dots = ftrans.per_sample_grad_dots(loss)(v, w, x)
        >>> per = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0))(w, x)
        >>> torch.allclose(dots, (per * v).sum((1, 2)), atol=1e-4)
        True
    """
    _check_func(func, "per_sample_grad_dots")
    form = _form("per_sample_grad_dots", func, argnums)

    @functools.wraps(func)
    def wrapper(vector, *args, **kwargs):
        cap = run(func, argnums, in_dims, False, args, kwargs, form, batch_norm)
        vs, vspec = _pytree.tree_flatten(vector)
        if vspec != cap.spec:
            raise ValueError(f"{form}: vector must have the structure of the differentiated "
                             f"inputs ({cap.spec}), got {vspec}")
        out = cap.losses.new_zeros(cap.batch_size)
        for f, v, x in zip(cap.factors, vs, cap.leaves):
            if v.shape != x.shape:
                raise ValueError(f"{form}: vector leaf of shape {tuple(v.shape)} does not match "
                                 f"the input of shape {tuple(x.shape)}")
            if f is not None:
                out = out + f.dot(v)
        return out

    return wrapper


def per_sample_grad_cross(func: Callable, argnums: Any = 0, *, in_dims: Any = 0,
                          batch_norm: str = "error") -> Callable:
    """``(args, other_args) -> [B1, B2]``: ``<g_i, h_j>`` between the per-example gradients of
    two batches (``args`` and ``other_args`` are the argument tuples of two calls of ``func``
    with the same ``argnums`` inputs), e.g. train-vs-test gradient similarity (TracIn).

    Example:
        >>> import torch, ftrans
        >>> w = torch.randn(3, 4)
        >>> loss = lambda w, x: (x @ w.T).square().sum()
        >>> xa, xb = torch.randn(5, 4), torch.randn(2, 4)
        >>> sim = ftrans.per_sample_grad_cross(loss)((w, xa), (w, xb))
        >>> pg = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0))
        >>> ref = pg(w, xa).flatten(1) @ pg(w, xb).flatten(1).T
        >>> sim.shape, torch.allclose(sim, ref, rtol=1e-4, atol=1e-3)
        (torch.Size([5, 2]), True)
    """
    _check_func(func, "per_sample_grad_cross")
    form = _form("per_sample_grad_cross", func, argnums)

    @functools.wraps(func)
    def wrapper(args, other_args, **kwargs):
        a = run(func, argnums, in_dims, False, tuple(args), kwargs, form, batch_norm)
        b = run(func, argnums, in_dims, False, tuple(other_args), kwargs, form, batch_norm)
        if a.spec != b.spec:
            raise ValueError(f"{form}: the two batches differentiate inputs of different "
                             "structures")
        out = a.losses.new_zeros(a.batch_size, b.batch_size)
        for f, h in zip(a.factors, b.factors):
            if f is not None and h is not None:
                out = out + f.cross(h)
        return out

    return wrapper
