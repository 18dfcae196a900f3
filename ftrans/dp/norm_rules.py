"""Norm rules: how the per-example gradients of one op's parameters are kept in factored form.

A norm rule is registered for the torch functions that call an op (``F.linear``,
``torch.conv2d``, ``x @ w``, ...), the way batching rules are registered for aten ops.  It runs
in two halves:

- *forward* (per example, inside the ``vmap`` of the clipping transform): it gets the call's
  arguments bound by name, with the differentiated parameters already detached, computes the
  op's output, and returns ``(out, saved, factors)``: ``saved`` are the per-example tensors the
  second half needs (the layer input, the normalised activations, the indices...);
- *factors* (once, on the whole batch, after the one backward): ``factors(*saved, g)`` gets
  ``saved`` and ``g``, the gradient of the loss w.r.t. ``out``, as physical batched tensors
  (batch dim first), and returns ``{argument name: Factor}`` (see ``factors.py``).

A rule returns None to decline a call it does not handle (a parameter in an unexpected
position, an option it does not cover); the call then runs with the differentiable parameters
and autograd instantiates their per-example gradients (the fallback: slower, never wrong,
counted in :func:`norm_rule_stats`).

Example: the rule of a custom op ``mylib::scale(x, w) = x * w`` with ``w`` of shape ``[d]``::

    @ftrans.register_norm_rule(torch.ops.mylib.scale, args=("x", "w"), params=("w",))
    def _scale(call):
        x, w = call["x"], call["w"]
        def factors(x, g):                       # [B, ..., d] each
            return {"w": Dense((g * x).reshape(g.shape[0], -1, x.shape[-1]).sum(1))}
        return torch.ops.mylib.scale(x, w), (x,), factors
"""
from __future__ import annotations

import collections
import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .factors import BiasRows, Dense, Outer, Rows, Scatter

__all__ = ["register_norm_rule", "get_norm_rule", "norm_rule_stats", "reset_norm_rule_stats",
           "NormRule", "Call"]


class Call(dict):
    """The arguments of one intercepted call, bound by name; ``targets`` names the
    differentiated parameters (already detached in the dict)."""

    def __init__(self, bound, targets):
        super().__init__(bound)
        self.targets = targets


class NormRule:
    __slots__ = ("fn", "args", "params", "name")

    def __init__(self, fn, args, params, name):
        self.fn, self.args, self.params, self.name = fn, tuple(args), frozenset(params), name

    def bind(self, args, kwargs) -> Optional[dict]:
        if len(args) > len(self.args) or any(k not in self.args for k in kwargs):
            return None
        bound = dict(zip(self.args, args))
        for k, v in kwargs.items():
            if k in bound:
                return None
            bound[k] = v
        return bound


_RULES: dict = {}
_stats: collections.Counter = collections.Counter()
_lock = threading.Lock()


def register_norm_rule(*funcs, args, params) -> Callable:
    """Register a norm rule for the torch callables ``funcs``.

    ``args`` names the call's positional parameters in order (keyword calls bind by the same
    names); ``params`` names those that may be differentiated parameters.  The decorated
    function receives a :class:`Call` and returns ``(out, saved, factors)`` or None.

    Example (a rule for ``torch.outer(x, w)`` with the parameter on the right; the gradient of
    ``w`` for one example is ``g^T x``, an :class:`~ftrans.dp.Outer` factor with one row):
        >>> import torch, ftrans
        >>> from ftrans.dp import Outer
        >>> @ftrans.register_norm_rule(torch.outer, args=("input", "vec2"), params=("vec2",))
        ... def _outer(call):
        ...     x, w = call["input"], call["vec2"]
        ...     def factors(x, g):              # x [B, n], g [B, n, m]
        ...         return {"vec2": Outer(g.unsqueeze(1), x.unsqueeze(1).unsqueeze(-1),
        ...                               w.shape, transpose=True)}
        ...     return torch.outer(x, w), (x,), factors
        >>> w, x = torch.randn(3), torch.randn(4, 2)
        >>> loss = lambda w, x: torch.outer(x, w).sin().sum()
        >>> ftrans.reset_norm_rule_stats()
        >>> norms = ftrans.per_sample_grad_norms(loss)(w, x)
        >>> ref = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0))(w, x).norm(dim=1)
        >>> torch.allclose(norms, ref, atol=1e-5), ftrans.norm_rule_stats()
        (True, {})
    """
    def decorator(fn):
        for f in funcs:
            if f is not None:
                _RULES[f] = NormRule(fn, args, params, getattr(f, "__name__", str(f)))
        return fn
    return decorator


