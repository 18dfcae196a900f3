"""``F.embedding_bag``: the forward kernels and the gradients of the weight and of the
per-sample weights.

The kernels already take a flat list of bags (``indices`` cut by ``offsets``), so the vmap batch
becomes more bags: example ``b``'s indices follow example ``b-1``'s, its offsets move by
``b * len(indices)``, its bags are numbered after ``b * num_bags``.  A per-example weight
table becomes one ``[B*V, D]`` table with example ``b``'s indices moved by ``b*V``, which also
keeps ``scale_grad_by_freq`` counts and max-mode winners per example.  Gradients of the weight
are per-example values even for a shared weight (they depend on each example's bags), so the
backward kernels always work on the ``[B*V, D]`` numbering and return ``[B, V, D]``.

One kernel quirk needs care: torch's CPU weight gradient with ``scale_grad_by_freq`` scales the
``r``-th distinct index by the count of the ``r``-th *sorted* index, not by its own count.
Ranks over a folded batch differ from each example's, so where a one-off probe finds that
behaviour the folded kernel runs unscaled and each example's rows are scaled afterwards with
native batched ops, reproducing what a per-example call returns.

The auxiliary outputs (``offset2bag``, ``bag_size``, ``max_indices``) are converted back to
each example's own numbering, so they are exactly what a per-example call returns: the backward
rules (and any other consumer) see per-example values and fold them again.  Outputs a kernel
leaves empty (``offset2bag`` of a plain sum on CPU) do not depend on the batch and stay
unbatched.

Index moves skip what must not move: ``padding_idx`` entries stay ``padding_idx`` (the kernel
must still recognize them; no moved index can equal it, since moved indices are ``>= V``), and
out-of-range indices stay out of range of the whole table (negative ones as they are, ``>= V``
ones past ``B*V``), so the kernel raises as the per-example call would instead of reading
another example's rows.  ``include_last_offset`` drops each example's last offset, which the
documented contract makes ``len(indices)``; the folded bags then end where the next example's
begin.  A ``sparse=True`` weight gradient comes back as a sparse ``[B*V, D]`` tensor whose
row indices split into (example, row): a sparse ``[B, V, D]``, as stacking the examples' would be.
"""
from __future__ import annotations

import torch

from ..registry import register_batch_rule
from ._util import aten_ops, batched_front, to_front

aten = torch.ops.aten


def _full(func, args, bdims, kwargs):
    """Positional ``args`` and ``bdims`` with every argument filled in (defaults, kwargs)."""
    schema_args = func._schema.arguments
    args, bdims = list(args), list(bdims)
    for a in schema_args[len(args):]:
        args.append(kwargs[a.name] if a.name in kwargs else a.default_value)
        bdims.append(None)
    return args, bdims


def _steps(x, B, step):
    """``arange(B) * step`` shaped to broadcast against ``x`` (``[B, ...]``)."""
    return (torch.arange(B, device=x.device, dtype=x.dtype) * step).view(
        (B,) + (1,) * (x.dim() - 1))


def _shift(idx, B, V, padding_idx):
    """Per-example indices ``[B, ...]`` into a ``[V, D]`` table -> indices into ``[B*V, D]``."""
    shift = torch.where(idx < V, _steps(idx, B, V), B * V)
    keep = idx < 0
    if padding_idx is not None and padding_idx >= 0:
        keep = keep | (idx == padding_idx)
    return idx + torch.where(keep, 0, shift)


def _unshift(idx, B, V):
    """Inverse of :func:`_shift` on what a kernel returns (sentinels ``< b*V`` stay)."""
    steps = _steps(idx, B, V)
    return torch.where(idx >= steps, idx - steps, idx)


def _flat(x, bdim, B):
    """``[B, n, ...]`` (expanding an unbatched ``x``) -> ``[B*n, ...]``."""
    x = batched_front(x, bdim, B)
    return x.reshape((-1,) + tuple(x.shape[2:]))


def _flat_ids(x, bdim, B, step):
    """Per-example ids into ``step`` items (bag numbers, positions) -> global ids, flat."""
    x = batched_front(x, bdim, B)
    if x.numel() == 0:
        return x.reshape(-1)
    return (x + _steps(x, B, step)).reshape(-1)


def _flat_offsets(off, bdim, B, n, num_bags=None):
    """Per-example offsets -> one offsets list over the folded indices, without a last offset
    (``num_bags`` given: drop a trailing one; else dropped by the caller's flag)."""
    off = batched_front(off, bdim, B)
    if num_bags is not None and off.shape[1] == num_bags + 1:
        off = off[:, :-1]
    return _flat_ids(off, 0, B, n), off.shape[1]


