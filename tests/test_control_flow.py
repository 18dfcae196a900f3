"""ftrans.cond / switch / while_loop / scan: eager, under vmap (agreeing and divergent
predicates, nesting), under grad/jvp, and torch's own operators inside ftrans transforms.
Every batched result is checked against a per-example loop in float64."""
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ftrans
from ftrans import control_flow

D = torch.float64


def _loop(fn, *xs):
    outs = [fn(*ex) for ex in zip(*xs)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs)
    return type(outs[0])(torch.stack([o[j] for o in outs]) for j in range(len(outs[0])))


def _eager_piecewise(x):
    return x.sin() * 2 if x.sum() > 0 else x.cos() - 1


def piecewise(x):
    return ftrans.cond(x.sum() > 0, lambda v: v.sin() * 2, lambda v: v.cos() - 1, (x,))


def _mixed_batch():
    x = torch.randn(8, 3, dtype=D)
    x[::2] = x[::2].abs()  # both branches taken
    x[1::2] = -x[1::2].abs()
    return x


# ---------------------------------------------------------------------------------------------
# cond / switch


def test_cond_eager_takes_one_branch():
    x = torch.randn(3, dtype=D)
    assert torch.equal(ftrans.cond(torch.tensor(True), torch.sin, torch.cos, (x,)), x.sin())
    assert torch.equal(ftrans.cond(False, torch.sin, torch.cos, (x,)), x.cos())


def test_vmap_cond_divergent_equals_loop_and_partitions():
    x = _mixed_batch()
    control_flow.reset_stats()
    out = ftrans.vmap(piecewise)(x)
    torch.testing.assert_close(out, _loop(_eager_piecewise, x))
    assert type(out) is torch.Tensor  # the merged result is a plain tensor
    assert control_flow.stats()["branch_lanes"] == 8  # each example ran exactly one branch


def test_vmap_cond_agreeing_runs_one_branch_on_whole_batch():
    x = torch.randn(5, 3, dtype=D).abs()
    calls = []

    def t(v):
        calls.append("t")
        return v.sin()

    def f(v):
        calls.append("f")
        return v.cos()

    control_flow.reset_stats()
    out = ftrans.vmap(lambda v: ftrans.cond(v.sum() > 0, t, f, (v,)))(x)
    torch.testing.assert_close(out, x.sin())
    assert calls == ["t"] and control_flow.stats()["branch_lanes"] == 0


def test_vmap_cond_multi_output_and_pytree():
    x, y = _mixed_batch(), torch.randn(8, 2, dtype=D)

    def f(a, b):
        return ftrans.cond(a.sum() > 0,
                           lambda p: {"u": p["a"] * 2, "v": (p["b"].exp(), p["a"].sum())},
                           lambda p: {"u": p["a"] - 1, "v": (p["b"] * 3, p["a"].prod())},
                           ({"a": a, "b": b},))

    out = ftrans.vmap(f)(x, y)
    for i in range(8):
        ref = f(x[i], y[i])
        torch.testing.assert_close(out["u"][i], ref["u"])
        torch.testing.assert_close(out["v"][0][i], ref["v"][0])
        torch.testing.assert_close(out["v"][1][i], ref["v"][1])


def test_vmap_cond_branch_closing_over_batched_value():
    x = _mixed_batch()
    w = torch.randn(3, dtype=D)  # unbatched closure too

    def f(v):
        return ftrans.cond(v.sum() > 0, lambda: v.sin() * w, lambda: v.cos() + w, ())

    torch.testing.assert_close(ftrans.vmap(f)(x), _loop(f, x))


