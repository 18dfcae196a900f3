"""chunk_size="auto" and memory_budget= on vmap/jacrev/jacfwd/hessian: equal to the unchunked
result, the chosen chunk keeps the peak of live tensors under a small CPU budget, the choice
is cached, and an out-of-memory chunk is halved and retried."""
import pytest
import torch

import ftrans
from ftrans._chunking import AutoChunk, _PeakMemory

D = torch.float64


def _wide(v, w):
    return torch.tanh(v[:, None] * w).sum(0)  # a [256, 1024] workspace per example


def test_vmap_auto_and_budget_equal_unchunked():
    x, w = torch.randn(40, 256, dtype=D), torch.randn(256, 64, dtype=D)
    ref = ftrans.vmap(_wide, in_dims=(0, None))(x, w)
    for kw in ({"chunk_size": "auto"}, {"memory_budget": 1 << 20}, {"memory_budget": 0.5}):
        out = ftrans.vmap(_wide, in_dims=(0, None), **kw)(x, w)
        torch.testing.assert_close(out, ref)
    # out_dims, pytree outputs, randomness='same' across chunks
    f = ftrans.vmap(lambda v: (v * 2, {"s": v.sum() + torch.rand(())}), out_dims=(1, 0),
                    randomness="same", memory_budget=1 << 12)
    torch.manual_seed(1)
    a, b = f(x)
    torch.manual_seed(1)
    a0, b0 = ftrans.vmap(lambda v: (v * 2, {"s": v.sum() + torch.rand(())}), out_dims=(1, 0),
                         randomness="same")(x)
    torch.testing.assert_close(a, a0)
    torch.testing.assert_close(b["s"], b0["s"])


def test_small_budget_bounds_the_peak_on_cpu():
    x, w = torch.randn(64, 256), torch.randn(256, 1024)
    budget = 8 << 20
    unchunked = _PeakMemory()
    with unchunked:
        ref = ftrans.vmap(_wide, in_dims=(0, None))(x, w)
    assert unchunked.peak > 4 * budget  # without a budget the workspace is far larger
    auto = AutoChunk(budget)
    for _ in range(2):  # the second call reuses the cached chunk (no probes)
        meter = _PeakMemory()
        with meter:
            out = ftrans.vmap(_wide, in_dims=(0, None), chunk_size=auto)(x, w)
        assert meter.peak <= budget, (meter.peak, auto.last)
        torch.testing.assert_close(out, ref)
    chunk, model = auto.last
    assert 1 <= chunk < 64 and model is None and len(auto.cache) == 1


def test_jacobians_auto_and_budget():
    w1, w2 = torch.randn(64, 32, dtype=D) / 5, torch.randn(128, 64, dtype=D) / 5
    f = lambda v: w2 @ torch.tanh(w1 @ v)  # noqa: E731
    v = torch.randn(32, dtype=D)
    ref = ftrans.jacrev(f)(v)
    torch.testing.assert_close(ftrans.jacrev(f, chunk_size="auto")(v), ref)
    torch.testing.assert_close(ftrans.jacrev(f, memory_budget=1 << 16)(v), ref)
    torch.testing.assert_close(ftrans.jacfwd(f, chunk_size="auto")(v), ref)
    torch.testing.assert_close(ftrans.jacfwd(f, memory_budget=1 << 16)(v), ref)
    g = lambda v: (torch.tanh(w1 @ v) ** 2).sum()  # noqa: E731
    h = ftrans.hessian(g)(v)
    torch.testing.assert_close(ftrans.hessian(g, chunk_size=5)(v), h)
    torch.testing.assert_close(ftrans.hessian(g, chunk_size="auto")(v), h)
    torch.testing.assert_close(ftrans.hessian(g, memory_budget=1 << 14)(v), h)
    torch.testing.assert_close(h, torch.func.hessian(g)(v))


def test_out_of_memory_chunk_is_halved_and_retried():
    auto = AutoChunk(1 << 30)
    auto.cache["k"] = 16
    seen = []

    def run_chunk(start, n):
        seen.append(n)
        if n > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return torch.arange(start, start + n)

    outs = auto.run(run_chunk, "k", 20, torch.device("cpu"))
    assert torch.equal(torch.cat(outs), torch.arange(20))
    assert seen[:3] == [16, 8, 4] and auto.cache["k"] == 4


def test_chunking_argument_errors():
    with pytest.raises(ValueError, match="memory_budget"):
        ftrans.vmap(torch.sin, memory_budget=-1)
    with pytest.raises(ValueError, match="memory_budget"):
        ftrans.jacrev(torch.sin, memory_budget=1.5)
    with pytest.raises(ValueError, match="either chunk_size"):
        ftrans.vmap(torch.sin, chunk_size=4, memory_budget=1 << 20)
    with pytest.raises(ValueError, match="chunk_size"):
        ftrans.vmap(torch.sin, chunk_size="big")
