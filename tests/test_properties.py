"""Property tests: vmap of random programs equals the per-example loop.

Hand-written tests check the cases someone thought of; silent wrong answers hide in the
combinations nobody wrote down (a view after a reduction after a transpose, the batch dim at
a negative position, an unbatched operand that broadcasts).  Hypothesis draws the shapes, the
in_dims/out_dims (negative ones included) and a chain of common ops (pointwise, reductions,
views, matmul, in-place on a clone), and every drawn program is checked against the oracle: the
same function applied to each example and stacked.  The same chains are differentiated
(``vmap(grad(f))`` against per-example ``torch.autograd.grad``) and nested (``vmap(vmap(f))``
against a double loop).  Runs are bounded and derandomized so the suite stays fast and
reproducible; a failure prints the drawn program.
"""
from __future__ import annotations

import os

import torch
from _helpers import no_fallback
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ftrans

# FTRANS_FULL=1 turns the bounded run into a bug hunt (more, non-derandomized examples).
_FULL = bool(os.environ.get("FTRANS_FULL"))
SETTINGS = settings(max_examples=400 if _FULL else 40, deadline=None, derandomize=not _FULL,
                    print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])

MAX_RANK = 4


def _dim(data, rank, label):
    """A dim of a rank-``rank`` tensor, negative ones included."""
    return data.draw(st.integers(-rank, rank - 1), label=label)


def _draw_op(data, shape, gen):
    """One op applicable to a tensor of ``shape``: (description, fn, new shape)."""
    r = len(shape)
    names = ["sin", "tanh_affine", "exp", "square", "relu", "inplace_on_clone", "mul_const"]
    if r >= 1:
        names += ["sum", "mean", "amax", "softmax", "logsumexp", "cumsum", "flip", "narrow",
                  "select", "matmul_w", "reshape_flat"]
    if r >= 2:
        names += ["transpose", "permute", "matmul_self", "mT_contiguous"]
    if r < MAX_RANK:
        names += ["unsqueeze", "expand"]
    name = data.draw(st.sampled_from(names), label="op")
    shape = list(shape)
    if name == "sin":
        return name, torch.sin, shape
    if name == "tanh_affine":
        return name, lambda t: (t * 0.5 + 1).tanh(), shape
    if name == "exp":
        return name, lambda t: t.clamp(-3, 3).exp(), shape
    if name == "square":
        return name, lambda t: t * t, shape
    if name == "relu":
        return name, torch.relu, shape
    if name == "inplace_on_clone":
        return name, lambda t: t.clone().mul_(2).add_(1), shape
    if name == "mul_const":  # an unbatched closed-over operand that broadcasts
        k = data.draw(st.integers(0, r), label="const_rank")
        c = torch.randn(shape[r - k:], generator=gen)
        return f"mul_const{tuple(c.shape)}", lambda t: t * c, shape
    if name in ("sum", "mean", "amax", "logsumexp"):
        d = _dim(data, r, "dim")
        keep = data.draw(st.booleans(), label="keepdim")
        fn = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax,
              "logsumexp": torch.logsumexp}[name]
        new = list(shape)
        if keep:
            new[d] = 1
        else:
            del new[d]
        return f"{name}({d}, keepdim={keep})", lambda t: fn(t, d, keepdim=keep), new
    if name in ("softmax", "cumsum", "flip"):
        d = _dim(data, r, "dim")
        fn = {"softmax": lambda t: t.softmax(d), "cumsum": lambda t: t.cumsum(d),
              "flip": lambda t: t.flip(d)}[name]
        return f"{name}({d})", fn, shape
    if name == "narrow":
        d = _dim(data, r, "dim")
        start = data.draw(st.integers(0, shape[d] - 1), label="start")
        n = data.draw(st.integers(1, shape[d] - start), label="length")
        new = list(shape)
        new[d] = n
        return f"narrow({d}, {start}, {n})", lambda t: t.narrow(d, start, n), new
    if name == "select":
        d = _dim(data, r, "dim")
        i = data.draw(st.integers(-shape[d], shape[d] - 1), label="index")
        new = list(shape)
        del new[d]
        return f"select({d}, {i})", lambda t: t.select(d, i), new
    if name == "matmul_w":
        k = data.draw(st.integers(1, 3), label="k")
        w = torch.randn(shape[-1], k, generator=gen) if r > 1 or data.draw(
            st.booleans(), label="w_2d") else torch.randn(shape[-1], generator=gen)
        new = shape[:-1] + list(w.shape[1:])
        return f"matmul_w{tuple(w.shape)}", lambda t: t @ w, new
    if name == "reshape_flat":
        n = 1
        for s in shape:
            n *= s
        return "reshape(-1)", lambda t: t.reshape(-1), [n]
    if name == "transpose":
        a, b = _dim(data, r, "dim0"), _dim(data, r, "dim1")
        new = list(shape)
        new[a], new[b] = new[b], new[a]
        return f"transpose({a}, {b})", lambda t: t.transpose(a, b), new
    if name == "permute":
        perm = data.draw(st.permutations(range(r)), label="perm")
        return f"permute{tuple(perm)}", lambda t: t.permute(*perm), [shape[p] for p in perm]
    if name == "matmul_self":
        return "t @ t.mT", lambda t: t @ t.mT, shape[:-1] + [shape[-2]]
    if name == "mT_contiguous":
        return "mT.contiguous().view", lambda t: t.mT.contiguous().view(-1), [_prod(shape)]
    if name == "unsqueeze":
        d = data.draw(st.integers(-r - 1, r), label="dim")
        new = list(shape)
        new.insert(d % (r + 1), 1)
        return f"unsqueeze({d})", lambda t: t.unsqueeze(d), new
    if name == "expand":
        return "unsqueeze(0).expand(2, ...)", lambda t: t.unsqueeze(0).expand(2, *t.shape), \
            [2] + shape
    raise AssertionError(name)


