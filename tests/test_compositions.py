"""Transforms composed in every order and depth, each against a loop or torch.func.

The per-sample-gradient models go through ``functional_call``; ops whose batching rules are
still missing run through the loop fallback there (correct, slower): those tests allow it and
the MLP one, whose rules are core, asserts there is none.
"""
import pytest
import torch
from torch import nn

import ftrans
from tests._helpers import QUIET_FALLBACKS, Cube, no_fallback

assert_close = torch.testing.assert_close
pytestmark = QUIET_FALLBACKS


# ------------------------------------------------------------------ per-sample gradients

class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.emb(tokens)
        a = (self.q(h) @ self.k(h).transpose(-1, -2) / 8 ** 0.5).softmax(-1)
        return self.out((a @ self.v(h)).mean(-2))


class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.cell = cell(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, xs):
        # An explicit per-example initial state: with hx=None the cells' composite kernels
        # add_ batched gates in place into an unbatched zero state (torch.func fails too).
        h = xs[..., 0, :1] * torch.zeros(self.cell.hidden_size)
        if isinstance(self.cell, nn.LSTMCell):
            h = (h, h)
        for t in range(xs.shape[-2]):
            h = self.cell(xs[..., t, :], h)
        return self.head(h[0] if isinstance(h, tuple) else h)


def _cnn():
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(3 * 3 * 3, 3))
    m[1].running_mean.uniform_()
    m[1].running_var.uniform_(0.5, 2)
    return m.eval()


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)),
            lambda B: torch.randn(B, 6)),
    "cnn": (_cnn, lambda B: torch.randn(B, 1, 8, 8)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(),
                                        nn.Linear(8, 3)), lambda B: torch.randn(B, 6)),
    "attention": (Attn, lambda B: torch.randint(0, 10, (B, 5))),
    "gru": (lambda: Recurrent(nn.GRUCell), lambda B: torch.randn(B, 3, 4)),
    "lstm": (lambda: Recurrent(nn.LSTMCell), lambda B: torch.randn(B, 3, 4)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_per_sample_grads(name):
    make, data = MODELS[name]
    model = make()
    B = 4
    x, y = data(B), torch.randint(0, 3, (B,))
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, x, y):
        out = ftrans.functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    expected = []
    for i in range(B):
        li = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        expected.append(dict(zip(params, torch.autograd.grad(li, list(model.parameters())))))
    before = dict(ftrans.fallback_stats())
    if name == "mlp":
        with no_fallback():
            got = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    else:
        got = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for k in params:
        assert type(got[k]) is torch.Tensor
        assert_close(got[k], torch.stack([e[k] for e in expected]), atol=1e-5, rtol=1e-5)
    fell_back = {k for k, v in ftrans.fallback_stats().items() if v != before.get(k, 0)}
    if fell_back:
        print(f"{name}: loop fallback for {sorted(fell_back)}")


def test_per_sample_grads_match_torch_func_mlp():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(7, 6)

    def loss(p, x):
        return torch.func.functional_call(model, p, (x,)).pow(2).sum()

    def floss(p, x):
        return ftrans.functional_call(model, p, (x,)).pow(2).sum()

    assert_close(ftrans.vmap(ftrans.grad(floss), in_dims=(None, 0))(params, x),
                 torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x))


# ------------------------------------------------------------------ pairs of transforms

def h(x):
    return (x.sin() * x.cumsum(-1)).exp().sum() / 10


def test_grad_of_vmap():
    x, w = torch.randn(3, 4), torch.randn(4)
    got = ftrans.grad(lambda x: ftrans.vmap(lambda r: (r * w).tanh().sum())(x).pow(2).sum())(x)
    exp = torch.func.grad(
        lambda x: torch.func.vmap(lambda r: (r * w).tanh().sum())(x).pow(2).sum())(x)
    assert_close(got, exp)


