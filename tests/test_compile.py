"""ftrans.compile: trace once per signature, replay the flat aten graph."""
import contextlib
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
    out = cf(d, 4)  # the number reaches an output: specialized, one trace per value
    assert out["n"] == 4
    torch.testing.assert_close(out["y"], d["a"] * 4)
    (sig,) = cf.cache.values()
    assert len(sig.entries) == 2


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


def test_inputs_or_closures_that_require_grad_get_a_differentiable_replay():
    f = ftrans.compile(ftrans.vmap(lambda t: (t * 2).sin().sum()))
    x = torch.randn(4, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = f(x)
    assert type(next(iter(f.cache.values())).runner).__name__ == "JointReplay"
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, 2 * torch.cos(2 * x.detach()))

    w = torch.randn(3, requires_grad=True)
    h = ftrans.compile(ftrans.vmap(lambda t: (t * w).sum()))
    xs = torch.randn(4, 3)
    out = h(xs)
    (gw,) = torch.autograd.grad(out.sum(), w)
    torch.testing.assert_close(gw, xs.sum(0))
    with torch.no_grad():  # no graph wanted: a plain replay (another signature)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(h(xs), xs @ w.detach())
    assert len(h.cache) == 2


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
    assert type(runner).__name__ != "OutputPool"  # the graph itself, called directly
    assert any(n.op == "call_function" for n in runner.graph.nodes)


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


# -- guards: a replay computes what an eager call computes, or the call warns and runs eagerly --

@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_module_mode_change_is_seen():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).requires_grad_(False)
    cf = ftrans.compile(lambda x: model(x))
    x = torch.randn(8, 4)
    cf(x)
    model.eval()
    torch.testing.assert_close(cf(x), model(x))  # no dropout any more
    model.train()
    assert not torch.equal(cf(x), model.eval()(x))


def test_autocast_default_dtype_and_grad_mode_are_seen():
    w = torch.randn(4, 4)
    cf = ftrans.compile(lambda x: x @ w)
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cf(x).dtype == torch.bfloat16
    assert cf(x).dtype == torch.float32
    g = ftrans.compile(lambda x: x * 1.5 + torch.ones(()))
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert g(torch.ones(2, dtype=torch.float32)).dtype == torch.float32
        assert g(torch.ones(2, dtype=torch.int64)).dtype == torch.float64
    finally:
        torch.set_default_dtype(old)
    assert g(torch.ones(2, dtype=torch.int64)).dtype == torch.float32


def test_input_layout_is_part_of_the_signature():
    cf = ftrans.compile(lambda x: x.view(-1) * 2 if x.is_contiguous() else x.reshape(-1) * 3)
    base = torch.arange(24.0).reshape(4, 6)
    torch.testing.assert_close(cf(base[:, :3].contiguous()), base[:, :3].reshape(-1) * 2)
    torch.testing.assert_close(cf(base[:, :3]), base[:, :3].reshape(-1) * 3)  # strided
    torch.testing.assert_close(cf(base.t()[:3, :4]), base.t()[:3, :4].reshape(-1) * 3)
    flat = torch.arange(30.0)
    h = ftrans.compile(lambda x: x.as_strided((2, 2), (2, 1)) + 0)
    torch.testing.assert_close(h(flat[:10]), flat[:10].as_strided((2, 2), (2, 1)))
    torch.testing.assert_close(h(flat[6:16]), flat[6:16].as_strided((2, 2), (2, 1)))


def test_python_values_read_from_closures_globals_and_objects_are_guarded():
    class Config:
        lr = 0.1

    cfg = Config()
    cfg.clip = 1.0
    scale = [2.0]

    def step(x):
        return (x * cfg.clip).clamp(max=cfg.lr) * scale[0]

    cf = ftrans.compile(step)
    x = torch.linspace(0, 1, 5)
    torch.testing.assert_close(cf(x), step(x))
    cfg.clip = 0.05
    torch.testing.assert_close(cf(x), step(x))
    cfg.lr = 0.01
    torch.testing.assert_close(cf(x), step(x))
    scale[0] = -1.0
    torch.testing.assert_close(cf(x), step(x))


GLOBAL_LR = 0.5


def test_global_scalar_and_rebound_closure_tensor_are_guarded():
    global GLOBAL_LR
    w = torch.ones(3)

    def f(x):
        return x * w * GLOBAL_LR

    cf = ftrans.compile(f)
    x = torch.ones(3)
    torch.testing.assert_close(cf(x), f(x))
    GLOBAL_LR = 2.0
    try:
        torch.testing.assert_close(cf(x), f(x))
        w = torch.full((3,), 3.0)  # noqa: F841 (rebinds the closure cell)
        torch.testing.assert_close(cf(x), f(x))
    finally:
        GLOBAL_LR = 0.5