def test_vmap_cond_operand_forms_and_closures():
    # flat tensor operands passed positionally, with a per-example closure value besides; a
    # list; a non-tensor operand (the pytree path); an empty part (one branch skipped)
    x, y = _mixed_batch(), torch.randn(8, 3, dtype=D)

    def flat(a, b):
        return ftrans.cond(a.sum() > 0, lambda p, q: p * q + b, lambda p, q: p - q * b,
                           (a, b.exp()))

    def listed(a, b):
        return ftrans.cond(a.sum() > 0, lambda p, s: p * s, lambda p, s: p - s, [a, 2.5])

    def switched(a, b):
        i = (a.sum() > 0).long() * 2  # never branch 1
        return ftrans.switch(i, [lambda p, q: p + q, lambda p, q: p / 0, lambda p, q: p * q],
                             (a, b))

    for f in (flat, listed, switched):
        torch.testing.assert_close(ftrans.vmap(f)(x, y), _loop(f, x, y))
    control_flow.reset_stats()
    ftrans.vmap(switched)(x, y)
    assert control_flow.stats()["branch_lanes"] == 8
    with pytest.raises(RuntimeError, match="different structures"):
        ftrans.vmap(lambda v: ftrans.cond(v.sum() > 0, lambda a: a, lambda a: (a,), (v,)))(x)


def test_vmap_cond_parts_plain_then_batched_at_an_outer_level():
    # the predicate varies along the inner vmap only; the true branch's part is a plain tensor
    # (written into the result as soon as it ran), the false branch's is still batched at the
    # outer vmap (it closes over y): the merge switches to the out-of-place path afterwards
    x, y = _mixed_batch(), torch.randn(4, 3, dtype=D)

    def f(yi, xi):
        return ftrans.cond(xi.sum() > 0, lambda v: v * 2, lambda v: v + yi, (xi,))

    out = ftrans.vmap(ftrans.vmap(f, in_dims=(None, 0)), in_dims=(0, None))(y, x)
    ref = torch.stack([torch.stack([f(yi, xi) for xi in x]) for yi in y])
    torch.testing.assert_close(out, ref)


def test_vmap_cond_hidden_batched_value_is_refused():
    x = _mixed_batch()
    box = {}

    def f(v):
        box["v"] = v
        return ftrans.cond(v.sum() > 0, lambda: box["v"].sin(), lambda: box["v"].cos(), ())

    with pytest.raises(RuntimeError, match="operands"):
        ftrans.vmap(f)(x)


def test_vmap_grad_cond_equals_per_example_grads():
    x = _mixed_batch()
    out = ftrans.vmap(ftrans.grad(lambda v: piecewise(v).sum()))(x)
    ref = torch.stack([torch.func.grad(lambda v: _eager_piecewise(v).sum())(r) for r in x])
    torch.testing.assert_close(out, ref)


def test_grad_of_vmap_cond_and_jacobians():
    x = _mixed_batch()
    g = ftrans.grad(lambda a: ftrans.vmap(piecewise)(a).pow(2).sum())(x)
    ref = torch.stack([torch.func.grad(lambda v: _eager_piecewise(v).pow(2).sum())(r) for r in x])
    torch.testing.assert_close(g, ref)
    jref = torch.stack([torch.func.jacrev(_eager_piecewise)(r) for r in x])
    torch.testing.assert_close(ftrans.vmap(ftrans.jacrev(piecewise))(x), jref)
    torch.testing.assert_close(ftrans.vmap(ftrans.jacfwd(piecewise))(x), jref)
    t = torch.randn_like(x)
    _, jv = ftrans.vmap(lambda a, b: ftrans.jvp(piecewise, (a,), (b,)))(x, t)
    torch.testing.assert_close(jv, torch.einsum("bij,bj->bi", jref, t))


