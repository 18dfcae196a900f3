"""ftrans.compile: trace once per signature, replay the flat aten graph."""
import warnings

import pytest
import torch

import ftrans
from ftrans._C.batched import BatchedTensor
from ftrans import CompileWarning


def test_replay_matches_eager_and_caches_per_signature():
    w = torch.randn(5, 3)
    f = ftrans.vmap(lambda t: (t * w[:, 0]).sin().sum())
    cf = ftrans.compile(f)
    x = torch.randn(4, 5)
    torch.testing.assert_close(cf(x), f(x))
    torch.testing.assert_close(cf(x * 2), f(x * 2))
    assert len(cf.cache) == 1
    cf(torch.randn(6, 5))  # new batch size: retrace
    cf(torch.randn(4, 5, dtype=torch.float64))  # new dtype: retrace
    assert len(cf.cache) == 3
    torch.testing.assert_close(cf(torch.ones(6, 5)), f(torch.ones(6, 5)))


def test_traced_graph_is_flat_aten():
    f = ftrans.vmap(lambda t: t.sin() * 2)
    cf = ftrans.compile(f)
    cf(torch.randn(3, 2))
    (entry,) = cf.cache.values()
    gm = entry.runner
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets and all(isinstance(t, torch._ops.OpOverload) for t in targets)
    # no wrapper tensor reaches the caller
    out = cf(torch.randn(3, 2))
    assert type(out) is torch.Tensor and not isinstance(out, BatchedTensor)


