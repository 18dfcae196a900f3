"""Neural-network kernels: normalization, softmax, embedding, attention, glu, prelu, weight norm.

Each kernel already loops over a sample dim N or over channels, so the vmap batch is folded
into one of them, and only the parts that would mix examples are computed differently:

- layer/group norm normalize within a sample, so the batch folds into the leading dims; their
  *weight gradients* sum over samples, which would also sum over the vmap batch, so those are
  computed per example from ``xhat`` with native reductions instead;
- batch norm's statistics are taken over N, so the batch folds into the *channels*
  (``[N, B*C, ...]``): every (example, channel) pair gets its own statistics, exactly the
  per-example semantics.  Running statistics are updated in place only in training mode; an
  unbatched running statistic cannot hold per-example updates, so that case raises (as
  torch.func does) instead of silently keeping one example's update;
- embedding tables that differ per example are flattened into one table ``[B*V, D]`` with the
  indices offset by ``b*V``, which also keeps ``scale_grad_by_freq`` counts per example.
"""
from __future__ import annotations

import torch

from ..errors import VmapError, call_form
from ..registry import register_batch_rule
from ._util import (aten_op, aten_ops, batched_front, logical_rank, pad_rank, register_present,
                    to_channels, to_front, wrap_dim)
from .pointwise import pointwise_rule

aten = torch.ops.aten


def _trailing_param(p, bdim, rank, k):
    """A per-example parameter of logical shape ``[*ns]`` aligned with a front-batched
    ``rank``-dim example whose last ``k`` dims are ``ns``."""
    if bdim is None:
        return p
    p = to_front(p, bdim)
    return p.view((p.shape[0],) + (1,) * (rank - k) + tuple(p.shape[1:]))


def _sum_dims(x, dims, keepdim=False):
    return x.sum(dims, keepdim=keepdim) if dims else x  # .sum([]) would reduce everything


# ----------------------------------------------------------------------------------------------
# layer norm
# ----------------------------------------------------------------------------------------------

@register_batch_rule(aten.native_layer_norm.default)
def layer_norm_rule(level, func, args, bdims, kwargs):
    x, ns, w, b, eps = args
    B = level.batch_size
    x = batched_front(x, bdims[0], B)
    if bdims[2] is None and bdims[3] is None:
        return func(x, ns, w, b, eps), (0, 0, 0)
    out, mean, rstd = func(x, ns, None, None, eps)
    rank, k = x.dim() - 1, len(ns)
    if w is not None:
        out = out * _trailing_param(w, bdims[2], rank, k)
    if b is not None:
        out = out + _trailing_param(b, bdims[3], rank, k)
    return (out, mean, rstd), (0, 0, 0)


@register_batch_rule(aten.native_layer_norm_backward.default)
def layer_norm_backward_rule(level, func, args, bdims, kwargs):
    go, x, ns, mean, rstd, w, b, mask = args
    B = level.batch_size
    # torch 2.13's CPU kernel reads expanded (stride-0) mean/rstd as if contiguous: NaNs.
    g = batched_front(go, bdims[0], B).contiguous()
    x = batched_front(x, bdims[1], B).contiguous()
    mean = batched_front(mean, bdims[3], B).contiguous()
    rstd = batched_front(rstd, bdims[4], B).contiguous()
    rank, k = x.dim() - 1, len(ns)
    dims = list(range(1, rank - k + 1))
    gi = gw = gb = None
    if mask[0]:
        if w is None or bdims[5] is None:
            gi = func(g, x, ns, mean, rstd, w, None, [True, False, False])[0]
        else:
            gw_ = g * _trailing_param(w, bdims[5], rank, k)
            gi = func(gw_, x, ns, mean, rstd, None, None, [True, False, False])[0]
    if mask[1] and w is not None:
        gw = _sum_dims(g * ((x - mean) * rstd), dims)
    if mask[2] and b is not None:
        gb = _sum_dims(g, dims)
    return (gi, gw, gb), tuple(None if t is None else 0 for t in (gi, gw, gb))


# ----------------------------------------------------------------------------------------------
# group norm: fold into N
# ----------------------------------------------------------------------------------------------

def _channel_param(p, bdim, rank):
    """Per-example ``[C]`` aligned with a front-batched ``[N, C, *]`` example."""
    p = to_front(p, bdim)
    return p.view((p.shape[0], 1, p.shape[1]) + (1,) * (rank - 2))