def test_nested_vmap_outer_batched_predicate():
    a, y = torch.tensor([1.0, -2.0, 0.5, -0.1], dtype=D), torch.randn(5, 3, dtype=D)

    def h(ai, yi):
        return ftrans.cond(ai > 0, lambda v, s: v.sin() * s, lambda v, s: v.cos() + s, (yi, ai))

    out = ftrans.vmap(lambda ai: ftrans.vmap(lambda yi: h(ai, yi))(y))(a)
    torch.testing.assert_close(out, torch.stack([_loop(lambda yi: h(ai, yi), y) for ai in a]))
    # the predicate batched at both levels, and gradients through it
    z = torch.randn(4, 5, 3, dtype=D)
    g = ftrans.vmap(ftrans.vmap(ftrans.grad(lambda v: piecewise(v).sum())))(z)
    ref = torch.stack([torch.stack([torch.func.grad(lambda v: _eager_piecewise(v).sum())(r)
                                    for r in row]) for row in z])
    torch.testing.assert_close(g, ref)


def test_vmap_cond_non_bool_and_shaped_predicates():
    # A float / int / (1,)-shaped predicate means pred.bool() per example (NaN and -0.0 too),
    # wherever the batch dim sits.
    x = torch.randn(7, 3, dtype=D)
    p = torch.tensor([0.0, -0.0, float("nan"), 2.5, 0.0, -1.0, 0.0], dtype=D)
    t, f = (lambda v: v.sin() * 2), (lambda v: v.cos() - 1)
    ref = torch.stack([t(v) if bool(q) else f(v) for q, v in zip(p, x)])
    control_flow.reset_stats()
    out = ftrans.vmap(lambda q, v: ftrans.cond(q, t, f, (v,)))(p, x)
    torch.testing.assert_close(out, ref)
    assert control_flow.stats()["branch_lanes"] == 7
    for pred in (p.long(), p[:, None], p.reshape(7, 1, 1)):
        out = ftrans.vmap(lambda q, v: ftrans.cond(q, t, f, (v,)))(pred, x)
        torch.testing.assert_close(out, ref)
    out = ftrans.vmap(lambda q, v: ftrans.cond(q, t, f, (v,)), in_dims=(1, 1))(
        p[None], x.t().contiguous())
    torch.testing.assert_close(out, ref)
    # a batch that agrees on a non-bool predicate runs one branch
    control_flow.reset_stats()
    out = ftrans.vmap(lambda q, v: ftrans.cond(q, t, f, (v,)))(torch.full((7,), 3), x)
    torch.testing.assert_close(out, t(x))
    assert control_flow.stats()["branch_lanes"] == 0


def test_vmap_cond_under_a_dispatch_mode_lets_it_see_the_partition():
    from _helpers import LogOps
    x = _mixed_batch()
    with LogOps() as seen:
        out = ftrans.vmap(piecewise)(x)
    torch.testing.assert_close(out, _loop(_eager_piecewise, x))
    assert torch.ops.aten.nonzero.default in seen
    assert torch.ops.aten.index_copy_.default in seen


def test_switch_under_vmap_clamps_and_equals_loop():
    fs = [lambda v: v + 1, lambda v: v * 10, lambda v: -v.exp()]
    idx = torch.tensor([0, 2, 1, 7, -3, 1])
    x = torch.randn(6, 2, dtype=D)
    out = ftrans.vmap(lambda i, v: ftrans.switch(i, fs, (v,)))(idx, x)
    ref = torch.stack([fs[min(max(int(i), 0), 2)](v) for i, v in zip(idx, x)])
    torch.testing.assert_close(out, ref)
    assert torch.equal(ftrans.switch(1, fs, (x,)), x * 10)


def test_cond_errors_match_torch():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="single-element"):
        ftrans.vmap(lambda v: ftrans.cond(v > 0, torch.sin, torch.cos, (v,)))(x)
    with pytest.raises(RuntimeError, match="callable"):
        ftrans.cond(True, 1, torch.cos, (x,))
    with pytest.raises(RuntimeError, match="operands"):
        ftrans.cond(True, torch.sin, torch.cos, x)
    with pytest.raises(RuntimeError, match="metadata"):
        ftrans.vmap(lambda v: ftrans.cond(v.sum() > 0, lambda a: a, lambda a: a[:2], (v,)))(
            torch.tensor([[1.0, 2, 3], [-1.0, -2, -3]]))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=9), st.integers(0, 2 ** 16))
