"""functional_call and stack_module_state: torch.func semantics, restore-on-exception, ensembles."""
import pytest
import torch
from torch import nn

import ftrans
from tests._helpers import QUIET_FALLBACKS

assert_close = torch.testing.assert_close
pytestmark = QUIET_FALLBACKS


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.foo = nn.Parameter(torch.tensor(1.0))
        self.bar = self.foo
        self.register_buffer("buf", torch.tensor(10.0))

    def forward(self, x):
        return x + self.foo + self.bar + self.buf


def test_functional_call_swaps_and_restores():
    lin = nn.Linear(3, 2)
    w0 = lin.weight
    params = {"weight": torch.zeros(2, 3), "bias": torch.ones(2)}
    x = torch.randn(4, 3)
    assert_close(ftrans.functional_call(lin, params, (x,)), torch.ones(4, 2))
    assert_close(ftrans.functional_call(lin, params, x), torch.ones(4, 2))  # bare arg
    assert lin.weight is w0


def test_functional_call_kwargs_and_partial_dict():
    lin = nn.Linear(3, 2)
    x = torch.randn(3)
    out = ftrans.functional_call(lin, {"bias": torch.zeros(2)}, kwargs={"input": x})
    assert_close(out, x @ lin.weight.detach().T)


def test_functional_call_tuple_of_dicts_and_duplicates():
    m = Tied()
    x = torch.tensor(0.0)
    out = ftrans.functional_call(m, ({"foo": torch.tensor(2.0)}, {"buf": torch.tensor(0.0)}), x)
    assert_close(out, torch.tensor(4.0))  # tied: bar follows foo
    with pytest.raises(ValueError, match="appeared in multiple dictionaries"):
        ftrans.functional_call(m, ({"foo": x}, {"foo": x}), x)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_functional_call_tie_weights_matches_torch_func(tie_weights):
    m = Tied()
    x = torch.tensor(0.0)
    d = {"foo": torch.tensor(3.0)}
    assert_close(ftrans.functional_call(m, d, x, tie_weights=tie_weights),
                 torch.func.functional_call(m, d, x, tie_weights=tie_weights))


def test_functional_call_strict():
    lin = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="Missing key"):
        ftrans.functional_call(lin, {"weight": torch.zeros(2, 2)}, torch.randn(2), strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ftrans.functional_call(lin, {"weight": torch.zeros(2, 2), "bias": torch.zeros(2),
                                     "extra": torch.zeros(1)}, torch.randn(2), strict=True)


def test_functional_call_restores_after_exception():
    class Boom(nn.Linear):
        def forward(self, x):
            raise ValueError("boom")

    m = Boom(2, 2)
    w0 = m.weight
    with pytest.raises(ValueError, match="boom"):
        ftrans.functional_call(m, {"weight": torch.zeros(2, 2)}, torch.randn(2))
    assert m.weight is w0 and isinstance(m.weight, nn.Parameter)


def test_grad_through_functional_call():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 3)

    def loss(p):
        return ftrans.functional_call(model, p, (x,)).pow(2).mean()

    got = ftrans.grad(loss)(params)
    model.zero_grad()
    model(x).pow(2).mean().backward()
    for k, p in model.named_parameters():
        assert_close(got[k], p.grad)


def test_stack_module_state():
    models = [nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)) for _ in range(3)]
    params, buffers = ftrans.stack_module_state(models)
    eparams, ebuffers = torch.func.stack_module_state(models)
    assert params.keys() == eparams.keys() and buffers.keys() == ebuffers.keys()
    for k in params:
        assert_close(params[k], eparams[k])
        assert params[k].requires_grad and params[k].is_leaf
    for k in buffers:
        assert_close(buffers[k], ebuffers[k])
        assert not buffers[k].requires_grad


def test_stack_module_state_errors():
    with pytest.raises(RuntimeError, match="at least one model"):
        ftrans.stack_module_state([])
    with pytest.raises(RuntimeError, match="same class"):
        ftrans.stack_module_state([nn.Linear(2, 2), nn.Conv1d(2, 2, 1)])
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.eval()
    with pytest.raises(RuntimeError, match="training/eval mode"):
        ftrans.stack_module_state([a, b])
    b.train()
    b.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="same .requires_grad"):
        ftrans.stack_module_state([a, b])


@pytest.mark.parametrize("same_data", [True, False])
def test_model_ensembling(same_data):
    M, B = 4, 6
    models = [nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)) for _ in range(M)]
    params, buffers = ftrans.stack_module_state(models)
    base = models[0]

    def run(p, b, x):
        return ftrans.functional_call(base, (p, b), (x,))

    if same_data:
        x = torch.randn(B, 3)
        got = ftrans.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
        exp = torch.stack([m(x) for m in models])
    else:
        x = torch.randn(M, B, 3)
        got = ftrans.vmap(run, in_dims=(0, 0, 0))(params, buffers, x)
        exp = torch.stack([m(xi) for m, xi in zip(models, x)])
    assert got.shape == (M, B, 2)
    assert_close(got, exp)
    # Gradients of the stacked parameters by a plain backward through the vmap.
    got.sum().backward()
    for k, p in params.items():
        assert type(p.grad) is torch.Tensor and p.grad.shape == p.shape
    exp.sum().backward()
    for i, m in enumerate(models):
        for k, p in m.named_parameters():
            assert_close(params[k].grad[i], p.grad)
