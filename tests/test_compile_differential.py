"""ftrans.compile against eager, on generated training steps whose state changes between calls.

Hypothesis builds a small step (a model with dropout and/or BatchNorm, an autocast region, a
Python number read from a closure and one from a config object, an in-place EMA buffer, a
logging side effect, a learning rate passed as a Python number, the gradient taken inside or
a plain forward) and a sequence of calls with changes in between (train/eval, closure and
config values, input layouts, a replaced or updated buffer).  The compiled step runs on the
state, an eager step on a deep copy of it; after every call the results and every piece of
state agree, and a ``CompileWarning`` appears only where the program does something a replay
cannot repeat.  CI runs a few examples; ``FTRANS_FULL=1`` runs many.
"""
import copy
import os
import warnings

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ftrans

FULL = bool(os.environ.get("FTRANS_FULL"))
D, B = 4, 6


class State:
    """Everything a step can reach: a model, a config object, closure values, a buffer, a log."""

    def __init__(self, prog):
        layers = [torch.nn.Linear(D, D)]
        if prog["dropout"]:
            layers.append(torch.nn.Dropout(0.3))
        if prog["batchnorm"]:
            layers.append(torch.nn.BatchNorm1d(D, momentum=prog["momentum"]))
        layers.append(torch.nn.Linear(D, 2))
        self.model = torch.nn.Sequential(*layers)
        self.model.requires_grad_(False)
        self.config = type("Config", (), {})()
        self.config.clip = 1.0
        self.scale = [0.5]
        self.ema = torch.zeros(2)
        self.log = []


def make_step(prog, s: State):
    model, config, scale, ema, log = s.model, s.config, s.scale, s.ema, s.log

    def loss(params, x, lr):
        if prog["autocast"]:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = ftrans.functional_call(model, params, (x,))
            h = h.float()
        else:
            h = ftrans.functional_call(model, params, (x,))
        out = (h * scale[0]).clamp(-config.clip, config.clip)
        return (out ** 2).mean() * lr

    def step(params, x, lr):
        if prog["grad"]:
            grads, value = ftrans.grad_and_value(loss)(params, x, lr)
        else:
            grads, value = {}, loss(params, x, lr)
        if prog["ema"]:
            ema.mul_(0.9).add_(value.detach() * 0.1)
        if prog["log"]:
            log.append(value.detach())
        return grads, value

    return step


def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def _layout(x, kind):
    if kind == "transposed":
        return x.t().contiguous().t()
    if kind == "offset":
        big = torch.zeros(B + 3, D)
        big[2:2 + B] = x
        return big[2:2 + B]
    if kind == "strided":
        big = torch.zeros(B, 2 * D)
        big[:, ::2] = x
        return big[:, ::2]
    return x


programs = st.fixed_dictionaries({
    "dropout": st.booleans(), "batchnorm": st.booleans(),
    "momentum": st.sampled_from([0.1, 0.1, None]), "autocast": st.booleans(),
    "grad": st.booleans(), "ema": st.booleans(), "log": st.booleans(),
})
events = st.lists(st.sampled_from([
    "none", "eval", "train", "scale", "clip", "lr", "transposed", "offset", "strided",
    "replace_buffer", "update_buffer",
]), min_size=2, max_size=5 if not FULL else 8)


def _apply(event, s: State, i):
    if event == "eval":
        s.model.eval()
    elif event == "train":
        s.model.train()
    elif event == "scale":
        s.scale[0] = 0.25 * (i + 1)
    elif event == "clip":
        s.config.clip = 0.5 / (i + 1)
    elif event == "replace_buffer":
        for m in s.model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_var = torch.full((D,), 2.0)
    elif event == "update_buffer":
        with torch.no_grad():
            s.ema.add_(1.0)


def _expected_warning(prog, msg):
    if "retraced" in msg:
        return True
    if prog["log"] and "while traced" in msg:
        return True
    if prog["batchnorm"] and prog["momentum"] is None and "num_batches_tracked" in msg:
        return True
    return False


@settings(max_examples=200 if FULL else 6, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(prog=programs, evs=events)
def test_compiled_step_agrees_with_eager_after_every_call(prog, evs):
    torch.manual_seed(0)
    s = State(prog)
    twin = copy.deepcopy(s)
    compiled = ftrans.compile(make_step(prog, s))
    eager = make_step(prog, twin)
    gen = torch.Generator().manual_seed(1)
    for i, event in enumerate(["none"] + evs):
        for state in (s, twin):
            _apply(event, state, i)
        x = torch.randn(B, D, generator=gen)
        lr = 0.1 / (i + 1) if event == "lr" or i % 2 else 0.1
        kind = event if event in ("transposed", "offset", "strided") else "contiguous"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(100 + i)
            got = compiled(_params(s.model), _layout(x, kind), lr)
        torch.manual_seed(100 + i)
        want = eager(_params(twin.model), _layout(x, kind), lr)
        for w in caught:
            if issubclass(w.category, (ftrans.CompileWarning, ftrans.FallbackWarning)):
                assert _expected_warning(prog, str(w.message)), (prog, evs, str(w.message))
        tol = dict(atol=2e-2, rtol=2e-2) if prog["autocast"] else {}
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(dict(s.model.state_dict()), dict(twin.model.state_dict()),
                                   **tol)
        torch.testing.assert_close(s.ema, twin.ema, **tol)
        assert len(s.log) == len(twin.log)
        assert all(type(v) is torch.Tensor for v in s.log)  # real numbers, no fake tensors
        torch.testing.assert_close(s.log, twin.log, **tol)
