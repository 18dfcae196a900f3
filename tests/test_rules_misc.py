"""Rules that replaced the last loop fallbacks: rsub.Tensor, lu_unpack, cdist/pdist, embedding_bag
and the grid sampler (forward and backward kernels, the latter via per-example gradients)."""
import math

import pytest
import torch
import torch.nn.functional as F

import ftrans
from _helpers import check_grads, check_vmap, no_fallback

aten = torch.ops.aten
B = 3

COVERED = [
    "rsub.Tensor", "lu_unpack.default", "_cdist_forward.default", "_cdist_backward.default",
    "_pdist_forward.default", "_pdist_backward.default", "_embedding_bag.default",
    "_embedding_bag_forward_only.default", "_embedding_bag_backward.default",
    "_embedding_bag_dense_backward.default", "_embedding_bag_per_sample_weights_backward.default",
    "grid_sampler_2d.default", "grid_sampler_3d.default", "grid_sampler_2d_backward.default",
    "grid_sampler_3d_backward.default",
]


@pytest.mark.parametrize("name", COVERED)
def test_op_has_a_rule(name):
    packet, overload = name.split(".")
    if not hasattr(aten, packet):
        pytest.skip(f"no aten.{packet} in this torch")
    assert ftrans.op_status(getattr(getattr(aten, packet), overload)) == "rule"




def _take(t, d):
    """``t`` ([B, ...]) with its batch at ``d``, or example 0 when ``d`` is None."""
    return t[0] if d is None else t.movedim(0, d)


# ----------------------------------------------------------------------------------------------
# rsub.Tensor
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 0)])
def test_rsub_tensor(in_dims):
    x, y = torch.randn(B, 4, 5), torch.randn(B, 5)
    args = [_take(x, in_dims[0]), _take(y, in_dims[1])]
    check_vmap(lambda a, b: torch.rsub(a, b, alpha=2), args, in_dims)
    check_grads(lambda a, b: (torch.rsub(a, b, alpha=3) ** 2).sum(), args, in_dims, (0, 1))


def test_rsub_tensor_promotes_like_one_example():
    x = torch.arange(B, dtype=torch.int64)  # logical 0-dim int against a float tensor
    check_vmap(lambda a, b: torch.rsub(a, b), (x, torch.randn(4)), (0, None))


# ----------------------------------------------------------------------------------------------
# lu_unpack
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 0)])
@pytest.mark.parametrize("shape", [(4, 4), (4, 3), (3, 5)])
def test_lu_unpack(in_dims, shape):
    LU, piv = torch.linalg.lu_factor(torch.randn((B,) + shape, dtype=torch.float64))
    args = [_take(LU, in_dims[0]), _take(piv, in_dims[1])]
    check_vmap(lambda a, p: torch.lu_unpack(a, p), args, in_dims)
    for data, pivots in [(False, True), (True, False)]:
        check_vmap(lambda a, p: aten.lu_unpack(a, p, data, pivots), args, in_dims,
                   all_placements=False)


def test_lu_unpack_per_sample_grads():
    A = torch.randn(B, 4, 4, dtype=torch.float64)

    def f(a):
        P, L, U = torch.lu_unpack(*torch.linalg.lu_factor(a))
        return (L.sin() * U.cos()).sum() + (P @ a).sum()

    check_grads(f, (A,), (0,), 0)


# ----------------------------------------------------------------------------------------------
# cdist / pdist
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [2.0, 1.0, 0.5, math.inf])
@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 0)])
def test_cdist(p, in_dims):
    x1, x2 = torch.randn(B, 4, 3, dtype=torch.float64), torch.randn(B, 5, 3, dtype=torch.float64)
    args = [_take(x1, in_dims[0]), _take(x2, in_dims[1])]
    check_vmap(lambda a, b: torch.cdist(a, b, p), args, in_dims)
    check_grads(lambda a, b: (torch.cdist(a, b, p) ** 2).sum(), args, in_dims, (0, 1))
    # A gradient for the shared operand alone, and for the batched one alone.
    check_grads(lambda a, b: torch.cdist(a, b, p).exp().sum(), args, in_dims, 0)
    check_grads(lambda a, b: torch.cdist(a, b, p).exp().sum(), args, in_dims, 1)


@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 0)])
def test_cdist_broadcasts_batch_dims_of_different_rank(in_dims):
    x1 = torch.randn(B, 4, 3, dtype=torch.float64)          # logical [P, M]
    x2 = torch.randn(B, 2, 5, 3, dtype=torch.float64)       # logical [K, R, M]
    for a, b in [(x1, x2), (x2, x1), (x1.unsqueeze(1), x2)]:
        args = [_take(a, in_dims[0]), _take(b, in_dims[1])]
        check_vmap(lambda u, v: torch.cdist(u, v), args, in_dims)
        check_grads(lambda u, v: torch.cdist(u, v, 1.5).sum(), args, in_dims, (0, 1))


