"""torch.autograd.Function under ftrans's transforms (ftrans/_C/function.py).

A Function with a ``vmap`` staticmethod is batched by that rule (torch.func's contract: info,
in_dims, physical values, ``(outputs, out_dims)``), checked against a per-example loop, also
under grad in both orders; ``generate_vmap_rule = True`` and a Function with neither run
``forward`` on the batched values; the refusals carry torch.func's messages.  Functions written
in the old ``forward(ctx, ...)`` style, which torch.func refuses under every transform, are
checked against eager autograd and a loop (ftrans supports them).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import ftrans
from ftrans._C import levels
from _helpers import Cube

torch.manual_seed(0)
X = torch.randn(4, 3, dtype=torch.float64)


def _loop(f, x):
    return torch.stack([f(x[i]) for i in range(x.shape[0])])


class NumpyExp(torch.autograd.Function):
    """exp through numpy: forward cannot run on batched values, the vmap rule must be used."""

    calls = []

    @staticmethod
    def forward(x):
        return torch.tensor(np.exp(x.detach().cpu().numpy()), device=x.device)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * y

    @staticmethod
    def vmap(info, in_dims, x):
        NumpyExp.calls.append((info.batch_size, info.randomness, in_dims))
        return NumpyExp.apply(x), in_dims[0]


def test_vmap_staticmethod_is_used():
    NumpyExp.calls.clear()
    torch.testing.assert_close(ftrans.vmap(NumpyExp.apply)(X), X.exp())
    assert NumpyExp.calls == [(4, "error", (0,))]
    NumpyExp.calls.clear()
    torch.testing.assert_close(ftrans.vmap(NumpyExp.apply, in_dims=1, randomness="same")(X),
                               X.exp().T)
    assert NumpyExp.calls == [(3, "same", (1,))]
    # nested: each level calls the rule once, the inner level on the outer level's values
    torch.testing.assert_close(ftrans.vmap(ftrans.vmap(NumpyExp.apply))(X), X.exp())


def test_vmap_staticmethod_under_grad():
    f = lambda v: NumpyExp.apply(v).sum()  # noqa: E731
    expected = X.exp()
    torch.testing.assert_close(ftrans.vmap(ftrans.grad(f))(X), expected)
    torch.testing.assert_close(ftrans.grad(lambda v: ftrans.vmap(NumpyExp.apply)(v).sum())(X),
                               expected)
    torch.testing.assert_close(ftrans.jacrev(NumpyExp.apply)(X[0]), torch.diag(X[0].exp()))
    x = X.clone().requires_grad_()
    ftrans.vmap(NumpyExp.apply)(x).sum().backward()
    torch.testing.assert_close(x.grad, expected)


def _fn(**attrs):
    """A Function computing ``x * 2 + y`` (torch ops only) with the given class attributes."""

    def forward(x, y):
        return x * 2 + y

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, g):
        return g * 2, g

    body = {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward)}
    body.update(attrs)
    return type("Lin", (torch.autograd.Function,), body)


@pytest.mark.parametrize("attrs", [{}, {"generate_vmap_rule": True}], ids=["neither", "generate"])
def test_forward_on_batched_values(attrs):
    # generate_vmap_rule=True, and (an ftrans extension) a Function with neither: forward and
    # backward run on the batched values.
    Lin = _fn(**attrs)
    y = torch.randn(3, dtype=torch.float64)
    out = ftrans.vmap(Lin.apply, in_dims=(0, None))(X, y)
    torch.testing.assert_close(out, _loop(lambda x: Lin.apply(x, y), X))
    g = ftrans.vmap(ftrans.grad(lambda x: Lin.apply(x, y).sum()), in_dims=0)(X)
    torch.testing.assert_close(g, torch.full_like(X, 2.0))


def test_info_in_dims_identity_and_none_out_dims():
    seen = []

    def vmap_rule(info, in_dims, x, ys):
        seen.append(in_dims)
        return (x, ys), in_dims

    Id = _fn(vmap=staticmethod(vmap_rule),
             forward=staticmethod(lambda x, ys: (x, ys)))
    x = torch.randn(2, 3)
    out = ftrans.vmap(lambda a: Id.apply(a, [a, a]))(x)
    assert seen == [(0, [0, 0])] and isinstance(seen[0][1], list)
    torch.testing.assert_close(out[0], x)

    def zeros_rule(info, in_dims, x, y):
        return torch.zeros(x.shape[1:]), None

    Zeros = _fn(vmap=staticmethod(zeros_rule))
    torch.testing.assert_close(ftrans.vmap(Zeros.apply, in_dims=(0, None))(x, x[0]),
                               torch.zeros(2, 3))

    # the rule may return an input as it is
    Same = _fn(vmap=staticmethod(lambda info, in_dims, x, y: (x, in_dims[0])))
    torch.testing.assert_close(ftrans.vmap(lambda a: Same.apply(a, a))(x), x)


def test_unbatched_call_skips_the_rule():
    def rule(info, in_dims, x, y):
        raise AssertionError("the rule must not run for unbatched arguments")

    Lin = _fn(vmap=staticmethod(rule))
    out = ftrans.vmap(lambda a: a + Lin.apply(torch.ones(3), torch.ones(3)))(torch.zeros(2, 3))
    torch.testing.assert_close(out, torch.full((2, 3), 3.0))


@pytest.mark.parametrize("make, exc, msg", [
    (lambda: _fn(generate_vmap_rule=True, vmap=staticmethod(lambda i, d, x, y: (x, 0))),
     RuntimeError, "has both generate_vmap_rule=True and an overridden vmap staticmethod"),
    (lambda: _fn(vmap=staticmethod(lambda i, d, x, y: x * 2 + y)),
     RuntimeError, "Expected the vmap staticmethod to have two returns"),
    (lambda: _fn(vmap=staticmethod(lambda i, d, x, y: (x, y, 0, 0))),
     RuntimeError, "Expected the vmap staticmethod to have two returns"),
    (lambda: _fn(vmap=staticmethod(lambda i, d, x, y: (x * 2 + y, (None, 0)))),
     RuntimeError, "returned an incompatible"),
])
def test_rule_errors(make, exc, msg):
    Fn = make()
    with pytest.raises(exc, match=msg):
        ftrans.vmap(Fn.apply)(X, X)
    assert levels.current_stack() == []


def test_kwarg_only_tensors_refused():
    class KwOnly(torch.autograd.Function):
        @staticmethod
        def forward(x, *, y):
            return x + y

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def vmap(info, in_dims, x, *, y):
            return x + y, 0

    with pytest.raises(NotImplementedError, match="kwarg-only Tensor args"):
        ftrans.vmap(KwOnly.apply)(X, y=X[0])
    assert levels.current_stack() == []


def test_forward_leaving_torch_without_a_rule_says_so():
    class NoRule(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return torch.tensor(np.exp(x.numpy()))

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

    with pytest.raises(RuntimeError, match="does not have vmap support") as info:
        ftrans.vmap(NoRule.apply)(X)
    assert "numpy" in str(info.value) and isinstance(info.value.__cause__, Exception)
    assert levels.current_stack() == []


# ---------------------------------------------------------------------------------------------
# Old-style Functions (forward(ctx, ...), no setup_context): torch.func refuses them under every
# transform ("it must override the setup_context staticmethod"); ftrans differentiates them with
# eager autograd and batches the torch ops inside.

OldCube = Cube  # tests/_helpers.py: forward(ctx, x) with a hand-written backward, no setup_context


class OldIdentity(torch.autograd.Function):  # the Function of torch.func's refusal test
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.mark.parametrize("Fn, d", [(OldCube, lambda x: 3 * x ** 2),
                                   (OldIdentity, torch.ones_like)])
def test_old_style_function_under_every_transform(Fn, d):
    x, t = X[0], torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(ftrans.vmap(Fn.apply)(X), _loop(Fn.apply, X))
    torch.testing.assert_close(ftrans.grad(lambda v: Fn.apply(v).sum())(x), d(x))
    g, value = ftrans.grad_and_value(lambda v: Fn.apply(v).sum())(x)
    torch.testing.assert_close((g, value), (d(x), Fn.apply(x).sum()))
    out, vjp_fn = ftrans.vjp(Fn.apply, x)
    torch.testing.assert_close(vjp_fn(t)[0], d(x) * t)
    out, tangent = ftrans.jvp(Fn.apply, (x,), (t,))
    torch.testing.assert_close((out, tangent), (Fn.apply(x), d(x) * t))
    torch.testing.assert_close(ftrans.jacrev(Fn.apply)(x), torch.diag(d(x)))
    torch.testing.assert_close(ftrans.jacfwd(Fn.apply)(x), torch.diag(d(x)))
    torch.testing.assert_close(ftrans.vmap(ftrans.grad(lambda v: Fn.apply(v).sum()))(X), d(X))