@register_batch_rule(aten.native_group_norm.default)
def group_norm_rule(level, func, args, bdims, kwargs):
    x, w, b, N, C, HxW, G, eps = args
    B = level.batch_size
    x = batched_front(x, bdims[0], B)
    xf = x.reshape((B * N,) + tuple(x.shape[2:])).contiguous()  # the kernel demands it
    affine_later = bdims[1] is not None or bdims[2] is not None
    out, mean, rstd = func(xf, None if affine_later else w, None if affine_later else b,
                           B * N, C, HxW, G, eps)
    out = out.view(x.shape)
    if affine_later:
        rank = x.dim() - 1
        if w is not None:
            out = out * (_channel_param(w, bdims[1], rank) if bdims[1] is not None
                         else w.view((C,) + (1,) * (rank - 2)))
        if b is not None:
            out = out + (_channel_param(b, bdims[2], rank) if bdims[2] is not None
                         else b.view((C,) + (1,) * (rank - 2)))
    return (out, mean.view(B, N, G), rstd.view(B, N, G)), (0, 0, 0)


@register_batch_rule(aten.native_group_norm_backward.default)
def group_norm_backward_rule(level, func, args, bdims, kwargs):
    go, x, mean, rstd, w, N, C, HxW, G, mask = args
    B = level.batch_size
    # Contiguous: folding an expanded (stride-0) tensor into N can stay a stride-0 view, which
    # torch 2.13's CPU kernel misreads (as native_layer_norm_backward does).
    g = batched_front(go, bdims[0], B).contiguous()
    x = batched_front(x, bdims[1], B).contiguous()
    mean = batched_front(mean, bdims[2], B).reshape(B * N, G).contiguous()
    rstd = batched_front(rstd, bdims[3], B).reshape(B * N, G).contiguous()
    rank = x.dim() - 1
    fold = (B * N,) + tuple(x.shape[2:])
    gi = gw = gb = None
    if mask[0]:
        if w is not None and bdims[4] is not None:
            gi = func((g * _channel_param(w, bdims[4], rank)).reshape(fold), x.reshape(fold),
                      mean, rstd, None, B * N, C, HxW, G, [True, False, False])[0]
        else:
            gi = func(g.reshape(fold), x.reshape(fold), mean, rstd, w, B * N, C, HxW, G,
                      [True, False, False])[0]
        gi = gi.view(x.shape)
    if (mask[1] and w is not None) or mask[2]:
        g4 = g.reshape(B, N, C, HxW)
        if mask[1] and w is not None:
            xg = x.reshape(B, N, G, C // G, HxW)
            xhat = (xg - mean.view(B, N, G, 1, 1)) * rstd.view(B, N, G, 1, 1)
            gw = (g4 * xhat.reshape(B, N, C, HxW)).sum((1, 3))
        if mask[2]:
            gb = g4.sum((1, 3))
    return (gi, gw, gb), tuple(None if t is None else 0 for t in (gi, gw, gb))


# ----------------------------------------------------------------------------------------------
# batch norm: fold into the channels
# ----------------------------------------------------------------------------------------------

def batch_norm_rule(acts, chans, training, stats=()):
    """``acts``: positions of ``[N, C, *]`` tensors; ``chans``: positions of ``[C]`` tensors;
    ``training``: position of the training flag or a constant; ``stats``: running statistics
    the kernel updates in place when training."""

    def rule(level, func, args, bdims, kwargs):
        B = level.batch_size
        args = list(args)
        train = args[training] if isinstance(training, int) else training
        # With an unbatched input every example's batch statistics are the same, so an unbatched
        # running statistic gets one update (written back below); with a batched input it
        # would need one per example.
        acts_batched = any(p < len(args) and bdims[p] is not None for p in acts)
        if train and acts_batched and any(p < len(args) and args[p] is not None
                                          and bdims[p] is None for p in stats):
            raise VmapError(
                f"{call_form(level)}: batch norm in training mode would update its running "
                "statistics in place, but they are not batched while the input is: one running "
                "mean cannot hold a different update per example. Use eval mode, pass "
                "`track_running_stats=False` (for modules: "
                "torch.func.replace_all_batch_norm_modules_), or make the running statistics "
                "batched (e.g. one copy per example) and pass them to vmap as mapped inputs."
            )
        C = None
        for p in acts:
            x = to_channels(args[p], bdims[p], B)
            args[p] = x
            C = x.shape[1] // B
        writeback, shared = [], []
        for p in chans:
            t = args[p] if p < len(args) else None
            if not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            front = batched_front(t, bdims[p], B)
            flat = front.reshape(-1)
            if p in stats and train and bdims[p] is None:
                flat = flat.clone()  # B equal updates of one statistic: example 0's is written
                shared.append((t, flat))
            elif p in stats and bdims[p] is not None and not front.is_contiguous():
                writeback.append((front, flat))  # reshape copied: copy the update back
            args[p] = flat
        out = func(*args, **kwargs)
        for front, flat in writeback:
            front.copy_(flat.view(front.shape))
        for t, flat in shared:
            t.copy_(flat.view((B,) + tuple(t.shape))[0])
        outs, obds = [], []
        for o in out:
            if not isinstance(o, torch.Tensor):
                outs.append(o)
                obds.append(None)
            elif o.dim() >= 2:
                outs.append(o.view((o.shape[0], B, C) + tuple(o.shape[2:])))
                obds.append(1)
            elif o.dim() == 1 and o.numel() == B * C and o.numel() > 0:
                outs.append(o.view(B, C))
                obds.append(0)
            else:  # empty placeholders (eval-mode saved stats, reserve)
                outs.append(o)
                obds.append(None)
        return tuple(outs), tuple(obds)

    rule.checks_mutation = True
    return rule


# (input, weight, bias, running_mean, running_var, training, momentum, eps)
register_present(*aten_ops("native_batch_norm", "_native_batch_norm_legit"))(
    batch_norm_rule([0], [1, 2, 3, 4], 5, stats=(3, 4)))
register_present(aten_op("_native_batch_norm_legit", "no_stats"))(
    batch_norm_rule([0], [1, 2], 3))
register_present(aten_op("_native_batch_norm_legit_no_training"))(
    batch_norm_rule([0], [1, 2, 3, 4], False))
# returns new stats instead of mutating
register_present(aten_op("_native_batch_norm_legit_functional"))(
    batch_norm_rule([0], [1, 2, 3, 4], 5))
register_present(aten_op("_batch_norm_with_update"))(
    batch_norm_rule([0], [1, 2, 3, 4], True, stats=(3, 4)))
register_present(aten_op("_batch_norm_with_update_functional"))(
    batch_norm_rule([0], [1, 2, 3, 4], True))
register_present(aten_op("_batch_norm_no_update"))(
    batch_norm_rule([0], [1, 2, 3, 4], False))
# (grad_out, input, weight, running_mean, running_var, save_mean, save_invstd, train, eps, mask)
register_present(*aten_ops("native_batch_norm_backward", "batch_norm_backward"))(
    batch_norm_rule([0, 1], [2, 3, 4, 5, 6], 7))


# ----------------------------------------------------------------------------------------------
# softmax family and glu: a logical dim shifted past the batch dim
# ----------------------------------------------------------------------------------------------

def dim_rule(positions, dim_pos):
    def rule(level, func, args, bdims, kwargs):
        B = level.batch_size
        args = list(args)
        rank = args[positions[0]].dim() - (bdims[positions[0]] is not None)
        for p in positions:
            x = batched_front(args[p], bdims[p], B)
            args[p] = x.unsqueeze(-1) if rank == 0 else x
        if dim_pos >= len(args):  # glu's dim defaults to -1
            args.append(kwargs.get("dim", -1))
            kwargs = {k: v for k, v in kwargs.items() if k != "dim"}
        args[dim_pos] = 1 if rank == 0 else wrap_dim(args[dim_pos], rank) + 1
        out = func(*args, **kwargs)
        return (out.squeeze(-1) if rank == 0 else out), 0

    return rule


register_batch_rule(aten._softmax.default, aten._log_softmax.default)(dim_rule([0], 1))
register_batch_rule(aten._softmax_backward_data.default,
                    aten._log_softmax_backward_data.default)(dim_rule([0, 1], 2))
register_batch_rule(aten.glu.default)(dim_rule([0], 1))
register_batch_rule(aten.glu_backward.default)(dim_rule([0, 1], 2))


# ----------------------------------------------------------------------------------------------
# prelu: the kernel is a broadcasting where(x > 0, x, w * x)
# ----------------------------------------------------------------------------------------------

@register_present(aten_op("_prelu_kernel"))
def prelu_rule(level, func, args, bdims, kwargs):
    # The kernel's output takes the input's shape (the weight only broadcasts into it), so an
    # unbatched input with a batched weight is expanded to the batch first (torch would resize
    # the output, with a warning).
    if bdims[0] is None:
        args = (batched_front(args[0], None, level.batch_size),) + tuple(args[1:])
        bdims = (0,) + tuple(bdims[1:])
    return pointwise_rule(level, func, args, bdims, kwargs)

if aten_op("_prelu_kernel_backward") is not None:
    @register_batch_rule(aten._prelu_kernel_backward.default)
    def prelu_backward_rule(level, func, args, bdims, kwargs):
        B = level.batch_size
        rank = max(a.dim() - (b is not None) for a, b in zip(args, bdims))
        g, x, w = (pad_rank(to_front(a, b), rank) if b is not None else a
                   for a, b in zip(args, bdims))
        pos = x > 0
        gi = torch.where(pos, g, w * g)
        gw = torch.where(pos, torch.zeros((), dtype=g.dtype, device=g.device), x * g)
        gw = gw.expand((B,) + tuple(gw.shape[-rank:]) if rank else (B,))
        wshape = tuple(args[2].shape) if bdims[2] is None else tuple(
            args[2].movedim(bdims[2], 0).shape[1:])
        lead = rank - len(wshape)
        gw = _sum_dims(gw, list(range(1, lead + 1)))
        red = [i + 1 for i, s in enumerate(wshape) if s == 1 and gw.shape[i + 1] != 1]
        if red:
            gw = gw.sum(red, keepdim=True)
        if gi.dim() == rank:
            gi = gi.unsqueeze(0).expand((B,) + tuple(gi.shape))
        return (gi, gw), (0, 0)


# ----------------------------------------------------------------------------------------------
# weight norm: w = g * v / ||v|| (the norm over every dim but ``dim``).  The fused kernels take
# ``dim`` 0 or last only, which a batch dim in front breaks, so the backward is its closed form
# on the physical tensors (the forward decomposes).
# ----------------------------------------------------------------------------------------------

@register_present(aten_op("_weight_norm_interface_backward"))
def weight_norm_backward_rule(level, func, args, bdims, kwargs):
    grad_w, v, g, norms, dim = args
    rank = logical_rank(v, bdims[1])
    gw, v1, g1, n1 = (to_front(a, b) if b is not None else a.unsqueeze(0)
                      for a, b in zip(args[:4], bdims[:4]))
    red = [i + 1 for i in range(rank) if i != wrap_dim(dim, rank)]
    acc = n1.dtype  # float for half inputs, as in the kernel
    gw, v1, g1 = gw.to(acc), v1.to(acc), g1.to(acc)
    s = _sum_dims(gw * v1, red, keepdim=True)
    grad_g = s / n1
    grad_v = (g1 / n1) * (gw - v1 * (s / (n1 * n1)))
    B = level.batch_size
    return tuple(o.to(a.dtype).expand((B,) + tuple(o.shape[1:]))
                 for o, a in ((grad_v, v), (grad_g, g))), (0, 0)


# ----------------------------------------------------------------------------------------------
# embedding
# ----------------------------------------------------------------------------------------------

def _offset_indices(idx, bdim, B, V):
    idx = batched_front(idx, bdim, B)
    offs = torch.arange(B, device=idx.device, dtype=idx.dtype) * V
    return idx + offs.view((B,) + (1,) * (idx.dim() - 1))


@register_batch_rule(aten.embedding.default)
def embedding_rule(level, func, args, bdims, kwargs):
    w, idx = args[0], args[1]
    rest = list(args[2:])
    if bdims[0] is None:
        return func(w, idx, *rest, **kwargs), bdims[1]
    B = level.batch_size
    w = to_front(w, bdims[0])
    V = w.shape[1]
    if rest:
        rest[0] = -1  # the forward ignores padding_idx; offsets would break it anyway
    out = func(w.reshape((B * V,) + tuple(w.shape[2:])), _offset_indices(idx, bdims[1], B, V),
               *rest, **kwargs)
    return out, 0


@register_batch_rule(aten.embedding_dense_backward.default)
def embedding_dense_backward_rule(level, func, args, bdims, kwargs):
    go, idx, V, padding_idx, scale = args
    B = level.batch_size
    g = batched_front(go, bdims[0], B)
    i = batched_front(idx, bdims[1], B)
    if padding_idx is not None and padding_idx >= 0:
        g = g * (i != padding_idx).unsqueeze(-1).to(g.dtype)
    out = func(g, _offset_indices(i, 0, B, V), B * V, -1, scale)
    return out.view((B, V) + tuple(out.shape[1:])), 0


# ----------------------------------------------------------------------------------------------
# scaled dot product attention kernels: fold into N
# ----------------------------------------------------------------------------------------------

def attention_rule(cores, dropout_pos=None):
    """``cores[pos]``: the logical rank of that tensor *with* its N dim (4 for q/k/v/out,
    3 for logsumexp).  Tensors of lower logical rank have no N and need no fold."""

    def rule(level, func, args, bdims, kwargs):
        B = level.batch_size
        p = args[dropout_pos] if dropout_pos is not None and dropout_pos < len(args) else 0.0
        if p and p > 0 and level.randomness != "different":
            raise VmapError(
                f"{call_form(level)}: attention with dropout_p={p} draws random values; use "
                "vmap(..., randomness='different') (randomness='same' is not supported for "
                "fused attention), or dropout_p=0."
            )
        args = list(args)
        N = None
        for pos, core in cores.items():
            t = args[pos] if pos < len(args) else None
            if not isinstance(t, torch.Tensor):
                continue
            x = batched_front(t, bdims[pos], B)
            if x.dim() - 1 == core:
                if N is None:
                    N = x.shape[1]
                elif x.shape[1] != N:  # a broadcast attention bias
                    x = x.expand((B, N) + tuple(x.shape[2:]))
                x = x.reshape((B * N,) + tuple(x.shape[2:]))
            args[pos] = x
        mask = kwargs.get("attn_mask")
        mask_bdim = getattr(bdims, "kw", {}).get("attn_mask")
        if isinstance(mask, torch.Tensor) and (mask_bdim is not None or N is not None):
            kwargs = dict(kwargs, attn_mask=_fold_mask(mask, mask_bdim, B, N))
        out = func(*args, **kwargs)
        outs, obds = [], []
        for o in out:
            if isinstance(o, torch.Tensor) and o.dim() >= 1 and N is not None \
                    and o.shape[0] == B * N and o.dim() >= 3:
                outs.append(o.view((B, N) + tuple(o.shape[1:])))
                obds.append(0)
            elif isinstance(o, torch.Tensor) and N is None and o.dim() >= 2 and o.shape[0] == B:
                outs.append(o)
                obds.append(0)
            else:  # rng seeds, sequence lengths, empty debug masks
                outs.append(o)
                obds.append(None)
        return tuple(outs), tuple(obds)

    rule.handles_randomness = True
    rule.kw_bdims = True
    return rule


def _fold_mask(mask, bdim, B, N):
    """An attention mask (logical shape broadcastable to [N, H, L, S], or [H, L, S] / [L, S]
    when q has no N dim) laid out for the kernel call on the folded [B*N, ...] tensors."""
    if bdim is None:
        if mask.dim() < 4 or N is None:
            return mask  # broadcasts against the folded tensors as it is
        m = mask.expand((N,) + tuple(mask.shape[1:]))
        return m.unsqueeze(0).expand((B,) + tuple(m.shape)).reshape((B * N,) + tuple(m.shape[1:]))
    m = mask.movedim(bdim, 0)
    if N is None:  # q was [B, H, L, E]: the mask's batch dim lines up with q's
        return pad_rank(m, 3)
    m = pad_rank(m, 4)  # [B, n, h, L, S] with n, h possibly 1
    m = m.expand((B, N) + tuple(m.shape[2:]))
    return m.reshape((B * N,) + tuple(m.shape[2:]))


_ATTN = {
    # (q, k, v, dropout_p, is_causal, *, attn_mask, scale) -> (out, logsumexp)
    "_scaled_dot_product_flash_attention_for_cpu": ({0: 4, 1: 4, 2: 4}, 3),
    # (grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, *, attn_mask, scale)
    "_scaled_dot_product_flash_attention_for_cpu_backward":
        ({0: 4, 1: 4, 2: 4, 3: 4, 4: 4, 5: 3}, 6),
    # CUDA kernels (q, k, v, dropout_p, is_causal, return_debug_mask, *, scale)
    "_scaled_dot_product_flash_attention": ({0: 4, 1: 4, 2: 4}, 3),
    # (q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, *, scale)
    "_scaled_dot_product_efficient_attention": ({0: 4, 1: 4, 2: 4, 3: 4}, 5),
    # (grad_out, q, k, v, out, logsumexp, cum_q, cum_k, max_q, max_k, dropout_p, ...)
    "_scaled_dot_product_flash_attention_backward":
        ({0: 4, 1: 4, 2: 4, 3: 4, 4: 4, 5: 3}, 10),
    # (grad_out, q, k, v, attn_bias, out, logsumexp, seed, offset, dropout_p, ...)
    "_scaled_dot_product_efficient_attention_backward":
        ({0: 4, 1: 4, 2: 4, 3: 4, 4: 4, 5: 4, 6: 3}, 9),
}
for _name, (_cores, _dp) in _ATTN.items():
    register_present(aten_op(_name))(attention_rule(_cores, _dp))
