"""Normalization, softmax, loss, embedding, attention, glu and prelu rules (forward and the
backward kernels, via per-example gradients under vmap)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import ftrans
from _helpers import check_vmap, loop_reference, no_fallback

B = 3
PW = torch.rand(4) + 0.5


def _match(fn, args, in_dims, atol=1e-4):
    with no_fallback():
        got = ftrans.vmap(fn, in_dims=in_dims)(*args)
    torch.testing.assert_close(got, loop_reference(fn, args, in_dims), atol=atol, rtol=atol)


def _with_grads(make_out, n_params):
    """fn(*tensors) -> (out, *grads of sum(out**3) wrt the first n_params + 1 tensors)."""
    def fn(*ts):
        ts = [t.detach().requires_grad_() if i <= n_params else t for i, t in enumerate(ts)]
        out = make_out(*ts)
        return (out,) + torch.autograd.grad((out ** 3).sum(), ts[: n_params + 1])
    return fn


@pytest.mark.parametrize("in_dims", [(0, None, None), (2, 0, 1), (None, 0, None)])
def test_layer_norm(in_dims):
    fn = _with_grads(lambda x, w, b: F.layer_norm(x, (5,), w, b), 2)
    x, w, b = torch.randn(B, 4, 5), torch.randn(B, 5), torch.randn(B, 5)
    args = [t.movedim(0, d) if d is not None else t[0] for t, d in zip((x, w, b), in_dims)]
    _match(fn, args, in_dims)
    check_vmap(lambda x: F.layer_norm(x, (4, 5)), (x,), 0)


@pytest.mark.parametrize("in_dims", [(0, None, None), (0, 0, None), (None, 0, 0)])
def test_group_norm(in_dims):
    fn = _with_grads(lambda x, w, b: F.group_norm(x, 2, w, b), 2)
    x, w, b = torch.randn(B, 2, 4, 5), torch.randn(B, 4), torch.randn(B, 4)
    _match(fn, [t if d is not None else t[0] for t, d in zip((x, w, b), in_dims)], in_dims)


@pytest.mark.parametrize("in_dims", [(0, None, None), (0, 0, None), (None, 0, 0)])
def test_batch_norm_training_no_stats(in_dims):
    fn = _with_grads(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True), 2)
    x, w, b = torch.randn(B, 6, 4, 5), torch.randn(B, 4), torch.randn(B, 4)
    _match(fn, [t if d is not None else t[0] for t, d in zip((x, w, b), in_dims)], in_dims)


def test_batch_norm_eval_with_unbatched_stats():
    fn = _with_grads(lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, training=False), 2)
    args = (torch.randn(B, 6, 4, 5), torch.randn(4), torch.randn(4), torch.randn(4),
            torch.rand(4) + 0.5)
    _match(fn, args, (0, None, None, None, None))
    _match(fn, (args[0], torch.randn(B, 4)) + args[2:], (0, 0, None, None, None))


def test_batch_norm_training_updates_batched_stats():
    def f(x, rm, rv):
        out = F.batch_norm(x, rm, rv, None, None, training=True, momentum=0.3)
        return out, rm.clone(), rv.clone()

    x, rm, rv = torch.randn(B, 6, 4), torch.randn(B, 4), torch.rand(B, 4) + 0.5
    expected = loop_reference(f, (x, rm.clone(), rv.clone()), (0, 0, 0))
    rm_t = rm.clone().t()  # batch dim 1: exercises the copy-back of a non-contiguous update
    with no_fallback():
        got = ftrans.vmap(f, in_dims=(0, 1, 0))(x, rm_t, rv.clone())
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(rm_t.t(), expected[1])


def test_batch_norm_training_unbatched_stats_raises():
    def f(x, rm, rv):
        return F.batch_norm(x, rm, rv, None, None, training=True)

    with pytest.raises(RuntimeError, match="running statistics"):
        ftrans.vmap(f, in_dims=(0, None, None))(torch.randn(B, 6, 4), torch.zeros(4),
                                                torch.ones(4))


def test_softmax_glu():
    def fn(x0):
        x = x0.detach().requires_grad_()
        outs = [F.softmax(x, -1), F.log_softmax(x, 0), F.glu(x, -1), F.glu(x, 0)[..., :2]]
        return tuple(outs) + torch.autograd.grad(sum((o ** 2).sum() for o in outs), x)
    _match(fn, (torch.randn(B, 4, 6),), (0,))
    check_vmap(lambda x: F.softmax(x, 0), (torch.randn(B),), 0)


@pytest.mark.parametrize("case", ["2d", "unbatched_x", "nd", "1d"])
def test_cross_entropy_nll(case):
    def fn(x0, t, w):
        x = x0.detach().requires_grad_()
        outs = [F.cross_entropy(x, t, weight=w),
                F.cross_entropy(x, t, reduction="none", ignore_index=1),
                F.cross_entropy(x, t, reduction="sum"),
                F.nll_loss(x, t, weight=w, ignore_index=2)]
        if x0.dim() > 1 and case != "unbatched_x":
            outs.append(F.cross_entropy(x, t, label_smoothing=0.1))
        return tuple(outs) + torch.autograd.grad(sum((o ** 2).sum() for o in outs), x)

    if case == "2d":
        args, d = (torch.randn(B, 5, 4), torch.randint(0, 4, (B, 5)), torch.rand(4)), (0, 0, None)
    elif case == "unbatched_x":
        args, d = (torch.randn(5, 4), torch.randint(0, 4, (B, 5)), torch.rand(B, 4)), (None, 0, 0)
    elif case == "nd":
        args, d = (torch.randn(B, 5, 4, 3), torch.randint(0, 4, (B, 5, 3)), torch.rand(4)), (0, 0, None)
    else:
        args, d = (torch.randn(B, 4), torch.randint(0, 4, (B,)), torch.rand(4)), (0, 0, None)
    _match(fn, args, d)


@pytest.mark.parametrize("spatial", [False, True])
def test_cross_entropy_mean_with_every_target_ignored(spatial):
    # 'mean' divides by a zero total weight for the first two examples: torch gives them zero
    # gradients (ignored targets are skipped), not 0 * g / 0 = nan.
    x = torch.randn(3, 2, 3, 4) if spatial else torch.randn(3, 2, 3)
    t = torch.ones((3, 2, 4) if spatial else (3, 2), dtype=torch.long)
    t[2, 0] = 0
    loss = lambda x, t: F.cross_entropy(x, t, ignore_index=1)  # noqa: E731
    got = ftrans.vmap(ftrans.grad(loss))(x, t)
    expected = torch.stack([torch.func.grad(loss)(a, b) for a, b in zip(x, t)])
    assert not got[:2].isnan().any()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 0)])
def test_elementwise_losses(in_dims):
    def fn(x0, t):
        x = x0.detach().requires_grad_()
        outs = [F.mse_loss(x, t), F.huber_loss(x, t, reduction="sum", delta=0.5),
                F.smooth_l1_loss(x, t, beta=0.3), F.soft_margin_loss(x, t.sign()),
                F.binary_cross_entropy(x.sigmoid(), t.sigmoid()),
                F.binary_cross_entropy(x.sigmoid(), t.sigmoid(), weight=PW, reduction="sum"),
                F.binary_cross_entropy_with_logits(x, t.sigmoid(), pos_weight=PW),
                F.kl_div(x.log_softmax(-1), t.softmax(-1), reduction="batchmean"),
                F.mse_loss(x, t, reduction="none"), F.l1_loss(x, t)]
        return tuple(outs) + torch.autograd.grad(sum((o ** 2).sum() for o in outs), x)

    x, t = torch.randn(B, 5, 4), torch.randn(B, 5, 4)
    _match(fn, [a if d == 0 else a[0] for a, d in zip((x, t), in_dims)], in_dims)


@pytest.mark.parametrize("in_dims", [(0, None), (None, 0), (0, 0)])
def test_embedding(in_dims):
    def fn(i, w0):
        w = w0.detach().requires_grad_()
        outs = [F.embedding(i, w), F.embedding(i, w, padding_idx=1),
                F.embedding(i, w, scale_grad_by_freq=True)]
        loss = sum(((o ** 2) * (k + 1)).sum() for k, o in enumerate(outs))
        return tuple(outs) + torch.autograd.grad(loss, w)

    i, w = torch.randint(0, 6, (B, 2, 5)), torch.randn(B, 6, 3)
    _match(fn, [a if d == 0 else a[0] for a, d in zip((i, w), in_dims)], in_dims)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa(causal):
    def fn(q, k, v):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return (o,) + torch.autograd.grad((o ** 2).sum(), (q, k, v))

    q, k, v = torch.randn(B, 2, 3, 4, 5), torch.randn(B, 2, 3, 6, 5), torch.randn(2, 3, 6, 5)
    _match(fn, (q, k, v), (0, 0, None))
    mask = torch.rand(4, 6) > 0.3
    mask[:, 0] = True
    check_vmap(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
               (q, k, v), (0, 0, None))


def test_sdpa_dropout_needs_randomness():
    q = torch.randn(B, 1, 2, 4, 5)
    f = ftrans.vmap(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
    with pytest.raises(RuntimeError, match="random"):
        f(q)


@pytest.mark.parametrize("in_dims", [(0, None), (None, 0), (0, 0)])
def test_prelu(in_dims):
    def fn(x0, w0):
        x, w = x0.detach().requires_grad_(), w0.detach().requires_grad_()
        o = F.prelu(x, w)
        return (o,) + torch.autograd.grad((o ** 2).sum(), (x, w))

    x, w = torch.randn(B, 2, 3, 4), torch.rand(B, 3)
    _match(fn, [a if d == 0 else a[0] for a, d in zip((x, w), in_dims)], in_dims)


@pytest.mark.parametrize("q_shape, m_shape", [
    ((3, 1, 2, 3, 2), (3, 1, 1, 1, 3)),   # 4-D per-example mask
    ((3, 2, 4, 5, 8), (3, 5, 5)),         # 2-D per-example mask, q with N
    ((3, 4, 5, 8), (3, 5, 5)),            # q without N
])
def test_attention_with_batched_keyword_mask_no_fallback(q_shape, m_shape):
    import torch.nn.functional as F

    q, m = torch.randn(q_shape, dtype=torch.float64), torch.randn(m_shape, dtype=torch.float64)
    f = lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m)  # noqa: E731
    with no_fallback():
        got = ftrans.vmap(f)(q, m)
        g = ftrans.vmap(ftrans.grad(lambda q, m: f(q, m).sum()))(q, m)
    torch.testing.assert_close(got, torch.stack([f(q[i], m[i]) for i in range(3)]))
    ref = torch.stack([torch.autograd.grad(f(qi, m[i]).sum(), qi)[0]
                       for i, qi in enumerate(q.clone().requires_grad_())])
    torch.testing.assert_close(g, ref)


def _loss_and_grad(loss):
    """fn(x0, *rest) -> (loss, d sum(loss**2) / dx): forward and backward kernel together."""
    def fn(x0, *rest):
        x = x0.detach().requires_grad_()
        out = loss(x, *rest)
        return (out,) + torch.autograd.grad((out ** 2).sum(), x)
    return fn


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ctc_loss_int_lengths(reduction):
    lp = torch.randn(B, 12, 2, 6, dtype=torch.float64).log_softmax(-1)
    t = torch.randint(1, 6, (B, 2, 5))
    fn = _loss_and_grad(lambda x, t: F.ctc_loss(x, t, [12, 10], [5, 3], reduction=reduction))
    check_vmap(fn, (lp, t), (0, 0))
    check_vmap(fn, (lp, t[0]), (0, None))
    check_vmap(fn, (lp[0], t), (None, 0))


def test_ctc_loss_per_example_tensor_lengths():
    # Concatenated 1-D targets with per-example lengths (each example's lengths sum to 8).
    lp = torch.randn(B, 12, 2, 6, dtype=torch.float64).log_softmax(-1)
    t = torch.randint(1, 6, (B, 8))
    il = torch.tensor([[12, 10], [9, 12], [12, 12]])
    tl = torch.tensor([[5, 3], [2, 6], [4, 4]])
    fn = _loss_and_grad(lambda x, t, il, tl: F.ctc_loss(x, t, il, tl, zero_infinity=True))
    check_vmap(fn, (lp, t, il, tl), (0, 0, 0, 0))
    check_vmap(fn, (lp, t, il[0], tl[0]), (0, 0, None, None))


def test_ctc_loss_unbatched_example_and_repro():
    lp = torch.randn(B, 12, 6, dtype=torch.float64).log_softmax(-1)
    t = torch.randint(1, 6, (B, 5))
    fn = _loss_and_grad(lambda x, t, il, tl: F.ctc_loss(x, t, il, tl, reduction="sum"))
    check_vmap(fn, (lp, t, torch.tensor([12, 11, 10]), torch.tensor([5, 5, 5])), (0, 0, 0, 0))
    lp = torch.randn(3, 50, 2, 15).log_softmax(-1)
    t = torch.randint(1, 15, (3, 2, 30))
    check_vmap(lambda lp, t: F.ctc_loss(lp, t, [50, 50], [30, 25]), (lp, t), (0, 0))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_n", [True, False])
def test_multilabel_margin_loss(reduction, with_n):
    shape = (B, 4, 6) if with_n else (B, 6)
    x = torch.randn(shape, dtype=torch.float64)
    t = torch.randint(-1, 6, shape)  # -1 ends a sample's label list
    fn = _loss_and_grad(lambda x, t: F.multilabel_margin_loss(x, t, reduction=reduction))
    check_vmap(fn, (x, t), (0, 0))
    check_vmap(fn, (x, t[0]), (0, None))
    check_vmap(fn, (x[0], t), (None, 0))


def test_multilabel_margin_loss_none_1d_shape():
    got = ftrans.vmap(lambda a, b: F.multilabel_margin_loss(a, b, reduction="none"))(
        torch.randn(3, 10), torch.randint(0, 10, (3, 10)))
    assert got.shape == (3,)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("p, margin", [(1, 1.0), (2, 0.5)])
def test_multi_margin_loss(reduction, p, margin):
    x = torch.randn(B, 4, 6, dtype=torch.float64)
    t = torch.randint(0, 6, (B, 4))
    w = torch.rand(B, 6, dtype=torch.float64) + 0.5
    fn = _loss_and_grad(lambda x, t, w: F.multi_margin_loss(x, t, p, margin, w,
                                                            reduction=reduction))
    check_vmap(fn, (x, t, w), (0, 0, 0))
    check_vmap(fn, (x, t, w[0]), (0, 0, None))
    check_vmap(fn, (x[0], t, w), (None, 0, 0))
    fn1 = _loss_and_grad(lambda x, t: F.multi_margin_loss(x, t, p, margin, reduction=reduction))
    check_vmap(fn1, (x[:, 0], t[:, 0]), (0, 0))           # 1-D input, 0-d target
    check_vmap(fn1, (x[:, 0], t[:, :1]), (0, 0))          # 1-D input, [1] target


def test_margin_losses_0d_examples():
    # A 0-d example is one sample with one class.
    x, t = torch.randn(B, dtype=torch.float64), torch.zeros(B, dtype=torch.long)
    for loss in (F.multilabel_margin_loss, F.multi_margin_loss):
        for reduction in ("none", "mean"):
            check_vmap(_loss_and_grad(lambda x, t: loss(x, t, reduction=reduction)), (x, t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("dim", [0, 2])
@pytest.mark.parametrize("in_dims", [(0, None, None, None), (0, 0, 0, 0), (None, 0, 0, 0)])
def test_weight_norm_backward_kernel(in_dims, dim, dtype):
    v = torch.randn(B, 3, 4, 5, dtype=dtype)
    g = torch.randn([B] + [s if i == dim else 1 for i, s in enumerate(v.shape[1:])], dtype=dtype)
    norms = torch.stack([torch.ops.aten._weight_norm_interface(v[i], g[i], dim)[1] for i in range(B)])
    gw = torch.randn(B, 3, 4, 5, dtype=dtype)
    args = [t if d is not None else t[0] for t, d in zip((gw, v, g, norms), in_dims)]
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-7
    check_vmap(lambda *a: torch.ops.aten._weight_norm_interface_backward(*a, dim), args, in_dims,
               atol=tol, rtol=tol)


@pytest.mark.parametrize("in_dims", [(None, 0), (None, 1)])
def test_prelu_unbatched_input_batched_weight_does_not_resize(in_dims):
    # The kernel's output has the input's shape: torch warned "An output ... was resized".
    x, w = torch.randn(2, 3, 4), torch.rand(B, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn = _with_grads(lambda x, w: F.prelu(x, w), 1)
        _match(fn, [x, w.movedim(0, in_dims[1])], in_dims)


def test_batch_norm_training_unbatched_input_shares_the_running_statistic_update():
    # Unbatched input: every example's batch statistics are equal, so an unbatched running
    # variance gets the one update a loop gives it, beside a batched running mean.
    torch.manual_seed(0)
    x, B = torch.randn(4, 3, 5, dtype=torch.float64), 6
    rm, rv = torch.randn(3, B, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    w, b = torch.randn(3, B, dtype=torch.float64), torch.randn(3, B, dtype=torch.float64)
    rm_ref, outs = rm.clone(), []
    for i in range(B):
        rv_i, m_i = rv.clone(), rm_ref[:, i].clone()
        outs.append(F.batch_norm(x, m_i, rv_i, w[:, i], b[:, i], training=True))
        rm_ref[:, i] = m_i
    out = ftrans.vmap(lambda m, ww, bb: F.batch_norm(x, m, rv, ww, bb, training=True),
                      in_dims=-1)(rm, w, b)
    torch.testing.assert_close(out, torch.stack(outs))
    torch.testing.assert_close(rm, rm_ref)
    torch.testing.assert_close(rv, rv_i)
    # a batched input still cannot update an unbatched statistic
    with pytest.raises(RuntimeError, match="running statistics"):
        ftrans.vmap(lambda xx: F.batch_norm(xx, rm[:, 0], rv, training=True))(x.unsqueeze(0).repeat(2, 1, 1, 1))