def test_item_of_a_captured_tensor_is_a_guarded_value_read():
    lim = torch.tensor(1.0)
    cf = ftrans.compile(lambda x: x.clamp(max=lim.item()))
    x = torch.linspace(0, 3, 4)
    torch.testing.assert_close(cf(x), x.clamp(max=1.0))
    lim.fill_(2.0)
    torch.testing.assert_close(cf(x), x.clamp(max=2.0))
    table = torch.tensor([1.0, 2.0])
    h = ftrans.compile(lambda x: x * table.tolist()[1])  # no aten op: seen all the same
    torch.testing.assert_close(h(x), x * 2)
    table.fill_(5.0)
    torch.testing.assert_close(h(x), x * 5)
    total = torch.tensor(1.0)
    g = ftrans.compile(lambda x: x * (total * 2).item())  # an intermediate: not guardable
    with pytest.warns(CompileWarning, match="reads the value"):
        torch.testing.assert_close(g(x), x * 2)
    total.fill_(3.0)
    torch.testing.assert_close(g(x), x * 6)


def test_batchnorm_state_matches_eager_after_every_call():
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    params = {k: v.detach() for k, v in model.named_parameters()}
    twin = copy.deepcopy(model)
    twin_params = {k: v.detach() for k, v in twin.named_parameters()}

    def loss(m):
        def f(p, x):
            return ftrans.functional_call(m, p, (x,)).pow(2).sum()
        return ftrans.grad(f)

    cf = ftrans.compile(loss(model))
    eager = loss(twin)
    for i in range(3):
        x = torch.randn(5, 3)
        torch.testing.assert_close(cf(params, x), eager(twin_params, x))
        torch.testing.assert_close(dict(model.named_buffers()), dict(twin.named_buffers()))
    assert int(model[1].num_batches_tracked) == 3


def test_batchnorm_cumulative_average_reads_its_counter_and_runs_eagerly():
    import copy

    bn = torch.nn.BatchNorm1d(3, momentum=None)
    twin = copy.deepcopy(bn)
    cf = ftrans.compile(lambda x: bn(x))
    with pytest.warns(CompileWarning, match="num_batches_tracked"):
        for _ in range(3):
            x = torch.randn(4, 3)
            torch.testing.assert_close(cf(x), twin(x))
    torch.testing.assert_close(dict(bn.named_buffers()), dict(twin.named_buffers()))


def test_logging_side_effect_runs_eagerly_with_real_values():
    log = []

    def step(x):
        loss = (x ** 2).sum()
        log.append(loss)
        return loss * 2

    cf = ftrans.compile(step)
    with pytest.warns(CompileWarning, match="log"):
        cf(torch.ones(3))
    cf(torch.ones(3) * 2)
    assert [float(v) for v in log] == [3.0, 12.0]
    assert all(type(v) is torch.Tensor for v in log)


def test_python_number_arguments_become_replay_inputs():
    w = torch.randn(3)
    cf = ftrans.compile(lambda x, lr: x - lr * w)
    x = torch.randn(3)
    with _no_warning():
        for i in range(20):  # a learning-rate schedule: no retrace per value
            lr = 0.1 / (i + 1)
            torch.testing.assert_close(cf(x, lr), x - lr * w)
    (sig,) = cf.cache.values()
    assert len(sig.entries) == 2  # the first value, then one trace with lr as an input


def test_python_number_in_control_flow_is_guarded_and_retraces_are_bounded():
    def f(x, n):
        return x * 2 if n > 3 else x - 1

    cf = ftrans.compile(f)
    x = torch.ones(2)
    torch.testing.assert_close(cf(x, 5), x * 2)
    torch.testing.assert_close(cf(x, 1), x - 1)
    with pytest.warns(CompileWarning, match="retraced"):
        for n in range(20):
            torch.testing.assert_close(cf(x, n), f(x, n))


def test_check_true_compares_the_first_replay_with_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3),
                                torch.nn.BatchNorm1d(4)).requires_grad_(False)
    cf = ftrans.compile(lambda x: model(x), check=True)
    for _ in range(2):
        cf(torch.randn(6, 4))
    # a function whose replay differs: a Python-side random number frozen into the trace
    import random

    bad = ftrans.compile(lambda x: x * random.random(), check=True)
    with pytest.raises(ftrans.CompileCheckError, match=r"output"):
        bad(torch.ones(3))