def test_grad_of_vmap_closure_is_summed():
    # The closed-over w gets per-example gradients inside the vmap: they must be summed.
    x, w = torch.randn(3, 4), torch.randn(4)
    got = ftrans.grad(lambda w: ftrans.vmap(lambda r: (r * w).tanh().sum())(x).sum())(w)
    assert got.shape == (4,) and type(got) is torch.Tensor
    assert_close(got, torch.func.grad(lambda w: (x * w).tanh().sum())(w))


def test_vmap_of_vjp():
    x, ct = torch.randn(5, 3), torch.randn(5, 3)

    def f(x, ct):
        return ftrans.vjp(lambda x: x.sin() * x.sum(), x)[1](ct)[0]

    def ef(x, ct):
        return torch.func.vjp(lambda x: x.sin() * x.sum(), x)[1](ct)[0]

    assert_close(ftrans.vmap(f)(x, ct), torch.func.vmap(ef)(x, ct))


def test_vmap_of_jvp():
    x, t = torch.randn(5, 3), torch.randn(5, 3)

    def f(x, t):
        return ftrans.jvp(h, (x,), (t,))[1]

    assert_close(ftrans.vmap(f)(x, t),
                 torch.func.vmap(lambda x, t: torch.func.jvp(h, (x,), (t,))[1])(x, t))
    # tangents batched, primal shared
    assert_close(ftrans.vmap(f, in_dims=(None, 0))(x[0], t),
                 torch.stack([torch.func.jvp(h, (x[0],), (ti,))[1] for ti in t]))


def test_vmap_of_jacrev_and_jacfwd():
    x = torch.randn(4, 3)
    g = lambda x: x.sin() * x.prod()  # noqa: E731
    exp = torch.func.vmap(torch.func.jacrev(g))(x)
    assert_close(ftrans.vmap(ftrans.jacrev(g))(x), exp)
    assert_close(ftrans.vmap(ftrans.jacfwd(g))(x), exp)


def test_jacrev_of_jacrev_and_hessian():
    x = torch.randn(4)
    exp = torch.func.hessian(h)(x)
    assert_close(ftrans.jacrev(ftrans.jacrev(h))(x), exp)
    assert_close(ftrans.jacfwd(ftrans.jacrev(h))(x), exp)
    assert_close(ftrans.jacfwd(ftrans.jacfwd(h))(x), exp)
    assert_close(ftrans.jacrev(ftrans.jacfwd(h))(x), exp)
    assert_close(ftrans.hessian(h)(x), exp)


@pytest.mark.parametrize("chunk_size", [1, 3])
def test_jacobians_chunked(chunk_size):
    x = torch.randn(5)
    g = lambda x: x.sin().cumsum(0)  # noqa: E731
    assert_close(ftrans.jacrev(g, chunk_size=chunk_size)(x), ftrans.jacrev(g)(x))
    assert_close(ftrans.jacfwd(g, chunk_size=chunk_size)(x), ftrans.jacfwd(g)(x))
    assert_close(ftrans.jacrev(g)(x), torch.func.jacrev(g)(x))


def test_jvp_of_grad_and_grad_of_jvp():
    x, v = torch.randn(4), torch.randn(4)
    exp = torch.func.jvp(torch.func.grad(h), (x,), (v,))
    assert_close(ftrans.jvp(ftrans.grad(h), (x,), (v,)), exp)
    got = ftrans.grad(lambda x: ftrans.jvp(h, (x,), (v,))[1])(x)
    assert_close(got, torch.func.grad(lambda x: torch.func.jvp(h, (x,), (v,))[1])(x))
    got = ftrans.grad(lambda v: ftrans.jvp(h, (x,), (v,))[1])(v)  # w.r.t. the tangent
    assert_close(got, torch.func.grad(h)(x))


def test_grad_of_grad():
    x = torch.tensor(2.0)
    assert_close(ftrans.grad(ftrans.grad(lambda x: x ** 3))(x), torch.tensor(12.0))
    assert_close(ftrans.grad(ftrans.grad(ftrans.grad(lambda x: x.sin())))(x), -x.cos())
    y = torch.randn(3)
    assert_close(ftrans.grad(lambda y: ftrans.grad(h)(y).sum())(y),
                 torch.func.grad(lambda y: torch.func.grad(h)(y).sum())(y))


