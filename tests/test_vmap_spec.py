"""Every example of shared/spec/vmap.md, each a test."""
import pytest
import torch

import ftrans


def test_batched_dot():
    batched_dot = ftrans.vmap(torch.dot)
    x, y = torch.randn(2, 5), torch.randn(2, 5)
    out = batched_dot(x, y)
    assert out.shape == (2,)
    torch.testing.assert_close(out, (x * y).sum(1))


def test_model_closing_over_weights():
    weights = torch.randn(5, requires_grad=True)

    def model(feature_vec):
        return feature_vec.dot(weights).relu()

    examples = torch.randn(3, 5)
    out = ftrans.vmap(model)(examples)
    assert out.shape == (3,)
    torch.testing.assert_close(out, (examples @ weights).relu())


def test_jacobian_in_one_vectorized_autograd_call():
    N = 5
    x = torch.randn(N, requires_grad=True)
    y = x ** 2

    def get_vjp(v):
        return torch.autograd.grad(y, x, v)

    loop = torch.stack([torch.autograd.grad(y, x, v, retain_graph=True)[0] for v in torch.eye(N)])
    (jacobian,) = ftrans.vmap(get_vjp)(torch.eye(N))
    torch.testing.assert_close(jacobian, loop)
    torch.testing.assert_close(jacobian, torch.diag(2 * x.detach()))


def test_nesting():
    x, y = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    out = ftrans.vmap(ftrans.vmap(torch.dot))(x, y)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, (x * y).sum(-1))


def test_in_dims_1():
    x, y = torch.randn(2, 5), torch.randn(2, 5)
    out = ftrans.vmap(torch.dot, in_dims=1)(x, y)
    assert out.shape == (5,)
    torch.testing.assert_close(out, (x * y).sum(0))


def test_one_mapped_one_broadcast():
    x, y = torch.randn(2, 5), torch.randn(5)
    out = ftrans.vmap(torch.dot, in_dims=(0, None))(x, y)
    assert out.shape == (2,)
    torch.testing.assert_close(out, x @ y)


def test_pytree_in_dims():
    f = lambda d: torch.dot(d["x"], d["y"])  # noqa: E731
    inp = {"x": torch.randn(2, 5), "y": torch.randn(5)}
    out = ftrans.vmap(f, in_dims=({"x": 0, "y": None},))(inp)
    assert out.shape == (2,)
    torch.testing.assert_close(out, inp["x"] @ inp["y"])


def test_out_dims_last():
    x = torch.randn(2, 5)
    out = ftrans.vmap(lambda x: x ** 2, out_dims=1)(x)
    assert out.shape == (5, 2)
    torch.testing.assert_close(out, (x ** 2).T)


def test_kwargs_not_mapped():
    def f(x, scale=4.0):
        return x * scale

    x = torch.randn(2, 5)
    assert torch.allclose(ftrans.vmap(f)(x), x * 4)
    out = ftrans.vmap(f)(x, scale=x)
    assert out.shape == (2, 2, 5)
    torch.testing.assert_close(out, x[:, None] * x)


@pytest.mark.parametrize("op", [torch.dot])
def test_spec_examples_run_without_fallback(op):
    from _helpers import no_fallback

    with no_fallback():
        ftrans.vmap(op)(torch.randn(3, 4), torch.randn(3, 4))
        ftrans.vmap(ftrans.vmap(op))(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
