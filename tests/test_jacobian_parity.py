"""jacrev, jacfwd, jvp, linearize, hessian where they used to differ from torch.func.

Each case runs the same call on torch.func (the oracle) and ftrans: values must agree, and a call
torch.func refuses must raise torch.func's exception type with torch.func's message inside ours
(code and tests written against torch.func keep matching).  Where ftrans deliberately accepts
what torch.func refuses (a non-tensor ``aux``), the result is checked against eager code.
"""
import warnings

import pytest
import torch
import torch.func as tf
from torch.utils._pytree import tree_leaves

import ftrans
from ftrans._C import levels

assert_close = torch.testing.assert_close


def _same(got, expected):
    assert type(got) is type(expected)
    got, expected = tree_leaves(got), tree_leaves(expected)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert_close(g, e)


# ---------------------------------------------------------------------------------------------
# 0-dim inputs and outputs

@pytest.mark.parametrize("api", ["jacrev", "jacfwd", "hessian"])
def test_zero_dim_input_and_output(api):
    x = torch.tensor(0.5)
    _same(getattr(ftrans, api)(torch.sin)(x), getattr(tf, api)(torch.sin)(x))


@pytest.mark.parametrize("api", ["jacrev", "jacfwd"])
def test_zero_dim_mixed_against_autograd_functional(api):
    def h(x, y):
        return y.sum(), x * y, torch.stack([x, x])

    x, y = torch.randn(()), torch.randn(1)
    expected = torch.autograd.functional.jacobian(h, (x, y))
    _same(getattr(ftrans, api)(h, argnums=(0, 1))(x, y), expected)


# ---------------------------------------------------------------------------------------------
# jacrev of a function that itself calls jacrev (a silent wrong answer before: the inner
# jacrev's basis vmap met the outer graph inside autograd's own ops, and the part of the
# gradient that did not go through it was counted once per basis row)

@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3])
@pytest.mark.parametrize("outer", ["jacrev", "jacfwd"])
def test_jacobian_of_function_calling_jacrev(outer, chunk_size):
    def g(L, **kw):
        def inner(x):
            j = L.jacrev(lambda y: (y.sin() * x, y), **kw)(x)
            return j[0] + torch.diag(x) ** 2 + j[1]
        return inner

    x = torch.randn(3, dtype=torch.float64)
    expected = getattr(tf, outer)(g(tf))(x)
    _same(getattr(ftrans, outer)(g(ftrans, chunk_size=chunk_size))(x), expected)
    _same(ftrans.vmap(getattr(ftrans, outer)(g(ftrans, chunk_size=chunk_size)))(x[None]),
          expected[None])


def test_chunked_jacrev_composition_matches_unchunked():
    def f(x):
        return (x.sin(), x), (x + 2, x.sum())

    x = torch.randn(10, 2)
    expected = tf.vmap(tf.jacrev(tf.jacrev(f)))(x)
    got = ftrans.vmap(ftrans.jacrev(ftrans.jacrev(f, chunk_size=3), chunk_size=3))(x)
    _same(got, expected)


