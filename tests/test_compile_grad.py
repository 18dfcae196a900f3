"""Differentiable replays: ``ftrans.compile`` of a function whose inputs or captured tensors
require grad, differentiated with ``.backward()`` outside it, against eager autograd.

Hypothesis builds training loops as users write them (a model the compiled step closes over,
or stacked ensemble parameters passed in; dropout and/or BatchNorm; train/eval switches; an
optimizer stepping the parameters in place; a learning-rate schedule) and checks, after every
step, that the loss, every ``.grad``, every parameter and every buffer equal an eager twin's
(float64).  CI runs a few examples; ``FTRANS_FULL=1`` runs many.
"""
import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ftrans
from ftrans.compiler import CompileWarning

FULL = bool(os.environ.get("FTRANS_FULL"))


@pytest.fixture(autouse=True)
def _strict_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileWarning)
        yield


def _runner(compiled):
    return type(next(iter(compiled.cache.values())).runner).__name__


def test_inputs_that_require_grad_get_the_eager_gradient():
    torch.manual_seed(0)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, dtype=torch.float64)

    def f(w, b, x):
        h = torch.tanh(x @ w + b)
        return (h ** 2).sum(), h.argmax(-1)  # a non-differentiable output beside

    cf = ftrans.compile(f)
    for _ in range(3):
        (loss, idx), (loss_e, idx_e) = cf(w, b, x), f(w, b, x)
        assert _runner(cf) == "JointReplay"
        assert torch.equal(idx, idx_e) and not idx.requires_grad
        got = torch.autograd.grad(loss, (w, b))
        want = torch.autograd.grad(loss_e, (w, b))
        torch.testing.assert_close(got, want)
        with torch.no_grad():
            w -= 0.1 * got[0]


def test_unused_input_gets_no_gradient_and_multiple_outputs_are_each_differentiable():
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    unused = torch.randn(4, dtype=torch.float64, requires_grad=True)
    cf = ftrans.compile(lambda x, u: (x.sin(), x.cos() * 2))
    a, b = cf(x, unused)
    (a.sum() + 3 * b.sum()).backward()
    torch.testing.assert_close(x.grad, x.detach().cos() - 6 * x.detach().sin())
    assert unused.grad is None
    x.grad = None
    a, b = cf(x, unused)
    b.sum().backward()  # only one output used: the other's cotangent is zero
    torch.testing.assert_close(x.grad, -2 * x.detach().sin())


def test_double_backward_through_a_replay_is_refused():
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    cf = ftrans.compile(lambda w: (w ** 3).sum())
    (g,) = torch.autograd.grad(cf(w), w)
    torch.testing.assert_close(g, 3 * w.detach() ** 2)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(cf(w), w, create_graph=True)
    # higher derivatives inside the compiled function are fine
    h = ftrans.compile(lambda w: ftrans.grad(
        lambda v: ftrans.grad(lambda u: (u ** 3).sum())(v).sum())(w))
    torch.testing.assert_close(h(w.detach()), 6 * w.detach())


def test_updating_an_input_that_requires_grad_in_place_runs_eagerly_with_a_warning():
    def f(w, x):
        with torch.no_grad():
            w.mul_(0.5)
        return (w * x).sum()

    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3)
    w_e = w.detach().clone().requires_grad_()
    with pytest.warns(CompileWarning, match="in place"):
        out = ftrans.compile(f)(w, x)
    want = f(w_e, x)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(w.detach(), w_e.detach())


def test_gradient_reaches_a_non_leaf_input():
    a = torch.randn(4, dtype=torch.float64, requires_grad=True)
    cf = ftrans.compile(ftrans.vmap(lambda t: t.exp() * 2))
    x = a * 3  # not a leaf: the replay's node connects to its history
    cf(x).sum().backward()
    torch.testing.assert_close(a.grad, 6 * (3 * a.detach()).exp())


def test_ensemble_training_with_backward_outside_matches_eager():
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
              for _ in range(4)]
    base = copy.deepcopy(models[0]).to("meta")
    params, _ = ftrans.stack_module_state(models)
    twin = {k: v.detach().clone().requires_grad_() for k, v in params.items()}

    def ensemble(p, x, y):
        logits = ftrans.vmap(lambda q: ftrans.functional_call(base, q, (x,)))(p)
        return F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]))

    step = ftrans.compile(ensemble)
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    opt_e = torch.optim.Adam(twin.values(), lr=1e-2)
    for i in range(4):
        x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
        opt.zero_grad()
        loss = step(params, x, y)
        loss.backward()
        opt.step()
        opt_e.zero_grad()
        loss_e = ensemble(twin, x, y)
        loss_e.backward()
        opt_e.step()
        torch.testing.assert_close(loss, loss_e)
        for k in params:
            torch.testing.assert_close(params[k], twin[k])
    assert _runner(step) == "JointReplay" and len(step.cache) == 1


