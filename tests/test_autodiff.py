"""grad, grad_and_value, vjp, jacrev on their own: values, pytrees, argnums, has_aux, errors.

torch.func is the oracle throughout; compositions with vmap and each other live in
test_compositions.py.
"""
import pytest
import torch

import ftrans
from ftrans._C import levels
from tests._helpers import QUIET_FALLBACKS, Cube

assert_close = torch.testing.assert_close
pytestmark = QUIET_FALLBACKS


def f_scalar(x):
    return (x.sin() * x).sum()


def test_grad_matches_torch_func():
    x = torch.randn(5)
    assert_close(ftrans.grad(f_scalar)(x), torch.func.grad(f_scalar)(x))


def test_grad_result_not_tracked_outside():
    x = torch.randn(5)
    g = ftrans.grad(f_scalar)(x)
    assert not g.requires_grad and g.grad_fn is None


def test_grad_and_value():
    x = torch.randn(4)
    g, v = ftrans.grad_and_value(f_scalar)(x)
    eg, ev = torch.func.grad_and_value(f_scalar)(x)
    assert_close(g, eg)
    assert_close(v, ev)
    assert not v.requires_grad


def test_argnums_tuple_and_negative():
    x, y = torch.randn(3), torch.randn(3)

    def f(x, y):
        return (x * y.exp()).sum()

    got = ftrans.grad(f, argnums=(0, 1))(x, y)
    exp = torch.func.grad(f, argnums=(0, 1))(x, y)
    assert isinstance(got, tuple) and len(got) == 2
    assert_close(got, exp)
    assert_close(ftrans.grad(f, argnums=-1)(x, y), torch.func.grad(f, argnums=1)(x, y))


def test_has_aux():
    x = torch.randn(3)

    def f(x):
        return x.pow(2).sum(), {"aux": x.cos(), "n": 3}

    g, aux = ftrans.grad(f, has_aux=True)(x)
    assert_close(g, 2 * x)
    assert_close(aux["aux"], x.cos())
    assert aux["n"] == 3
    g, (v, aux) = ftrans.grad_and_value(f, has_aux=True)(x)
    assert_close(v, x.pow(2).sum())


def test_pytree_inputs():
    params = {"w": torch.randn(3, 2), "b": [torch.randn(2), torch.randn(())]}
    x = torch.randn(3)

    def f(p, x):
        return ((x @ p["w"] + p["b"][0]) * p["b"][1]).tanh().sum()

    got = ftrans.grad(f)(params, x)
    exp = torch.func.grad(f)(params, x)
    assert set(got) == {"w", "b"} and isinstance(got["b"], list)
    assert_close(got, exp)


def test_kwargs_not_differentiated():
    x = torch.randn(3)
    got = ftrans.grad(lambda x, scale: (x * scale).sum())(x, scale=torch.full((3,), 2.0))
    assert_close(got, torch.full((3,), 2.0))


def test_unconnected_output_gives_zeros():
    x, y = torch.randn(3), torch.randn(3)
    g = ftrans.grad(lambda x, y: (y ** 2).sum(), argnums=(0, 1))(x, y)
    assert_close(g[0], torch.zeros(3))
    assert_close(g[1], 2 * y)
    # Output that does not require grad at all.
    assert_close(ftrans.grad(lambda x: torch.tensor(1.0))(x), torch.zeros(3))


def test_no_grad_inside_is_constant():
    x = torch.randn(3)

    def f(x):
        with torch.no_grad():
            c = x * 2
        return (c * x).sum()

    assert_close(ftrans.grad(f)(x), torch.func.grad(f)(x))
    assert_close(ftrans.grad(f)(x), 2 * x)


def test_no_grad_outside_still_differentiates():
    x = torch.randn(3)
    with torch.no_grad():
        g = ftrans.grad(f_scalar)(x)
    assert_close(g, torch.func.grad(f_scalar)(x))


def test_grad_input_requiring_grad_stays_connected():
    x = torch.randn(3, requires_grad=True)
    g = ftrans.grad(lambda x: (x ** 3).sum())(x)
    assert g.requires_grad
    (g2,) = torch.autograd.grad(g.sum(), x)
    assert_close(g2, 6 * x.detach())


def test_custom_function_inside_grad():
    x = torch.randn(4)
    assert_close(ftrans.grad(lambda x: Cube.apply(x).sum())(x), 3 * x ** 2)


# ------------------------------------------------------------------------------- errors

def test_error_non_scalar_output():
    with pytest.raises(RuntimeError, match=r"grad\(.*\)\(\*args\).*scalar Tensor.*1 dims"):
        ftrans.grad(lambda x: x * 2)(torch.randn(3))


