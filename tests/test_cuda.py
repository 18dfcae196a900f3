"""CUDA checks (skipped without a GPU): results, autograd device threads, CUDA-graph replay.

Run on a GPU machine with ``bash benchmarks/run_gpu.sh`` (which also runs the benchmarks).
"""

import pytest
import torch
import torch.nn.functional as F

import ftrans
from _helpers import no_fallback, run_in_threads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _per_sample_grads(device):
    """(vmap(grad(loss)) of the benchmark MLP, its parameters) on ``device``."""
    from benchmarks import models

    model, _, _ = models.make("mlp", device)  # seeded: the same weights on any device
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xb, yb):
        return F.cross_entropy(ftrans.functional_call(model, p, (xb[None],)), yb[None])

    return ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0, 0)), params


def test_per_sample_grads_on_cuda_match_cpu():
    f, params = _per_sample_grads("cuda")
    x = torch.randn(16, 784, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    with no_fallback():
        g = f(params, x, y)
    f_cpu, params_cpu = _per_sample_grads("cpu")
    ref = f_cpu(params_cpu, x.cpu(), y.cpu())
    for k in g:
        torch.testing.assert_close(g[k].cpu(), ref[k], atol=1e-4, rtol=1e-4)


def test_backward_on_autograd_device_threads():
    # .backward() of CUDA tensors runs on autograd's device thread (pitfall 7): dispatch must
    # work from the tensors' tags alone, and captured parameters get plain summed grads.
    w = torch.randn(8, device="cuda", requires_grad=True)
    x = torch.randn(5, 8, device="cuda")
    out = ftrans.vmap(lambda t: (t * w).sin().sum())(x)
    out.sum().backward()
    ref_w = w.detach().clone().requires_grad_()
    (x * ref_w).sin().sum().backward()
    assert type(w.grad) is torch.Tensor
    torch.testing.assert_close(w.grad, ref_w.grad)


def test_threads_on_cuda():
    def work(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(4, 3, device="cuda", generator=g)
        got = ftrans.vmap(ftrans.grad(lambda t: (t ** 3).sum()))(x)
        torch.testing.assert_close(got, 3 * x ** 2)

    run_in_threads(work, 4)


def test_compile_with_cuda_graph_replay():
    f, params = _per_sample_grads("cuda")
    cf = ftrans.compile(f)  # CUDA inputs, none requiring grad: CUDA graph by default
    x = torch.randn(32, 784, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    eager = f(params, x, y)
    for _ in range(3):
        got = cf(params, x, y)
    (entry,) = cf.cache.values()
    assert type(entry.runner).__name__ == "_CudaGraphReplay"
    for k in eager:
        torch.testing.assert_close(got[k], eager[k], atol=1e-4, rtol=1e-4)
    x2 = torch.randn(32, 784, device="cuda")
    eager2 = f(params, x2, y)
    got2 = cf(params, x2, y)  # new values, same signature: replay sees them
    for k in eager2:
        torch.testing.assert_close(got2[k], eager2[k], atol=1e-4, rtol=1e-4)


def test_fast_path_and_pooling_on_cuda():
    # The torch-function fast path with CUDA values (learned per device), and max pooling,
    # whose channels-last detour is CPU-only.
    x = torch.randn(6, 3, 8, 8, device="cuda")

    def f(t):
        return F.max_pool2d((t * 1.5 + 0.25).sin(), 2)

    for _ in range(2):
        got = ftrans.vmap(f)(x)
    torch.testing.assert_close(got, torch.stack([f(t) for t in x]))
    assert got.device.type == "cuda" and got.is_contiguous()


def test_compile_on_cuda_without_graphs_allocates_fresh_outputs():
    f, params = _per_sample_grads("cuda")
    x = torch.randn(8, 784, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    cf = ftrans.compile(f, cuda_graph=False)
    first = cf(params, x, y)
    second = cf(params, x * 2, y)
    torch.testing.assert_close(first, f(params, x, y))
    torch.testing.assert_close(second, f(params, x * 2, y))
    runner = next(iter(cf.cache.values())).runner
    assert isinstance(runner, torch.fx.GraphModule)  # the output pool is CPU-only


def test_cuda_graph_warmup_and_capture_apply_state_updates_once():
    # Warm-up runs (and the capture) execute the graph's in-place updates: a BatchNorm's running
    # statistics and counter, an EMA the function closes over. After every call they must be
    # exactly what the same number of eager calls leaves.
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)).cuda()
    model.requires_grad_(False)
    ema = torch.zeros(8, device="cuda")
    twin, twin_ema = copy.deepcopy(model), ema.clone()

    def make(m, e):
        def step(x):
            out = m(x)
            e.mul_(0.5).add_(out.mean(0))
            return out
        return step

    cf = ftrans.compile(make(model, ema), cuda_graph=True)
    eager = make(twin, twin_ema)
    for i in range(3):
        x = torch.randn(16, 8, device="cuda")
        torch.testing.assert_close(cf(x), eager(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dict(model.named_buffers()), dict(twin.named_buffers()))
        torch.testing.assert_close(ema, twin_ema, atol=1e-5, rtol=1e-5)
    (sig,) = cf.cache.values()
    assert type(sig.runner).__name__ == "_CudaGraphReplay"
    assert int(model[1].num_batches_tracked) == 3


def test_cuda_graph_replay_updates_inputs_in_place_like_eager():
    def f(x, acc):
        acc.add_(x.sum(0))
        return acc * 2

    cf = ftrans.compile(f, cuda_graph=True)
    acc, ref = torch.zeros(4, device="cuda"), torch.zeros(4, device="cuda")
    for _ in range(3):
        x = torch.randn(5, 4, device="cuda")
        torch.testing.assert_close(cf(x, acc), f(x, ref))
        torch.testing.assert_close(acc, ref)


def test_cuda_graph_replay_with_check_and_guards():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)).cuda()
    model.requires_grad_(False)
    cf = ftrans.compile(lambda x: model(x), check=True)
    x = torch.randn(4, 8, device="cuda")
    cf(x)
    model.eval()  # guarded: a new trace without dropout
    torch.testing.assert_close(cf(x), model(x))


def test_cuda_graph_replay_takes_python_number_arguments_as_inputs():
    # A learning rate passed as a Python number becomes a 0-dim CUDA input of the graph: a new
    # value each call must be seen (a CPU scalar would be frozen into the graph at capture).
    w = torch.randn(4, device="cuda")
    cf = ftrans.compile(lambda x, lr: x - lr * w, cuda_graph=True)
    x = torch.randn(4, device="cuda")
    for i in range(5):
        lr = 0.5 / (i + 1)
        torch.testing.assert_close(cf(x, lr), x - lr * w)
    (sig,) = cf.cache.values()
    assert len(sig.entries) == 2


def test_dpsgd_with_a_cuda_generator_draws_on_the_gpu():
    """A CUDA generator seeds a noise generator on the GPU: the noise is drawn there, into the
    sums, with the same numbers as a whole draw (prefetching is for CPU noise only)."""
    from ftrans.dp import DPSGD
    from ftrans.dp import dpsgd as D

    def lin(p, x):
        return (p["w"] @ x).sum()

    w = {"w": torch.zeros(300, 500, device="cuda")}
    gen = torch.Generator(device="cuda").manual_seed(3)
    dp = DPSGD(lin, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, num_examples=2,
               accountant=None, generator=gen)
    assert dp._noise_gen.device.type == "cuda"
    out = dp.step(w, torch.zeros(0, 500, device="cuda"))["w"]
    assert out.device.type == "cuda" and dp._pending is None
    assert abs(out.std().item() - 1.0) < 0.05
    g = torch.zeros(300, 500, device="cuda")
    got = D._add_normal(g, 0.5, torch.Generator(device="cuda").manual_seed(1))
    whole = D._draw((0.5, ((300, 500), torch.float32)),
                    torch.Generator(device="cuda").manual_seed(1))[0]
    assert got is g and torch.equal(got, whole)
    dp.close()