def get_norm_rule(func) -> Optional[NormRule]:
    """The norm rule registered for ``func``, or None."""
    return _RULES.get(func)


def norm_rule_stats() -> dict:
    """``{op name: calls}`` for every parameter use that had no norm rule and was instantiated
    per example (the slow path of the clipping transforms).

    Example:
        >>> import torch, ftrans
        >>> ftrans.reset_norm_rule_stats()
        >>> w = torch.randn(3)
        >>> _ = ftrans.clipped_grad(lambda w, x: (w.exp() * x).sum(), 1.0)(w, torch.randn(4, 3))
        >>> ftrans.norm_rule_stats()   # exp() of a parameter has no norm rule
        {'exp': 1}
    """
    return dict(_stats)


def reset_norm_rule_stats() -> None:
    """Clear :func:`norm_rule_stats`.

    Example:
        >>> import ftrans
        >>> ftrans.reset_norm_rule_stats()
        >>> ftrans.norm_rule_stats()
        {}
    """
    _stats.clear()


def count_fallback(name: str) -> None:
    with _lock:
        _stats[name] += 1


# ----------------------------------------------------------------------------------------------
# helpers (physical tensors, batch dim first)
# ----------------------------------------------------------------------------------------------

def _rows(t, d):
    """``[B, *lead, d]`` -> ``[B, 1, T, d]`` (every leading dim of one example is a row)."""
    return t.reshape(t.shape[0], 1, -1, d)


def sum_to(g, shape):
    """Per-example ``g [B, *out]`` summed to ``[B, *shape]`` (undo broadcasting)."""
    lead = g.dim() - 1 - len(shape)
    if lead > 0:
        if all(s == 1 for s in g.shape[1:1 + lead]):  # a view, not a copy (one row)
            g = g.reshape(g.shape[:1] + g.shape[1 + lead:])
        else:
            g = g.sum(tuple(range(1, 1 + lead)))
    dims = [i + 1 for i, s in enumerate(shape) if s == 1 and g.shape[i + 1] != 1]
    return g.sum(dims, keepdim=True) if dims else g


def _bias(g, shape, weight=None):
    """The factor of a bias added to ``g``'s op output: with a weight factor of one row per
    example and an unbroadcast bias, its rows share the weight's ``||G_i||^2``."""
    rows = sum_to(g, shape)
    if isinstance(weight, Outer) and weight.dims[1:3] == (1, 1) and rows.shape[1:] == shape \
            and rows.dim() == 2 and rows.shape[1] == weight.dims[4]:
        return BiasRows(rows, weight)
    return Dense(rows)


def _channel_sum(t, channel_dim):
    """``[B, *ex]`` summed over every per-example dim but ``channel_dim`` -> ``[B, C]``."""
    dims = [d for d in range(1, t.dim()) if d != channel_dim + 1]
    return t.sum(dims) if dims else t


# ----------------------------------------------------------------------------------------------
# linear / matmul family
# ----------------------------------------------------------------------------------------------

@register_norm_rule(F.linear, args=("input", "weight", "bias"), params=("weight", "bias"))
def _linear(call):
    x, w, b = call["input"], call["weight"], call.get("bias")
    if "input" in call.targets or w.dim() != 2:
        return None
    wshape = w.shape

    def factors(x, g):
        out = {}
        if "weight" in call.targets:
            out["weight"] = Outer(_rows(x, wshape[1]), _rows(g, wshape[0]), wshape)
        if "bias" in call.targets:
            out["bias"] = _bias(g, b.shape, out.get("weight"))
        return out
    return F.linear(x, w, b), (x,), factors


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm,
            torch.Tensor.mm)


@register_norm_rule(*_MATMULS, args=("input", "other"), params=("input", "other"))
def _matmul(call):
    x, w = call["input"], call["other"]
    if len(call.targets) != 1 or not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)):
        return None
    if call.targets == {"other"}:
        if w.dim() != 2 or x.dim() < 1:
            return None
        d, p = w.shape

        def factors(x, g):  # x @ w: g_w = x^T g
            return {"other": Outer(_rows(x, d), _rows(g, p), w.shape, transpose=True)}
        return torch.matmul(x, w), (x,), factors
    # w @ x with the parameter on the left: g_w = g x^T
    w, x = x, w
    if w.dim() != 2 or x.dim() not in (1, 2):
        return None
    p, d = w.shape

    def factors(x, g):
        if x.dim() == 2:  # [B, d] @ ... -> one column per example
            x, g = x.unsqueeze(-1), g.unsqueeze(-1)
        return {"input": Outer(x.mT.unsqueeze(1), g.mT.unsqueeze(1), w.shape)}
    return torch.matmul(w, x), (x,), factors


