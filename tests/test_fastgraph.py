"""Replays call torch's operator bindings directly (ftrans/_fastgraph.py)."""
import pytest
import torch

import ftrans
from ftrans import _fastgraph


def _runner(cf):
    return next(iter(cf.cache.values())).runner


def _calls_of(runner):
    return runner._fn.func.__code__.co_names


def test_plain_replay_binds_every_aten_overload_directly():
    assert _fastgraph.ENABLED  # torch's OpOverload.__call__ only forwards to ``_op``
    w = torch.randn(5, 3)
    f = ftrans.vmap(lambda t: (t @ w).relu().sum() * 2)
    cf = ftrans.compile(f)
    x = torch.randn(4, 5)
    cf(x)
    runner = _runner(cf)
    assert type(runner) is _fastgraph.FastGraph
    ops = [n.target for n in runner.graph.nodes if n.op == "call_function"]
    assert ops and all(isinstance(t, torch._ops.OpOverload) for t in ops)
    # No aten overload is looked up through ``torch.ops`` at call time
    assert "ops" not in _calls_of(runner)
    for x in (torch.randn(4, 5), torch.randn(4, 5).mul_(-1)):
        torch.testing.assert_close(cf(x), f(x))


def test_differentiable_replay_and_pooled_outputs_use_it_too():
    lin = torch.nn.Linear(600, 512)
    params = {k: v.detach().requires_grad_() for k, v in lin.named_parameters()}
    f = lambda p, x: torch.func.functional_call(lin, p, (x,)).tanh().sum()  # noqa: E731
    cf = ftrans.compile(f)
    x = torch.randn(8, 600)
    cf(params, x).backward()
    runner = _runner(cf)
    assert type(runner.fwd) is _fastgraph.FastGraph and type(runner.bwd) is _fastgraph.FastGraph
    got = {k: v.grad.clone() for k, v in params.items()}
    for v in params.values():
        v.grad = None
    f(params, x).backward()
    for k, v in params.items():
        torch.testing.assert_close(got[k], v.grad)

    g = ftrans.vmap(ftrans.grad(lambda p, x: f(p, x[None])), in_dims=(None, 0))
    plain = {k: v.detach() for k, v in params.items()}
    cg = ftrans.compile(g)
    expected = g(plain, x)
    for _ in range(3):  # the second call onward writes into the pool's buffers
        out = cg(plain, x)
        for k in out:
            torch.testing.assert_close(out[k], expected[k])
    pool = _runner(cg)
    assert type(pool).__name__ == "OutputPool"
    assert type(pool.gm) is _fastgraph.FastGraph and type(pool.gm_out) is _fastgraph.FastGraph


def test_graph_constants_are_reached_through_the_module(monkeypatch):
    gm = torch.fx.symbolic_trace(torch.nn.Linear(3, 2))  # get_attr nodes: self.weight, ...
    fast = _fastgraph.fast_graph(gm)
    x = torch.randn(4, 3)
    torch.testing.assert_close(fast(x), gm(x))


def test_without_the_plain_call_the_module_runs_as_it_is(monkeypatch):
    monkeypatch.setattr(_fastgraph, "ENABLED", False)
    f = ftrans.vmap(lambda t: t.sin() * 2)
    cf = ftrans.compile(f)
    x = torch.randn(3, 2)
    torch.testing.assert_close(cf(x), f(x))
    assert isinstance(_runner(cf), torch.fx.GraphModule)


@pytest.mark.parametrize("src, expected", [
    ("    def __call__(self, /, *args, **kwargs):\n        return self._op(*args, **kwargs)\n",
     True),
    ("    def __call__(self, /, *args, **kwargs):\n        # a comment\n"
     "        return self._op(*args, **kwargs)\n", True),
    ("    def __call__(self, /, *args, **kwargs):\n        record(self)\n"
     "        return self._op(*args, **kwargs)\n", False),
])
def test_the_plain_call_check_reads_torchs_source(monkeypatch, src, expected):
    monkeypatch.setattr(_fastgraph.inspect, "getsource", lambda f: src)
    assert _fastgraph._call_is_plain() is expected
