"""vmap(randomness='error' | 'same' | 'different') for torch's random ops (ftrans/_C/random.py).

'same' must give identical draws for every example (also when the op's input is batched, as
long as the inputs are identical per example); 'different' must give independent draws and
refuse an in-place draw into an unbatched tensor; 'error' must raise naming the op.  Values
cannot be compared with a loop (the generator is consumed differently), so the tests check the
row structure, shapes, dtypes, supports of the distributions and reproducibility.
"""
import pytest
import torch
import torch.nn.functional as F

import ftrans
from ftrans._C import dispatch as fdispatch

B = 4

# name: (fn(x) for one example x of shape (3, 5), in-place?)  x is positive and < 1.
OPS = {
    "randn": (lambda x: torch.randn(3, 5), False),
    "rand": (lambda x: torch.rand(3, 5, dtype=torch.float64), False),
    "randint": (lambda x: torch.randint(0, 1000, (3, 5)), False),
    "randint_high": (lambda x: torch.randint(1000, (3, 5), dtype=torch.int32), False),
    "randperm": (lambda x: torch.randperm(20), False),
    "normal_float": (lambda x: torch.normal(0.0, 1.0, (3, 5)), False),
    "normal_mean": (lambda x: torch.normal(x, 1.0), False),
    "normal_std": (lambda x: torch.normal(0.0, x), False),
    "normal_both": (lambda x: torch.normal(x, x), False),
    "rand_like": (lambda x: torch.rand_like(x), False),
    "randn_like": (lambda x: torch.randn_like(x), False),
    "randint_like": (lambda x: torch.randint_like(x, 1000), False),
    "dropout": (lambda x: F.dropout(x, 0.5), False),
    "dropout_module": (lambda x: torch.nn.Dropout(0.5)(x), False),
    "dropout1d": (lambda x: F.dropout1d(x, 0.5), False),
    "dropout2d": (lambda x: F.dropout2d(x.view(1, 3, 5, 1), 0.5), False),
    "alpha_dropout": (lambda x: F.alpha_dropout(x, 0.5, True), False),
    "feature_alpha_dropout": (lambda x: F.feature_alpha_dropout(x.view(3, 5, 1), 0.5, True),
                              False),
    "bernoulli": (lambda x: torch.bernoulli(x), False),
    "bernoulli_p": (lambda x: torch.bernoulli(x, 0.5), False),
    "multinomial": (lambda x: torch.multinomial(x, 3), False),
    "multinomial_repl": (lambda x: torch.multinomial(x[0], 6, replacement=True), False),
    "poisson": (lambda x: torch.poisson(x * 10), False),
    "binomial": (lambda x: torch.binomial(x * 20, x), False),
    "standard_gamma": (lambda x: torch._standard_gamma(x * 3), False),
    "sample_dirichlet": (lambda x: torch._sample_dirichlet(x * 3), False),
    "bernoulli_": (lambda x: x.clone().bernoulli_(0.5), True),
    "bernoulli_tensor_": (lambda x: x.clone().bernoulli_(x), True),
    "uniform_": (lambda x: x.clone().uniform_(-1, 1), True),
    "normal_": (lambda x: x.clone().normal_(), True),
    "exponential_": (lambda x: x.clone().exponential_(), True),
    "random_": (lambda x: x.clone().random_(0, 1000), True),
    "cauchy_": (lambda x: x.clone().cauchy_(), True),
    "log_normal_": (lambda x: x.clone().log_normal_(), True),
    "geometric_": (lambda x: x.clone().geometric_(0.3), True),
}


def example():
    return torch.rand(3, 5) * 0.8 + 0.1


def rows_equal(out):
    return all(torch.equal(out[0], out[i]) for i in range(1, out.shape[0]))


def rows_distinct(out):
    """Every pair of examples differs somewhere."""
    return all(not torch.equal(out[i], out[j]) for i in range(out.shape[0])
               for j in range(i + 1, out.shape[0]))


def call(fn, mode, x_batched, x0=None, **kw):
    """vmap(fn) over B examples: the op's input batched (identical examples) or unbatched (the
    batch comes from a dummy mapped argument)."""
    x0 = example() if x0 is None else x0
    if x_batched:
        xs = x0.expand(B, *x0.shape).clone()
        return ftrans.vmap(fn, randomness=mode, **kw)(xs)
    return ftrans.vmap(lambda d: _touch(fn(x0), d), randomness=mode, **kw)(torch.zeros(B))


