"""Issue 15 (per-call fixed costs): the shortcuts taken on the common path give what
torch.func and a plain loop give, and fall back to the general path when they do not apply."""
import pytest
import torch
import torch.func
from torch.overrides import TorchFunctionMode

import ftrans
from ftrans import _autodiff_common as common


def _f(x):
    return (x.sin() * x.cos().sum() + x ** 2).tanh()


def _loop_jacobian(f, x):
    x = x.detach().requires_grad_()
    y = f(x)
    rows = [torch.autograd.grad(y.reshape(-1)[i], x, retain_graph=True)[0]
            for i in range(y.numel())]
    return torch.stack(rows).reshape(y.shape + x.shape)


@pytest.fixture
def engine_calls(monkeypatch):
    calls = []
    real = common._engine_run_backward

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(common, "_engine_run_backward", counting)
    return calls


def test_jacrev_direct_engine_matches_torch_func_and_loop(engine_calls):
    x = torch.randn(7, dtype=torch.float64)
    got = ftrans.jacrev(_f)(x)
    assert engine_calls, "the direct engine call was not taken"
    torch.testing.assert_close(got, torch.func.jacrev(_f)(x))
    torch.testing.assert_close(got, _loop_jacobian(_f, x))


def test_grad_and_vjp_direct_engine(engine_calls):
    x = torch.randn(5, dtype=torch.float64)
    g = ftrans.grad(lambda x: _f(x).sum())(x)
    torch.testing.assert_close(g, torch.func.grad(lambda x: _f(x).sum())(x))
    out, fn = ftrans.vjp(_f, x)
    ct = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(fn(ct)[0], torch.func.vjp(_f, x)[1](ct)[0])
    assert len(engine_calls) == 2


def test_hessian_and_vmap_jacrev_match_torch_func():
    x = torch.randn(6, dtype=torch.float64)
    g = lambda x: _f(x).sum()  # noqa: E731
    torch.testing.assert_close(ftrans.hessian(g)(x), torch.func.hessian(g)(x))
    xs = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(ftrans.vmap(ftrans.jacrev(_f))(xs),
                               torch.stack([_loop_jacobian(_f, x) for x in xs]))


def test_torch_function_mode_takes_torch_path(engine_calls):
    seen = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.autograd.grad:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    x = torch.randn(4, dtype=torch.float64)
    with Mode():
        got = ftrans.grad(lambda x: (x ** 3).sum())(x)
    torch.testing.assert_close(got, 3 * x ** 2)
    assert seen and not engine_calls


def test_mismatched_cotangent_keeps_torchs_error(engine_calls):
    x = torch.randn(3)
    _, fn = ftrans.vjp(torch.sin, x)
    with pytest.raises(RuntimeError, match="Mismatch in dtype"):
        fn(torch.randn(3, dtype=torch.complex64))
    _, tfn = torch.func.vjp(torch.sin, x)
    with pytest.raises(RuntimeError):
        tfn(torch.randn(3, dtype=torch.complex64))
    assert not engine_calls


def test_closes_over_grad():
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3).requires_grad_()
    assert common.closes_over_grad([(x * w).sum()], [x])
    assert not common.closes_over_grad([(x * x).sum()], [x])
    assert not common.closes_over_grad([torch.randn(2)], [x])
    # a gradient penalty through closed-over parameters stays differentiable, as in torch.func
    gp = ftrans.grad(lambda x: (x * w).sum())(x.detach())
    assert gp.requires_grad
    assert torch.func.grad(lambda x: (x * w).sum())(x.detach()).requires_grad


@pytest.mark.parametrize("in_dims", [(0, 0, None), (None, 1, 0), (0, None, -1), (1, 0, 0)])
def test_flat_in_dims_fast_path(in_dims):
    """One int/None per argument: the shortcut gives what the prefix broadcast gives."""
    from ftrans import _pytree
    from ftrans._vmap_args import _flatten_in_dims

    args = ({"a": torch.ones(2, 3), "b": [torch.ones(2, 3), None]}, (), torch.ones(2, 3))
    leaves, _, dims = _flatten_in_dims(torch.add, in_dims, 0, args)
    want = _pytree.tree_leaves(_pytree.tree_broadcast_prefix(in_dims, args))
    assert dims == want and len(dims) == len(leaves) == 4


def test_ensemble_in_dims_matches_torch_func_and_loop():
    ms = [torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
          for _ in range(3)]
    x = torch.randn(6, 4)
    p, b = ftrans.stack_module_state(ms)
    got = ftrans.vmap(lambda p, b, x: ftrans.functional_call(ms[0], (p, b), (x,)),
                      in_dims=(0, 0, None))(p, b, x)
    torch.testing.assert_close(got, torch.stack([m(x) for m in ms]))
    tp, tb = torch.func.stack_module_state(ms)
    want = torch.func.vmap(lambda p, b, x: torch.func.functional_call(ms[0], (p, b), (x,)),
                           in_dims=(0, 0, None))(tp, tb, x)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="in_dim=True"):  # a bool is not an int: general path
        ftrans.vmap(torch.neg, in_dims=(True,))(x)


def test_grad_level_unwinds_and_restores_modes():
    from ftrans._C import levels

    with pytest.raises(ValueError, match="must be Tensor"):
        ftrans.grad(lambda x: x)((torch.ones(()), "not a tensor"))
    assert levels.current_stack() == [] or len(levels.current_stack()) == 0
    with pytest.raises(RuntimeError, match="scalar"):
        ftrans.grad(lambda x: x * 2)(torch.ones(3))
    assert len(levels.current_stack()) == 0
    with torch.no_grad():
        g = ftrans.grad(lambda x: (x ** 2).sum())(torch.ones(2))
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(g, torch.full((2,), 2.0))
    with torch.inference_mode():
        g = ftrans.jacrev(torch.sin)(torch.zeros(2))
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    torch.testing.assert_close(g, torch.eye(2))
    assert torch.is_grad_enabled() and len(levels.current_stack()) == 0