def test_jvp_of_jvp_of_jvp():
    x = torch.randn(3)
    a, b, c = torch.randn(3), torch.randn(3), torch.randn(3)

    def nest(jvp):
        f1 = lambda x: jvp(h, (x,), (a,))[1]  # noqa: E731
        f2 = lambda x: jvp(f1, (x,), (b,))[1]  # noqa: E731
        return jvp(f2, (x,), (c,))

    assert_close(nest(ftrans.jvp), nest(torch.func.jvp))


def test_vmap_vmap_grad():
    x = torch.randn(2, 3, 4)
    assert_close(ftrans.vmap(ftrans.vmap(ftrans.grad(h)))(x),
                 torch.func.vmap(torch.func.vmap(torch.func.grad(h)))(x))
    assert_close(ftrans.vmap(ftrans.grad(lambda x: ftrans.vmap(h)(x).sum()))(x),
                 torch.func.vmap(torch.func.grad(lambda x: torch.func.vmap(h)(x).sum()))(x))


# ------------------------------------------------------------------ perturbation confusion

def test_perturbation_confusion_constant():
    c, x0 = torch.tensor(3.0), torch.tensor(2.0)
    got = ftrans.grad(lambda x: ftrans.grad(lambda y: x * y)(c))(x0)
    assert_close(got, torch.tensor(1.0))


def test_perturbation_confusion_same_tensor():
    x0 = torch.tensor(2.0)
    got = ftrans.grad(lambda x: ftrans.grad(lambda y: x * y)(x))(x0)
    exp = torch.func.grad(lambda x: torch.func.grad(lambda y: x * y)(x))(x0)
    assert_close(got, exp)
    assert_close(got, torch.tensor(1.0))


def test_perturbation_confusion_jvp():
    x0 = torch.tensor(2.0)
    one = torch.tensor(1.0)

    def f(x):
        return ftrans.jvp(lambda y: x * y, (x,), (one,))[1]

    def ef(x):
        return torch.func.jvp(lambda y: x * y, (x,), (one,))[1]

    assert_close(ftrans.jvp(f, (x0,), (one,))[1], torch.func.jvp(ef, (x0,), (one,))[1])


# ------------------------------------------------------------------ autograd through vmap

def test_plain_backward_through_vmap_captured_params():
    w = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    x = torch.randn(5, 4)
    out = ftrans.vmap(lambda r: (r @ w + b).tanh().sum())(x)
    out.sum().backward()
    assert type(w.grad) is torch.Tensor and type(b.grad) is torch.Tensor
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (x @ w2 + b2).tanh().sum().backward()
    assert_close(w.grad, w2.grad)
    assert_close(b.grad, b2.grad)


def test_captured_used_inside_and_outside_vmap():
    # Per-example contributions must be summed per use, before they meet the shared one
    # (summing w's total gradient over the batch would count the outside use 5 times).
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(5, 3)
    (ftrans.vmap(lambda r: (r * w).sin().sum())(x).sum() + (w ** 2).sum()).backward()
    w2 = w.detach().clone().requires_grad_()
    ((x * w2).sin().sum() + (w2 ** 2).sum()).backward()
    assert_close(w.grad, w2.grad)
    got = ftrans.grad(lambda w: ftrans.vmap(lambda r: (r * w).sin().sum())(x).sum() * w.sum())(w)
    exp = torch.func.grad(
        lambda w: torch.func.vmap(lambda r: (r * w).sin().sum())(x).sum() * w.sum())(w.detach())
    assert_close(got, exp)


def test_plain_backward_through_vmap_mapped_input():
    x = torch.randn(5, 4, requires_grad=True)
    ftrans.vmap(h)(x).sum().backward()
    assert_close(x.grad, torch.func.vmap(torch.func.grad(h))(x.detach()))


