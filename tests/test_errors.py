"""Every user mistake gets the exception type torch.func raises, and a message a user can act on.

A wrong call must never produce a silent answer, and the error must be findable in a large
program: so each message starts with the user's own call form (``vmap(f, in_dims=(0, None),
...)(<inputs>)``, ``grad(f, argnums=2)(*args)``), names the argument at fault and says what was
expected.  Where the same mistake is cheap to make with torch.func, the test makes it there too
and requires our exception to be an instance of torch.func's type, so ``except`` clauses written
against torch.func keep working.  The few deliberate divergences are listed in ``_DIVERGENT`` with
the reason.

tests/test_vmap_api.py checks the basic vmap messages by regex; this file adds the type parity,
the call-form prefix, nesting/composition (which level's form is reported) and the autodiff APIs.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.func as tf

import ftrans
from ftrans._C import levels

X = torch.randn(2, 3)
XD = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -2.0, -3.0]])  # examples whose sums disagree in sign
XZ = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 3.0]])  # examples with different nonzero counts

# Mistakes where torch.func's exception is an accident of its implementation and ours is
# deliberately the documented, more specific one: {case id: (our type, why)}.
_DIVERGENT = {
    # torch.func lets `True` through as an int and fails later in Tensor.size() with TypeError.
    "in_dims_bool": ValueError,
}


def _raise_of(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - we want whatever torch.func raises
            return e
    return None


def _check(case, ours, theirs, prefix, *needles):
    """``ours()`` raises torch.func's type, message starts with ``prefix`` and has ``needles``."""
    err = _raise_of(ours)
    assert err is not None, f"{case}: no error raised (a silent answer)"
    msg = str(err)
    assert msg.startswith(prefix), f"{case}: message does not start with {prefix!r}:\n{msg}"
    for n in needles:
        assert re.search(n, msg), f"{case}: message lacks {n!r}:\n{msg}"
    if case in _DIVERGENT:
        assert type(err) is _DIVERGENT[case] or isinstance(err, _DIVERGENT[case]), msg
    elif theirs is not None:
        ref = _raise_of(theirs)
        assert ref is not None, f"{case}: torch.func accepts this call; the test is wrong"
        assert isinstance(err, type(ref)), (
            f"{case}: torch.func raises {type(ref).__name__}, we raise {type(err).__name__}")
    assert levels.current_stack() == []


def _both(make):
    """(ours, theirs) thunks from a lambda taking the library module."""
    return (lambda: make(ftrans)), (lambda: make(tf))


# ---------------------------------------------------------------------------------------------
# vmap arguments: (id, call, prefix, needles)