# ---------------------------------------------------------------------------------------------
# Generated fine-tuning loops: the compiled step closes over the model.
# ---------------------------------------------------------------------------------------------

programs = st.fixed_dictionaries({
    "dropout": st.booleans(), "batchnorm": st.booleans(), "optim": st.sampled_from(["sgd", "adam"]),
    "frozen_first": st.booleans(), "aux": st.booleans(),
})
events = st.lists(st.sampled_from(["none", "eval", "train", "lr", "zero_grad_off"]),
                  min_size=2, max_size=4 if not FULL else 8)


def _model(prog):
    layers = [nn.Linear(5, 8)]
    if prog["batchnorm"]:
        layers.append(nn.BatchNorm1d(8))
    layers.append(nn.ReLU())
    if prog["dropout"]:
        layers.append(nn.Dropout(0.25))
    layers.append(nn.Linear(8, 3))
    model = nn.Sequential(*layers).double()
    if prog["frozen_first"]:
        model[0].requires_grad_(False)
    return model


@settings(max_examples=60 if FULL else 5, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(prog=programs, evs=events)
def test_compiled_fine_tuning_step_agrees_with_eager_after_every_step(prog, evs):
    torch.manual_seed(0)
    model = _model(prog)
    twin = copy.deepcopy(model)

    def make_step(m):
        def step(x, y):
            logits = m(x)
            loss = F.cross_entropy(logits, y)
            return (loss, logits.detach().argmax(-1)) if prog["aux"] else loss
        return step

    compiled, eager = ftrans.compile(make_step(model)), make_step(twin)
    opts = []
    for m in (model, twin):
        trainable = [p for p in m.parameters() if p.requires_grad]
        opts.append(torch.optim.SGD(trainable, lr=0.1, momentum=0.9) if prog["optim"] == "sgd"
                    else torch.optim.Adam(trainable, lr=1e-2))
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in opts]
    gen = torch.Generator().manual_seed(1)
    zero = True
    for i, event in enumerate(["none"] + evs):
        for m in (model, twin):
            if event == "eval":
                m.eval()
            elif event == "train":
                m.train()
        if event == "zero_grad_off":
            zero = not zero  # gradients accumulate over two steps
        x = torch.randn(6, 5, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 3, (6,), generator=gen)
        results = []
        for fn, m, opt, sched in ((compiled, model, opts[0], scheds[0]),
                                  (eager, twin, opts[1], scheds[1])):
            if zero:
                opt.zero_grad()
            torch.manual_seed(100 + i)
            out = fn(x, y)
            loss = out[0] if prog["aux"] else out
            loss.backward()
            results.append((out, [None if p.grad is None else p.grad.clone()
                                  for p in m.parameters()]))
            opt.step()
            if event == "lr":
                sched.step()
        (got, g_grads), (want, w_grads) = results
        torch.testing.assert_close(got, want)
        for a, b in zip(g_grads, w_grads):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)
        torch.testing.assert_close(dict(model.state_dict()), dict(twin.state_dict()))


def test_inside_ftrans_transforms_a_compiled_call_stays_correct_to_any_order():
    # grad of grad, jvp and hessian differentiate the call's backward again: inside a
    # transform, a signature with inputs that require grad runs eagerly (warned once).
    f = lambda x: (x.sin() * x).sum()  # noqa: E731
    x = torch.randn(3, dtype=torch.float64)
    c = ftrans.compile(f)
    with pytest.warns(CompileWarning, match="inside an ftrans transform"):
        torch.testing.assert_close(ftrans.grad(c)(x), ftrans.grad(f)(x))
    torch.testing.assert_close(ftrans.hessian(c)(x), ftrans.hessian(f)(x))
    t = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(ftrans.jvp(c, (x,), (t,)), ftrans.jvp(f, (x,), (t,)))
    # the same function called outside any transform is still a differentiable replay
    xr = x.clone().requires_grad_()
    c(xr).backward()
    torch.testing.assert_close(xr.grad, ftrans.grad(f)(x))
    assert "JointReplay" in {type(s.runner).__name__ for s in c.cache.values()
                             if s.entries}
