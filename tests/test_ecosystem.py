"""ftrans next to the rest of the ecosystem: torch.compile, nn.Module state, pytrees, packaging.

Users do not call ftrans alone: they compile it, feed it modules with buffers and tied weights,
pass their own containers (namedtuples, dataclasses, registered pytree nodes) through ``in_dims``
and return them, and install it from a wheel.  Each of those is a place where a transform library
can break without any of its own unit tests noticing.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys
import time
import warnings
import zipfile

import optree
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ftrans

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# torch.compile: graph breaks are allowed (ftrans is Python dispatch), errors are not.
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile_quietly(fn, **kw):
    compiled = torch.compile(fn, **kw)

    def run(*args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compiled(*args)
    return run


def test_torch_compile_of_vmap(fresh_dynamo):
    w = torch.randn(5, 3)
    f = ftrans.vmap(lambda x: (x @ w).sin().sum(-1))
    x = torch.randn(4, 7, 5)
    out = _compile_quietly(f, backend="eager")(x)
    torch.testing.assert_close(out, (x @ w).sin().sum(-1))


def test_torch_compile_of_per_sample_grads(fresh_dynamo):
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(ftrans.functional_call(model, p, (x,)), y)

    f = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0, 0))
    x, y = torch.randn(5, 6), torch.randint(0, 2, (5,))
    out = _compile_quietly(f, backend="aot_eager")(params, x, y)
    ref = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k])
    assert any(v.abs().sum() > 0 for v in out.values())


@pytest.mark.parametrize("api", ["grad", "jvp", "vjp"])
def test_ftrans_autodiff_inside_torch_functionalize_is_refused(api):
    # torch.func.functionalize rewraps tensors at its own level and drops the autograd history
    # ftrans records: the gradient came back as zeros. Refused, never silently zero.
    f = lambda x: (x + x).view(-1).sin().sum()
    call = {
        "grad": lambda x: ftrans.grad(f)(x),
        "jvp": lambda x: ftrans.jvp(f, (x,), (torch.ones_like(x),))[1],
        "vjp": lambda x: ftrans.vjp(f, x)[1](torch.tensor(1.0))[0],
    }[api]
    x = torch.randn(2, 3)
    assert call(x).abs().sum() > 0
    with pytest.raises(RuntimeError, match="inside one of torch.func's transforms"):
        torch.func.functionalize(call)(x)
    with pytest.raises(RuntimeError, match="inside one of torch.func's transforms"):
        ftrans.vmap(torch.func.functionalize(call))(x[None])


def test_functionalize_outside_a_vmapped_jvp_agrees():
    # PyTorch's test_vmap_functionalize_jvp, with ftrans's transforms outside functionalize
    # as ftrans supports it: functionalize the function, then vmap its jvp.
    def f(x):
        y = x + x
        z = y.view(-1)
        y.add_(1)
        return z

    x, t = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    ours = ftrans.vmap(lambda x, t: ftrans.jvp(torch.func.functionalize(f), (x,), (t,)))(x, t)
    ref = torch.func.vmap(lambda x, t: torch.func.jvp(f, (x,), (t,)))(x, t)
    torch.testing.assert_close(ours, ref)


_GLOBAL_BUFFER = torch.zeros(3, dtype=torch.float64)


@pytest.mark.parametrize("where", ["closure", "global"])
@pytest.mark.parametrize("api", ["grad", "vjp", "jvp"])
def test_writing_a_differentiated_value_into_a_captured_tensor_is_refused(where, api):
    # torch.func refuses it ("mutate a captured Tensor"); ftrans used to leave the captured
    # tensor with this level's grad_fn after the call.
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    captured = torch.zeros(3, dtype=torch.float64)

    def closure_fn(x):
        captured.copy_(x)
        return (x * captured).sum()

    def global_fn(x):
        _GLOBAL_BUFFER.copy_(x)
        return (x * _GLOBAL_BUFFER).sum()

    foo, buf = (closure_fn, captured) if where == "closure" else (global_fn, _GLOBAL_BUFFER)
    call = {"grad": lambda: ftrans.grad(foo)(x), "vjp": lambda: ftrans.vjp(foo, x),
            "jvp": lambda: ftrans.jvp(foo, (x,), (x,))}[api]
    with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
        call()
    assert buf.grad_fn is None and not buf.requires_grad


def test_captured_tensors_written_with_plain_values_and_fresh_tensors_stay_allowed():
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    counter = torch.zeros(())

    def f(x):
        counter.add_(1)                # no differentiated value: eager semantics
        buf = torch.zeros(3, dtype=torch.float64)
        buf.copy_(x)                   # a tensor the function made: fine
        return (x * buf).sum()

    torch.testing.assert_close(ftrans.grad(f)(x), 2 * x)
    assert counter.item() == 1.0 and counter.grad_fn is None


@pytest.mark.slow
def test_torch_compile_inductor(fresh_dynamo):
    f = ftrans.vmap(lambda x: x.sin() * 2 + x.cos())
    x = torch.randn(3, 4)
    torch.testing.assert_close(_compile_quietly(f)(x), x.sin() * 2 + x.cos())


# ---------------------------------------------------------------------------------------------
# functional_call with buffers and tied weights (torch.func.functional_call is the oracle).
# ---------------------------------------------------------------------------------------------

class TiedAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 4, bias=False)
        self.norm = nn.BatchNorm1d(4)
        self.dec = nn.Linear(4, 6, bias=False)
        self.dec.weight = self.enc.weight          # tied: dec uses enc.weight (transposed below)

    def forward(self, x):
        return F.linear(self.norm(self.enc(x)), self.dec.weight.t())


def test_functional_call_buffers_and_tied_weights():
    model = TiedAutoencoder().eval()
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 6)
    w2 = torch.randn(4, 6)
    buffers = {"norm.running_mean": torch.randn(4), "norm.running_var": torch.rand(4) + 0.5}
    # Replacing one name of a tied pair replaces both (tie_weights=True, the default).
    for params in ({"enc.weight": w2}, {"dec.weight": w2}):
        out = ftrans.functional_call(model, (params, buffers), (x,))
        ref = torch.func.functional_call(model, (params, buffers), (x,))
        torch.testing.assert_close(out, ref)
    # The module is left untouched.
    assert model.enc.weight is model.dec.weight and not torch.equal(model.enc.weight, w2)


def test_functional_call_tied_weights_under_vmap_and_grad():
    model = TiedAutoencoder().eval()
    params = {"enc.weight": model.enc.weight.detach()}
    buffers = {k: v for k, v in model.named_buffers()}

    def loss(p, x):
        return ftrans.functional_call(model, (p, buffers), (x.unsqueeze(0),)).pow(2).sum()

    def loss_tf(p, x):
        return torch.func.functional_call(model, (p, buffers), (x.unsqueeze(0),)).pow(2).sum()

    x = torch.randn(5, 6)
    g = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0))(params, x)
    ref = torch.func.vmap(torch.func.grad(loss_tf), in_dims=(None, 0))(params, x)
    torch.testing.assert_close(g["enc.weight"], ref["enc.weight"])


def test_stack_module_state_with_buffers():
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval() for _ in range(3)]
    for m in models:
        m[1].running_mean.normal_()
    params, buffers = ftrans.stack_module_state(models)
    assert buffers["1.running_mean"].shape == (3, 4)
    base = models[0]
    x = torch.randn(2, 3)
    out = ftrans.vmap(lambda p, b: ftrans.functional_call(base, (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(out, torch.stack([m(x) for m in models]))


# ---------------------------------------------------------------------------------------------
# Pytrees: namedtuples, dataclasses and custom nodes in in_dims and outputs.
# ---------------------------------------------------------------------------------------------

Pair = collections.namedtuple("Pair", "a b")


def test_namedtuple_in_dims_and_outputs():
    x, y = torch.randn(4, 3), torch.randn(3, 4)
    out = ftrans.vmap(lambda p: Pair(p.a * 2, (p.a * p.b).sum()),
                      in_dims=(Pair(0, 1),))(Pair(x, y))
    assert type(out) is Pair
    torch.testing.assert_close(out.a, x * 2)
    torch.testing.assert_close(out.b, (x * y.t()).sum(1))
    # A namedtuple as out_dims
    out2 = ftrans.vmap(lambda v: Pair(v, v.sum()), out_dims=Pair(1, 0))(x)
    assert out2.a.shape == (3, 4) and out2.b.shape == (4,)


# Custom containers registered with optree.  ftrans flattens pytrees with optree; a user-facing
# optree registration needs a namespace, and the one torch uses for its C++ pytrees is "torch".
NAMESPACE = "ftrans"  # the namespace ftrans flattens with (ftrans._pytree.NAMESPACE)


class Box:
    """A user container: ``value`` is data, ``scale`` is static metadata."""

    def __init__(self, value, scale):
        self.value, self.scale = value, scale


try:
    optree.register_pytree_node(Box, lambda b: ((b.value,), b.scale, ("value",)),
                                lambda scale, children: Box(children[0], scale),
                                namespace=NAMESPACE)
except ValueError:  # already registered (module re-import)
    pass


@optree.dataclasses.dataclass(namespace=NAMESPACE)
class Params:
    w: torch.Tensor
    b: torch.Tensor


def test_custom_optree_node_in_dims_and_outputs():
    x = torch.randn(4, 3)
    out = ftrans.vmap(lambda b: Box(b.value * b.scale, b.scale), in_dims=(Box(0, 3.0),))(
        Box(x, 3.0))
    assert type(out) is Box and out.scale == 3.0
    torch.testing.assert_close(out.value, x * 3)


def test_optree_dataclass_in_dims_outputs_and_grad():
    p = Params(torch.randn(3), torch.randn(()))
    xs = torch.randn(5, 3)

    def loss(p, x):
        return (x @ p.w + p.b).tanh()

    g = ftrans.vmap(ftrans.grad(loss), in_dims=(Params(None, None), 0))(p, xs)
    assert type(g) is Params and g.w.shape == (5, 3) and g.b.shape == (5,)
    for i in range(5):
        wi, bi = p.w.clone().requires_grad_(), p.b.clone().requires_grad_()
        gw, gb = torch.autograd.grad(loss(Params(wi, bi), xs[i]), (wi, bi))
        torch.testing.assert_close(g.w[i], gw)
        torch.testing.assert_close(g.b[i], gb)


# ---------------------------------------------------------------------------------------------
# Packaging: the wheel builds and contains the whole package (and nothing else).
# ---------------------------------------------------------------------------------------------

def test_wheel_builds(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    assert len(wheels) == 1 and wheels[0].startswith(f"ftrans-{ftrans.__version__}-")
    names = set(zipfile.ZipFile(tmp_path / wheels[0]).namelist())
    expected = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "ftrans")):
        for f in files:
            if f.endswith(".py") or f == "py.typed":
                expected.add(os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/"))
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
    assert not any(n.startswith(("tests/", "tutorials/", "benchmarks/")) for n in names)
    # Building must not take long enough to need the slow mark (see the module docstring).
    assert time.perf_counter() - start < 120


def test_torch_pytree_registered_dataclass():
    import dataclasses

    import torch.utils._pytree as torch_pytree

    @dataclasses.dataclass
    class Pair:
        a: torch.Tensor
        b: torch.Tensor

    torch_pytree.register_pytree_node(Pair, lambda p: ([p.a, p.b], None),
                                      lambda xs, ctx: Pair(*xs))
    x = torch.randn(4, 3)
    out = ftrans.vmap(lambda p: Pair(p.a * 2, p.b.sum()))(Pair(x, x + 1))
    assert type(out) is Pair
    torch.testing.assert_close(out.a, x * 2)
    torch.testing.assert_close(out.b, (x + 1).sum(1))