@pytest.mark.parametrize("mode", ["use_mm_for_euclid_dist", "donot_use_mm_for_euclid_dist",
                                  "use_mm_for_euclid_dist_if_necessary"])
def test_cdist_compute_modes(mode):
    x1, x2 = torch.randn(B, 30, 3, dtype=torch.float64), torch.randn(B, 6, 3, dtype=torch.float64)
    check_vmap(lambda a, b: torch.cdist(a, b, compute_mode=mode), (x1, x2), (0, None))
    check_grads(lambda a, b: torch.cdist(a, b, compute_mode=mode).sum(), (x1, x2), (0, 0), (0, 1))


@pytest.mark.parametrize("p", [2.0, 1.0, 0.5, 0.0, math.inf])
def test_pdist(p):
    x = torch.randn(B, 6, 3, dtype=torch.float64)
    check_vmap(lambda a: F.pdist(a, p), (x,), 0)
    check_grads(lambda a: (F.pdist(a, p) ** 2).sum(), (x,), (0,), 0)
    check_grads(lambda a: F.pdist(a, p).sin().sum(), (x.transpose(0, 2),), (2,), 0)


def test_pdist_duplicate_rows_and_tiny_inputs():
    x = torch.randn(B, 5, 2, dtype=torch.float64)
    x[:, 3] = x[:, 1]  # zero distances: the backward must not divide by them
    check_vmap(lambda a: F.pdist(a), (x,), 0)
    check_grads(lambda a: F.pdist(a).sum(), (x,), (0,), 0)
    check_vmap(lambda a: F.pdist(a), (torch.randn(B, 1, 3),), 0)  # no pairs at all
    check_grads(lambda a: F.pdist(a).sum(), (torch.randn(B, 2, 3),), (0,), 0)


def test_nested_pdist_and_cdist():
    x = torch.randn(2, B, 5, 3, dtype=torch.float64)
    with no_fallback():
        got = ftrans.vmap(ftrans.vmap(lambda a: F.pdist(a) + torch.cdist(a, a).sum()))(x)
    ref = torch.stack([torch.stack([F.pdist(x[i, j]) + torch.cdist(x[i, j], x[i, j]).sum()
                                    for j in range(B)]) for i in range(2)])
    torch.testing.assert_close(got, ref)


# ----------------------------------------------------------------------------------------------
# embedding_bag
# ----------------------------------------------------------------------------------------------

V, D = 7, 4
# Per-example indices [B, 8] cut into bags by offsets [B, 4]: example 1 has an empty bag, the
# padding index 2 appears in every example (a whole bag of it in example 2).
IDX = torch.tensor([[1, 2, 4, 5, 4, 3, 2, 6], [0, 0, 3, 2, 6, 1, 1, 5], [2, 2, 5, 5, 0, 6, 3, 4]])
OFF = torch.tensor([[0, 2, 5, 7], [0, 3, 3, 6], [0, 2, 4, 5]])
ALL_DIMS = [(0, 0, 0), (0, None, None), (None, 0, 0), (None, 0, None), (0, 0, None)]


def _eb_args(in_dims, dtype=torch.float64):
    w = torch.randn(B, V, D, dtype=dtype)
    return [_take(t, d) for t, d in zip((w, IDX, OFF), in_dims)]


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("in_dims", ALL_DIMS)
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_bag(mode, in_dims, padding_idx):
    args = _eb_args(in_dims)

    def f(w, i, o):
        return F.embedding_bag(i, w, o, mode=mode, padding_idx=padding_idx)

    check_vmap(f, args, in_dims, all_placements=False)
    check_grads(lambda w, i, o: (f(w, i, o) ** 2).sum(), args, in_dims, 0)


@pytest.mark.parametrize("op", [aten._embedding_bag.default,
                                aten._embedding_bag_forward_only.default])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_embedding_bag_auxiliary_outputs_are_per_example(op, mode):
    """offset2bag, bag_size and max_indices come back in each example's own numbering."""
    for in_dims in [(0, 0, 0), (0, None, None), (None, 0, 0)]:
        for pad in (-1, 2):
            check_vmap(lambda w, i, o: op(w, i, o, False, mode, False, None, False, pad),
                       _eb_args(in_dims), in_dims)


@pytest.mark.parametrize("in_dims", [(0, 0, 0, 0), (None, 0, 0, 0), (0, None, None, 0),
                                     (0, 0, 0, None)])
