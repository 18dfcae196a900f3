"""Custom ops' own ``register_vmap`` rules are honoured by ftrans.vmap (no loop, no warning)."""
import warnings

import numpy as np
import pytest
import torch

import ftrans

CALLS = []


@torch.library.custom_op("ftrans_test_cv::np_mul", mutates_args=())
def np_mul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.multiply(x.numpy(), y.numpy()))


@np_mul.register_fake
def _(x, y):
    return torch.empty(torch.broadcast_shapes(x.shape, y.shape), dtype=x.dtype)


def _np_mul_vmap(info, in_dims, x, y):
    CALLS.append((info.batch_size, info.randomness, tuple(in_dims)))
    x = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.unsqueeze(0)
    y = y.movedim(in_dims[1], 0) if in_dims[1] is not None else y.unsqueeze(0)
    rank = max(x.dim(), y.dim())
    x = x.reshape(x.shape[:1] + (1,) * (rank - x.dim()) + x.shape[1:])
    y = y.reshape(y.shape[:1] + (1,) * (rank - y.dim()) + y.shape[1:])
    return np_mul(x, y), 0


np_mul.register_vmap(_np_mul_vmap)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, g):
    x, y = ctx.saved_tensors
    return np_mul(g, y), np_mul(g, x)


np_mul.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("ftrans_test_cv::np_split", mutates_args=())
def np_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = x.numpy()
    return torch.from_numpy(a * 2), torch.from_numpy(a.sum(-1, keepdims=True))


@np_split.register_fake
def _(x):
    return torch.empty_like(x), torch.empty(x.shape[:-1] + (1,), dtype=x.dtype)


@np_split.register_vmap
def _np_split_vmap(info, in_dims, x):
    x = x.movedim(in_dims[0], -1)  # batch last: exercises out_dims other than 0
    twice = np_split(x.movedim(-1, 0))[0]
    total = (x * 1).sum(-2)  # [.., B]
    return (twice, total.unsqueeze(-2)), (0, total.dim())


def test_registered_vmap_rule_is_used_with_no_fallback():
    x, y = torch.randn(4, 3), torch.randn(3)
    CALLS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ftrans.FallbackWarning)
        out = ftrans.vmap(np_mul, in_dims=(0, None))(x, y)
        out2 = ftrans.vmap(np_mul, in_dims=(1, 0), randomness="same")(x.t(), torch.randn(4, 3))
    torch.testing.assert_close(out, x * y)
    assert out2.shape == (4, 3)
    assert CALLS == [(4, "error", (0, None)), (4, "same", (1, 0))]
    assert ftrans.op_status(torch.ops.ftrans_test_cv.np_mul.default) == "rule"


def test_tuple_outputs_and_out_dims():
    x = torch.randn(5, 2, 3)
    twice, total = ftrans.vmap(np_split, in_dims=1)(x)
    torch.testing.assert_close(twice, (x * 2).movedim(1, 0))
    torch.testing.assert_close(total, x.sum(-1, keepdim=True).movedim(1, 0))


def test_nested_vmap_and_per_sample_gradients_through_the_rule():
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(ftrans.vmap(ftrans.vmap(np_mul))(x, y), x * y)
    w = torch.randn(4)
    g = ftrans.vmap(ftrans.grad(lambda w, x: np_mul(w, x).sum()), in_dims=(None, 0))(w, x[0])
    torch.testing.assert_close(g, x[0])


def test_a_batch_rule_registered_with_ftrans_wins():
    @torch.library.custom_op("ftrans_test_cv::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    seen = []

    @twice.register_vmap
    def _(info, in_dims, x):
        seen.append("torch.library")
        return twice(x), in_dims[0]

    @ftrans.register_batch_rule(torch.ops.ftrans_test_cv.twice.default)
    def rule(level, func, args, bdims, kwargs):
        seen.append("ftrans")
        return func(args[0]), bdims[0]

    torch.testing.assert_close(ftrans.vmap(twice)(torch.ones(3, 2)), torch.full((3, 2), 2.0))
    assert seen == ["ftrans"]


def test_vmap_rule_registered_after_first_batched_call():
    @torch.library.custom_op("ftrans_test_cv::thrice", mutates_args=())
    def thrice(x: torch.Tensor) -> torch.Tensor:
        return x * 3

    x = torch.randn(3, 2)
    with pytest.warns(ftrans.FallbackWarning):
        torch.testing.assert_close(ftrans.vmap(thrice)(x), x * 3)
    seen = []

    @thrice.register_vmap
    def _(info, in_dims, x):
        seen.append(1)
        return thrice(x), in_dims[0]

    torch.testing.assert_close(ftrans.vmap(thrice)(x), x * 3)
    assert seen


@torch.library.custom_op("ftrans_test_cv::np_split_n", mutates_args=())
def np_split_n(x: torch.Tensor, splits: list[int], dim: int) -> tuple[list[torch.Tensor], int]:
    return [torch.from_numpy(a.copy()) for a in np.split(x.numpy(), splits, axis=dim)], len(splits)


@np_split_n.register_fake
def _(x, splits, dim):
    return [t.clone() for t in torch.tensor_split(x, splits, dim)], len(splits)


@np_split_n.register_vmap
def _np_split_n_vmap(info, in_dims, x, splits, dim):
    x = x.movedim(in_dims[0], 0)
    parts, n = np_split_n(x, splits, dim + 1)
    return (parts, n), ([0 for _ in parts], None)


@pytest.mark.parametrize("in_dim", [0, 2])
def test_rule_with_nested_outputs(in_dim):
    # `-> (Tensor[], int)` with out_dims `([0, 0, ...], None)`: each listed tensor is batched
    # once (it used to come back with the physical batch dim as an extra logical dim).
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ftrans.FallbackWarning)
        parts, n = ftrans.vmap(np_split_n, in_dims=(in_dim, None, None), out_dims=(0, None))(
            x, [1, 3, 6], 1)
    xs = x.movedim(in_dim, 0)
    expected = [torch.stack([np_split_n(xs[i], [1, 3, 6], 1)[0][j] for i in range(len(xs))])
                for j in range(4)]
    assert n == 3 and len(parts) == 4
    for p, e in zip(parts, expected):
        torch.testing.assert_close(p, e)