def _touch(out, d):
    """Make ``out`` depend on the mapped dummy without changing it (so it comes out batched)."""
    return out + (d * 0).to(out.dtype)


@pytest.mark.parametrize("name", sorted(OPS))
def test_error_mode_raises_naming_op(name):
    fn, _ = OPS[name]
    for batched in (True, False):
        with pytest.raises(RuntimeError, match="called random operation while in randomness "
                           "error mode.*aten::"):
            call(fn, "error", batched)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("batched", [True, False])
def test_same(name, batched):
    fn, _ = OPS[name]
    x0 = example()
    torch.manual_seed(1)
    expected = fn(x0)
    out = call(fn, "same", batched, x0)
    assert out.shape == (B,) + expected.shape
    assert out.dtype == expected.dtype
    assert rows_equal(out), "randomness='same' gave different draws per example"


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("batched", [True, False])
def test_different(name, batched):
    fn, inplace = OPS[name]
    x0 = example()
    expected = fn(x0)
    if inplace and not batched:
        with pytest.raises(RuntimeError, match="inplace randomness on an unbatched"):
            call(fn, "different", batched, x0)
        return
    out = call(fn, "different", batched, x0)
    assert out.shape == (B,) + expected.shape
    assert out.dtype == expected.dtype
    assert rows_distinct(out), "randomness='different' repeated a draw across examples"


@pytest.mark.parametrize("mode", ["same", "different"])
@pytest.mark.parametrize("name", ["randn", "dropout", "bernoulli", "normal_both", "uniform_",
                                  "multinomial", "randperm", "poisson"])
def test_reproducible_under_manual_seed(name, mode):
    fn, _ = OPS[name]
    x0 = example()
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(call(fn, mode, True, x0))
    assert torch.equal(outs[0], outs[1])


def test_supports_of_distributions():
    # per-example different probabilities: the values must respect each example's p
    p = torch.tensor([[0.0, 1.0, 0.5]] * B)
    p[1] = torch.tensor([1.0, 0.0, 0.5])
    for mode in ("same", "different"):
        out = ftrans.vmap(torch.bernoulli, randomness=mode)(p)
        assert torch.equal(out[:, :2], p[:, :2])
        out = ftrans.vmap(lambda q: q.clone().bernoulli_(q), randomness=mode)(p)
        assert torch.equal(out[:, :2], p[:, :2])
        probs = torch.tensor([[0.0, 1.0, 0.0, 2.0]] * B)
        s = ftrans.vmap(lambda q: torch.multinomial(q, 2), randomness=mode)(probs)
        assert torch.equal(s.sort(-1).values, torch.tensor([[1, 3]] * B))
        s = ftrans.vmap(lambda q: torch.multinomial(q, 50, True), randomness=mode)(probs)
        assert set(s.unique().tolist()) <= {1, 3}
        mean = torch.arange(B, dtype=torch.float32)[:, None].expand(B, 1000)
        z = ftrans.vmap(lambda m: torch.normal(m, 0.01), randomness=mode)(mean)
        torch.testing.assert_close(z.mean(1), torch.arange(B, dtype=torch.float32), atol=0.01,
                                   rtol=0)


def test_same_batched_shares_noise():
    # 'same' with different per-example inputs: one noise draw, applied to each example.
    x = torch.rand(B, 3, 5) + 0.5
    out = ftrans.vmap(lambda t: F.dropout(t, 0.5), randomness="same")(x)
    mask = out != 0
    assert all(torch.equal(mask[0], mask[i]) for i in range(B))
    torch.testing.assert_close(out, x * mask * 2)
    z = ftrans.vmap(lambda m: torch.normal(m, 2.0), randomness="same")(x)
    noise = (z - x) / 2
    torch.testing.assert_close(noise, noise[:1].expand_as(noise))


def test_randperm_rows_are_permutations():
    out = ftrans.vmap(lambda d: torch.randperm(10) + 0 * d.long(), randomness="different")(
        torch.zeros(B))
    assert torch.equal(out.sort(-1).values, torch.arange(10).expand(B, 10))


def test_different_multinomial_2d_unbatched_probs():
    probs = torch.rand(3, 6)
    out = ftrans.vmap(lambda d: torch.multinomial(probs, 2) + 0 * d.long(),
                      randomness="different")(torch.zeros(B))
    assert out.shape == (B, 3, 2)
    assert rows_distinct(out)