def test_cond_random_masks_equal_loop(mask, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(mask), 2, generator=g, dtype=D).abs() + 0.1
    x[torch.tensor(mask)] *= -1
    out = ftrans.vmap(piecewise)(x)
    torch.testing.assert_close(out, _loop(_eager_piecewise, x))


def test_compiled_vmap_cond_selects_and_replays_correctly():
    f = ftrans.compile(ftrans.vmap(piecewise))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ftrans.CompileWarning)
        for _ in range(2):
            x = _mixed_batch()
            torch.testing.assert_close(f(x), _loop(_eager_piecewise, x))


# ---------------------------------------------------------------------------------------------
# while_loop


def _doubling(x):
    return ftrans.while_loop(lambda v, k: v.sum() < 10, lambda v, k: (v * 1.5 + 0.1 * v ** 2, k + 1),
                             (x.abs() + 0.1, torch.zeros((), dtype=torch.long)))


def test_while_loop_eager_and_structure_errors():
    v, k = _doubling(torch.ones(2, dtype=D))
    assert v.sum() >= 10 and int(k) == 3
    with pytest.raises(RuntimeError, match="structure"):
        ftrans.while_loop(lambda a: a.sum() < 3, lambda a: (a, a), (torch.ones(2),))
    with pytest.raises(RuntimeError, match="boolean"):
        ftrans.while_loop(lambda a: a.sum(), lambda a: (a,), (torch.ones(2),))


def test_vmap_while_loop_retires_finished_examples():
    x = torch.randn(16, 3, dtype=D) * torch.linspace(0.1, 5, 16, dtype=D)[:, None]
    control_flow.reset_stats()
    v, k = ftrans.vmap(_doubling)(x)
    lanes = control_flow.stats()["while_body_lanes"]
    rv, rk = _loop(_doubling, x)
    torch.testing.assert_close(v, rv)
    assert torch.equal(k, rk)
    assert lanes == int(rk.sum()) and int(rk.max()) * 16 > lanes  # sum of trips, not B * max


def _loop_grad_while(a):
    a = a.clone().requires_grad_()
    v = a.abs() + 0.1
    while v.sum() < 10:
        v = v * 1.5 + 0.1 * v ** 2
    return torch.autograd.grad(v.sum(), a)[0]


def test_grad_through_while_loop():
    x = torch.randn(6, 3, dtype=D)
    ref = torch.stack([_loop_grad_while(a) for a in x])
    loss = lambda a: _doubling(a)[0].sum()  # noqa: E731
    torch.testing.assert_close(ftrans.grad(loss)(x[0]), ref[0])
    torch.testing.assert_close(ftrans.vmap(ftrans.grad(loss))(x), ref)
    torch.testing.assert_close(ftrans.grad(lambda a: ftrans.vmap(loss)(a).sum())(x), ref)


def test_vmap_while_loop_closure_and_nested_levels():
    # Newton iteration for sqrt(a), a closed over; tolerance decides each example's trip count
    def sqrt(a):
        return ftrans.while_loop(lambda y: (y * y - a).abs() > 1e-10,
                                 lambda y: ((y + a / y) / 2,), (a.clone(),))[0]

    a = torch.rand(3, 5, dtype=D) * 100 + 0.5
    torch.testing.assert_close(ftrans.vmap(ftrans.vmap(sqrt))(a), a.sqrt())
    torch.testing.assert_close(ftrans.vmap(ftrans.grad(sqrt))(a[0]), 0.5 / a[0].sqrt())


# ---------------------------------------------------------------------------------------------
# scan


def _cumsum_scan(x):
    return ftrans.scan(lambda c, xi: (c + xi, (c + xi).clone()), torch.zeros(4, dtype=x.dtype), x)


def test_vmap_scan_unbatched_carry():
    xs = torch.randn(5, 3, 4, dtype=D)
    c, ys = ftrans.vmap(_cumsum_scan)(xs)
    torch.testing.assert_close(ys, xs.cumsum(1))
    torch.testing.assert_close(c, xs.sum(1))