def test_data_dependent_control_flow_warns_and_runs_eagerly():
    def f(x):
        return x * 2 if x.sum() > 0 else -x

    cf = ftrans.compile(f)
    with pytest.warns(CompileWarning, match="control flow"):
        out = cf(torch.ones(3))
    torch.testing.assert_close(out, torch.full((3,), 2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # same signature, other branch: still correct (eager), and no second warning
        torch.testing.assert_close(cf(-torch.ones(3)), torch.ones(3))


def test_closure_updated_in_place_is_seen():
    w = torch.ones(3)
    cf = ftrans.compile(ftrans.vmap(lambda x: (x * w).sum()))
    x = torch.ones(2, 3)
    torch.testing.assert_close(cf(x), torch.full((2,), 3.0))
    with torch.no_grad():
        w.mul_(2)
    torch.testing.assert_close(cf(x), torch.full((2,), 6.0))


def test_pytree_inputs_and_outputs_with_non_tensor_leaves():
    def f(d, k):
        return {"y": d["a"] * k, "n": k, "t": (d["b"].sum(),)}

    cf = ftrans.compile(f)
    d = {"a": torch.randn(3), "b": torch.randn(2)}
    out = cf(d, 3)
    assert out["n"] == 3
    torch.testing.assert_close(out["y"], d["a"] * 3)
    torch.testing.assert_close(out["t"][0], d["b"].sum())
    cf(d, 4)  # non-tensor values are part of the signature
    assert len(cf.cache) == 2


def test_per_example_autograd_inside_compiled_vmap():
    w = torch.randn(4, 3)

    def per_example_grad(x):
        w_ = w.detach().requires_grad_()
        (g,) = torch.autograd.grad((x @ w_).tanh().sum(), w_)
        return g

    f = ftrans.vmap(per_example_grad)
    cf = ftrans.compile(f)
    x = torch.randn(5, 4)
    torch.testing.assert_close(cf(x), f(x))
    torch.testing.assert_close(cf(x + 1), f(x + 1))


def test_random_ops_draw_fresh_values_on_replay():
    cf = ftrans.compile(ftrans.vmap(lambda x: x + torch.rand(()), randomness="different"))
    x = torch.zeros(4)
    a, b = cf(x), cf(x)
    assert not torch.equal(a, b)
    assert a.unique().numel() == 4


def test_replay_graph_drops_detach_and_dead_nodes_without_changing_results():
    w = torch.randn(3)
    f = ftrans.vmap(ftrans.grad(lambda x: ((x * w).sin() ** 2).sum()))
    cf = ftrans.compile(f)
    x = torch.randn(5, 3)
    torch.testing.assert_close(cf(x), f(x))
    gm = next(iter(cf.cache.values())).runner
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert not [n for n in nodes if n.target is torch.ops.aten.detach.default
                and n.args[0].op != "placeholder"]
    assert all(n.users for n in nodes)  # no dead node left
    out = ftrans.compile(lambda t: t.detach())(x)  # an output is never the caller's tensor
    assert out is not x and torch.equal(out, x)


def test_inputs_or_closures_that_require_grad_run_eagerly_and_stay_differentiable():
    f = ftrans.compile(ftrans.vmap(lambda t: (t * 2).sin().sum()))
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.warns(CompileWarning, match="requires grad"):
        out = f(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, 2 * torch.cos(2 * x.detach()))

    w = torch.randn(3, requires_grad=True)
    h = ftrans.compile(ftrans.vmap(lambda t: (t * w).sum()))
    xs = torch.randn(4, 3)
    with pytest.warns(CompileWarning, match="requires grad"):
        out = h(xs)
    (gw,) = torch.autograd.grad(out.sum(), w)
    torch.testing.assert_close(gw, xs.sum(0))
    with torch.no_grad():  # no graph wanted: a replay
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(h(xs), xs @ w.detach())


def _psg(hidden=600):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(hidden, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        out = torch.func.functional_call(model, p, (x[None],))
        return torch.nn.functional.cross_entropy(out, y[None])

    return ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0, 0)), params


def test_cpu_replay_reuses_dropped_outputs_and_never_a_held_one():
    f, params = _psg()
    cf = ftrans.compile(f)
    xs = [torch.randn(8, 600) for _ in range(4)]
    y = torch.randint(0, 3, (8,))
    expected = [f(params, x, y) for x in xs]
    # Dropped results: the next replay writes into the same memory.
    ptrs = []
    for x, e in zip(xs, expected):
        out = cf(params, x, y)
        torch.testing.assert_close(out, e)
        ptrs.append(out["0.weight"].data_ptr())
        del out
    assert len(set(ptrs[1:])) == 1  # 8 x 512 x 600 floats > 1 MiB: pooled
    # A held result (or a view of it, or its storage) is never overwritten.
    held = cf(params, xs[0], y)
    snapshot = {k: v.clone() for k, v in held.items()}
    again = cf(params, xs[1], y)
    torch.testing.assert_close(held, snapshot)
    torch.testing.assert_close(again, expected[1])
    assert held["0.weight"].data_ptr() != again["0.weight"].data_ptr()
    view = again["0.weight"][0]
    del again
    third = cf(params, xs[2], y)
    assert view.data_ptr() != third["0.weight"][0].data_ptr()
    torch.testing.assert_close(view, expected[1]["0.weight"][0])
    storage = third["0.weight"].untyped_storage()
    ptr = third["0.weight"].data_ptr()
    del third
    fourth = cf(params, xs[3], y)
    assert fourth["0.weight"].data_ptr() != ptr
    del storage


def test_reuse_outputs_off_allocates_every_call():
    f, params = _psg()
    cf = ftrans.compile(f, reuse_outputs=False)
    x, y = torch.randn(8, 600), torch.randint(0, 3, (8,))
    entry_out = cf(params, x, y)
    del entry_out
    runner = next(iter(cf.cache.values())).runner
    assert isinstance(runner, torch.fx.GraphModule)


def test_output_reuse_from_several_threads():
    from _helpers import run_in_threads

    f, params = _psg()
    cf = ftrans.compile(f)
    y = torch.randint(0, 3, (8,))
    xs = [torch.randn(8, 600, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = [f(params, x, y)["0.weight"] for x in xs]
    cf(params, xs[0], y)  # trace once, before the threads

    def work(i):
        for _ in range(10):
            out = cf(params, xs[i], y)["0.weight"]
            torch.testing.assert_close(out, expected[i])

    run_in_threads(work, 4)