def test_error_non_tensor_output():
    with pytest.raises(RuntimeError, match="Expected f\\(\\*args\\) to return a Tensor"):
        ftrans.grad(lambda x: 3.0)(torch.randn(3))


@pytest.mark.parametrize("argnums,msg", [(2, "Got argnum=2, but only 2 positional inputs"),
                                         (-3, "Got argnum=-3"),
                                         ((0, 0), "argnums elements must be unique"),
                                         ((), "argnums must be non-empty"),
                                         (1.0, "argnums must be int or Tuple")])
def test_error_argnums(argnums, msg):
    with pytest.raises(RuntimeError, match=msg) as info:
        ftrans.grad(lambda x, y: (x * y).sum(), argnums=argnums)(torch.randn(2), torch.randn(2))
    assert "grad(" in str(info.value)
    with pytest.raises(RuntimeError, match=msg):
        torch.func.grad(lambda x, y: (x * y).sum(), argnums=argnums)(torch.randn(2),
                                                                      torch.randn(2))


def test_error_has_aux_not_pair():
    with pytest.raises(RuntimeError, match=r"grad\(.*has_aux=True.*\(output, aux\)"):
        ftrans.grad(lambda x: x.sum(), has_aux=True)(torch.randn(3))
    with pytest.raises(RuntimeError, match="vjp.*\\(output, aux\\)"):
        ftrans.vjp(lambda x: (x, x, x), torch.randn(3), has_aux=True)


def test_error_non_tensor_at_argnums():
    with pytest.raises(ValueError, match=r"grad\(.*must be Tensor, got <class 'float'>"):
        ftrans.grad(lambda x, y: x * y, argnums=1)(torch.randn(()), 2.0)


def test_exception_inside_leaves_stack_empty():
    def bad(x):
        assert levels.current_stack(), "grad level should be on the stack during the call"
        raise KeyError("boom")

    for t in (ftrans.grad, ftrans.jacrev, ftrans.jacfwd, ftrans.hessian):
        with pytest.raises(KeyError):
            t(bad)(torch.randn(2))
        assert levels.current_stack() == []
    with pytest.raises(KeyError):
        ftrans.vmap(ftrans.grad(bad))(torch.randn(3, 2))
    assert levels.current_stack() == []


# ------------------------------------------------------------------------------- vjp

def test_vjp_matches_torch_func():
    x, y = torch.randn(3, 4), torch.randn(4)

    def f(x, y):
        return (x @ y).sin(), x.sum(1)

    out, fn = ftrans.vjp(f, x, y)
    eout, efn = torch.func.vjp(f, x, y)
    assert_close(out, eout)
    ct = (torch.randn(3), torch.randn(3))
    assert_close(fn(ct), efn(ct))
    assert_close(fn(ct), efn(ct))  # callable twice
    assert not out[0].requires_grad


def test_vjp_has_aux_and_pytree_cotangent_check():
    x = torch.randn(3)
    out, fn, aux = ftrans.vjp(lambda x: ({"a": x.exp()}, x.sum()), x, has_aux=True)
    assert_close(aux, x.sum())
    (g,) = fn({"a": torch.ones(3)})
    assert_close(g, x.exp())
    with pytest.raises(RuntimeError, match="pytree structure of cotangents"):
        fn(torch.ones(3))


def test_vjp_unconnected_output():
    x = torch.randn(3)
    _, fn = ftrans.vjp(lambda x: torch.ones(2), x)
    assert_close(fn(torch.ones(2)), (torch.zeros(3),))


# ------------------------------------------------------------------------------- jacrev

def g_multi(x, y):
    return {"a": x.sin() * y[:2].sum(), "b": (x[:, None] * y).exp()}


def test_jacrev_pytree_argnums():
    x, y = torch.randn(3), torch.randn(4)
    for argnums in (0, 1, (0, 1)):
        assert_close(ftrans.jacrev(g_multi, argnums)(x, y),
                     torch.func.jacrev(g_multi, argnums)(x, y))


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 100])
def test_jacrev_chunked_equals_unchunked(chunk_size):
    x, y = torch.randn(3), torch.randn(4)
    assert_close(ftrans.jacrev(g_multi, (0, 1), chunk_size=chunk_size)(x, y),
                 ftrans.jacrev(g_multi, (0, 1))(x, y))


def test_jacrev_has_aux():
    x = torch.randn(3)
    jac, aux = ftrans.jacrev(lambda x: (x.sin(), x.cos()), has_aux=True)(x)
    assert_close(jac, torch.diag(x.cos()))
    assert_close(aux, x.cos())


def test_jacrev_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        ftrans.jacrev(torch.sin, chunk_size=0)