def test_generator_argument():
    for mode, check in (("same", rows_equal), ("different", rows_distinct)):
        g = torch.Generator().manual_seed(5)
        out = ftrans.vmap(lambda d: torch.rand(4, generator=g) + d, randomness=mode)(
            torch.zeros(B))
        assert check(out)
        g.manual_seed(5)
        again = ftrans.vmap(lambda d: torch.rand(4, generator=g) + d, randomness=mode)(
            torch.zeros(B))
        assert torch.equal(out, again)


def test_inplace_into_unbatched():
    buf = torch.zeros(5)
    with pytest.raises(RuntimeError, match="inplace randomness on an unbatched"):
        ftrans.vmap(lambda d: buf.uniform_() + d, randomness="different")(torch.zeros(B))
    out = ftrans.vmap(lambda d: buf.uniform_() + d, randomness="same")(torch.zeros(B))
    assert rows_equal(out)
    torch.testing.assert_close(out[0], buf)
    # an in-place draw into an unbatched tensor from a batched probability tensor cannot fit
    with pytest.raises(RuntimeError, match="not batched"):
        ftrans.vmap(lambda p: buf.bernoulli_(p), randomness="same")(torch.rand(B, 5))


def test_eval_dropout_needs_no_randomness():
    x = torch.randn(B, 3)
    torch.testing.assert_close(ftrans.vmap(lambda t: F.dropout(t, 0.5, training=False))(x), x)
    m = torch.nn.Dropout(0.3).eval()
    torch.testing.assert_close(ftrans.vmap(m)(x), x)
    for mode in ("same", "different"):
        torch.testing.assert_close(ftrans.vmap(m, randomness=mode)(x), x)
        torch.testing.assert_close(ftrans.vmap(lambda t: F.dropout(t, 0.0), randomness=mode)(x),
                                   x)


@pytest.mark.parametrize("mode", ["same", "different"])
def test_dropout_gradient(mode):
    def f(x):
        x = x.detach().requires_grad_()
        y = F.dropout(x, 0.25)
        (g,) = torch.autograd.grad(y.sum(), x)
        return y, g

    x = torch.rand(B, 6) + 1
    y, g = ftrans.vmap(f, randomness=mode)(x)
    torch.testing.assert_close(g, (y != 0).float() / 0.75)
    y2, g2 = ftrans.vmap(f, randomness=mode)(torch.ones(B, 6))  # unbatched-looking data
    assert (rows_equal(g2) if mode == "same" else rows_distinct(g2))


def test_nested_levels_combine():
    x = torch.zeros(3, B)

    def inner_rand(t):
        return torch.rand(2) + t

    # outer different, inner same: varies along the outer batch only
    out = ftrans.vmap(ftrans.vmap(inner_rand, randomness="same"), randomness="different")(x)
    assert out.shape == (3, B, 2)
    for i in range(3):
        assert rows_equal(out[i])
    assert rows_distinct(out[:, 0])
    # outer same, inner different: varies along the inner batch only
    out = ftrans.vmap(ftrans.vmap(inner_rand, randomness="different"), randomness="same")(x)
    for i in range(1, 3):
        assert torch.equal(out[0], out[i])
    assert rows_distinct(out[0])
    # both different: all distinct
    out = ftrans.vmap(ftrans.vmap(inner_rand, randomness="different"),
                      randomness="different")(x)
    assert rows_distinct(out.reshape(3 * B, 2))
    # batched input at both levels, noise-transform ops
    for fn in (lambda t: F.dropout(t + 1, 0.5), lambda t: torch.bernoulli(t + 0.5),
               lambda t: t.clone().uniform_()):
        out = ftrans.vmap(ftrans.vmap(fn, randomness="same"), randomness="different")(
            torch.zeros(3, B, 8))
        for i in range(3):
            assert rows_equal(out[i])
        assert rows_distinct(out[:, 0])
    # inner 'error' under an outer 'different' still raises
    with pytest.raises(RuntimeError, match="random operation"):
        ftrans.vmap(ftrans.vmap(inner_rand), randomness="different")(x)


