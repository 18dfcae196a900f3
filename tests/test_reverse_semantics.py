"""Reverse-mode semantics shared with torch.func: ``no_grad`` around a transform, calls that
a transformed function may not make, anomaly mode, vjp functions under ``torch.compile``.

torch.func is the oracle where it accepts the program; where it refuses something on purpose
and ftrans supports it, the result is checked against a per-example loop or eager autograd.
"""
import pytest
import torch

import ftrans
from tests._helpers import QUIET_FALLBACKS

assert_close = torch.testing.assert_close
pytestmark = QUIET_FALLBACKS


# ----------------------------------------------------------------------------------------------
# no_grad around an inner transform stops the outer levels, not the inner one
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lib", [torch.func, ftrans], ids=["torch.func", "ftrans"])
def test_inner_grad_under_no_grad_is_a_constant_for_the_outer_grad(lib):
    x = torch.tensor(1.5)
    f = lambda x: x ** 2 - torch.no_grad()(lib.grad(lambda y: y ** 2))(x)  # noqa: E731
    assert_close(lib.grad(f)(x), torch.tensor(3.0))


def test_no_grad_inner_grad_and_value_and_vjp():
    x = torch.tensor(1.6, requires_grad=True)

    def h(x):
        with torch.no_grad():
            g, value = ftrans.grad_and_value(lambda t: t ** 3)(x)
            out, vjp_fn = ftrans.vjp(lambda t: t.sin(), x)
            (v,) = vjp_fn(torch.tensor(1.0))
        assert not (g.requires_grad or value.requires_grad or out.requires_grad
                    or v.requires_grad)
        return x ** 3 - value + g + out + v

    y = ftrans.grad(h)(x)
    assert_close(y, 3 * x.detach() ** 2)
    (z,) = torch.autograd.grad(y, x)  # the outer grad's own graph is still there
    assert_close(z, 6 * x.detach())


def test_no_grad_inner_grad_captures_outer_input():
    # The inner function closes over the outer level's input: still a constant outside.
    def h(x):
        with torch.no_grad():
            shift = ftrans.grad(lambda y: (x * y).sum())(x)
        return (x ** 2).sum() - (shift * x).sum()

    x = torch.randn(3)
    assert_close(ftrans.grad(h)(x), torch.func.grad(h_tf)(x))
    assert_close(ftrans.grad(h)(x), 2 * x - x)


def h_tf(x):
    with torch.no_grad():
        shift = torch.func.grad(lambda y: (x * y).sum())(x)
    return (x ** 2).sum() - (shift * x).sum()


def test_no_grad_inner_grad_inside_jvp_still_carries_tangents():
    # Forward mode ignores no_grad (torch.func's semantics): the tangent flows through the
    # inner gradient, whose value does not depend on grad mode.
    x, t = torch.tensor(1.5), torch.tensor(1.0)

    def make(lib):
        return lambda x: x ** 3 + torch.no_grad()(lib.grad(lambda y: y ** 3))(x)

    assert_close(ftrans.jvp(make(ftrans), (x,), (t,)),
                 torch.func.jvp(make(torch.func), (x,), (t,)))


def test_no_grad_inner_vmap_grad_under_outer_grad():
    x = torch.randn(4)

    def h(x):
        with torch.no_grad():
            per_example = ftrans.vmap(ftrans.grad(lambda y: y ** 3))(x)
        return (x ** 3).sum() - per_example.sum()

    assert_close(ftrans.grad(h)(x), 3 * x ** 2)


# ----------------------------------------------------------------------------------------------
# requires_grad_() / retain_grad() / torch.autograd.functional inside a transform: refused
# ----------------------------------------------------------------------------------------------

def _sets_requires_grad(x):
    x.requires_grad_()
    return x.sin().sum()


def _retains_grad(x):
    y = x.sin()
    y.retain_grad()
    return y.sum()


def _autograd_functional_vjp(x):
    return torch.autograd.functional.vjp(lambda t: t.sin().sum(), x)[1]


def _transforms(lib):
    return {
        "vmap": lib.vmap,
        "grad": lambda f: lambda x: lib.grad(f)(x[0]),
        "vmap_grad": lambda f: lib.vmap(lib.grad(f)),
        "vjp": lambda f: lambda x: lib.vjp(f, x)[0],
    }


@pytest.mark.parametrize("transform", list(_transforms(ftrans)))
@pytest.mark.parametrize("func", [_sets_requires_grad, _retains_grad, _autograd_functional_vjp])
def test_autograd_state_calls_refused_like_torch_func(transform, func):
    x = torch.randn(3, 2)
    with pytest.raises(RuntimeError) as oracle:
        _transforms(torch.func)[transform](func)(x)
    with pytest.raises(RuntimeError) as ours:
        _transforms(ftrans)[transform](func)(x)
    assert str(oracle.value) in str(ours.value)
    assert not x.requires_grad  # the caller's tensor is untouched