_VMAP_CASES = [
    ("in_dims_float", lambda L: L.vmap(torch.sin, in_dims=1.0)(X),
     "vmap(sin, in_dims=1.0, ...)(<inputs>)", r"`in_dims`", r"int or a .*tuple"),
    ("in_dims_list", lambda L: L.vmap(torch.add, in_dims=[0, 0])(X, X),
     "vmap(add, in_dims=[0, 0], ...)(<inputs>)", r"`in_dims`", r"tuple"),
    ("in_dims_bool", lambda L: L.vmap(torch.sin, in_dims=True)(X),
     "vmap(sin, in_dims=True, ...)(<inputs>)", r"`in_dims`", r"int"),
    ("in_dims_too_short", lambda L: L.vmap(torch.add, in_dims=(0,))(X, X),
     "vmap(add, in_dims=(0,), ...)(<inputs>)", r"in_dims", r"1 entries .* 2 positional"),
    ("in_dims_entry_type", lambda L: L.vmap(torch.add, in_dims=(0, "a"))(X, X),
     "vmap(add, in_dims=(0, 'a'), ...)(<inputs>)", r"in_dim='?a'?", r"integer dimension or None"),
    ("in_dims_nested_structure",
     lambda L: L.vmap(lambda p: p[0] + p[1], in_dims=((0, 0, 0),))((X, X)),
     "vmap(<lambda>, in_dims=((0, 0, 0),), ...)(<inputs>)", r"in_dims is not compatible"),
    ("in_dims_negative_out_of_range", lambda L: L.vmap(torch.sin, in_dims=-3)(X),
     "vmap(sin, in_dims=-3, ...)(<inputs>)", r"in_dim=-3", r"-2 <= in_dim < 2"),
    ("in_dims_zero_dim_tensor", lambda L: L.vmap(torch.sin)(torch.tensor(1.0)),
     "vmap(sin, ...)(<inputs>)", r"in_dim=0", r"dimensionality 0"),
    ("in_dims_on_python_scalar", lambda L: L.vmap(torch.mul, in_dims=(0, 0))(X, 2.0),
     "vmap(mul, in_dims=(0, 0), ...)(<inputs>)", r"in_dim=0", r"float", r"None"),
    ("batch_sizes_in_pytree", lambda L: L.vmap(lambda d: d["a"] + d["b"])(
        {"a": torch.ones(2, 3), "b": torch.ones(4, 3)}),
     "vmap(<lambda>, ...)(<inputs>)", r"same size in the mapped dimension", r"\[2, 4\]"),
    ("batch_sizes_in_dims_1", lambda L: L.vmap(torch.add, in_dims=(0, 1))(X, X),
     "vmap(add, in_dims=(0, 1), ...)(<inputs>)", r"same size", r"\[2, 3\]"),
    ("no_inputs", lambda L: L.vmap(lambda: torch.ones(2))(),
     "vmap(<lambda>, ...)(<inputs>)", r"got no inputs"),
    ("all_in_dims_none", lambda L: L.vmap(torch.add, in_dims=(None, None))(X, X),
     "vmap(add, in_dims=(None, None), ...)(<inputs>)",
     r"vmap: Expected at least one Tensor to vmap over", r"in_dim"),
    ("out_dims_too_many", lambda L: L.vmap(lambda x: (x, x), out_dims=(0, 0, 0))(X),
     "vmap(<lambda>, out_dims=(0, 0, 0), ...)(<inputs>)", r"out_dims", r"3 entries .* 2 outputs"),
    ("out_dims_type", lambda L: L.vmap(lambda x: x, out_dims="a")(X),
     "vmap(<lambda>, out_dims='a', ...)(<inputs>)",
     r"`out_dims` must be an int, None or a python collection of ints"),
    ("out_dims_entry_type", lambda L: L.vmap(lambda x: x, out_dims=("a",))(X),
     "vmap(<lambda>, out_dims=('a',), ...)(<inputs>)",
     r"`out_dims` must be an int, None or a python collection of ints"),
    ("out_dims_out_of_range", lambda L: L.vmap(lambda x: x, out_dims=2)(X),
     "vmap(<lambda>, out_dims=2, ...)(<inputs>)",
     r"Dimension out of range \(expected to be in range of \[-2, 1\], but got 2\)",
     r"out_dim=2", r"-2 <= out_dim < 2"),
    ("out_dims_negative_out_of_range", lambda L: L.vmap(lambda x: x, out_dims=-3)(X),
     "vmap(<lambda>, out_dims=-3, ...)(<inputs>)", r"out_dim=-3", r"-2 <= out_dim < 2"),
    ("out_dims_none_for_batched", lambda L: L.vmap(lambda x: x * 2, out_dims=None)(X),
     "vmap(<lambda>, out_dims=None, ...)(<inputs>)",
     r"can not return a BatchedTensor when out_dim is None", r"out_dim=None", r"batched"),
    ("non_tensor_output_nested", lambda L: L.vmap(lambda x: (x, [x, "s"]))(X),
     "vmap(<lambda>, ...)(<inputs>)", r"must only return Tensors, got type <class 'str'>"),
    ("none_output", lambda L: L.vmap(lambda x: None)(X),
     "vmap(<lambda>, ...)(<inputs>)", r"must only return Tensors", r"NoneType"),
]


@pytest.mark.parametrize("case, make, prefix, needles", [(c[0], c[1], c[2], c[3:])
                                                         for c in _VMAP_CASES],
                         ids=[c[0] for c in _VMAP_CASES])
def test_vmap_argument_errors(case, make, prefix, needles):
    _check(case, *_both(make), prefix, *needles)


def test_nested_vmap_error_names_the_inner_call():
    # The mistake is in the inner vmap: its form, not the outer one, must lead the message.
    _check("nested_batch_sizes",
           *_both(lambda L: L.vmap(lambda x: L.vmap(torch.add)(x, torch.ones(5, 3)))(
               torch.ones(2, 4, 3))),
           "vmap(add, ...)(<inputs>)", r"same size", r"\[4, 5\]")


