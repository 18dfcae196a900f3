"""The replay graph's clean-up (``compiler._simplify``): view chains folded into one view,
``x + zeros(())`` dropped, never changing what a replay returns or writes.

Differential: hypothesis builds programs of view ops (reshape, transpose, permute, unsqueeze,
squeeze, select, slice, expand, t) mixed with pointwise ops, zero offsets and in-place writes
through views, on inputs of several layouts (contiguous, transposed, sliced at an offset), and
the compiled function must return and write what the eager one does, call after call.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ftrans
from ftrans import compiler

FULL = bool(os.environ.get("FTRANS_FULL"))
aten = torch.ops.aten


def _graph(fn, *args):
    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*args)
    return gm


def _count(gm, targets):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def test_view_chain_becomes_one_view():
    def f(x):
        y = x.unsqueeze(1).view(4, 1, 1, 6).transpose(1, 2).reshape(4, 6).unsqueeze(0)
        return y.exp()

    gm = _graph(f, torch.randn(4, 6))
    before = _count(gm, compiler._VIEW_OPS)
    compiler._simplify(gm)
    assert before >= 4 and _count(gm, compiler._VIEW_OPS) == 1
    x = torch.randn(4, 6)
    torch.testing.assert_close(gm(x), f(x))


def test_transposes_that_change_the_layout_stay():
    def f(x):
        return x.t().contiguous().view(-1) + x.t().reshape(-1)

    gm = _graph(f, torch.randn(3, 5))
    compiler._simplify(gm)
    x = torch.randn(3, 5)
    torch.testing.assert_close(gm(x), f(x))
    assert _count(gm, {aten.t.default, aten.transpose.int, aten.permute.default}) >= 1


def test_zero_add_dropped_only_when_nothing_writes():
    def clean(x):
        y = x.exp()
        return (y + torch.zeros(())).sin()

    def written(x):
        y = x.exp()
        z = y + torch.zeros(())
        y.mul_(2)  # z must keep the value before the write
        return z, y

    def written_after(x):
        y = x.exp()
        z = y + torch.zeros(())
        z.view(-1).add_(1)  # a write through a view of z must not reach y
        return z, y

    x = torch.randn(5)
    gm = _graph(clean, x)
    compiler._simplify(gm)
    assert _count(gm, {aten.add.Tensor}) == 0
    torch.testing.assert_close(gm(x), clean(x))
    for f in (written, written_after):
        gm = _graph(f, x)
        compiler._simplify(gm)
        assert _count(gm, {aten.add.Tensor}) >= 1
        for a, b in zip(gm(x), f(x)):
            torch.testing.assert_close(a, b)


def test_an_output_view_of_an_input_stays_a_tensor_of_its_own():
    def f(x):
        return x.view(2, 3).view(6)

    x = torch.randn(6)
    c = ftrans.compile(f)
    for _ in range(2):
        out = c(x)
        assert out is not x and torch.equal(out, x)
        out.add_(1)  # a view: the write reaches x, as in eager
    torch.testing.assert_close(x, torch.zeros(6).add_(2) + (x - 2))


# ----------------------------------------------------------------------------------------------
# generated programs
# ----------------------------------------------------------------------------------------------

def _apply(op, t):
    kind, k = op
    if kind == "flat":
        return t.reshape(-1)
    if kind == "unsqueeze":
        return t.unsqueeze(k % (t.dim() + 1))
    if kind == "squeeze":
        return t.squeeze()
    if kind == "t" and t.dim() == 2:
        return t.t()
    if kind == "transpose" and t.dim() >= 2:
        return t.transpose(0, -1)
    if kind == "permute" and t.dim() >= 2:
        return t.permute(*reversed(range(t.dim())))
    if kind == "select" and t.dim() >= 2 and t.shape[0] > 0:
        return t.select(0, k % t.shape[0])
    if kind == "slice" and t.dim() >= 1 and t.shape[0] > 1:
        return t[k % 2:]
    if kind == "expand":
        return t.unsqueeze(0).expand(2, *t.shape)
    if kind == "view2" and t.dim() >= 1 and t.numel() % 2 == 0 and t.is_contiguous():
        return t.view(2, -1)
    if kind == "exp":
        return t.exp()
    if kind == "zero":
        return t + torch.zeros(())
    if kind == "write" and t.dim() >= 1 and t.shape[-1] > 0 and 0 not in t.stride():
        t.select(-1, 0).mul_(1.5)
        return t
    return t


OPS = st.tuples(st.sampled_from(["flat", "unsqueeze", "squeeze", "t", "transpose", "permute",
                                 "select", "slice", "expand", "view2", "exp", "zero",
                                 "write"]), st.integers(0, 5))


def _layout(x, how):
    if how == "transposed":
        return x.t().contiguous().t()
    if how == "offset":
        big = torch.randn(x.shape[0] + 1, x.shape[1], dtype=x.dtype)
        big[1:] = x
        return big[1:]
    return x.clone()


@settings(max_examples=200 if FULL else 25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=8), how=st.sampled_from(
    ["contiguous", "transposed", "offset"]), seed=st.integers(0, 1000))
def test_generated_view_programs_replay_as_eager(ops, how, seed):
    torch.manual_seed(seed)
    base = torch.randn(4, 6, dtype=torch.float64)

    def f(x):
        t = x.exp()  # a fresh tensor first: writes never reach the caller's input
        outs = []
        for op in ops:
            t = _apply(op, t)
            outs.append(t)
        return outs[-1], outs[len(outs) // 2]

    c = ftrans.compile(f, check=True)
    for _ in range(3):
        x = _layout(base, how)
        want = f(x.clone())
        got = c(x)
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.stride() == b.stride()
            torch.testing.assert_close(a, b)
        base = base * 0.9


@pytest.mark.parametrize("name", ["mlp-a3", "cnn", "transformer"])
def test_clipped_step_graph_is_smaller_and_exact(name):
    """The clipping transforms' graphs are the ones with the most views (per-example rules
    reshape around every kernel): folded, they replay what eager computes."""
    from benchmarks import dp
    impls = dp.setup(name, 8)
    ref = impls["ftrans"]()
    for _ in range(2):
        got = impls["compiled"]()
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)


def test_a_returned_zero_sum_stays_a_tensor_of_its_own():
    def f(x):
        y = x.exp()
        return y, y + torch.zeros(())

    c = ftrans.compile(f)
    x = torch.randn(4)
    for _ in range(2):
        y, z = c(x)
        assert y.data_ptr() != z.data_ptr()
        z.add_(1)  # eager: y is untouched
        torch.testing.assert_close(y, x.exp())


def test_symbolic_sizes_stay_symbolic():
    """A graph traced with symbolic sizes: the clean-up must not bake the trace's sizes in."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(x):
        return x.unsqueeze(1).view(x.shape[0], 1, -1).transpose(1, 2).reshape(x.shape[0], -1)

    gm = make_fx(f, tracing_mode="symbolic")(torch.randn(4, 6))
    compiler._simplify(gm)
    for n in (3, 5, 7):
        x = torch.randn(n, 6)
        torch.testing.assert_close(gm(x), f(x))