def test_scan_dim_reverse_pytree_like_torch():
    from torch._higher_order_ops.scan import scan as torch_scan

    xs = torch.randn(2, 3, dtype=D)
    step = lambda c, x: (c * 0.5 + x, {"y": (c + x).clone()})  # noqa: E731
    ours = ftrans.scan(step, torch.zeros(2, dtype=D), xs, dim=1, reverse=True)
    theirs = torch_scan._ftrans_original(step, torch.zeros(2, dtype=D), xs, dim=1, reverse=True)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1]["y"], theirs[1]["y"])


def test_vmap_grad_scan():
    xs = torch.randn(4, 5, 3, dtype=D)

    def loss(x):
        c, ys = ftrans.scan(lambda c, xi: (torch.tanh(c * xi), c * xi), torch.ones(3, dtype=D), x)
        return c.sum() + ys.pow(2).sum()

    def eager(x):
        c, tot = torch.ones(3, dtype=D), 0
        for xi in x:
            tot = tot + (c * xi).pow(2).sum()
            c = torch.tanh(c * xi)
        return c.sum() + tot

    ref = torch.stack([torch.func.grad(eager)(x) for x in xs])
    torch.testing.assert_close(ftrans.vmap(ftrans.grad(loss))(xs), ref)


# ---------------------------------------------------------------------------------------------
# torch's own operators inside ftrans transforms


def test_torch_cond_while_scan_inside_ftrans_vmap():
    from torch._higher_order_ops.scan import scan as torch_scan
    from torch._higher_order_ops.while_loop import while_loop as torch_while

    x = _mixed_batch()
    f2 = lambda v: torch.cond(v.sum() > 0, lambda a: (a.sin(), a * 2),  # noqa: E731
                              lambda a: (a.cos(), a * 3), (v,))
    out = ftrans.vmap(f2)(x)
    ref = _loop(lambda v: (v.sin(), v * 2) if v.sum() > 0 else (v.cos(), v * 3), x)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])
    g = ftrans.vmap(ftrans.grad(lambda v: f2(v)[0].sum()))(x)
    torch.testing.assert_close(g, torch.stack([v.cos() if v.sum() > 0 else -v.sin() for v in x]))
    w = lambda v: torch_while(lambda a: a.sum() < 10, lambda a: (a * 2,), (v.abs() + 0.1,))[0]  # noqa: E731
    ref = []
    for v in x:
        a = v.abs() + 0.1
        while a.sum() < 10:
            a = a * 2
        ref.append(a)
    torch.testing.assert_close(ftrans.vmap(w)(x), torch.stack(ref))
    xs = torch.randn(5, 3, 4, dtype=D)
    s = lambda v: torch_scan(lambda c, xi: (c + xi, (c + xi).clone()),  # noqa: E731
                             torch.zeros(4, dtype=D), v)
    torch.testing.assert_close(ftrans.vmap(s)(xs)[1], xs.cumsum(1))


# ---------------------------------------------------------------------------------------------
# Python control flow on batched values


def test_python_if_and_item_proceed_when_the_batch_agrees():
    x = torch.randn(5, 3, dtype=D)

    def f(v):
        if v.isnan().any():  # a check every example passes
            raise ValueError("nan")
        n = int(v.new_tensor(2.0) + 0 * v.sum())  # the same value in every example
        return v * n if (v.abs().sum() >= 0) else v

    torch.testing.assert_close(ftrans.vmap(f)(x), x * 2)
    torch.testing.assert_close(ftrans.vmap(ftrans.vmap(f))(x.expand(2, 5, 3)), 2 * x.expand(2, 5, 3))
    g = ftrans.vmap(ftrans.grad(lambda v: (v * v).sum() if (v * 0).sum() == 0 else v.sum()))(x)
    torch.testing.assert_close(g, 2 * x)