@register_norm_rule(torch.addmm, torch.Tensor.addmm,
                    args=("input", "mat1", "mat2", "beta", "alpha"), params=("input", "mat2"))
def _addmm(call):
    b, x, w = call["input"], call["mat1"], call["mat2"]
    if call.get("beta", 1) != 1 or call.get("alpha", 1) != 1 or "mat1" in call.targets:
        return None
    d, p = w.shape

    def factors(x, g):
        out = {}
        if "mat2" in call.targets:
            out["mat2"] = Outer(_rows(x, d), _rows(g, p), w.shape, transpose=True)
        if "input" in call.targets:
            out["input"] = _bias(g, b.shape, out.get("mat2"))
        return out
    return torch.addmm(b, x, w), (x,), factors


@register_norm_rule(torch.bmm, torch.Tensor.bmm, args=("input", "mat2"), params=("mat2",))
def _bmm(call):
    x, w = call["input"], call["mat2"]
    if "input" in call.targets:
        return None
    n, d, p = w.shape

    def factors(x, g):  # [B, n, T, d], [B, n, T, p]: one group per matrix of the stack
        return {"mat2": Outer(x, g, w.shape, transpose=True)}
    return torch.bmm(x, w), (x,), factors


# ----------------------------------------------------------------------------------------------
# convolution
# ----------------------------------------------------------------------------------------------

def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _pads(padding, k, dilation, nd):
    """Per spatial dim ``(low, high)`` zero padding, 'same'/'valid' included."""
    if padding == "valid":
        return [(0, 0)] * nd
    if padding == "same":
        out = []
        for i in range(nd):
            total = dilation[i] * (k[i] - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in _tuple(padding, nd)]


def unfold(x, k, stride, pads, dilation):
    """``[M, C, *S]`` -> ``[M, C * prod(k), L]``, patches ordered like a conv weight's
    ``(C, *k)`` (``F.unfold`` for any number of spatial dims)."""
    nd = len(k)
    flat = []
    for lo, hi in reversed(pads):
        flat += [lo, hi]
    if any(flat):
        x = F.pad(x, flat)
    for i in range(nd):
        x = x.unfold(2 + i, dilation[i] * (k[i] - 1) + 1, stride[i])
        if dilation[i] > 1:
            x = x[..., ::dilation[i]]
    M, C = x.shape[:2]
    L = x.shape[2:2 + nd]
    perm = [0, 1] + list(range(2 + nd, 2 + 2 * nd)) + list(range(2, 2 + nd))
    return x.permute(perm).reshape(M, -1, int(torch.Size(L).numel()))