def test_jacrev_chunk_size_one_is_a_loop():
    # A backward with a data-dependent shape cannot be batched; one row at a time it works.
    class DynamicBackward(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g * g.nonzero().shape[0] / g.numel()

    x = torch.randn(3, 3)
    expected = torch.autograd.functional.jacobian(DynamicBackward.apply, x, vectorize=False)
    for preallocate in (True, False):
        got = ftrans.jacrev(DynamicBackward.apply, chunk_size=1,
                            _preallocate_and_copy=preallocate)(x)
        assert_close(got, expected)
    # Batched, each basis row of the chunk has one nonzero: the counts agree, nonzero is batched
    # (torch.func refuses it) and the Jacobian is the loop's.
    assert_close(ftrans.jacrev(DynamicBackward.apply, chunk_size=2)(x), expected)

    class DisagreeingBackward(DynamicBackward):
        @staticmethod
        def backward(ctx, g):  # a count that differs between basis rows
            return g * g.cumsum(0).nonzero().shape[0]

    with pytest.raises(RuntimeError, match="dynamic shape"):
        ftrans.jacrev(DisagreeingBackward.apply, chunk_size=2)(x)
    assert levels.current_stack() == []


# ---------------------------------------------------------------------------------------------
# forward mode: integer outputs, in-place writes into primals

def test_integer_outputs_get_zero_tangents():
    def f(x):
        return x.sin(), x.argmax(), (x > 0)

    x, t = torch.randn(2, 3), torch.randn(2, 3)
    _same(ftrans.jvp(f, (x,), (t,)), tf.jvp(f, (x,), (t,)))
    _same(ftrans.jacfwd(f)(x), tf.jacfwd(f)(x))
    _same(ftrans.linearize(f, x)[1](t), tf.jvp(f, (x,), (t,))[1])
    _same(ftrans.vmap(lambda x, t: ftrans.jvp(f, (x,), (t,)))(x, t),
          tf.vmap(lambda x, t: tf.jvp(f, (x,), (t,)))(x, t))
    with pytest.raises(RuntimeError, match=r"vjp\(f, \.\.\.\): All outputs of f must be floating"):
        ftrans.jacrev(f)(x)


def _mul_into(x, y):
    x.mul_(y)
    return x.sin()


def _copy_into_view(x, y):
    x[::2].copy_(y[::2] * 2)
    return x * y


@pytest.mark.parametrize("f", [_mul_into, _copy_into_view])
def test_jvp_of_function_writing_into_its_primal(f):
    x, y, tx, ty = (torch.randn(4, dtype=torch.float64) for _ in range(4))
    x_ref, x_ours, tx_ours = x.clone(), x.clone(), tx.clone()
    expected = tf.jvp(f, (x_ref, y), (tx.clone(), ty))
    _same(ftrans.jvp(f, (x_ours, y), (tx_ours, ty)), expected)
    assert_close(x_ours, x_ref)        # the write reaches the caller's tensor, as in eager
    assert_close(x_ours, _written(f, x, y))
    assert_close(tx_ours, tx)          # the tangent is the caller's and is left alone

    _same(ftrans.jacfwd(f, argnums=(0, 1))(x.clone(), y),
          tf.jacfwd(f, argnums=(0, 1))(x.clone(), y))

    def tangent_sum(L):
        return lambda x, y: L.jvp(f, (x.clone(), y), (tx.clone(), ty))[1].sum()
    _same(ftrans.grad(tangent_sum(ftrans), argnums=(0, 1))(x, y),
          tf.grad(tangent_sum(tf), argnums=(0, 1))(x, y))

    X, TX = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    X_ref, X_ours = X.clone(), X.clone()
    TX_ref = TX.clone()  # torch.func writes into the tangent too
    per_example = [tf.jvp(f, (X_ref[i], y), (TX_ref[i], ty)) for i in range(3)]
    expected = tuple(torch.stack(ts) for ts in zip(*per_example))
    _same(ftrans.vmap(lambda a, ta: ftrans.jvp(f, (a, y), (ta, ty)))(X_ours, TX), expected)
    assert_close(X_ours, X_ref)
    assert levels.current_stack() == []


def _written(f, x, y):
    x = x.clone()
    f(x, y)
    return x


def test_vmap_jvp_write_through_a_view_of_the_primal():
    def f(x, y):
        view = x[:, ::2]
        view.copy_(y)
        return view, x

    x, xt = torch.randn(2, 6, 2), torch.randn(2, 6, 2)
    y, yt = torch.randn(2, 2, 3), torch.randn(2, 2, 3)

    def push(L):
        return lambda x, xt, y, yt: L.jvp(f, (x, y), (xt, yt))

    x_ref, x_ours = x.clone(), x.clone()
    expected = tf.vmap(push(tf), in_dims=(2, 2, 1, 1))(x_ref, xt, y, yt)
    _same(ftrans.vmap(push(ftrans), in_dims=(2, 2, 1, 1))(x_ours, xt, y, yt), expected)
    assert_close(x_ours, x_ref)


# ---------------------------------------------------------------------------------------------
# Non-tensor aux: torch.func refuses it, ftrans returns it as it is (checked against eager)

@pytest.mark.parametrize("api", ["jacrev", "jacfwd"])
def test_jacobian_non_tensor_aux_returned_as_is(api):
    x = torch.randn(3)
    jac, aux = getattr(ftrans, api)(lambda x: (x.sin(), {"n": 3, "s": "abc", "t": [x.cos(), 1.0]}),
                                    has_aux=True)(x)
    assert_close(jac, torch.diag(x.cos()))
    assert aux["n"] == 3 and aux["s"] == "abc" and aux["t"][1] == 1.0
    assert_close(aux["t"][0], x.cos())


def test_jvp_non_tensor_aux_returned_as_is():
    x, t = torch.randn(3), torch.randn(3)
    out, jvp_out, aux = ftrans.jvp(lambda x: (x.sin(), [x.cos(), 7]), (x,), (t,), has_aux=True)
    assert_close(out, x.sin())
    assert_close(jvp_out, x.cos() * t)
    assert_close(aux[0], x.cos())
    assert aux[1] == 7


# ---------------------------------------------------------------------------------------------
# Refusals: torch.func's type, torch.func's message inside ours, no leaked level

_GEN = torch.Generator().manual_seed(0)  # module-level inputs: seeded, whatever ran before
X = torch.randn(2, 3, generator=_GEN)
T = torch.randn(2, 3, generator=_GEN)
C = torch.randn(2, dtype=torch.cfloat, generator=_GEN)

_REFUSED = {
    "jacrev_complex_input": lambda L: L.jacrev(torch.conj)(C),
    "jacfwd_complex_input": lambda L: L.jacfwd(torch.conj)(C),
    "hessian_complex_input": lambda L: L.hessian(lambda x: x.abs().sum())(C),
    "jacrev_complex_output": lambda L: L.jacrev(lambda x: x * 0.5j)(X),
    "jacfwd_complex_output": lambda L: L.jacfwd(lambda x: x * 0.5j)(X),
    "jacrev_complex_unused_arg": lambda L: L.jacrev(lambda x, c: x, argnums=0)(X, C),
    "jacrev_none_output": lambda L: L.jacrev(lambda _: None)(X),
    "jacrev_empty_output": lambda L: L.jacrev(lambda _: ())(X),
    "jacrev_int_output": lambda L: L.jacrev(lambda _: 1)(X),
    "jacfwd_none_output": lambda L: L.jacfwd(lambda _: None)(X),
    "jacfwd_empty_output": lambda L: L.jacfwd(lambda _: ())(X),
    "jacfwd_string_output": lambda L: L.jacfwd(lambda _: "abc")(X),
    "jvp_none_output": lambda L: L.jvp(lambda _: None, (X,), (T,)),
    "jvp_empty_output": lambda L: L.jvp(lambda _: (), (X,), (T,)),
    "jvp_float_output": lambda L: L.jvp(lambda _: 12.2, (X,), (T,)),
    "jvp_no_primals": lambda L: L.jvp(torch.sin, (), ()),
    "jvp_empty_primal_tree": lambda L: L.jvp(lambda x: x, ((),), ((),)),
    "jvp_primal_not_tensor": lambda L: L.jvp(torch.sin, ((X, X), 1), ((X, X), X)),
    "jvp_has_aux_list": lambda L: L.jvp(lambda x: [x, x], (X,), (T,), has_aux=True),
    "jvp_has_aux_triple": lambda L: L.jvp(lambda x: (x, x, x), (X,), (T,), has_aux=True),
    "jacfwd_has_aux_list": lambda L: L.jacfwd(lambda x: [x, x], has_aux=True)(X),
    "jacrev_has_aux_list": lambda L: L.jacrev(lambda x: [x, x], has_aux=True)(X),
    "jacrev_chunk_size_zero": lambda L: L.jacrev(torch.sin, chunk_size=0)(X),
    "linearize_tangent_dtype": lambda L: L.linearize(torch.sin, X)[1](T.double()),
    "linearize_tangent_shape": lambda L: L.linearize(torch.sin, X)[1](T[0]),
}


def _raised(call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except Exception as e:  # noqa: BLE001 - whatever each library raises
            return e
    return None


@pytest.mark.parametrize("case", sorted(_REFUSED))
def test_refusal_matches_torch_func(case):
    theirs = _raised(lambda: _REFUSED[case](tf))
    assert theirs is not None, "torch.func accepts this call: the case is wrong"
    ours = _raised(lambda: _REFUSED[case](ftrans))
    assert ours is not None, "ftrans accepted a call torch.func refuses"
    assert isinstance(ours, type(theirs)), (type(ours), type(theirs))
    assert str(theirs) in str(ours), f"\ntheirs: {theirs}\nours:   {ours}"
    assert levels.current_stack() == []


def test_linearize_tangent_structure_error():
    _, jvp_fn = ftrans.linearize(torch.sin, X)
    with pytest.raises(RuntimeError, match="to have the same argspec as the primals"):
        jvp_fn((T, T))


# ---------------------------------------------------------------------------------------------
# Results stay differentiable with respect to tensors the function closes over (a gradient
# penalty backpropagates into the critic's parameters); they were detached before, and such a
# term silently added nothing to the parameters' gradients.

_W = torch.randn(3, dtype=torch.float64, generator=_GEN)
_XS = torch.randn(4, 3, dtype=torch.float64, generator=_GEN)
_THROUGH = {
    "grad": lambda L, f: L.grad(lambda x: f(x).sum())(_XS[0]),
    "vmap_grad": lambda L, f: L.vmap(L.grad(lambda x: f(x).sum()))(_XS),
    "grad_and_value": lambda L, f: L.grad_and_value(lambda x: f(x).sum())(_XS[0]),
    "vjp": lambda L, f: L.vjp(f, _XS[0])[1](_XS[1]),
    "jacrev": lambda L, f: L.jacrev(f)(_XS[0]),
    "jacfwd": lambda L, f: L.jacfwd(f)(_XS[0]),
    "jvp": lambda L, f: L.jvp(f, (_XS[0],), (_XS[1],)),
    "vmap_jvp": lambda L, f: L.vmap(lambda x, t: L.jvp(f, (x,), (t,)))(_XS, _XS.flip(0)),
    # torch.func.linearize's result is not differentiable: jvp is its oracle
    "linearize": lambda L, f: (L.linearize(f, _XS[0])[1](_XS[1]) if L is ftrans
                               else L.jvp(f, (_XS[0],), (_XS[1],))[1]),
    "jacrev_jacrev": lambda L, f: L.jacrev(L.jacrev(f))(_XS[0]),
    "jacrev_jacfwd": lambda L, f: L.jacrev(L.jacfwd(f))(_XS[0]),
    "jacfwd_jacfwd": lambda L, f: L.jacfwd(L.jacfwd(f))(_XS[0]),
    "hessian": lambda L, f: L.hessian(lambda x: f(x).sum())(_XS[0]),
}


@pytest.mark.parametrize("api", sorted(_THROUGH))
def test_results_differentiable_wrt_closed_over_parameters(api):
    def param_grad(L):
        w = _W.clone().requires_grad_()
        out = _THROUGH[api](L, lambda x: (w * x).sin() * w)
        penalty = sum((t ** 2).sum() for t in tree_leaves(out))
        return torch.autograd.grad(penalty, w)[0]

    assert_close(param_grad(ftrans), param_grad(tf))


@pytest.mark.parametrize("api", sorted(_THROUGH))
def test_results_not_differentiable_without_grad_mode_or_closure(api):
    w = _W.clone().requires_grad_()
    with torch.no_grad():
        out = _THROUGH[api](ftrans, lambda x: (w * x).sin() * w)
    assert not any(t.requires_grad for t in tree_leaves(out))
    out = _THROUGH[api](ftrans, lambda x: (_W * x).sin() * _W)
    assert not any(t.requires_grad for t in tree_leaves(out))