def test_embedding_bag_per_sample_weights(in_dims):
    psw = torch.randn(B, 8, dtype=torch.float64)
    args = _eb_args(in_dims[:3]) + [_take(psw, in_dims[3])]

    def f(w, i, o, s):
        return F.embedding_bag(i, w, o, mode="sum", per_sample_weights=s, padding_idx=2)

    check_vmap(f, args, in_dims, all_placements=False)
    nums = tuple(k for k in (0, 3) if in_dims[k] is not None) or (0, 3)
    check_grads(lambda *a: (f(*a) ** 2).sum(), args, in_dims, nums)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_2d_input_last_offset_and_freq_scaling(mode):
    w = torch.randn(B, V, D, dtype=torch.float64)
    i2 = IDX.view(B, 2, 4)  # 2-D input: fixed-size bags, no offsets
    check_vmap(lambda w, i: F.embedding_bag(i, w, mode=mode), (w, i2), (0, 0))
    check_grads(lambda w, i: F.embedding_bag(i, w, mode=mode).pow(2).sum(), (w, i2), (0, 0), 0)
    last = torch.cat([OFF, torch.full((B, 1), 8)], dim=1)

    def f(w, i, o):
        return F.embedding_bag(i, w, o, mode=mode, include_last_offset=True,
                               scale_grad_by_freq=mode != "max")

    check_vmap(f, (w, IDX, last), (0, 0, 0))
    for dims in [(0, 0, 0), (None, 0, 0), (0, None, None)]:
        args = [_take(t, d) for t, d in zip((w, IDX, last), dims)]
        check_grads(lambda *a: f(*a).pow(2).sum(), args, dims, 0)


def test_embedding_bag_backward_kernels_directly():
    """The weight-gradient kernels under vmap with every operand batched or shared."""
    w, idx, off = torch.randn(V, D, dtype=torch.float64), IDX[0], OFF[0]
    grad = torch.randn(B, 4, D, dtype=torch.float64)
    for mode in (0, 1, 2):
        _, o2b, bs, mi = aten._embedding_bag(w, idx, off, False, mode, False, None, False, 2)

        def dense(g):
            return aten._embedding_bag_dense_backward(g, idx, o2b, bs, mi, V, True, mode, None, 2)

        def full(g, i, o):
            return aten._embedding_bag_backward(g, i, o, o2b, bs, mi, V, False, mode, False,
                                                None, 2)

        check_vmap(dense, (grad,), 0)
        check_vmap(full, (grad, idx, off), (0, None, None))
        check_vmap(lambda g, ws: aten._embedding_bag_per_sample_weights_backward(
            g, ws, idx, off, o2b, 0, -1), (grad, torch.randn(B, V, D, dtype=torch.float64)),
            (0, 0))


def test_embedding_bag_out_of_range_index_still_raises():
    bad = IDX.clone()
    bad[1, 0] = V  # in range of the folded [B*V, D] table, not of one example's
    with pytest.raises((IndexError, RuntimeError)):
        ftrans.vmap(lambda w, i, o: F.embedding_bag(i, w, o))(torch.randn(B, V, D), bad, OFF)


# ----------------------------------------------------------------------------------------------
# grid sampler
# ----------------------------------------------------------------------------------------------

def _grid_args(dims3, in_dims):
    spatial = (4, 5, 3)[: 3 if dims3 else 2]
    out_sp = (3, 2, 2)[: 3 if dims3 else 2]
    x = torch.randn((B, 2, 3) + spatial, dtype=torch.float64)
    g = torch.rand((B, 2) + out_sp + (len(spatial),), dtype=torch.float64) * 2.2 - 1.1
    return [_take(x, in_dims[0]), _take(g, in_dims[1])]


@pytest.mark.parametrize("dims3", [False, True])
@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 0)])
@pytest.mark.parametrize("opts", [("bilinear", "zeros", False), ("nearest", "border", True),
                                  ("bilinear", "reflection", True)])
def test_grid_sample(dims3, in_dims, opts):
    mode, padding, align = opts
    args = _grid_args(dims3, in_dims)

    def f(x, g):
        return F.grid_sample(x, g, mode=mode, padding_mode=padding, align_corners=align)

    check_vmap(f, args, in_dims, all_placements=not dims3)
    check_grads(lambda x, g: (f(x, g) ** 2).sum(), args, in_dims, (0, 1))
    # Only the grid's gradient: a shared input's gradient is not requested (output_mask).
    check_grads(lambda x, g: f(x, g).sin().sum(), args, in_dims, 1)


def test_grid_sample_bicubic_2d():
    for in_dims in [(0, 0), (None, 0)]:
        args = _grid_args(False, in_dims)
        f = lambda x, g: F.grid_sample(x, g, mode="bicubic", align_corners=False)  # noqa: E731
        check_vmap(f, args, in_dims)
        check_grads(lambda x, g: f(x, g).pow(2).sum(), args, in_dims, (0, 1))