def test_refusal_names_the_transform():
    with pytest.raises(RuntimeError, match=r"Tensor\.requires_grad_\(\).*ftrans: called inside "
                       r"vmap\(_sets_requires_grad"):
        ftrans.vmap(_sets_requires_grad)(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match=r"Tensor\.retain_grad\(\).*inside a grad transform"):
        ftrans.grad(_retains_grad)(torch.randn(3))


def test_autograd_state_calls_fine_outside_transforms():
    x = torch.randn(3)
    x.requires_grad_()
    y = x.sin()
    y.retain_grad()
    y.sum().backward()
    assert_close(y.grad, torch.ones(3))
    assert_close(x.grad, x.detach().cos())
    x.requires_grad_(False)
    assert not x.requires_grad
    # ... and after a refused call, the stack is clean again (conftest checks it too)
    with pytest.raises(RuntimeError):
        ftrans.grad(_sets_requires_grad)(torch.randn(3))
    z = torch.randn(2).requires_grad_()
    assert z.requires_grad


def test_autograd_functional_forward_mode_jacobian_inside_vmap_matches_loop():
    # torch.func refuses this one (no batching rule for aten::_make_dual); ftrans batches it,
    # and the result is the per-example Jacobian.
    def f(x):
        return torch.autograd.functional.jacobian(lambda t: (t.sin() * t).sum(), x,
                                                  strategy="forward-mode", vectorize=True)

    x = torch.randn(5, 3)
    assert_close(ftrans.vmap(f)(x), torch.stack([f(xi) for xi in x]))


@pytest.mark.parametrize("inner", [False, True], ids=["around", "inside"])
def test_vjp_under_saved_tensor_hooks_matches_eager(inner):
    # torch.func refuses vjp under saved-tensor hooks; ftrans has no wrapper tensors for the
    # hooks to trip on, and the pullback is eager autograd's.
    def f(x):
        return (torch.sin(x) * x.exp()).sum()

    def g(x):
        with torch.autograd.graph.save_on_cpu():
            return f(x)

    x, ct = torch.randn(3, dtype=torch.float64), torch.tensor(1.7, dtype=torch.float64)
    xe = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad(f(xe), xe, ct)
    if inner:
        out, vjp_fn = ftrans.vjp(g, x)
    else:
        with torch.autograd.graph.save_on_cpu():
            out, vjp_fn = ftrans.vjp(f, x)
    assert_close(out, f(x))
    assert_close(vjp_fn(ct)[0], expected)


# ----------------------------------------------------------------------------------------------
# anomaly mode, torch.compile
# ----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Error detected in")
@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_vmap_grad_under_anomaly_detection():
    x = torch.zeros(3) - 1
    with torch.autograd.set_detect_anomaly(True):
        assert_close(ftrans.vmap(ftrans.grad(lambda t: t.sum()))(x), torch.ones(3))
        assert_close(ftrans.vmap(ftrans.grad(lambda t: (t * t).sum()))(torch.arange(3.)),
                     2 * torch.arange(3.))
        with pytest.raises(RuntimeError, match="Function 'SqrtBackward0' returned nan values"):
            ftrans.vmap(ftrans.grad(lambda t: t.sqrt().sum()))(x)
        # one bad example among good ones is enough
        with pytest.raises(RuntimeError, match="returned nan values"):
            ftrans.vmap(ftrans.grad(lambda t: t.sqrt().sum()))(torch.tensor([1.0, -1.0, 4.0]))


def test_whole_batch_truth_ops_under_vmap_match_torch_func():
    x = torch.tensor([[True, False], [False, False]])
    for op in (torch.Tensor._is_any_true, torch.Tensor._is_all_true):
        for v in (x, ~x, x[:, :1], torch.ones(2, 1, dtype=torch.bool)):
            assert torch.equal(ftrans.vmap(lambda t: op(t.reshape(-1)))(v),
                               torch.func.vmap(lambda t: op(t.reshape(-1)))(v))


def test_vjp_fn_called_inside_torch_compile():
    torch._dynamo.reset()
    x, ct = torch.randn(3), torch.randn(3)
    out, vjp_fn = ftrans.vjp(torch.sin, x)

    def g(v):
        return vjp_fn(v)[0] * 2

    assert_close(torch.compile(g, backend="eager")(ct), 2 * ct * x.cos())
    out, vjp_fn = ftrans.vjp(lambda a: {"s": a.sin(), "c": [a.cos()]}, x)
    h = torch.compile(lambda a, b: vjp_fn({"s": a, "c": [b]})[0] + 1, backend="eager")
    assert_close(h(ct, ct), ct * x.cos() - ct * x.sin() + 1)


