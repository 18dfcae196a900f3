"""The benchmark models' per-sample-gradient paths: correct, and no op falls back to the loop.

A loop fallback turns one kernel into B kernels on a GPU; these are the workloads users run.
"""
import pytest
import torch
import torch.nn.functional as F

import ftrans
from benchmarks import models
from _helpers import no_fallback


def _loss(model, buffers):
    def loss(params, x, y):
        out = ftrans.functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    return loss


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "gru"])
def test_per_sample_grads_match_loop_without_fallback(name):
    model, shape, classes = models.make(name)
    model = model.double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    B = 4
    x = torch.randn(B, *shape, dtype=torch.float64)
    y = torch.randint(0, classes, (B,))
    with no_fallback():
        grads = ftrans.vmap(ftrans.grad(_loss(model, buffers)), in_dims=(None, 0, 0))(params, x, y)
    for i in range(B):
        out = model(x[i:i + 1])
        ref = torch.autograd.grad(F.cross_entropy(out, y[i:i + 1]), list(model.parameters()))
        for k, r in zip(params, ref):
            torch.testing.assert_close(grads[k][i], r, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer", "gru"])
def test_compiled_per_sample_grads_match_eager(name):
    model, shape, classes = models.make(name)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    f = ftrans.vmap(ftrans.grad(_loss(model, buffers)), in_dims=(None, 0, 0))
    cf = ftrans.compile(f)
    x = torch.randn(3, *shape)
    y = torch.randint(0, classes, (3,))
    eager = f(params, x, y)
    for _ in range(2):
        got = cf(params, x, y)
        for k in params:
            torch.testing.assert_close(got[k], eager[k], atol=1e-5, rtol=1e-4)


# Weight reparametrizations researchers use: each run in training mode (spectral norm's power
# iteration updates its buffers in place), forward and backward without a loop fallback.
_P = torch.nn.utils.parametrizations
_REPARAM = {
    "weight_norm": lambda: _P.weight_norm(torch.nn.Linear(5, 3)),
    "weight_norm_dim1": lambda: _P.weight_norm(torch.nn.Linear(5, 3), dim=1),
    "weight_norm_none": lambda: _P.weight_norm(torch.nn.Linear(5, 3), dim=None),
    "weight_norm_conv": lambda: _P.weight_norm(torch.nn.Conv1d(5, 3, 3)),
    "weight_norm_old": lambda: torch.nn.utils.weight_norm(torch.nn.Linear(5, 3)),
    "spectral_norm": lambda: _P.spectral_norm(torch.nn.Linear(5, 3)),
    "spectral_norm_conv": lambda: _P.spectral_norm(torch.nn.Conv1d(5, 3, 3)),
    "spectral_norm_old": lambda: torch.nn.utils.spectral_norm(torch.nn.Linear(5, 3)),
    "orthogonal_matrix_exp": lambda: _P.orthogonal(torch.nn.Linear(5, 5),
                                                   orthogonal_map="matrix_exp"),
    "orthogonal_cayley": lambda: _P.orthogonal(torch.nn.Linear(5, 5), orthogonal_map="cayley"),
    "orthogonal_householder": lambda: _P.orthogonal(torch.nn.Linear(5, 3),
                                                    orthogonal_map="householder"),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.nn.utils.weight_norm's deprecation
@pytest.mark.parametrize("name", sorted(_REPARAM))
def test_reparametrized_per_sample_grads_match_loop_without_fallback(name):
    model = _REPARAM[name]().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    start = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randn((4, 5, 7) if "conv" in name else (4, 5), dtype=torch.float64)

    def loss(params, buffers, x):
        return ftrans.functional_call(model, (params, buffers), (x,)).pow(2).sum()

    buffers = {k: v.clone() for k, v in start.items()}
    with no_fallback():
        grads = ftrans.vmap(ftrans.grad(loss), in_dims=(None, None, 0))(params, buffers, x)
    for i in range(x.shape[0]):
        ref_buffers = {k: v.clone() for k, v in start.items()}
        ref = torch.func.grad(loss)(params, ref_buffers, x[i])
        for k in params:
            torch.testing.assert_close(grads[k][i], ref[k], atol=1e-8, rtol=1e-6)
    for k in start:  # one forward's buffer update, as in eager (not one per example)
        torch.testing.assert_close(buffers[k], ref_buffers[k], atol=1e-10, rtol=0)


@pytest.mark.parametrize("dim", [0, 1])
def test_weight_norm_ensemble_grads_match_loop_without_fallback(dim):
    # Stacked members (v and g batched), each with its own input: forward and backward.
    model = _P.weight_norm(torch.nn.Linear(5, 3), dim=dim).double()
    members = [{k: v.detach() + 0.1 * i for k, v in model.named_parameters()} for i in range(3)]
    stacked = {k: torch.stack([m[k] for m in members]) for k in members[0]}
    x = torch.randn(3, 2, 5, dtype=torch.float64)

    def loss(params, x):
        return ftrans.functional_call(model, params, (x,)).pow(2).sum()

    with no_fallback():
        grads = ftrans.vmap(ftrans.grad(loss))(stacked, x)
    for i in range(3):
        ref = torch.func.grad(loss)(members[i], x[i])
        for k in ref:
            torch.testing.assert_close(grads[k][i], ref[k], atol=1e-8, rtol=1e-6)
