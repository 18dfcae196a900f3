"""The DP-SGD layer: bucketing and masking (padded examples contribute exactly 0), few traces
under ftrans.compile over a Poisson epoch, Gaussian noise of the right scale, accounting."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ftrans
from ftrans.dp import DPSGD, bucket_size, pad_batch, poisson_batches


def _setup(n=400):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(ftrans.functional_call(model, p, (x,)), y)
    return params, loss, torch.randn(n, 8), torch.randint(0, 3, (n,))


def test_bucket_size_ladder():
    assert [bucket_size(s, 64) for s in (1, 64, 65, 96, 97, 128, 129, 300)] == \
        [64, 64, 96, 96, 128, 128, 256, 512]
    assert bucket_size(0, 0.2) == 1


def test_padding_contributes_exactly_zero():
    params, loss, X, Y = _setup()
    clip = ftrans.clipped_grad(loss, 0.5)
    x, y = X[:13], Y[:13]
    (px, py), w = pad_batch((x, y), (0, 0), 20)
    assert w.tolist() == [1.0] * 13 + [0.0] * 7
    padded = clip(params, px, py, sample_weights=w)
    # other (finite) content in the padded slots: bitwise the same result
    px2, py2 = px.clone(), py.clone()
    px2[13:], py2[13:] = X[100:107], Y[100:107]
    padded2 = clip(params, px2, py2, sample_weights=w)
    plain = clip(params, x, y)
    for k in plain:
        assert torch.equal(padded[k], padded2[k])
        torch.testing.assert_close(padded[k], plain[k], rtol=1e-6, atol=1e-7)


def test_epoch_of_poisson_batches_traces_at_most_three_times():
    params, loss, X, Y = _setup(1000)
    dp = DPSGD(loss, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.05, num_examples=1000,
               compile=True, accountant=None, generator=torch.Generator().manual_seed(0))
    sizes = set()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ftrans.CompileWarning)
        for idx in poisson_batches(1000, 0.05, generator=torch.Generator().manual_seed(1)):
            sizes.add(len(idx))
            g = dp.step(params, X[idx], Y[idx])
            params = {k: v - 0.05 * g[k] for k, v in params.items()}
    assert len(sizes) > 5 and dp.steps == 20
    assert 1 <= dp.traces <= 3


def test_no_noise_is_the_scaled_clipped_sum_and_noise_has_the_right_scale():
    params, loss, X, Y = _setup()
    x, y = X[:30], Y[:30]
    clean = DPSGD(loss, max_norm=0.5, noise_multiplier=0.0, sample_rate=0.1, num_examples=400,
                  accountant=None).step(params, x, y)
    ref = ftrans.clipped_grad(loss, 0.5)(params, x, y)
    for k in ref:
        torch.testing.assert_close(clean[k], ref[k] / 40.0)
    big = {"w": torch.zeros(200, 50)}

    def lin(p, x):
        return (p["w"] @ x).sum()
    dp = DPSGD(lin, max_norm=2.0, noise_multiplier=1.5, sample_rate=0.5, num_examples=8,
               accountant=None, generator=torch.Generator().manual_seed(3))
    xs = torch.randn(4, 50)
    noisy = dp.step(big, xs)["w"] * 4.0
    exact = ftrans.clipped_grad(lin, 2.0)(big, xs)["w"]
    std = (noisy - exact).std().item()
    assert abs(std - 3.0) < 0.1, std
    again = DPSGD(lin, max_norm=2.0, noise_multiplier=1.5, sample_rate=0.5, num_examples=8,
                  accountant=None, generator=torch.Generator().manual_seed(3)).step(big, xs)
    assert torch.equal(again["w"] * 4.0, noisy)


def test_empty_batch_is_noise_only():
    params, loss, X, Y = _setup()
    dp = DPSGD(loss, max_norm=1.0, noise_multiplier=0.0, sample_rate=0.01, num_examples=400,
               accountant=None)
    g = dp.step(params, X[:0], Y[:0])
    assert all(torch.equal(v, torch.zeros_like(v)) for v in g.values())


def test_accountant_matches_opacus():
    opacus = pytest.importorskip("opacus")
    params, loss, X, Y = _setup()
    dp = DPSGD(loss, max_norm=1.0, noise_multiplier=1.1, sample_rate=0.05, num_examples=400)
    for idx in poisson_batches(400, 0.05, steps=5, generator=torch.Generator().manual_seed(0)):
        dp.step(params, X[idx], Y[idx])
    ref = opacus.accountants.RDPAccountant()
    for _ in range(5):
        ref.step(noise_multiplier=1.1, sample_rate=0.05)
    assert dp.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5))
    assert 0 < dp.epsilon(1e-5) < 10


def test_refuses_non_private_batchnorm_and_bad_arguments():
    params, loss, X, Y = _setup()
    with pytest.raises(ValueError, match="not differentially private"):
        DPSGD(loss, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.1, num_examples=10,
              batch_norm="batch", accountant=None)
    with pytest.raises(ValueError, match="sample_rate"):
        DPSGD(loss, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.0, num_examples=10,
              accountant=None)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPSGD(loss, max_norm=1.0, noise_multiplier=-1.0, sample_rate=0.1, num_examples=10,
              accountant=None)


def _noise_only_steps(dp, w, n):
    return [dp.step(w, torch.zeros(0, 50))["w"].clone() for _ in range(n)]


def _lin(p, x):
    return (p["w"] @ x).sum()


def test_prefetched_noise_is_the_same_sequence_each_draw_used_once():
    """The next step's noise is drawn ahead in a worker thread: the sequence is the one drawn
    inline (a seeded run does not depend on the threads' timing), consecutive steps never share
    a draw, and the caller's generator is read once, at construction."""
    w = {"w": torch.zeros(20, 50)}
    runs = []
    for prefetch in (True, False):
        gen = torch.Generator().manual_seed(5)
        dp = DPSGD(_lin, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, num_examples=2,
                   accountant=None, generator=gen, prefetch_noise=prefetch)
        state = gen.get_state()
        runs.append(_noise_only_steps(dp, w, 4))
        assert torch.equal(gen.get_state(), state)  # the worker draws from its own generator
        dp.close()
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    for i in range(4):
        for j in range(i):
            assert not torch.equal(runs[0][i], runs[0][j])


def test_prefetched_noise_follows_a_changed_multiplier_and_shape():
    gen = torch.Generator().manual_seed(7)
    dp = DPSGD(_lin, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, num_examples=2,
               accountant=None, generator=gen)
    w = {"w": torch.zeros(100, 50)}
    first = dp.step(w, torch.zeros(0, 50))["w"]  # noise only, scale 1 / expected = 1
    assert abs(first.std().item() - 1.0) < 0.05
    dp.noise_multiplier = 3.0  # the draw made ahead at std 1 must not be used
    second = dp.step(w, torch.zeros(0, 50))["w"]
    assert abs(second.std().item() - 3.0) < 0.15
    other = dp.step({"w": torch.zeros(7, 50)}, torch.zeros(0, 50))["w"]
    assert other.shape == (7, 50) and abs(other.std().item() - 3.0) < 0.6
    dp.close()
    dp.close()  # (twice is fine)
    again = dp.step(w, torch.zeros(0, 50))["w"]  # a closed object still steps (inline draws)
    assert again.shape == (100, 50)
    dp.close()


def test_inline_noise_is_written_into_the_sums_and_matches_a_whole_draw():
    """prefetch_noise=False draws into the clipped sums a chunk at a time (no parameter-sized
    buffer): the same numbers as a whole draw of the same generator state."""
    from ftrans.dp import dpsgd
    g = torch.randn(300, 500)  # 150 000 values: three chunks
    g0 = g.clone()
    out = dpsgd._add_normal(g, 0.7, torch.Generator().manual_seed(11))
    assert out is g
    whole = dpsgd._draw((0.7, ((300, 500), torch.float32)), torch.Generator().manual_seed(11))[0]
    assert torch.equal(out, g0 + whole)
    t = torch.randn(500, 300).t()  # not contiguous: a new tensor, the same numbers
    t0 = t.clone()
    out = dpsgd._add_normal(t, 0.7, torch.Generator().manual_seed(11))
    assert out is not t and torch.equal(t, t0) and torch.equal(out, t0 + whole)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_never_reuses_the_parents_draw():
    """The noise worker is a thread: a forked child does not have it, and the draw made ahead
    for the parent's next step is copied into the child's memory. The child starts afresh
    with a generator of its own: the parent's and the child's next noise differ (the same
    noise added by two processes would undo part of the privacy)."""
    import os
    import select
    import signal
    w = {"w": torch.zeros(20, 50)}
    dp = DPSGD(_lin, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, num_examples=2,
               accountant=None, generator=torch.Generator().manual_seed(5))
    _noise_only_steps(dp, w, 1)
    dp._pending[1].result()  # (fork with no draw in flight: torch is not fork-safe mid-op)
    r, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one step; is its noise the parent's prefetched draw?
        try:
            parents = dp._pending[1].result()[0].clone()
            mine = _noise_only_steps(dp, w, 1)[0]
            os.write(wfd, b"0" if torch.equal(mine, parents) else b"1")
        finally:
            os._exit(0)
    os.close(wfd)
    ready, _, _ = select.select([r], [], [], 30)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert ready and os.read(r, 1) == b"1"
    dp.close()


def test_the_noise_generator_lives_on_the_callers_generator_device():
    """Seeded from ``generator`` on its own device (tests/test_cuda.py checks a CUDA one)."""
    dp = DPSGD(_lin, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, num_examples=2,
               accountant=None, generator=torch.Generator().manual_seed(0))
    assert dp._noise_gen.device == torch.device("cpu")
    a = DPSGD(_lin, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.5, num_examples=2,
              accountant=None)
    assert a._noise_gen.device == torch.device("cpu")


def test_noise_drawn_ahead_takes_the_clipped_sum_in_place():
    """With the noise drawn ahead, the clipped sum is added into the noise buffers (add_to=:
    no buffer of its own); the result is the inline path's (the same noise, drawn into the
    sums after they are formed) up to rounding."""
    params, loss, X, Y = _setup()
    outs, seen = {}, {}
    for prefetch in (True, False):
        dp = DPSGD(loss, max_norm=1.0, noise_multiplier=0.5, sample_rate=0.05, num_examples=400,
                   accountant=None, generator=torch.Generator().manual_seed(3),
                   prefetch_noise=prefetch)
        inner, calls = dp._clipped, []

        def spy(*args, _inner=inner, _calls=calls, **kwargs):
            out = _inner(*args, **kwargs)
            _calls.append(kwargs.get("add_to"))
            return out
        dp._clipped = spy
        outs[prefetch] = [dp.step(params, X[i * 20:(i + 1) * 20], Y[i * 20:(i + 1) * 20])
                          for i in range(3)]
        seen[prefetch] = calls
        dp.close()
    assert all(a is None for a in seen[False])
    for add_to, out in zip(seen[True], outs[True]):  # the buffers are the results
        assert add_to is not None and all(add_to[k] is out[k] for k in out)
    for a, b in zip(outs[True], outs[False]):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(outs[True][0]["0.weight"], outs[True][1]["0.weight"])
