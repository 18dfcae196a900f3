"""vmap's contract beyond the spec examples: in_dims/out_dims forms, chunking, nesting, errors."""
import collections

import pytest
import torch

import ftrans
from ftrans._C import levels


# ---------------------------------------------------------------------------------------------
# in_dims / out_dims forms


def test_negative_in_dims():
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(ftrans.vmap(lambda t: t.sin(), in_dims=-1)(x),
                               x.sin().movedim(-1, 0))
    torch.testing.assert_close(ftrans.vmap(lambda t: t * 2, in_dims=-2, out_dims=-1)(x),
                               (x * 2).movedim(-2, -1))


def test_nested_pytree_in_dims_and_list_inputs():
    a, b, c = torch.randn(3, 2), torch.randn(2, 3), torch.randn(2)

    def f(pair, d):
        return pair[0] * pair[1] + d["c"]

    out = ftrans.vmap(f, in_dims=([0, 1], {"c": None}))([a, b], {"c": c})
    torch.testing.assert_close(out, a * b.T + c)


def test_in_dims_prefix_applies_to_whole_subtree():
    x = {"a": torch.randn(4, 2), "b": torch.randn(4, 3)}
    out = ftrans.vmap(lambda d: d["a"].sum() + d["b"].sum(), in_dims=(0,))(x)
    torch.testing.assert_close(out, x["a"].sum(1) + x["b"].sum(1))


def test_out_dims_tuple_and_none():
    x = torch.randn(3, 4)
    y = torch.randn(4)

    def f(x):
        return x * 2, y

    a, b = ftrans.vmap(f, out_dims=(1, None))(x)
    torch.testing.assert_close(a, (x * 2).T)
    assert b is y


def test_unbatched_output_is_expanded():
    y = torch.randn(4)
    out = ftrans.vmap(lambda x: y, in_dims=0)(torch.randn(3, 2))
    torch.testing.assert_close(out, y.expand(3, 4))


def test_pytree_outputs():
    Point = collections.namedtuple("Point", "x y")
    x = torch.randn(3, 2)
    out = ftrans.vmap(lambda t: {"p": Point(t + 1, t * 2), "l": [t.sum()]})(x)
    assert isinstance(out["p"], Point)
    torch.testing.assert_close(out["p"].y, x * 2)
    torch.testing.assert_close(out["l"][0], x.sum(1))


def test_non_tensor_inputs_with_none_in_dim_pass_through():
    x = torch.randn(3, 2)
    out = ftrans.vmap(lambda t, k, s: t * k + len(s), in_dims=(0, None, None))(x, 3.0, "ab")
    torch.testing.assert_close(out, x * 3 + 2)


def test_chunk_size_equals_unchunked():
    x = torch.randn(10, 3)
    w = torch.randn(3)
    f = lambda t: (t * w).sin().sum()  # noqa: E731
    full = ftrans.vmap(f)(x)
    for cs in (1, 3, 4, 10, 100):
        torch.testing.assert_close(ftrans.vmap(f, chunk_size=cs)(x), full)
    a, b = ftrans.vmap(lambda t: (t, t.sum()), out_dims=(1, 0), chunk_size=4)(x)
    torch.testing.assert_close(a, x.T)
    torch.testing.assert_close(b, x.sum(1))


def test_nested_vmap_closure_over_outer_tensor():
    xs, ys = torch.randn(3, 4), torch.randn(5, 4)
    out = ftrans.vmap(lambda x: ftrans.vmap(lambda y: (x * y).sum())(ys))(xs)
    torch.testing.assert_close(out, xs @ ys.T)


def test_triple_nesting_with_different_in_dims():
    x = torch.randn(2, 3, 4, 5)
    f = ftrans.vmap(ftrans.vmap(ftrans.vmap(lambda t: t.sin() * 2, in_dims=1), in_dims=0), in_dims=3)
    out = f(x)
    # outer maps dim 3 (5), middle maps dim 0 of the rest (2), inner maps dim 1 of the rest (4)
    ref = (x.sin() * 2).permute(3, 0, 2, 1)
    torch.testing.assert_close(out, ref)