def test_requires_grad_on_a_tensor_the_function_made_stays_supported():
    # Per-example eager autograd inside vmap on a fresh leaf: not a transform input, so ftrans
    # keeps it (the result is the per-example loop's).
    w = torch.randn(4, 3)

    def per_example_grad(x):
        w_ = w.detach().requires_grad_()
        (g,) = torch.autograd.grad((x @ w_).tanh().sum(), w_)
        return g

    x = torch.randn(5, 4)
    assert_close(ftrans.vmap(per_example_grad)(x), torch.stack([per_example_grad(r) for r in x]))
    assert not w.requires_grad


# ----------------------------------------------------------------------------------------------
# vmap under saved-tensor hooks: torch.utils.checkpoint recomputes the vmap at a new level
# ----------------------------------------------------------------------------------------------

def _checkpointed_and_eager(fn, wrt, *args):
    from torch.utils.checkpoint import checkpoint

    got = torch.autograd.grad(checkpoint(fn, *args, use_reentrant=False).sum(), wrt)
    expected = torch.autograd.grad(fn(*args).sum(), wrt)
    for g in got:
        assert type(g) is torch.Tensor  # no per-example wrapper left behind
    return got, expected


def test_vmap_inside_checkpoint_captured_weight():
    x, w = torch.randn(4, 3), torch.randn(3, requires_grad=True)
    got, expected = _checkpointed_and_eager(
        lambda x: ftrans.vmap(lambda t: (t * w).sin().sum())(x), (w,), x)
    assert_close(got, expected)
    assert_close(got[0], ((x * w).cos() * x).sum(0).detach())


def test_vmap_inside_checkpoint_batched_input_like_torch_func():
    A = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)

    def loss(lib):
        return lambda A: lib.vmap(torch.linalg.qr)(A)[0].sum()

    got, expected = _checkpointed_and_eager(loss(ftrans), (A,), A)
    assert_close(got, expected)
    oracle, _ = _checkpointed_and_eager(loss(torch.func), (A,), A)
    assert_close(got, oracle)


def test_nested_vmap_inside_checkpoint():
    B = torch.randn(2, 3, 4, requires_grad=True)
    w = torch.randn(4, requires_grad=True)
    got, expected = _checkpointed_and_eager(
        lambda B: ftrans.vmap(ftrans.vmap(lambda v: (v.sin() * w).sum()))(B), (B, w), B)
    assert_close(got, expected)


def test_vmap_under_save_on_cpu():
    x, w = torch.randn(4, 3), torch.randn(3, requires_grad=True)
    with torch.autograd.graph.save_on_cpu():
        out = ftrans.vmap(lambda t: (t * w).sin().sum())(x)
    (g,) = torch.autograd.grad(out.sum(), w)
    assert_close(g, ((x * w).cos() * x).sum(0).detach())


# ----------------------------------------------------------------------------------------------
# sparse inputs: gradients in torch.func's layout
# ----------------------------------------------------------------------------------------------

_D = torch.randn(3, 2)


@pytest.mark.parametrize("f", [
    lambda s, d: torch.sparse.mm(s, d).sum(),
    lambda s, d: torch.sparse.sum(s) * d.sum(),
    lambda s, d: (s.to_dense() * 2).sum(),
    lambda s, d: d.sum(),                      # s unused: a zero gradient
], ids=["sparse.mm", "sparse.sum", "to_dense", "unused"])
def test_sparse_input_gradients_match_torch_func(f):
    s = torch.randn(3, 3).relu().to_sparse()
    got = ftrans.grad(f, argnums=(0, 1))(s, _D)
    expected = torch.func.grad(f, argnums=(0, 1))(s, _D)
    for g, e in zip(got, expected):
        assert g.layout == e.layout
        assert_close(g.to_dense(), e.to_dense())


def test_non_tensor_aux_leaves_are_returned_as_they_are():
    # torch.func refuses non-tensor leaves in aux ("Expected tensors, got unsupported type");
    # ftrans returns them untouched next to the right gradient / pullback.
    x, v = torch.randn(3), torch.randn(3)
    for aux in (1, 1.0, "abc"):
        g, got = ftrans.grad(lambda t: (t.sin().sum(), [t.cos(), aux]), has_aux=True)(x)
        assert_close(g, x.cos())
        assert_close(got[0], x.cos())
        assert got[1] == aux
        out, vjp_fn, got = ftrans.vjp(lambda t: (t.sin(), {"a": aux, "b": [t]}), x,
                                      has_aux=True)
        assert_close(vjp_fn(v)[0], v * x.cos())
        assert got["a"] == aux
        assert_close(got["b"][0], x)


# ----------------------------------------------------------------------------------------------
# Several inputs that require grad enter a vmap through one autograd node
# ----------------------------------------------------------------------------------------------

