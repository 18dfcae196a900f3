"""Memory of the clipped step: the spans that bound its temporaries are exact, and its peak of
live tensors stays near the non-private step's (deterministic: counted on the aten graph)."""
import functools

import pytest
import torch

import ftrans
from ftrans.dp import factors
from ftrans.dp.factors import Outer, Rows, spans

import test_clipping as tc
import test_clipping_bag_convt as tb


@pytest.fixture
def tiny_spans(monkeypatch):
    """Every Outer temporary split over as many spans as allowed (8)."""
    monkeypatch.setattr(Outer, "MIN_SPAN_BYTES", 1)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    ftrans.reset_norm_rule_stats()
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("test", [
    tc.test_mlp, tc.test_cnn_groupnorm, tc.test_conv1d_instancenorm_and_conv3d_layernorm,
    tc.test_weight_shared_across_time_steps, tc.test_embedding_model_tied_weights,
    tc.test_matmul_bmm_addmm_parameters,
    functools.partial(tc.test_inside_vmap_over_models, 8),
    tc.test_dots_and_cross_batch_attribution, tc.test_conv_configs,
    tb.test_conv_transpose_modules, tb.test_conv_transpose_configs,
], ids=lambda f: getattr(f, "__name__", "test_inside_vmap_over_models"))
@pytest.mark.filterwarnings("ignore:There is a performance drop")  # the torch.func oracle
def test_exact_when_split_over_spans(tiny_spans, test):
    test()


def test_spans_cover_the_batch():
    assert spans(0, 10, 1) == [(0, 0)] and spans(1, 10, 1) == [(0, 1)]
    for B, nbytes, budget in [(7, 100, 30), (256, 1 << 20, 1), (5, 10, 100), (64, 64, 8)]:
        s = spans(B, nbytes, budget)
        assert s[0][0] == 0 and s[-1][1] == B and len(s) <= 8
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(s, s[1:]))


def test_rows_are_built_per_span(tiny_spans):
    """A lazily unfolded operand is asked for pieces, never for the whole batch, on the
    instantiated path; the blocks equal the eager outer products."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 1, 50, 3, generator=gen)
    g = torch.randn(6, 1, 50, 2, generator=gen)
    asked = []

    def rows(lo, hi):
        asked.append((lo, hi))
        return a[lo:hi]

    f = Outer(Rows(rows, a.shape, a.dtype), g, (2, 3))
    assert not f.use_ghost()
    tc.close(f.norm2(), (g.mT @ a).flatten(1).square().sum(1))
    assert len(asked) > 1 and all(hi - lo < 6 for lo, hi in asked)
    c = torch.rand(6, generator=gen)
    tc.close(f.weighted(c), torch.einsum("b,bpd->pd", c, (g.mT @ a)[:, 0]))


@pytest.mark.parametrize("name,bound", [("mlp-a3", 1.02), ("cnn", 1.05), ("transformer", 1.22)])
def test_graph_peak_near_the_nonprivate_step(name, bound):
    """The clipped step's peak of live tensors (its aten graph run in order, storages freed
    after their last use) against the non-private step's: 1.33x for both before the clipped
    sums were ordered and split, the bias sums made views and conv unfolds built per span;
    1.06x / 1.15x / 1.29x before long-row layers were instantiated during the backward."""
    from benchmarks import dp
    peaks = dp.graph_peak_mb(name, dp.SIZES[name])
    assert peaks["clipped"] <= bound * peaks["nonprivate"], peaks


def test_factor_helpers_exported():
    assert factors.Rows is Rows and "Rows" in factors.__all__


def _alive_batched():
    import gc
    from ftrans._C.batched import BatchedTensor
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is BatchedTensor)


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    ftrans.reset_norm_rule_stats()
    yield
    torch.set_default_dtype(old)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_calls_leave_nothing_behind(f64):
    """A tap's gradient hook lives in the autograd node of the output it watches, out of the
    garbage collector's sight: the taps must let go of the outputs, gradients and saved
    inputs, or every eager call kept its batch's activations alive (3 MiB per step on the A.3
    MLP)."""
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(3 * 4 * 4, 2))
    p = {k: v.detach() for k, v in cnn.named_parameters()}
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 2, (4,))

    def loss(p, x, y):
        out = ftrans.functional_call(cnn, p, (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, y.unsqueeze(0)) + p["3.bias"].exp().sum()

    ftrans.clipped_grad(loss, 1.0)(p, x, y)
    base = _alive_batched()
    for _ in range(3):
        ftrans.clipped_grad(loss, 1.0)(p, x, y)
        ftrans.per_sample_grad_norms(loss)(p, x, y)
    ftrans.reset_norm_rule_stats()  # (the exp() above is a counted fallback)
    tb.test_embedding_bag_module("max", 1, False)
    tc.test_unused_output()  # the unreached-output rerun
    assert _alive_batched() == base == 0


def test_results_carry_no_graph_when_nothing_requires_grad(f64):
    """The saved inputs of all but the first layer hang off the capture's internal anchor: the
    clipped sums must come back detached, or a training loop's ``params - lr * g`` chains every
    step's graph (and its factor temporaries) to the next."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))

    def loss(p, x, y):
        out = ftrans.functional_call(model, p, (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, y.unsqueeze(0))

    g = ftrans.clipped_grad(loss, 0.5)(params, x, y)
    assert not any(v.requires_grad for v in g.values())
    assert not ftrans.per_sample_grad_norms(loss)(params, x, y).requires_grad
    dp = ftrans.dp.DPSGD(loss, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.5,
                         num_examples=6, accountant=None,
                         generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        g = dp.step(params, x, y)
        params = {k: v - 0.1 * g[k] for k, v in params.items()}
    assert not any(v.requires_grad or v.grad_fn is not None for v in params.values())


def test_factors_formed_in_the_backward_skip_dispatch_only_when_no_other_mode(
        f64, monkeypatch):
    """The factors formed as a gradient arrives (``capture._form_early``) run their plain-tensor
    ops without the Python dispatch hop when vmap's mode is the only one pushed; a user's (or a
    tracer's) dispatch mode still sees every one of them, and the result is the same."""
    from ftrans.dp import capture
    from _helpers import LogOps
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 16, 2)  # 16 rows per example: 2 T^2 > p d, instantiated in the backward

    def loss(p, x):
        return ftrans.functional_call(model, p, (x,)).square().sum()

    skipped, seen_in_form = [], []
    real_disable, real_form = capture._DisableTD, capture._form_early

    def disable():
        skipped.append(1)
        return real_disable()

    monkeypatch.setattr(capture, "_DisableTD", disable)
    ref = ftrans.clipped_grad(loss, 0.7)(params, x)
    assert skipped  # no other mode: the hop is skipped
    skipped.clear()
    with LogOps() as seen:
        def form(tap):
            n = len(seen)
            real_form(tap)
            seen_in_form.append(len(seen) - n)
        monkeypatch.setattr(capture, "_form_early", form)
        got = ftrans.clipped_grad(loss, 0.7)(params, x)
    assert not skipped and seen_in_form and all(n > 0 for n in seen_in_form)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    per = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0))(params, x)
    c = (0.7 / torch.cat([v.flatten(1) for v in per.values()], 1).norm(dim=1)).clamp(max=1)
    for k in ref:
        torch.testing.assert_close(ref[k], torch.einsum("b,b...->...", c, per[k]))