def test_bound_methods_partials_and_modules_are_walked():
    import functools

    class Scaler(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.k = 2.0

        def forward(self, x):
            return x * self.k

        def half(self, x):
            return x * self.k / 2

    m = Scaler()
    x = torch.ones(3)
    fns = [m, m.half, functools.partial(lambda mod, t: mod(t) + 1, m)]
    compiled = [ftrans.compile(f) for f in fns]
    for f, cf in zip(fns, compiled):
        torch.testing.assert_close(cf(x), f(x))
    m.k = 5.0
    for f, cf in zip(fns, compiled):
        torch.testing.assert_close(cf(x), f(x))


def test_tracing_changes_no_state_and_replays_apply_one_calls_updates():
    counter = torch.zeros((), dtype=torch.int64)
    ema = torch.zeros(3)

    def step(x):
        counter.add_(1)
        ema.mul_(0.5).add_(x)
        return x * 2

    cf = ftrans.compile(step)
    for i in range(3):
        cf(torch.ones(3))
        assert int(counter) == i + 1
    torch.testing.assert_close(ema, torch.full((3,), 1.75))


def test_plain_objects_are_guarded_on_the_attributes_the_code_reads():
    class Cfg:
        clip = 1.0  # a class attribute

        def __init__(self):
            self.history = []  # not read by the step: changing it does not retrace

        @property
        def double(self):
            return self.clip * 2

    cfg = Cfg()

    def step(x):
        return x.clamp(max=cfg.double)

    cf = ftrans.compile(step)
    x = torch.linspace(0, 5, 6)
    torch.testing.assert_close(cf(x), step(x))
    cfg.history.extend(range(1000))
    torch.testing.assert_close(cf(x), step(x))
    Cfg.clip = 2.0
    torch.testing.assert_close(cf(x), step(x))
    (sig,) = cf.cache.values()
    assert len(sig.entries) == 2


def test_a_failed_trace_leaves_no_fake_value_behind():
    log = []

    def step(x):
        loss = x.sum()
        log.append(loss)
        return loss * 2 if loss > 0 else loss  # control flow on a traced value: eager

    cf = ftrans.compile(step)
    with pytest.warns(CompileWarning, match="control flow"):
        cf(torch.ones(3))
    assert len(log) == 1 and type(log[0]) is torch.Tensor and float(log[0]) == 3.0


def test_inference_mode_and_deterministic_flags_are_part_of_the_signature():
    cf = ftrans.compile(lambda x: x * 2)
    x = torch.ones(2)
    cf(x)
    with torch.inference_mode():
        out = cf(x)
    assert out.is_inference()
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        cf(x)
    finally:
        torch.use_deterministic_algorithms(was)
    assert len(cf.cache) == 3


def test_cyclic_state_is_walked_once():
    box = {"k": 2.0}
    box["self"] = box
    items = [1.0]
    items.append(items)
    cf = ftrans.compile(lambda x: x * box["k"] * items[0])
    x = torch.ones(2)
    torch.testing.assert_close(cf(x), x * 2)
    box["k"] = 3.0
    torch.testing.assert_close(cf(x), x * 3)


def test_input_aliasing_is_part_of_the_signature():
    """Inputs that share memory are a signature of their own (a trace made with separate
    inputs assumed them separate): replayed when the function only reads them, run eagerly
    with a CompileWarning when it writes one of them; each call returns, and updates, what the
    eager call does."""
    def g(a, b):
        a.mul_(2)
        return b + 1

    def h(a, b):
        return a * b + b

    for fn, writes in ((g, True), (h, False)):
        compiled = ftrans.compile(fn)
        for make in (lambda t: (t, t.clone()), lambda t: (t, t), lambda t: (t[:3], t[1:]),
                     lambda t: (t[:2], t[2:]), lambda t: (t, t.clone())):
            base, ref = torch.arange(4.0), torch.arange(4.0)
            args = make(base)
            aliased = args[0].untyped_storage().data_ptr() == args[1].untyped_storage().data_ptr()
            if aliased and writes:
                with pytest.warns(ftrans.CompileWarning, match="share memory"):
                    out = compiled(*args)
            else:
                out = compiled(*args)
            expected = fn(*make(ref))
            assert torch.equal(out, expected) and torch.equal(base, ref)
        # separate inputs, the same tensor twice, overlapping views, disjoint views of one storage
        assert len(compiled.cache) == 4
