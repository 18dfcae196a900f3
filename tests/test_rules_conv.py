"""Convolution, pooling, upsampling, im2col and padding rules, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

import ftrans
from _helpers import check_vmap, loop_reference, no_fallback

B = 3


def _grads_match(fn, args, in_dims, atol=1e-4):
    with no_fallback():
        got = ftrans.vmap(fn, in_dims=in_dims)(*args)
    torch.testing.assert_close(got, loop_reference(fn, args, in_dims), atol=atol, rtol=atol)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_forward_every_batching(groups):
    x, w, b = torch.randn(B, 2, 4, 6, 6), torch.randn(6, 4 // groups, 3, 3), torch.randn(6)
    wb, bb = torch.randn(B, 6, 4 // groups, 3, 3), torch.randn(B, 6)

    def f(x, w, b):
        return F.conv2d(x, w, b, stride=2, padding=1, dilation=1, groups=groups)

    check_vmap(f, (x, w, b), (0, None, None))
    check_vmap(f, (x[0], wb, b), (None, 0, None))
    check_vmap(f, (x, wb, bb), (0, 0, 0))
    check_vmap(f, (x[0], w, bb), (None, None, 0))
    check_vmap(lambda x, w: F.conv2d(x, w, None, padding=2, dilation=2, groups=groups),
               (x, wb), (0, 0))


def test_conv1d_3d_unbatched_input_and_transpose():
    check_vmap(lambda x, w: F.conv1d(x, w, padding=1), (torch.randn(B, 4, 7), torch.randn(5, 4, 3)),
               (0, None))
    check_vmap(lambda x, w: F.conv3d(x, w), (torch.randn(B, 1, 2, 4, 4, 4),
                                            torch.randn(B, 3, 2, 2, 2, 2)), (0, 0))
    for groups in (1, 2):
        def ft(x, w):
            return F.conv_transpose2d(x, w, stride=2, padding=1, output_padding=1, groups=groups)
        x, w = torch.randn(B, 2, 4, 5, 5), torch.randn(4, 6 // groups, 3, 3)
        check_vmap(ft, (x, w), (0, None))
        check_vmap(ft, (x[0], torch.randn(B, 4, 6 // groups, 3, 3)), (None, 0))
        check_vmap(ft, (x, torch.randn(B, 4, 6 // groups, 3, 3)), (0, 0))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("in_dims", [(0, None, None), (0, 0, None), (None, 0, 0), (0, 0, 0)])
def test_conv_per_sample_grads(transposed, in_dims):
    def g(x0, w0, b0):
        x, w, b = (t.detach().requires_grad_() for t in (x0, w0, b0))
        if transposed:
            out = F.conv_transpose1d(x.unsqueeze(0), w, b, stride=2, padding=1, groups=2,
                                     output_padding=1)
        else:
            out = F.conv1d(x.unsqueeze(0), w, b, stride=2, padding=1, groups=2)
        return torch.autograd.grad((out ** 2).sum(), (x, w, b))

    x = torch.randn(B, 4, 7)
    w = torch.randn(B, 4, 3, 3) if transposed else torch.randn(B, 6, 2, 3)
    b = torch.randn(B, 6)
    args = [t if d == 0 else t[0] for t, d in zip((x, w, b), in_dims)]
    _grads_match(g, args, in_dims)


def test_tiny_conv_net_per_sample_grads():
    params = [torch.randn(4, 1, 3, 3), torch.randn(4), torch.randn(3, 4 * 2 * 2)]

    def net_grad(x, y, *ps):
        w1, b1, w2 = (p.detach().requires_grad_() for p in ps)
        h = F.max_pool2d(F.relu(F.conv2d(x.unsqueeze(0), w1, b1, padding=1)), 2)
        logits = F.linear(h.flatten(1), w2)
        loss = F.cross_entropy(logits, y.unsqueeze(0))
        return torch.autograd.grad(loss, (w1, b1, w2))

    x, y = torch.randn(B, 1, 4, 4), torch.randint(0, 3, (B,))
    _grads_match(net_grad, [x, y] + params, (0, 0, None, None, None))


POOLS = [
    lambda x: F.max_pool2d(x, 2),
    lambda x: F.max_pool2d(x, 3, stride=2, padding=1, dilation=1, ceil_mode=True),
    lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False),
    lambda x: F.adaptive_avg_pool2d(x, (2, 3)),
    lambda x: F.adaptive_max_pool2d(x, 2),
    lambda x: F.max_pool1d(x[0], 2),
    lambda x: F.avg_pool1d(x[0], 2),
    lambda x: F.adaptive_avg_pool1d(x[0], 3),
    lambda x: F.adaptive_max_pool1d(x[0], 3),
    lambda x: F.max_pool3d(x.unsqueeze(0), 2),
    lambda x: F.avg_pool3d(x.unsqueeze(0), 2),
    lambda x: F.adaptive_avg_pool3d(x.unsqueeze(0), 2),
    lambda x: F.adaptive_max_pool3d(x.unsqueeze(0), 2),
    lambda x: F.interpolate(x.unsqueeze(0), scale_factor=2, mode="nearest"),
    lambda x: F.interpolate(x.unsqueeze(0), size=(7, 9), mode="bilinear"),
    lambda x: F.interpolate(x.unsqueeze(0), size=(7, 9), mode="bicubic", align_corners=True),
    lambda x: F.interpolate(x, size=9, mode="linear"),
    lambda x: F.interpolate(x.unsqueeze(0), scale_factor=2, mode="nearest-exact"),
    lambda x: F.unfold(x.unsqueeze(0), 2, stride=2),
    lambda x: F.fold(x.reshape(1, 8, 9), (4, 4), 2, stride=1),
    lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"),
    lambda x: F.pad(x, (1, 2), mode="reflect"),
    lambda x: F.pad(x, (1, 2, 2, 1), mode="replicate"),
    lambda x: F.pad(x.unsqueeze(0), (1, 1, 1, 1, 1, 1), mode="replicate"),
    lambda x: F.pad(x, (1, 2, 2, 1), value=0.5),
    lambda x: F.pad(x, (1, 2, 2, 1), mode="circular"),
]


@pytest.mark.parametrize("k", range(len(POOLS)))
def test_pool_pad_forward_and_grad(k):
    fn = POOLS[k]
    x = torch.randn(B, 2, 6, 6)
    check_vmap(fn, (x,), 0)

    def g(x0, v):
        x = x0.detach().requires_grad_()
        y = fn(x)
        return torch.autograd.grad((y * v.reshape(-1)[: y.numel()].view_as(y)).sum(), x)[0]

    _grads_match(g, (x, torch.randn(B, 4096)), (0, 0))


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("with_n", [True, False])
def test_fractional_max_pool_forward_and_grad(d, with_n):
    pool = getattr(F, f"fractional_max_pool{d}d")
    size = (5,) * d
    x = torch.randn((B, 2, 3) + size if with_n else (B, 3) + size, dtype=torch.float64)
    n = 2 if with_n else 1
    rs = torch.rand(B, n, 3, d, dtype=torch.float64)  # per (N, C) samples, per example

    def fn(x0, rs):
        x = x0.detach().requires_grad_()
        out, idx = pool(x, 2, output_ratio=(0.5,) * d, return_indices=True,
                        _random_samples=rs)
        return (out, idx) + torch.autograd.grad((out ** 2).sum(), x)

    check_vmap(fn, (x, rs), (0, 0))
    check_vmap(fn, (x, rs[0]), (0, None))
    check_vmap(fn, (x[0], rs), (None, 0))


def test_fractional_max_pool_module_repro():
    m = torch.nn.FractionalMaxPool2d(2, output_ratio=0.5, _random_samples=torch.rand(1, 3, 2))
    check_vmap(m, (torch.randn(3, 1, 3, 7, 7),), (0,))


@pytest.mark.parametrize("in_dims", [0, 1, 4])
@pytest.mark.parametrize("geometry", [(2, 2, 0, 1, False), (3, 2, 1, 1, True), (3, 1, 1, 2, False)])
def test_max_pool2d_channels_last_path_matches_nchw_exactly(in_dims, geometry):
    # The CPU rule pools in channels-last layout (faster kernel): values, tie-breaking between
    # equal maxima, NaN and -inf, and the indices must be exactly what the NCHW kernel gives.
    k, s, p, d, ceil = geometry
    x = torch.randint(0, 3, (3, 2, 4, 9, 11)).float()
    x[0, 0, 1, 0, 0] = float("nan")
    x[1, 1, 2, 3, 4] = float("-inf")
    x = x.movedim(0, in_dims)

    def f(t):
        return F.max_pool2d(t, k, s, p, d, ceil_mode=ceil, return_indices=True)

    got = ftrans.vmap(f, in_dims=in_dims)(x)
    ref = [torch.stack(r) for r in zip(*[f(t) for t in x.movedim(in_dims, 0)])]
    assert torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[0], ref[0], equal_nan=True, rtol=0, atol=0)
    assert got[0].is_contiguous() and got[1].is_contiguous()