def test_inner_vmap_over_outer_batched_input():
    x = torch.randn(3, 4, 5)
    out = ftrans.vmap(lambda r: ftrans.vmap(lambda e: e * r.sum())(r))(x)
    torch.testing.assert_close(out, x * x.sum((1, 2), keepdim=True))


def test_inplace_on_batched_tensor():
    x = torch.randn(3, 4)
    x_before = x.clone()

    def f(t):
        t = t.clone()
        t.mul_(2).add_(1)
        return t

    torch.testing.assert_close(ftrans.vmap(f)(x), x * 2 + 1)
    assert torch.equal(x, x_before)


def test_inplace_batched_into_unbatched_raises():
    y = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"vmap\(.*in place"):
        ftrans.vmap(lambda t: y.add_(t))(torch.randn(3, 4))
    assert torch.equal(y, torch.zeros(4))


def test_inplace_unbatched_into_batched_is_fine():
    y = torch.ones(4)
    out = ftrans.vmap(lambda t: t.clone().add_(y))(torch.zeros(3, 4))
    torch.testing.assert_close(out, torch.ones(3, 4))


def test_user_inputs_not_mutated():
    x = torch.randn(3, 4)
    before = x.clone()
    ftrans.vmap(lambda t: t * 3)(x)
    assert torch.equal(x, before)


def test_backward_through_vmap_gives_plain_grads():
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)
    out = ftrans.vmap(lambda t: (t * w).sin().sum())(x)
    out.sum().backward()
    w2 = w.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (x2 * w2).sin().sum().backward()
    assert type(w.grad) is torch.Tensor and type(x.grad) is torch.Tensor
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(x.grad, x2.grad)


# ---------------------------------------------------------------------------------------------
# errors: type, call form, what was expected


def test_error_non_callable():
    with pytest.raises(TypeError, match="callable"):
        ftrans.vmap(3)


def test_error_in_dims_structure():
    with pytest.raises(ValueError, match=r"vmap\(dot, in_dims=\(0, 0, 0\).*in_dims"):
        ftrans.vmap(torch.dot, in_dims=(0, 0, 0))(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="in_dims is not compatible"):
        ftrans.vmap(lambda d: d["a"], in_dims=({"b": 0},))({"a": torch.randn(2)})
    with pytest.raises(ValueError, match="in_dims"):
        ftrans.vmap(torch.dot, in_dims=[0, 0])(torch.randn(2, 3), torch.randn(2, 3))


def test_error_in_dim_out_of_range():
    with pytest.raises(ValueError, match=r"in_dim=2.*dimensionality 2"):
        ftrans.vmap(torch.sin, in_dims=2)(torch.randn(2, 3))


def test_error_in_dim_on_non_tensor():
    with pytest.raises(ValueError, match="non-Tensor"):
        ftrans.vmap(lambda x, k: x * k, in_dims=(0, 0))(torch.randn(2), 3.0)


def test_error_inconsistent_batch_sizes():
    with pytest.raises(ValueError, match=r"same size.*\[2, 3\]"):
        ftrans.vmap(torch.add)(torch.randn(2), torch.randn(3))


def test_error_no_mapped_tensor():
    with pytest.raises(ValueError, match="at least one"):
        ftrans.vmap(lambda x: x, in_dims=None)(torch.randn(2))
    with pytest.raises(ValueError, match="non-Tensor"):
        ftrans.vmap(lambda x: x)(3.0)


def test_error_non_tensor_output():
    with pytest.raises(ValueError, match="must only return Tensors, got type <class 'float'>"):
        ftrans.vmap(lambda x: 1.0)(torch.randn(2))


def test_error_out_dims_mismatch():
    with pytest.raises(ValueError, match="out_dims"):
        ftrans.vmap(lambda x: (x, x), out_dims=(0, 0, 0))(torch.randn(2))
    with pytest.raises(IndexError, match=r"Dimension out of range .*out_dim=3"):
        ftrans.vmap(lambda x: x, out_dims=3)(torch.randn(2, 3))


def test_error_bad_randomness_and_chunk_size():
    with pytest.raises(RuntimeError, match="randomness"):
        ftrans.vmap(torch.sin, randomness="sometimes")
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="chunk_size"):
            ftrans.vmap(torch.sin, chunk_size=bad)