def _prod(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _draw_program(data, shape, gen, max_len=4):
    steps = []
    for _ in range(data.draw(st.integers(1, max_len), label="length")):
        desc, fn, shape = _draw_op(data, shape, gen)
        steps.append((desc, fn))

    def f(t):
        for _, fn in steps:
            t = fn(t)
        return t

    f.__name__ = " -> ".join(d for d, _ in steps)
    return f, shape


def _draw_shape(data, min_rank=0):
    rank = data.draw(st.integers(min_rank, 3), label="rank")
    return [data.draw(st.integers(1, 4), label="size") for _ in range(rank)]


def _batched(gen, shape, B, d):
    """A tensor whose examples have ``shape``, batch of ``B`` at (possibly negative) dim ``d``."""
    x = torch.randn([B] + list(shape), generator=gen)
    return x.movedim(0, d)


def _loop(f, args, in_dims, out_dim):
    B = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    outs = [f(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)])
            for i in range(B)]
    return torch.stack(outs, dim=out_dim)


@SETTINGS
@given(st.data())
def test_vmap_of_random_program_matches_loop(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    shape = _draw_shape(data)
    B = data.draw(st.integers(1, 4), label="B")
    prog, out_shape = _draw_program(data, shape, gen)
    r = len(shape)
    dx = data.draw(st.integers(-r - 1, r), label="in_dim x")
    dy = data.draw(st.one_of(st.none(), st.integers(-r - 1, r)), label="in_dim y")
    od = data.draw(st.integers(-len(out_shape) - 1, len(out_shape)), label="out_dim")
    chunk = data.draw(st.one_of(st.none(), st.integers(1, B)), label="chunk_size")
    x = _batched(gen, shape, B, dx)
    y = torch.randn(shape, generator=gen) if dy is None else _batched(gen, shape, B, dy)

    def f(a, b):
        return prog(a * b + b)

    expected = _loop(f, (x, y), (dx, dy), od)
    with no_fallback():
        got = ftrans.vmap(f, in_dims=(dx, dy), out_dims=od, chunk_size=chunk)(x, y)
    assert got.shape == expected.shape, (prog.__name__, got.shape, expected.shape)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{prog.__name__}: {m}")


@SETTINGS
@given(st.data())
def test_vmap_of_grad_of_random_program_matches_autograd(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    shape = _draw_shape(data, min_rank=1)
    B = data.draw(st.integers(1, 4), label="B")
    prog, _ = _draw_program(data, shape, gen, max_len=3)
    r = len(shape)
    dx = data.draw(st.integers(-r - 1, r), label="in_dim")
    x = _batched(gen, shape, B, dx)
    w = torch.randn(shape, generator=gen)

    def loss(v):
        return prog(v * w).sum()

    expected = []
    for i in range(B):
        xi = x.select(dx, i).detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(xi), xi, allow_unused=True)
        expected.append(torch.zeros_like(xi) if g is None else g)
    expected = torch.stack(expected)
    with no_fallback():
        got = ftrans.vmap(ftrans.grad(loss), in_dims=dx)(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{prog.__name__}: {m}")


@SETTINGS
@given(st.data())
def test_nested_vmap_of_random_program_matches_double_loop(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    shape = _draw_shape(data)
    B1, B2 = data.draw(st.integers(1, 3), label="B1"), data.draw(st.integers(1, 3), label="B2")
    prog, out_shape = _draw_program(data, shape, gen, max_len=3)
    r = len(shape)
    d2 = data.draw(st.integers(-r - 1, r), label="inner in_dim")   # on the example's tensor
    d1 = data.draw(st.integers(-r - 2, r + 1), label="outer in_dim")
    o2 = data.draw(st.integers(-len(out_shape) - 1, len(out_shape)), label="inner out_dim")
    o1 = data.draw(st.integers(-len(out_shape) - 2, len(out_shape) + 1), label="outer out_dim")
    close = data.draw(st.booleans(), label="close over outer value")
    x = _batched(gen, [B2] + shape, B1, 0)  # (B1, B2, *shape)
    x = x.movedim(1, d2 % (r + 1) + 1).movedim(0, d1)  # inner batch at d2, then outer at d1

    def outer(xo):
        scale = xo.sum() if close else 1.0  # a value batched at the outer level only
        return ftrans.vmap(lambda xi: prog(xi) * scale, in_dims=d2, out_dims=o2)(xo)

    def ref_outer(xo):
        scale = xo.sum() if close else 1.0
        return _loop(lambda xi: prog(xi) * scale, (xo,), (d2,), o2)

    expected = _loop(ref_outer, (x,), (d1,), o1)
    with no_fallback():
        got = ftrans.vmap(outer, in_dims=d1, out_dims=o1)(x)
    assert got.shape == expected.shape, (prog.__name__, got.shape, expected.shape)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{prog.__name__}: {m}")