@pytest.mark.parametrize("kind", ["vmap", "jacrev", "jacfwd"])
@pytest.mark.parametrize("bad", [0, -2])
def test_chunk_size_must_be_positive(kind, bad):
    make = {"vmap": lambda L: L.vmap(torch.sin, chunk_size=bad)(X),
            "jacrev": lambda L: L.jacrev(torch.sin, chunk_size=bad)(X),
            "jacfwd": lambda L: L.jacfwd(torch.sin, chunk_size=bad)(X)}[kind]
    # torch.func.jacfwd has no chunk_size (an ftrans extension): compare with vmap's type.
    theirs = (lambda: make(tf)) if kind != "jacfwd" else (
        lambda: tf.vmap(torch.sin, chunk_size=bad)(X))
    _check(f"chunk_{kind}", lambda: make(ftrans), theirs, f"{kind}(sin, chunk_size={bad})",
           r"chunk_size", r"greater than 0|positive")


def test_bad_randomness():
    _check("randomness", *_both(lambda L: L.vmap(torch.sin, randomness="sometimes")(X)),
           "vmap(sin, randomness='sometimes')", r"randomness", r"'error'", r"'same'",
           r"'different'")


def test_vmap_non_callable():
    _check("vmap_non_callable", *_both(lambda L: L.vmap(3)(X)), "vmap(func)", r"callable", "int")


# ---------------------------------------------------------------------------------------------
# Per-example values used where one Python value is needed

_DATA_DEPENDENT = [
    ("item", lambda L: L.vmap(lambda x: x.sum().item())(X), r"\.item\(\)"),
    ("bool", lambda L: L.vmap(lambda x: x if bool(x.sum() > 0) else -x)(XD), r"bool|if"),
    ("if", lambda L: L.vmap(lambda x: x if x.sum() > 0 else -x)(XD), r"if"),
    ("float", lambda L: L.vmap(lambda x: x * float(x[0]))(X), r"float"),
    ("nonzero", lambda L: L.vmap(torch.nonzero)(XZ), r"nonzero"),
    ("mask_index", lambda L: L.vmap(lambda x: x[x > 0])(X), r"mask|nonzero"),
    ("nested_item", lambda L: L.vmap(L.vmap(lambda x: x * x.item()))(torch.arange(6.0).view(2, 3)),
     r"item"),
    ("vmap_of_grad_item", lambda L: L.vmap(L.grad(lambda x: x.sum() * x.sum().item()))(X),
     r"item"),
    ("grad_of_vmap_bool",
     lambda L: L.grad(lambda x: L.vmap(lambda y: y if bool(y.sum() > 0) else -y)(x).sum())(XD),
     r"bool|if"),
]


@pytest.mark.parametrize("case, make, hint", _DATA_DEPENDENT, ids=[c[0] for c in _DATA_DEPENDENT])
def test_data_dependent_python_values(case, make, hint):
    _check(case, *_both(make), "vmap(", r"data-dependent", hint, r"torch\.where|tensor ops|Use")


# ---------------------------------------------------------------------------------------------
# In-place writes of batched values into unbatched tensors (the result cannot fit)

_INPLACE = [
    # (tensors made before the call: one the vmapped function creates becomes batched instead)
    ("add_", lambda L, z=torch.zeros(3): L.vmap(lambda x: z.add_(x))(X), "add_"),
    ("copy_", lambda L, z=torch.zeros(3): L.vmap(lambda x: z.copy_(x))(X), "copy_"),
    ("setitem", lambda L, z=torch.zeros(3): L.vmap(lambda x: _setitem(z, x[0]))(X), "copy_"),
    ("index_put_", lambda L, z=torch.zeros(3): L.vmap(lambda x: z.index_put_(
        (torch.tensor([0]),), x[:1]))(X), "index_put_"),
    ("view_of_fresh", lambda L: L.vmap(lambda x: torch.zeros(2, 3)[0].add_(x))(X), "add_"),
    ("captured_outer_batched",  # level-1 batched x cannot take level-2 values
     lambda L: L.vmap(lambda x: L.vmap(lambda y: x.add_(y))(torch.ones(4, 3)))(torch.ones(2, 3)),
     "add_"),
]


@pytest.mark.parametrize("case, make, op", _INPLACE, ids=[c[0] for c in _INPLACE])
def test_inplace_batched_into_unbatched(case, make, op):
    _check(case, *_both(make), "vmap(", op, r"not batched", r"y = y \+ x|batched tensor")


def _setitem(z, v):
    z[0] = v
    return z