@pytest.mark.parametrize(
    "fn, hint",
    [
        (lambda x: x.sum().item(), r"\.item\(\)"),
        (lambda x: x * 2 if x.sum() > 0 else x, r"if"),
        (lambda x: torch.nonzero(x > 0), "nonzero"),  # counts 4, 0, 4: they differ
        (lambda x: x[x > 0], r"mask|masked|nonzero|index"),
        (lambda x: float(x.sum()), r"item|float"),
    ],
)
def test_error_data_dependent(fn, hint):
    with pytest.raises(RuntimeError, match=r"vmap\(.*data-dependent") as info:
        ftrans.vmap(fn)((torch.rand(3, 4) + 0.1) * torch.tensor([1.0, -1.0, 1.0])[:, None])
    assert info.match(hint)
    assert levels.current_stack() == []


def test_stack_unwinds_after_exception_at_depth():
    def inner(y):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        ftrans.vmap(lambda x: ftrans.vmap(inner)(x))(torch.randn(2, 3))
    assert levels.current_stack() == []
    # and the next call is correct
    torch.testing.assert_close(ftrans.vmap(torch.sin)(torch.ones(2)), torch.ones(2).sin())


def test_fallback_warns_once_and_is_counted():
    lib = torch.library.Library("ftrans_test_fb", "DEF")
    lib.define("myop(Tensor x) -> Tensor")
    lib.impl("myop", lambda x: x * 3 + 1, "CompositeExplicitAutograd")
    op = torch.ops.ftrans_test_fb.myop.default
    ftrans.reset_fallback_stats()
    x = torch.randn(4, 2)
    with pytest.warns(ftrans.FallbackWarning, match="ftrans_test_fb.myop"):
        out = ftrans.vmap(op)(x)
    torch.testing.assert_close(out, x * 3 + 1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ftrans.FallbackWarning)
        ftrans.vmap(op)(x)  # warns only once per op
    assert ftrans.fallback_stats()["ftrans_test_fb.myop.default"] == 2
    assert ftrans.op_status(op) == "fallback"


def test_user_registered_rule():
    lib = torch.library.Library("ftrans_test_rule", "DEF")
    lib.define("scale(Tensor x, float s) -> Tensor")
    lib.impl("scale", lambda x, s: x * s, "CompositeExplicitAutograd")
    op = torch.ops.ftrans_test_rule.scale.default
    calls = []

    @ftrans.register_batch_rule(torch.ops.ftrans_test_rule.scale)
    def scale_rule(level, func, args, bdims, kwargs):
        calls.append(level.batch_size)
        x, s = args
        return func(x, s), bdims[0]

    x = torch.randn(5, 3)
    from _helpers import no_fallback

    with no_fallback():
        out = ftrans.vmap(lambda t: op(t, 2.0), in_dims=1)(x)
    torch.testing.assert_close(out, (x * 2).T)
    assert calls == [3]
    assert ftrans.op_status(op) == "rule"


def test_vmap_inside_non_reentrant_checkpoint():
    # The checkpoint's saved-tensor hooks are set aside for the vmap's body: its recomputation
    # used to hand the vmap's backward values batched at the recomputation's level, and a
    # BatchedTensor leaked into .grad.
    from torch.utils.checkpoint import checkpoint

    a = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)

    def loss(m):
        q, _ = ftrans.vmap(torch.linalg.qr)(m)
        return (q * m).sum()

    expected = torch.autograd.grad(loss(a), a)[0]
    got = torch.autograd.grad(checkpoint(loss, a, use_reentrant=False), a)[0]
    assert type(got) is torch.Tensor
    torch.testing.assert_close(got, expected)
    a.grad = None
    checkpoint(loss, a, use_reentrant=False).backward()
    assert type(a.grad) is torch.Tensor
    torch.testing.assert_close(a.grad, expected)


def test_saved_tensors_hooks_restored_after_vmap():
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    x = torch.randn(2, 3, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with pytest.raises(ZeroDivisionError):
            ftrans.vmap(lambda v: v.sin() / 0 if (1 / 0) else v)(x)
        y = ftrans.vmap(torch.sin)(x)
        n = len(packed)
        (y * y).sum()
        assert len(packed) > n  # the hooks apply again after the vmap
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
