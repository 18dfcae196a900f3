"""jvp, linearize, jacfwd, hessian: values against torch.func and torch.autograd.functional."""
import pytest
import torch

import ftrans
from tests._helpers import QUIET_FALLBACKS

assert_close = torch.testing.assert_close
pytestmark = QUIET_FALLBACKS


def f(x, y):
    return (x.sin() * y).tanh(), x.exp().sum()


def test_jvp_matches_torch_func():
    x, y = torch.randn(4), torch.randn(4)
    tx, ty = torch.randn(4), torch.randn(4)
    out, t = ftrans.jvp(f, (x, y), (tx, ty))
    eout, et = torch.func.jvp(f, (x, y), (tx, ty))
    assert_close(out, eout)
    assert_close(t, et)
    assert not t[0].requires_grad and not out[0].requires_grad


def test_jvp_has_aux_and_pytree_primals():
    p = {"a": torch.randn(3), "b": torch.randn(3)}
    tp = {"a": torch.randn(3), "b": torch.randn(3)}

    def g(p):
        return (p["a"] * p["b"]).sum(), p["a"].cos()

    out, t, aux = ftrans.jvp(g, (p,), (tp,), has_aux=True)
    eout, et, eaux = torch.func.jvp(g, (p,), (tp,), has_aux=True)
    assert_close((out, t, aux), (eout, et, eaux))


def test_jvp_unconnected_output():
    out, t = ftrans.jvp(lambda x: torch.ones(2), (torch.randn(3),), (torch.randn(3),))
    assert_close(t, torch.zeros(2))


def test_jvp_errors():
    x = torch.randn(3)
    with pytest.raises(RuntimeError, match="Expected primals to be a tuple"):
        ftrans.jvp(torch.sin, x, (x,))
    with pytest.raises(RuntimeError, match="same python structure"):
        ftrans.jvp(torch.sin, (x,), (x, x))
    with pytest.raises(RuntimeError, match="shape"):
        ftrans.jvp(torch.sin, (x,), (torch.randn(4),))
    with pytest.raises(RuntimeError, match="output, aux"):
        ftrans.jvp(torch.sin, (x,), (x,), has_aux=True)


def test_jvp_of_jvp():
    x, v, w = torch.randn(3), torch.randn(3), torch.randn(3)

    def inner(x):
        return ftrans.jvp(lambda y: y.sin() * y, (x,), (v,))[1]

    def inner_ref(x):
        return torch.func.jvp(lambda y: y.sin() * y, (x,), (v,))[1]

    got = ftrans.jvp(inner, (x,), (w,))
    exp = torch.func.jvp(inner_ref, (x,), (w,))
    assert_close(got, exp)


@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr")  # torch.func's own
def test_linearize():
    x = torch.randn(4)
    out, jvp_fn = ftrans.linearize(lambda x: x.sin() * x.exp(), x)
    eout, ejvp_fn = torch.func.linearize(lambda x: x.sin() * x.exp(), x)
    assert_close(out, eout)
    for _ in range(2):
        t = torch.randn(4)
        assert_close(jvp_fn(t), ejvp_fn(t))


def test_jacfwd_pytree_argnums():
    x, y = torch.randn(3), torch.randn(3)
    for argnums in (0, 1, (0, 1)):
        assert_close(ftrans.jacfwd(f, argnums)(x, y), torch.func.jacfwd(f, argnums)(x, y))


def test_jacfwd_equals_jacrev_and_autograd_functional():
    x = torch.randn(5)

    def g(x):
        return x.cumsum(0).sin() * x.flip(0)

    assert_close(ftrans.jacfwd(g)(x), torch.autograd.functional.jacobian(g, x))
    assert_close(ftrans.jacfwd(g)(x), ftrans.jacrev(g)(x))


def test_jacfwd_has_aux():
    x = torch.randn(3)
    jac, aux = ftrans.jacfwd(lambda x: (x ** 2, x.sum()), has_aux=True)(x)
    assert_close(jac, torch.diag(2 * x))
    assert_close(aux, x.sum())


def test_jacfwd_randomness():
    x = torch.randn(3)
    with pytest.raises(Exception, match="random"):
        ftrans.jacfwd(lambda x: x * torch.rand(3))(x)
    jac = ftrans.jacfwd(lambda x: x * torch.rand(()), randomness="same")(x)
    # One draw for every tangent: the Jacobian is a multiple of the identity.
    assert_close(jac, torch.eye(3) * jac[0, 0])


def test_hessian_is_forward_over_reverse():
    x = torch.randn(4)

    def g(x):
        return (x.sin().prod() + (x ** 3).sum()) * x.norm()

    h = ftrans.hessian(g)(x)
    assert_close(h, torch.autograd.functional.hessian(g, x))
    assert_close(h, torch.func.hessian(g)(x))
    assert_close(h, ftrans.jacrev(ftrans.jacrev(g))(x))


def test_hessian_argnums_tuple():
    x, y = torch.randn(3), torch.randn(2)

    def g(x, y):
        return (x.sum() * y.exp()).sum() + (x ** 2).sum()

    got = ftrans.hessian(g, argnums=(0, 1))(x, y)
    exp = torch.func.hessian(g, argnums=(0, 1))(x, y)
    assert_close(got, exp)