def test_custom_function_inside_vmap_and_grad():
    x = torch.randn(4, 3)
    assert_close(ftrans.vmap(Cube.apply)(x), x ** 3)
    assert_close(ftrans.vmap(ftrans.grad(lambda x: Cube.apply(x).sum()))(x), 3 * x ** 2)
    assert_close(ftrans.grad(lambda x: ftrans.vmap(Cube.apply)(x).sum())(x), 3 * x ** 2)


# ------------------------------------------------------------------ MAML

def test_maml_vmapped_over_tasks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    T, N, k_steps, lr = 3, 6, 2, 0.1
    xs, ys = torch.randn(T, N, 1), torch.randn(T, N, 1)
    xq, yq = torch.randn(T, N, 1), torch.randn(T, N, 1)

    def make(fc, grad, vmap):
        def loss(p, x, y):
            return (fc(model, p, (x,)) - y).pow(2).mean()

        def task_loss(p, xs, ys, xq, yq):
            for _ in range(k_steps):
                g = grad(loss)(p, xs, ys)
                p = {k: p[k] - lr * g[k] for k in p}
            return loss(p, xq, yq)

        def meta(p):
            return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq).mean()

        return grad(meta)

    got = make(ftrans.functional_call, ftrans.grad, ftrans.vmap)(params)
    exp = make(torch.func.functional_call, torch.func.grad, torch.func.vmap)(params)
    for k in params:
        assert_close(got[k], exp[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rows, n", [(3, 3), (5, 3), (3, 4)])
def test_second_order_through_inner_vmap_closure(rows, n):
    # The inner vmap closes over the differentiated input AND maps a value computed from it.
    # Forward-over-reverse used to count part of the Hessian (n+1)/2 times (jacrev(jacfwd)) or
    # raise (hessian): the engine's create_graph ops mix batched tangents or cotangents with the
    # older graph's tensors without the per-use lift.
    scale = torch.arange(float(rows))[:, None]

    def make(vmap):
        return lambda x: vmap(lambda r: (r * x).sin().sum())(x.expand(rows, -1) * scale).sum()

    x = torch.randn(n, dtype=torch.float64)
    exp = torch.func.hessian(make(torch.func.vmap))(x)
    f = make(ftrans.vmap)
    assert_close(ftrans.jacrev(ftrans.jacrev(f))(x), exp)
    assert_close(ftrans.jacrev(ftrans.jacfwd(f))(x), exp)
    assert_close(ftrans.jacfwd(ftrans.jacfwd(f))(x), exp)
    assert_close(ftrans.hessian(f)(x), exp)
    assert_close(ftrans.vmap(ftrans.hessian(f))(torch.stack([x, 2 * x])),
                 torch.stack([exp, torch.func.hessian(make(torch.func.vmap))(2 * x)]))


def _f_two_closures(vmap):
    def f(x):
        w = x.cos()
        return vmap(lambda r: (r * x + w).tanh().sum() * x.sum())(torch.outer(x, x)).sum()
    return f


def _f_nested_inner(vmap):
    def f(x):
        m = torch.outer(x, x.sin())
        return vmap(lambda row: vmap(lambda e: (e * x[0]).exp())(row).sum())(m).sum()
    return f


@pytest.mark.parametrize("make", [_f_two_closures, _f_nested_inner])
@pytest.mark.parametrize("outer, inner", [("jacrev", "jacfwd"), ("jacfwd", "jacrev"),
                                          ("jacfwd", "jacfwd"), ("jacrev", "jacrev")])
def test_second_order_mixed_modes_with_closures(make, outer, inner):
    x = torch.randn(3, dtype=torch.float64) * 0.5
    exp = torch.func.hessian(make(torch.func.vmap))(x)
    got = getattr(ftrans, outer)(getattr(ftrans, inner)(make(ftrans.vmap)))(x)
    assert_close(got, exp)