def _conv_rule(nd, conv):
    def rule(call):
        x, w, b = call["input"], call["weight"], call.get("bias")
        if "input" in call.targets:
            return None
        stride = _tuple(call.get("stride", 1), nd)
        dilation = _tuple(call.get("dilation", 1), nd)
        padding = call.get("padding", 0)
        groups = call.get("groups", 1)
        k = tuple(w.shape[2:])
        pads = _pads(padding, k, dilation, nd)
        unbatched = x.dim() == nd + 1  # one example is [C, *S], not [N, C, *S]
        out = conv(x, w, b, stride, padding, dilation, groups)

        def factors(x, g):
            B = x.shape[0]
            if unbatched:
                x, g = x.unsqueeze(1), g.unsqueeze(1)
            N = x.shape[1]
            g = g.reshape(B * N, g.shape[2], -1)  # [B * N, Cout, L]
            cout, L = g.shape[1], g.shape[2]
            res = {}
            if "weight" in call.targets:
                def rows(lo, hi, x=x):  # the unfolded input of examples lo:hi
                    m = hi - lo
                    xs = x[lo:hi].reshape((m * N,) + x.shape[2:])  # [m * N, C, *S]
                    a = unfold(xs, k, stride, pads, dilation)  # [m * N, C * K, L]
                    a = a.reshape(m, N, groups, -1, L).permute(0, 2, 1, 4, 3)
                    return a.reshape(m, groups, N * L, -1)
                cin_k = x.shape[2] // groups * int(torch.Size(k).numel())
                gg = g.reshape(B, N, groups, cout // groups, L).permute(0, 2, 1, 4, 3)
                res["weight"] = Outer(Rows(rows, (B, groups, N * L, cin_k), x.dtype),
                                      gg.reshape(B, groups, N * L, -1), w.shape)
            if "bias" in call.targets:
                res["bias"] = Dense(g.reshape(B, N, cout, L).sum((1, 3)))
            return res
        return out, (x,), factors
    return rule


register_norm_rule(torch.conv1d, F.conv1d, args=("input", "weight", "bias", "stride", "padding",
                   "dilation", "groups"), params=("weight", "bias"))(_conv_rule(1, F.conv1d))
register_norm_rule(torch.conv2d, F.conv2d, args=("input", "weight", "bias", "stride", "padding",
                   "dilation", "groups"), params=("weight", "bias"))(_conv_rule(2, F.conv2d))
register_norm_rule(torch.conv3d, F.conv3d, args=("input", "weight", "bias", "stride", "padding",
                   "dilation", "groups"), params=("weight", "bias"))(_conv_rule(3, F.conv3d))


def _conv_transpose_rule(nd, conv_t):
    """``conv_transpose`` is the adjoint of a convolution of its output by the same weight
    (``[Cin, Cout / groups, *k]``, read as a conv weight from ``Cout`` to ``Cin`` channels), so
    ``g_w[ci, co, k] = sum_s x[ci, s] * unfold(g)[co, k, s]``: an :class:`Outer` with the layer
    input on the output side (``p = Cin / groups``) and the unfolded output gradient on the
    input side (``d = Cout / groups * prod(k)``), one row per input position.  The unfold uses
    the forward's stride, dilation and padding; ``output_padding`` only trims the high side."""
    def rule(call):
        x, w, b = call["input"], call["weight"], call.get("bias")
        if "input" in call.targets:
            return None
        stride = _tuple(call.get("stride", 1), nd)
        dilation = _tuple(call.get("dilation", 1), nd)
        padding = call.get("padding", 0)
        if isinstance(padding, str):
            return None
        padding = _tuple(padding, nd)
        out_pad = _tuple(call.get("output_padding", 0), nd)
        groups = call.get("groups", 1)
        k = tuple(w.shape[2:])
        cin, cout = w.shape[0], w.shape[1] * groups
        pads = [(padding[i], padding[i] - out_pad[i]) for i in range(nd)]
        unbatched = x.dim() == nd + 1
        out = conv_t(x, w, b, stride, padding, out_pad, groups, dilation)

        def factors(x, g):
            B = x.shape[0]
            if unbatched:
                x, g = x.unsqueeze(1), g.unsqueeze(1)
            N = x.shape[1]
            res = {}
            if "weight" in call.targets:
                L = int(torch.Size(x.shape[3:]).numel())
                xs = x.reshape(B, N, groups, cin // groups, L).permute(0, 2, 1, 4, 3)

                def rows(lo, hi, g=g):  # the unfolded output gradient of examples lo:hi
                    m = hi - lo
                    a = unfold(g[lo:hi].reshape((m * N,) + g.shape[2:]), k, stride, pads,
                               dilation)
                    a = a.reshape(m, N, groups, -1, L).permute(0, 2, 1, 4, 3)
                    return a.reshape(m, groups, N * L, -1)
                K = int(torch.Size(k).numel())
                res["weight"] = Outer(Rows(rows, (B, groups, N * L, cout // groups * K),
                                           g.dtype),
                                      xs.reshape(B, groups, N * L, -1), w.shape)
            if "bias" in call.targets:
                res["bias"] = Dense(g.reshape(B, N, cout, -1).sum((1, 3)))
            return res
        return out, (x,), factors
    return rule


_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
                "dilation")
register_norm_rule(torch.conv_transpose1d, F.conv_transpose1d, args=_CONV_T_ARGS,
                   params=("weight", "bias"))(_conv_transpose_rule(1, F.conv_transpose1d))
register_norm_rule(torch.conv_transpose2d, F.conv_transpose2d, args=_CONV_T_ARGS,
                   params=("weight", "bias"))(_conv_transpose_rule(2, F.conv_transpose2d))
register_norm_rule(torch.conv_transpose3d, F.conv_transpose3d, args=_CONV_T_ARGS,
                   params=("weight", "bias"))(_conv_transpose_rule(3, F.conv_transpose3d))


# ----------------------------------------------------------------------------------------------
# embedding
# ----------------------------------------------------------------------------------------------

@register_norm_rule(F.embedding, args=("input", "weight", "padding_idx", "max_norm", "norm_type",
                                       "scale_grad_by_freq", "sparse"), params=("weight",))
def _embedding(call):
    idx, w = call["input"], call["weight"]
    pad = call.get("padding_idx")
    if call.get("max_norm") is not None or call.get("scale_grad_by_freq") or call.get("sparse"):
        return None  # renorm writes the weight; per-batch frequencies: the fallback is exact
    if pad is not None and pad < 0:
        pad += w.shape[0]
    V, d = w.shape

    def factors(idx, g):
        idx = idx.reshape(idx.shape[0], -1)
        g = g.reshape(g.shape[0], -1, d)
        if pad is not None:
            g = g * (idx != pad).unsqueeze(-1).to(g.dtype)
        return {"weight": Scatter(idx, g, V)}
    return F.embedding(idx, w, pad), (idx,), factors


_BAG_MODES = {"sum": 0, "mean": 1, "max": 2}


@register_norm_rule(F.embedding_bag, args=("input", "weight", "offsets", "max_norm", "norm_type",
                                           "scale_grad_by_freq", "mode", "sparse",
                                           "per_sample_weights", "include_last_offset",
                                           "padding_idx"), params=("weight",))
def _embedding_bag(call):
    """One example's indices (1-D with ``offsets``, or 2-D: one bag per row) are a
    :class:`Scatter`: index ``t`` of bag ``b`` adds ``g[b]`` (sum), ``g[b] / |bag b|`` (mean:
    non-padding entries counted) or ``psw[t] * g[b]`` (sum with ``per_sample_weights``) to its
    row; max mode scatters ``g[b, c]`` to the winning row of each column ``c`` (a column-wise
    Scatter).  Padding entries and empty bags contribute nothing."""
    idx, w = call["input"], call["weight"]
    offsets, psw = call.get("offsets"), call.get("per_sample_weights")
    mode = call.get("mode", "mean")
    last = bool(call.get("include_last_offset", False))
    pad = call.get("padding_idx")
    if call.get("max_norm") is not None or call.get("scale_grad_by_freq") or call.get("sparse") \
            or mode not in _BAG_MODES or w.dim() != 2 or getattr(idx, "is_nested", False) \
            or (psw is not None and mode != "sum"):
        return None
    V, d = w.shape
    if pad is not None and pad < 0:
        pad += V
    if idx.dim() == 2:
        if offsets is not None:
            return None  # F.embedding_bag raises; let it
        L = idx.shape[1]
        offsets = torch.arange(0, idx.numel(), L, dtype=idx.dtype, device=idx.device)
        idx, last = idx.reshape(-1), False
        if psw is not None:
            psw = psw.reshape(-1)
    elif idx.dim() != 1 or offsets is None or offsets.dim() != 1:
        return None
    out, _, _, max_idx = torch.embedding_bag(w, idx, offsets, False, _BAG_MODES[mode], False,
                                             psw, last, pad)
    saved = (idx, offsets) + ((psw,) if psw is not None else ()) \
        + ((max_idx,) if mode == "max" else ())

    def factors(idx, offsets, *rest):
        g = rest[-1]  # [B, nb, d]
        B, T = idx.shape
        nb = g.shape[1]
        if offsets.dim() == 1:
            offsets = offsets.expand(B, -1)
        pos = torch.arange(T, device=idx.device).expand(B, T)
        bag = torch.searchsorted(offsets.contiguous(), pos.contiguous(), right=True) - 1
        valid = (bag >= 0) & (bag < nb)  # past include_last_offset's end: unused
        if pad is not None:
            valid = valid & (idx != pad)
        bag = bag.clamp(0, nb - 1)
        count = g.new_zeros(B, nb).scatter_add(1, bag, valid.to(g.dtype))
        if mode == "max":
            # Each column's winner among the bag's non-padding entries; empty bags output 0.
            win = rest[-2]
            keep = (count > 0).unsqueeze(-1).to(g.dtype)
            return {"weight": Scatter(win, g * keep, V)}
        scale = valid.to(g.dtype)
        if mode == "mean":
            scale = scale / torch.gather(count, 1, bag).clamp_min(1)
        if psw is not None:
            scale = scale * rest[0].to(g.dtype)
        rows = torch.gather(g, 1, bag.unsqueeze(-1).expand(B, T, d)) * scale.unsqueeze(-1)
        return {"weight": Scatter(idx, rows, V)}
    return out, saved, factors


# ----------------------------------------------------------------------------------------------
# normalisation affine parameters (instantiated: they are small)
# ----------------------------------------------------------------------------------------------

def _affine(call, xhat, channel_dim, shape):
    """``xhat * weight + bias`` with the weight broadcast along ``channel_dim`` (or over the
    trailing ``shape`` when channel_dim is None)."""
    w, b = call.get("weight"), call.get("bias")
    view = shape if channel_dim is None else (shape[0],) + (1,) * (xhat.dim() - channel_dim - 1)
    out = xhat
    if w is not None:
        out = out * (w if w.shape == view else w.reshape(view))
    if b is not None:
        out = out + (b if b.shape == view else b.reshape(view))

    def factors(xhat, g):
        res = {}
        B = g.shape[0]
        if channel_dim is None:
            if "weight" in call.targets:
                res["weight"] = Dense((g * xhat).reshape(B, -1, *shape).sum(1))
            if "bias" in call.targets:
                res["bias"] = Dense(g.reshape(B, -1, *shape).sum(1))
        else:
            if "weight" in call.targets:
                res["weight"] = Dense(_channel_sum(g * xhat, channel_dim))
            if "bias" in call.targets:
                res["bias"] = Dense(_channel_sum(g, channel_dim))
        return res
    return out, (xhat,), factors


@register_norm_rule(F.layer_norm, args=("input", "normalized_shape", "weight", "bias", "eps"),
                    params=("weight", "bias"))
def _layer_norm(call):
    if "input" in call.targets:
        return None
    shape = tuple(call["normalized_shape"])
    xhat = F.layer_norm(call["input"], shape, None, None, call.get("eps", 1e-5))
    return _affine(call, xhat, None, shape)


@register_norm_rule(F.group_norm, args=("input", "num_groups", "weight", "bias", "eps"),
                    params=("weight", "bias"))
def _group_norm(call):
    x = call["input"]
    if "input" in call.targets:
        return None
    xhat = F.group_norm(x, call["num_groups"], None, None, call.get("eps", 1e-5))
    return _affine(call, xhat, 1, (x.shape[1],))


@register_norm_rule(F.instance_norm, args=("input", "running_mean", "running_var", "weight",
                                           "bias", "use_input_stats", "momentum", "eps"),
                    params=("weight", "bias"))
def _instance_norm(call):
    x = call["input"]
    if not call.targets <= {"weight", "bias"}:
        return None
    xhat = F.instance_norm(x, call.get("running_mean"), call.get("running_var"), None, None,
                           call.get("use_input_stats", True), call.get("momentum", 0.1),
                           call.get("eps", 1e-5))
    return _affine(call, xhat, 1, (x.shape[1],))


@register_norm_rule(F.batch_norm, args=("input", "running_mean", "running_var", "weight", "bias",
                                        "training", "momentum", "eps"),
                    params=("weight", "bias"))
def _batch_norm(call):
    x = call["input"]
    if not call.targets <= {"weight", "bias"}:
        return None
    xhat = F.batch_norm(x, call.get("running_mean"), call.get("running_var"), None, None,
                        call.get("training", False), call.get("momentum", 0.1),
                        call.get("eps", 1e-5))
    return _affine(call, xhat, 1, (x.shape[1],))


# ----------------------------------------------------------------------------------------------
# bias adds and elementwise scales
# ----------------------------------------------------------------------------------------------

def _binary(op, scale):
    def rule(call):
        x, y = call["input"], call["other"]
        if len(call.targets) != 1 or call.get("alpha", 1) != 1:
            return None
        name = next(iter(call.targets))
        p, other = (x, y) if name == "input" else (y, x)
        out = op(x, y)
        if not isinstance(out, torch.Tensor) or out.shape != torch.broadcast_shapes(
                out.shape, p.shape):
            return None
        sign = -1.0 if (op is torch.sub and name == "other") else 1.0
        saved = (other,) if scale and isinstance(other, torch.Tensor) else ()

        def factors(*t):
            g = t[-1]
            if scale:
                g = g * (t[0] if saved else other)
            elif sign != 1.0:
                g = -g
            return {name: Dense(sum_to(g, p.shape))}
        return out, saved, factors
    return rule


_ADD_ARGS = dict(args=("input", "other", "alpha"), params=("input", "other"))
register_norm_rule(torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__,
                   **_ADD_ARGS)(
    _binary(torch.add, False))
register_norm_rule(torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, **_ADD_ARGS)(
    _binary(torch.sub, False))
register_norm_rule(torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
                   **_ADD_ARGS)(
    _binary(torch.mul, True))
