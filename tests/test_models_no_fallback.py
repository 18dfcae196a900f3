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