def _unflat(x, B):
    return x.view((B, x.shape[0] // B) + tuple(x.shape[1:]))


# ----------------------------------------------------------------------------------------------
# forward: _embedding_bag, _embedding_bag_forward_only
# ----------------------------------------------------------------------------------------------

@register_batch_rule(*aten_ops("_embedding_bag", "_embedding_bag_forward_only"))
def embedding_bag_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    (w, idx, off, scale, mode, sparse, psw, last, pad), bd = _full(func, args, bdims, kwargs)
    idx = batched_front(idx, bd[1], B)
    n = idx.shape[1]
    V = None
    if bd[0] is not None:
        w = to_front(w, bd[0])
        V = w.shape[1]
        w = w.reshape((B * V,) + tuple(w.shape[2:]))
        idx = _shift(idx, B, V, pad)
    off = batched_front(off, bd[2], B)
    if last:
        off = off[:, :-1]
    nb = off.shape[1]
    off = _flat_ids(off, 0, B, n)
    if psw is not None:
        psw = _flat(psw, bd[6], B)
    out, o2b, bag_size, max_idx = func(w, idx.reshape(-1), off, scale, mode, sparse, psw, False,
                                       pad)
    o2b, o2b_bd = (o2b, None) if o2b.numel() == 0 else (
        _unflat(o2b, B) - _steps(o2b, B, nb).view(B, 1), 0)
    bs_bd = None if bag_size.numel() == 0 else 0
    if bs_bd is not None:
        bag_size = _unflat(bag_size, B)
    mi_bd = None if max_idx.numel() == 0 else 0
    if mi_bd is not None:
        max_idx = _unflat(max_idx, B)
        if mode == 2 and V is not None:  # max mode: winners index the folded table
            max_idx = _unshift(max_idx, B, V)
    return (_unflat(out, B), o2b, bag_size, max_idx), (0, o2b_bd, bs_bd, mi_bd)


# ----------------------------------------------------------------------------------------------
# weight gradient: _embedding_bag_backward, _embedding_bag_dense_backward
# ----------------------------------------------------------------------------------------------

def _backward_common(B, grad, gbd, idx, ibd, o2b, obd, bag_size, bbd, max_idx, mbd, V, mode,
                     psw, pbd, pad):
    grad = batched_front(grad, gbd, B)
    nb = grad.shape[1]
    idx = _shift(batched_front(idx, ibd, B), B, V, pad)
    n = idx.shape[1]
    o2b = _flat_ids(o2b, obd, B, nb) if obd is not None or o2b.numel() else o2b
    if bbd is not None or bag_size.numel():
        bag_size = _flat(bag_size, bbd, B)
    if mbd is not None or max_idx.numel():
        max_idx = batched_front(max_idx, mbd, B)
        if mode == 2:
            max_idx = _shift(max_idx, B, V, pad)
        max_idx = max_idx.reshape((-1,) + tuple(max_idx.shape[2:]))
    if psw is not None:
        psw = _flat(psw, pbd, B)
    return grad.reshape((B * nb,) + tuple(grad.shape[2:])), idx.reshape(-1), n, nb, o2b, \
        bag_size, max_idx, psw


_FREQ_BUG: dict = {}


def _kernel_freq_scale_is_per_rank(device) -> bool:
    """Whether this device's sum/mean weight-gradient kernel scales the ``r``-th distinct index
    by ``1 / count(sorted_indices[r])`` instead of by its own count (torch's CPU kernel does:
    ``counts[indices_data[i]]`` with ``i`` the group number).  Probed once per device type, so
    a torch that fixes it gets the fixed behaviour."""
    key = device.type
    if key not in _FREQ_BUG:
        ones = torch.ones(1, 1, device=device)
        probe = torch.tensor([0, 0, 1], device=device)
        grad_w = aten._embedding_bag_dense_backward(
            ones, probe, torch.zeros(3, dtype=torch.long, device=device),
            torch.tensor([3], device=device), torch.zeros(1, dtype=torch.long, device=device),
            2, True, 0, None, -1)
        _FREQ_BUG[key] = bool(grad_w[1, 0] != 1)  # index 1 occurs once: a correct scale is 1
    return _FREQ_BUG[key]


def _freq_scale(idx, B, V, dtype):
    """``[B, V, 1]``: the factor the kernel's ``scale_grad_by_freq`` applies to each row of each
    example's gradient (see :func:`_kernel_freq_scale_is_per_rank`), from the per-example
    indices ``[B, n]`` with native batched ops: counts by scatter_add, the rank of each distinct
    index by a cumsum over present rows, the kernel's count by two gathers."""
    idx = idx.long()  # scatter/gather index dtype (the kernels also accept int32 indices)
    counts = torch.zeros((B, V), dtype=idx.dtype, device=idx.device).scatter_add(
        1, idx, torch.ones_like(idx))
    rank = ((counts > 0).cumsum(1) - 1).clamp(0, idx.shape[1] - 1)
    sorted_idx = idx.sort(dim=1).values
    kernel_counts = counts.gather(1, sorted_idx.gather(1, rank))
    return kernel_counts.to(dtype).reciprocal().unsqueeze(-1)


def _weight_grad(B, V, grad, idx_pe, scale, mode, call):
    """Run the folded weight-gradient kernel ``call(scale)`` -> ``[B, V, D]``.  Where the kernel
    scales by rank, unscaled results times :func:`_freq_scale` reproduce it per example (a
    folded call would rank the distinct indices of all examples together)."""
    if scale and mode != 2 and idx_pe.shape[1] > 0 and _kernel_freq_scale_is_per_rank(
            grad.device):
        return _unflat(call(False), B) * _freq_scale(idx_pe, B, V, grad.dtype)
    return _unflat(call(scale), B)


def _split_sparse_rows(out, B, V):
    """A sparse ``[B*V, D]`` gradient -> sparse ``[B, V, D]`` (what stacking the examples'
    sparse ``[V, D]`` gradients gives): the row index splits into (example, row)."""
    rows = out._indices()[0]
    return torch.sparse_coo_tensor(torch.stack([rows // V, rows % V]), out._values(),
                                   (B, V) + tuple(out.shape[1:]), check_invariants=False)


@register_batch_rule(*aten_ops("_embedding_bag_backward"))
def embedding_bag_backward_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    a, bd = _full(func, args, bdims, kwargs)
    grad, idx, off, o2b, bag_size, max_idx, V, scale, mode, sparse, psw, pad = a
    idx_pe = batched_front(idx, bd[1], B)
    grad, idx, n, nb, o2b, bag_size, max_idx, psw = _backward_common(
        B, grad, bd[0], idx, bd[1], o2b, bd[3], bag_size, bd[4], max_idx, bd[5], V, mode, psw,
        bd[10], pad)
    off, _ = _flat_offsets(off, bd[2], B, n, nb)
    if sparse:
        out = func(grad, idx, off, o2b, bag_size, max_idx, B * V, scale, mode, True, psw, pad)
        return _split_sparse_rows(out, B, V), 0
    return _weight_grad(B, V, grad, idx_pe, scale, mode, lambda sc: func(
        grad, idx, off, o2b, bag_size, max_idx, B * V, sc, mode, False, psw, pad)), 0


@register_batch_rule(*aten_ops("_embedding_bag_dense_backward"))
def embedding_bag_dense_backward_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    a, bd = _full(func, args, bdims, kwargs)
    grad, idx, o2b, bag_size, max_idx, V, scale, mode, psw, pad = a
    idx_pe = batched_front(idx, bd[1], B)
    grad, idx, n, nb, o2b, bag_size, max_idx, psw = _backward_common(
        B, grad, bd[0], idx, bd[1], o2b, bd[2], bag_size, bd[3], max_idx, bd[4], V, mode, psw,
        bd[8], pad)
    return _weight_grad(B, V, grad, idx_pe, scale, mode, lambda sc: func(
        grad, idx, o2b, bag_size, max_idx, B * V, sc, mode, psw, pad)), 0


# ----------------------------------------------------------------------------------------------
# per-sample-weights gradient
# ----------------------------------------------------------------------------------------------

@register_batch_rule(*aten_ops("_embedding_bag_per_sample_weights_backward"))
def embedding_bag_psw_backward_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    (grad, w, idx, off, o2b, mode, pad), bd = _full(func, args, bdims, kwargs)
    grad = batched_front(grad, bd[0], B)
    nb = grad.shape[1]
    idx = batched_front(idx, bd[2], B)
    n = idx.shape[1]
    if bd[1] is not None:  # per-example tables: one folded table, moved indices
        w = to_front(w, bd[1])
        V = w.shape[1]
        w = w.reshape((B * V,) + tuple(w.shape[2:]))
        idx = _shift(idx, B, V, pad)
    off, _ = _flat_offsets(off, bd[3], B, n, nb)
    o2b = _flat_ids(o2b, bd[4], B, nb) if bd[4] is not None or o2b.numel() else o2b
    out = func(grad.reshape((B * nb,) + tuple(grad.shape[2:])), w, idx.reshape(-1), off, o2b,
               mode, pad)
    return _unflat(out, B), 0