def test_inplace_error_leaves_the_unbatched_tensor_untouched():
    z = torch.zeros(3)
    with pytest.raises(RuntimeError):
        ftrans.vmap(lambda x: z.add_(x))(X)
    assert torch.equal(z, torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# Randomness

_RANDOM = [
    ("randn_error", lambda L: L.vmap(lambda x: x + torch.randn(3))(X), "randn"),
    ("rand_like_error", lambda L: L.vmap(torch.rand_like)(X), "rand_like"),
    ("dropout_error", lambda L: L.vmap(lambda x: torch.nn.functional.dropout(x, 0.5))(X),
     "bernoulli|dropout"),
    ("inner_error_outer_same",
     lambda L: L.vmap(L.vmap(lambda x: x + torch.rand(())), randomness="same")(torch.ones(2, 3)),
     "rand"),
]


@pytest.mark.parametrize("case, make, op", _RANDOM, ids=[c[0] for c in _RANDOM])
def test_random_op_in_error_mode(case, make, op):
    _check(case, *_both(make), "vmap(", op, r"randomness", r"'same' or 'different'")


def test_different_inplace_randomness_on_unbatched():
    _check("normal_", *_both(lambda L: L.vmap(lambda x: torch.zeros(3).normal_() + x,
                                              randomness="different")(X)),
           "vmap(<lambda>, ...)(<inputs>)", r"inplace randomness", r"unbatched")


def test_random_error_under_jacfwd_names_jacfwd():
    _check("jacfwd_rand", *_both(lambda L: L.jacfwd(lambda x: x + torch.rand(3))(torch.ones(3))),
           "jacfwd(<lambda>)", r"random")


# ---------------------------------------------------------------------------------------------
# grad-family arguments

def _f2(a, b):
    return (a * b).sum()


_GRAD_CASES = [
    ("nonscalar", lambda L: L.grad(torch.sin)(X), "grad(sin)(*args)", r"scalar", r"2 dims"),
    ("nonscalar_in_vmap", lambda L: L.vmap(L.grad(torch.sin))(X), "grad(sin)(*args)", r"scalar"),
    ("non_tensor_output", lambda L: L.grad(lambda a: 1.0)(X), "grad(<lambda>)(*args)",
     r"return a Tensor", r"float"),
    ("argnum_out_of_range", lambda L: L.grad(_f2, argnums=2)(X, X),
     "grad(_f2, argnums=2)(*args)", r"argnum=2", r"2 positional"),
    ("argnum_negative_out_of_range", lambda L: L.grad(_f2, argnums=-3)(X, X),
     "grad(_f2, argnums=-3)(*args)", r"argnum=-3"),
    ("argnums_duplicated", lambda L: L.grad(_f2, argnums=(0, 0))(X, X),
     "grad(_f2, argnums=(0, 0))(*args)", r"unique"),
    ("argnums_duplicated_negative", lambda L: L.grad(_f2, argnums=(1, -1))(X, X),
     "grad(_f2, argnums=(1, -1))(*args)", r"unique"),
    ("argnums_empty", lambda L: L.grad(_f2, argnums=())(X, X),
     "grad(_f2, argnums=())(*args)", r"non-empty"),
    ("argnums_type", lambda L: L.grad(_f2, argnums=[0, 1])(X, X),
     "grad(_f2, argnums=[0, 1])(*args)", r"int or Tuple"),
    ("no_args", lambda L: L.grad(lambda: torch.ones(()))(), "grad(<lambda>)(*args)",
     r"argnum=0", r"0 positional"),
    ("has_aux_not_tuple", lambda L: L.grad(lambda a: a.sum(), has_aux=True)(X),
     "grad(<lambda>, has_aux=True)(*args)", r"tuple: \(output, aux\)"),
    ("has_aux_triple", lambda L: L.grad(lambda a: (a.sum(), a, a), has_aux=True)(X),
     "grad(<lambda>, has_aux=True)(*args)", r"tuple: \(output, aux\)"),
    ("grad_and_value_aux", lambda L: L.grad_and_value(lambda a: a.sum(), has_aux=True)(X),
     "grad_and_value(<lambda>, has_aux=True)(*args)", r"\(output, aux\)"),
    ("integer_input", lambda L: L.grad(lambda a: a.sum())(torch.ones(3, dtype=torch.long)),
     "grad(<lambda>)(*args)", r"floating point"),
    ("python_scalar_input", lambda L: L.grad(lambda a: a)(1.0), "grad(<lambda>)(*args)",
     r"must be Tensor", r"float"),
    ("jacrev_argnum", lambda L: L.jacrev(torch.sin, argnums=1)(X),
     "jacrev(sin, argnums=1)(*args)", r"argnum=1"),
    ("jacfwd_argnum", lambda L: L.jacfwd(torch.sin, argnums=1)(X),
     "jacfwd(sin, argnums=1)(*args)", r"argnum=1"),
    ("jacrev_has_aux", lambda L: L.jacrev(torch.sin, has_aux=True)(X), "jacrev(sin)(*args)",
     r"\(output, aux\)"),
    ("jacfwd_has_aux", lambda L: L.jacfwd(torch.sin, has_aux=True)(X), "jacfwd(sin)(*args)",
     r"\(output, aux\)"),
    ("jacrev_non_tensor_output", lambda L: L.jacrev(lambda x: 1.0)(X),
     "jacrev(<lambda>)(*args)", r"only tensors"),
    ("jacrev_integer_output", lambda L: L.jacrev(lambda x: x.long())(X),
     "jacrev(<lambda>)(*args)", r"floating-point"),
    ("vjp_has_aux", lambda L: L.vjp(torch.sin, X, has_aux=True), "vjp(sin, *primals)",
     r"\(output, aux\)"),
    ("vjp_fn_structure", lambda L: L.vjp(torch.sin, X)[1]((torch.ones(2, 3),)),
     "vjp(sin, *primals)", r"pytree structure of cotangents"),
    ("vjp_fn_shape", lambda L: L.vjp(torch.sin, X)[1](torch.ones(3)), "vjp(sin, *primals)",
     r"shape"),
    ("jvp_primals_not_tuple", lambda L: L.jvp(torch.sin, X, X),
     "jvp(sin, primals, tangents)", r"primals to be a tuple"),
    ("jvp_structure", lambda L: L.jvp(torch.sin, (X,), (X, X)), "jvp(sin, primals, tangents)",
     r"same python structure"),
    ("jvp_tangent_type", lambda L: L.jvp(torch.sin, (X,), (1.0,)), "jvp(sin, primals, tangents)",
     r"only contain Tensors"),
    ("jvp_tangent_shape", lambda L: L.jvp(torch.sin, (X,), (torch.ones(3),)),
     "jvp(sin, primals, tangents)", r"shape"),
]


@pytest.mark.parametrize("case, make, prefix, needles", [(c[0], c[1], c[2], c[3:])
                                                         for c in _GRAD_CASES],
                         ids=[c[0] for c in _GRAD_CASES])
def test_autodiff_argument_errors(case, make, prefix, needles):
    _check(case, *_both(make), prefix, *needles)


def test_grad_non_callable():
    _check("grad_non_callable", *_both(lambda L: L.grad(3)(X)), "grad(", r"callable")


def test_hessian_argnum_error_names_hessian():
    _check("hessian_argnum", *_both(lambda L: L.hessian(_f2, argnums=2)(X, X)),
           "hessian(_f2, argnums=2)", r"argnum=2")


def test_where_with_only_a_condition_is_refused_like_torch_func():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"Attempted to vmap over aten::where") as ours:
        ftrans.vmap(lambda t: torch.where(t))(x)
    with pytest.raises(RuntimeError, match=r"Attempted to vmap over aten::where"):
        torch.func.vmap(lambda t: torch.where(t))(x)
    assert "ftrans.nonzero" in str(ours.value)
    # the three-argument form is an ordinary batched select
    torch.testing.assert_close(ftrans.vmap(lambda t: torch.where(t > 0, t, 0.0))(x),
                               torch.where(x > 0, x, 0.0))


@pytest.mark.parametrize("call", [
    lambda t, out: torch.index_select(t, 0, torch.tensor([1, 2]), out=out),
    lambda t, out: torch.gather(t, 0, torch.tensor([1, 0]), out=out),
], ids=["index_select", "gather"])
def test_out_variant_of_an_op_with_a_rule_is_refused_and_out_untouched(call):
    # A rule registered on an op packet covers its functional overloads only; an out= overload
    # is refused (torch.func's message), never run by the functional rule with `out` dropped.
    x, out = torch.randn(2, 3), torch.zeros(1)
    with pytest.raises(RuntimeError, match="doesn't work on out= or view ops"):
        ftrans.vmap(lambda t: call(t, out))(x)
    assert out.shape == (1,) and out.eq(0).all()
    assert ftrans.op_status(torch.ops.aten.index_select.out) == "error"
    assert ftrans.op_status(torch.ops.aten.index_select.default) == "rule"