def test_inputs_that_require_grad_share_one_entry_node_and_get_their_own_gradients():
    torch.manual_seed(0)
    a, b, c = (torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    d = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)  # mapped over dim 1
    nodes = set()

    def f(a, b, c, d):
        nodes.update(type(t.grad_fn).__name__ for t in (a, b, c, d) if t.grad_fn is not None)
        return (a * b).sin().sum() + (d * a).sum()  # c unused: its gradient stays None

    out = ftrans.vmap(f, in_dims=(0, 0, 0, 1))(a, b, c, d)
    assert nodes == {"AddBatchDimsBackward"}
    ga, gb, gc, gd = torch.autograd.grad(out.sum(), (a, b, c, d), allow_unused=True,
                                         create_graph=True)
    assert gc is None
    ref = torch.stack([f(a[i], b[i], c[i], d[:, i]) for i in range(4)])
    ra, rb, rd = torch.autograd.grad(ref.sum(), (a, b, d), create_graph=True)
    for g, r in ((ga, ra), (gb, rb), (gd, rd)):
        assert_close(g, r)
    # double backward through the shared node
    assert_close(torch.autograd.grad(ga.sum(), b)[0], torch.autograd.grad(ra.sum(), b)[0])


def test_the_same_tensor_twice_and_an_outer_level_input_through_the_shared_entry():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def inner(u, v, w):
        return (u * v * w).sum()

    def outer(xo):
        return ftrans.vmap(inner)(xo, xo, w)

    out = ftrans.vmap(outer)(x)
    gx, gw = torch.autograd.grad(out.sum(), (x, w))
    ref = torch.stack([torch.stack([inner(x[i, j], x[i, j], w[j]) for j in range(4)])
                       for i in range(2)])
    rx, rw = torch.autograd.grad(ref.sum(), (x, w))
    assert_close(gx, rx)
    assert_close(gw, rw)


# ----------------------------------------------------------------------------------------------
# A captured tensor that requires grad, entering an inner transform as its input, under vmap:
# an outer backward sums its per-example contributions (it came back as an escaped
# BatchedTensor before)
# ----------------------------------------------------------------------------------------------

_XS = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

_CAPTURED_ENTRIES = {
    "vmap(grad)": lambda lib, w: lib.vmap(
        lambda x: lib.grad(lambda w: (w.sin() * x).sum())(w))(_XS),
    "vmap(vjp)": lambda lib, w: lib.vmap(
        lambda x: lib.vjp(lambda w: w.sin() * x, w)[1](x)[0])(_XS),
    "vmap(jvp)": lambda lib, w: lib.vmap(
        lambda x: lib.jvp(lambda w: w.sin() * x, (w,), (x,))[1])(_XS),
    "vmap(jacrev)": lambda lib, w: lib.vmap(lambda x: lib.jacrev(lambda w: w.sin() * x)(w))(_XS),
    "vmap(jacfwd)": lambda lib, w: lib.vmap(lambda x: lib.jacfwd(lambda w: w.sin() * x)(w))(_XS),
    "vmap(hessian)": lambda lib, w: lib.vmap(
        lambda x: lib.hessian(lambda w: (w.sin() * x).sum())(w))(_XS),
    "vmap(vmap), mapped inner input": lambda lib, w: lib.vmap(
        lambda x: lib.vmap(lambda a, b: a * b)(w, x))(_XS),
    "vmap(grad(vmap))": lambda lib, w: lib.vmap(lambda x: lib.grad(
        lambda w: lib.vmap(lambda a, b: a * b)(w, x).sin().sum())(w))(_XS),
    "vmap(vmap(grad)), in_dims None": lambda lib, w: lib.vmap(lambda x: lib.vmap(
        lambda w, y: lib.grad(lambda w: (w.sin() * y).sum())(w), in_dims=(None, 0))(
        w, x.view(2, 2).repeat(1, 2)))(_XS),
    "grad(vmap(vmap)), closure": lambda lib, w: lib.grad(lambda w2: lib.vmap(
        lambda x: lib.vmap(lambda a: a * w2.sin().sum())(x))(_XS).sum())(w),
}


@pytest.mark.parametrize("case", list(_CAPTURED_ENTRIES))
def test_outer_backward_through_a_captured_input_of_an_inner_transform(case):
    fn = _CAPTURED_ENTRIES[case]
    results = []
    for lib in (torch.func, ftrans):
        w = torch.randn(4, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1)).requires_grad_()
        out = fn(lib, w)
        (g,) = torch.autograd.grad((out * out.detach().cos()).sum(), w)
        results.append((out.detach(), g))
    (ref_out, ref_g), (out, g) = results
    assert type(g) is torch.Tensor
    assert_close(out, ref_out)
    assert_close(g, ref_g)