def test_chunk_size():
    x = torch.zeros(7)
    torch.manual_seed(3)
    full = ftrans.vmap(lambda t: torch.rand(3) + t, randomness="same")(x)
    torch.manual_seed(3)
    chunked = ftrans.vmap(lambda t: torch.rand(3) + t, randomness="same", chunk_size=3)(x)
    assert rows_equal(chunked)
    torch.testing.assert_close(chunked, full)
    out = ftrans.vmap(lambda t: torch.rand(3) + t, randomness="different", chunk_size=3)(x)
    assert out.shape == (7, 3) and rows_distinct(out)
    out = ftrans.vmap(lambda t: F.dropout(t + 1, 0.5), randomness="same", chunk_size=2)(
        torch.zeros(5, 10))
    assert rows_equal(out)


def test_mode_does_not_leak_after_exception():
    def boom(t):
        torch.rand(2)
        raise ValueError("user error")

    for mode, exc in (("error", RuntimeError), ("same", ValueError), ("different", ValueError)):
        with pytest.raises(exc):
            ftrans.vmap(boom, randomness=mode)(torch.zeros(B))
        assert torch._C._len_torch_dispatch_stack() == 0
        assert torch._C._len_torch_function_stack() == 0
        assert not getattr(fdispatch._tls, "active", False)
        assert not getattr(fdispatch._tls, "dropout", False)
        assert torch.rand(3).shape == (3,)  # random ops work again outside vmap
        assert F.dropout(torch.ones(8), 0.5).shape == (8,)
    # an error-mode vmap after a 'different' one is strict again
    with pytest.raises(RuntimeError, match="random operation"):
        ftrans.vmap(lambda t: torch.rand(2) + t)(torch.zeros(B))


def test_torch_func_messages():
    # Code written against torch.func matches these phrases (assertRaisesRegex).
    with pytest.raises(RuntimeError, match="called random operation while in randomness error "
                       "mode"):
        ftrans.vmap(torch.bernoulli)(torch.rand(B, 3))
    buf = torch.zeros(3)
    with pytest.raises(RuntimeError, match="there exists a Tensor `other` in extra_args that has "
                       "more elements than `self`"):
        ftrans.vmap(lambda p: buf.bernoulli_(p), randomness="different")(torch.rand(B, 3))
    with pytest.raises(RuntimeError, match="calling out variants"):
        ftrans.vmap(lambda d: torch.randn(3, out=buf) + d, randomness="same")(torch.zeros(B))
    with pytest.raises(RuntimeError, match="calling out variants"):
        ftrans.vmap(lambda d: torch.normal(buf, 1.0, out=buf) + d, randomness="different")(
            torch.zeros(B))
    assert torch.equal(buf, torch.zeros(3))


@pytest.mark.parametrize("mode", ["same", "different"])
def test_different_with_an_unbatched_argument_matches_the_expanded_call(mode):
    # 'different': the physical call sees every tensor expanded to the batch, so a kernel that
    # takes its output's shape from one argument (binomial's count) draws exactly what the eager
    # call on the expanded inputs draws.
    count, prob = torch.full((3, 5), 10.0), torch.rand(3, 5, B)
    torch.manual_seed(0)
    out = ftrans.vmap(lambda c, p: torch.binomial(c, p), in_dims=(None, -1),
                      randomness="different")(count, prob)
    torch.manual_seed(0)
    expected = torch.binomial(count.expand(B, 3, 5), prob.movedim(-1, 0))
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ["same", "different"])
def test_rrelu(mode):
    # torch.func refuses rrelu under vmap ("we do not yet support aten::rrelu"); ftrans batches it.
    x = torch.randn(B, 200)
    torch.testing.assert_close(ftrans.vmap(torch.rrelu, randomness=mode)(x), torch.rrelu(x))
    out = ftrans.vmap(lambda t: torch.rrelu(t, training=True), randomness=mode)(x)
    neg = x < 0
    assert torch.equal(out[~neg], x[~neg])
    slope = out[neg] / x[neg]
    assert slope.min() >= 1 / 8 - 1e-6 and slope.max() <= 1 / 3 + 1e-6
    same_x = x[:1].expand(B, 200).clone()
    out = ftrans.vmap(lambda t: torch.rrelu(t, training=True), randomness=mode)(same_x)
    assert rows_equal(out) == (mode == "same")
    with pytest.raises(RuntimeError, match="called random operation while in randomness error"):
        ftrans.vmap(lambda t: torch.rrelu(t, training=True))(x)