def test_python_if_divergent_points_to_cond():
    x = torch.tensor([[1.0, 2.0], [-1.0, -3.0]])
    with pytest.raises(ftrans.VmapError, match=r"(?s)disagree.*ftrans\.cond.*control_flow") as e:
        ftrans.vmap(lambda v: v if v.sum() > 0 else -v)(x)
    assert isinstance(e.value, RuntimeError)
    with pytest.raises(ftrans.VmapError, match="disagree"):
        ftrans.vmap(lambda v: v * v.sum().item())(x)
    # the same value per outer example is not enough: a Python `if` takes one path for all
    with pytest.raises(ftrans.VmapError, match="disagree"):
        ftrans.vmap(lambda a: ftrans.vmap(lambda b: b if a.sum() > 0 else -b)(x))(x)


def _two_ifs(v):
    out = v * 2 if v.sum() > 0 else -v
    if v[0] > 0.5:
        return out.exp(), v.sum()
    return out, v.prod()


def test_control_flow_split_equals_loop():
    x = torch.randn(12, 3, dtype=D)
    out = ftrans.vmap(_two_ifs, control_flow="split")(x)
    ref = _loop(_two_ifs, x)
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1], ref[1])
    with pytest.raises(ftrans.VmapError, match="disagree"):  # the default policy refuses
        ftrans.vmap(_two_ifs)(x)
    with pytest.raises(ValueError, match="control_flow"):
        ftrans.vmap(_two_ifs, control_flow="maybe")


def test_control_flow_split_gradients_and_out_dims():
    x = torch.randn(9, 3, dtype=D)
    loss = lambda v: _two_ifs(v)[0].sum()  # noqa: E731
    ref = torch.stack([torch.func.grad(loss)(r) for r in x])
    torch.testing.assert_close(ftrans.vmap(ftrans.grad(loss), control_flow="split")(x), ref)
    g = ftrans.grad(lambda a: ftrans.vmap(loss, control_flow="split")(a).sum())(x)
    torch.testing.assert_close(g, ref)
    out = ftrans.vmap(_two_ifs, in_dims=1, out_dims=(1, 0), control_flow="split")(x.T)
    torch.testing.assert_close(out[0], _loop(_two_ifs, x)[0].T)


def test_torch_cond_under_torch_compile_is_untouched():
    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return torch.cond(x.sum() > 0, lambda v: v.sin(), lambda v: v.cos(), (x,))

    x = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(f(x), x.sin())
    torch.testing.assert_close(f(-x), (-x).cos())


@pytest.mark.parametrize("randomness", ["different", "same", "error"])
def test_random_ops_in_branches_follow_the_vmaps_randomness(randomness):
    """A divergent cond / while_loop runs its branches under inner vmaps over the lanes: they
    draw as the user's vmap says (they refused every random op before)."""
    torch.manual_seed(0)
    x = torch.tensor([1.0, -1.0, 2.0, -2.0, 3.0, -3.0])

    def f(v):
        return ftrans.cond(v > 0, lambda v: v + torch.rand(()), lambda v: v - 10.0, (v,))

    def g(v):
        return ftrans.while_loop(lambda y: y < v.abs() + 0.5, lambda y: (y + torch.rand(()),),
                                 (torch.zeros(()),))[0]

    if randomness == "error":
        for fn in (f, g):
            with pytest.raises(RuntimeError, match="randomness"):
                ftrans.vmap(fn, randomness=randomness)(x)
        return
    out = ftrans.vmap(f, randomness=randomness)(x)
    pos = x > 0
    noise = out[pos] - x[pos]
    assert ((noise >= 0) & (noise < 1)).all()
    torch.testing.assert_close(out[~pos], x[~pos] - 10.0)
    assert (noise.unique().numel() == 1) == (randomness == "same")
    y = ftrans.vmap(g, randomness=randomness)(x)
    assert (y >= x.abs() + 0.5).all() and (y < x.abs() + 1.5).all()