@pytest.mark.parametrize("dims3", [False, True])
def test_grid_sampler_backward_kernel_output_mask(dims3):
    op = aten.grid_sampler_3d_backward.default if dims3 else aten.grid_sampler_2d_backward.default
    x, g = _grid_args(dims3, (0, 0))
    go = torch.randn((B, 2, 3) + tuple(g.shape[2:-1]), dtype=torch.float64)
    for mask in ([True, True], [False, True]):
        for dims in [(0, 0, 0), (0, None, 0), (0, 0, None), (None, None, 0)]:
            args = [go if dims[0] is not None else go[0], x if dims[1] is not None else x[0],
                    g if dims[2] is not None else g[0]]
            with no_fallback():
                got = ftrans.vmap(lambda a, b, c: op(a, b, c, 0, 0, False, mask)[1],
                                  in_dims=dims)(*args)
            ref = torch.stack([op(*[a if d is None else a[i] for a, d in zip(args, dims)],
                                  0, 0, False, mask)[1] for i in range(B)])
            torch.testing.assert_close(got, ref)


def test_pdist_uses_the_exact_kernel_in_float32():
    # Far from the origin, the matrix-product form of euclidean distances cancels badly.
    x = torch.randn(B, 30, 3) * 0.01 + 100.0
    check_vmap(lambda a: F.pdist(a), (x,), 0, atol=1e-6, rtol=1e-5, all_placements=False)


def test_embedding_bag_int32_indices_with_freq_scaling():
    w = torch.randn(V, D, dtype=torch.float64)

    def f(w, i, o):
        return F.embedding_bag(i, w, o, mode="mean", scale_grad_by_freq=True).pow(2).sum()

    check_grads(f, (w, IDX.int(), OFF.int()), (None, 0, 0), 0)


def test_nested_vmap_embedding_bag_and_grid_sample():
    w = torch.randn(2, B, V, D, dtype=torch.float64)
    idx, off = IDX.expand(2, B, 8), OFF.expand(2, B, 4)

    def eb(w, i, o):
        return F.embedding_bag(i, w, o, mode="sum", scale_grad_by_freq=True, padding_idx=2)

    def per_sample(w, i, o):
        return ftrans.grad(lambda w: eb(w, i, o).pow(2).sum())(w)

    with no_fallback():
        got = ftrans.vmap(ftrans.vmap(per_sample))(w, idx, off)
    ref = []
    for a in range(2):
        for b in range(B):
            wi = w[a, b].detach().requires_grad_()
            ref.append(torch.autograd.grad(eb(wi, idx[a, b], off[a, b]).pow(2).sum(), wi)[0])
    torch.testing.assert_close(got, torch.stack(ref).view(2, B, V, D))

    x = torch.randn(2, B, 1, 2, 4, 5, dtype=torch.float64)
    g = torch.rand(2, 1, 3, 2, 2, dtype=torch.float64) * 2 - 1  # shared by the inner vmap

    def gs(x, g):
        return ftrans.grad(lambda x, g: F.grid_sample(x, g, align_corners=True).pow(2).sum(),
                           argnums=(0, 1))(x, g)

    with no_fallback():
        got = ftrans.vmap(ftrans.vmap(gs, in_dims=(0, None)))(x, g)
    for a in range(2):
        for b in range(B):
            xi, gi = x[a, b].detach().requires_grad_(), g[a].detach().requires_grad_()
            ref = torch.autograd.grad(F.grid_sample(xi, gi, align_corners=True).pow(2).sum(),
                                      (xi, gi))
            torch.testing.assert_close(got[0][a, b], ref[0])
            torch.testing.assert_close(got[1][a, b], ref[1])


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("w_dim", [None, 0])
def test_embedding_bag_sparse_weight_gradient(mode, w_dim):
    w = torch.randn(B, V, D, dtype=torch.float64)
    args = [_take(w, w_dim), IDX, OFF]

    def f(w, i, o):
        return F.embedding_bag(i, w, o, mode=mode, sparse=True, padding_idx=2).pow(2).sum()

    with no_fallback():
        got = ftrans.vmap(ftrans.grad(f), in_dims=(w_dim, 0, 0))(*args)
    ref = []
    for b in range(B):
        wb = (w[b] if w_dim is not None else w[0]).detach().requires_grad_()
        ref.append(torch.autograd.grad(f(wb, IDX[b], OFF[b]), wb)[0])
    assert got.layout == torch.sparse_coo
    torch.testing.assert_close(got, torch.stack(ref))
