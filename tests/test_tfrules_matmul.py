"""The torch-function matmul rule (ftrans/_C/tfrules.py): ``torch.matmul`` / ``@`` on batched
values as ONE physical matmul.  Exactly torch.matmul's per-example semantics for every rank
combination, batch-dim placement and dtype, against a per-example loop and torch.func.vmap;
taken only where autograd, forward AD or another dispatch mode would not need the
decomposition's ops, and never changes a result, a gradient or an error."""
import itertools

import pytest
import torch

import ftrans
from ftrans._C import fastpath, tfrules

from _helpers import check_vmap, entries, loop_reference, no_fallback, tf_entry

pytestmark = pytest.mark.skipif(not fastpath.ENABLED, reason="torch lacks the dispatch-stack API")


@pytest.fixture(autouse=True, params=entries())
def _entry(request):
    """Every test under each torch-function entry: the compiled one (which serves a
    per-example operand times a plain matrix itself, when built) and Python's."""
    with tf_entry(request.param):
        yield

B = 3

# Logical shapes by rank, with contraction size 4: left [..., 2, 4] / right [..., 4, 5].  The
# leading (batch) dims broadcast against each other: 3-d has (2,), 4-d has (3, 1).
LEFT = {1: (4,), 2: (2, 4), 3: (2, 2, 4), 4: (3, 1, 2, 4)}
RIGHT = {1: (4,), 2: (4, 5), 3: (2, 4, 5), 4: (3, 1, 4, 5)}
BATCHINGS = [(True, False), (False, True), (True, True)]


def _c_matmuls():
    try:
        from ftrans._C import _fastc
    except ImportError:
        return 0
    return _fastc.matmul_hits()


class _Taken:
    """Counts the calls the matmul rule answered (not MISS): the Python rule's, and the C
    entry's for the case it serves itself (a per-example operand times a plain matrix)."""

    def __enter__(self):
        self.n = 0
        self.orig = {f: r for f, r in tfrules.RULES.items()}
        self.c0 = _c_matmuls()

        def counting(rule):
            def run(args):
                out = rule(args)
                if out is not tfrules.MISS:
                    self.n += 1
                return out
            return run

        for f, r in self.orig.items():
            tfrules.RULES[f] = counting(r)
        return self

    def __exit__(self, *exc):
        tfrules.RULES.update(self.orig)
        self.n += _c_matmuls() - self.c0


def _make(shape, batched, dtype, gen):
    shape = ((B,) + shape) if batched else shape
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype, generator=gen)
    return torch.randint(-4, 5, shape, dtype=dtype, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64],
                         ids=["f32", "f64", "i64"])
@pytest.mark.parametrize("which", BATCHINGS, ids=["left", "right", "both"])
@pytest.mark.parametrize("ra,rb", list(itertools.product((1, 2, 3, 4), repeat=2)))
def test_every_rank_combination_matches_the_loop_and_torch_func(ra, rb, which, dtype):
    gen = torch.Generator().manual_seed(100 * ra + 10 * rb + BATCHINGS.index(which))
    a, b = _make(LEFT[ra], which[0], dtype, gen), _make(RIGHT[rb], which[1], dtype, gen)
    dims = tuple(0 if w else None for w in which)
    with _Taken() as taken:
        check_vmap(torch.matmul, (a, b), dims)  # every batch-dim placement, vs the loop
        check_vmap(lambda x, y: x @ y, (a, b), dims, all_placements=False)
        check_vmap(lambda x, y: x.matmul(y), (a, b), dims, all_placements=False)
    assert taken.n > 0
    expected = torch.func.vmap(torch.matmul, in_dims=dims)(a, b)
    got = ftrans.vmap(torch.matmul, in_dims=dims)(a, b)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if dtype.is_floating_point:
        torch.testing.assert_close(got, expected)
    else:
        assert torch.equal(got, expected)


@pytest.mark.parametrize("sa,sb", [
    ((1, 2, 4), (3, 4, 5)),        # size-1 logical batch dim broadcasts
    ((3, 2, 4), (1, 4, 5)),
    ((2, 1, 2, 4), (3, 4, 5)),     # ranks 4 and 3 broadcast to (2, 3)
    ((4,), (2, 3, 4, 5)),          # vector against a rank-4 stack
    ((2, 3, 2, 4), (4,)),
    ((1, 4), (4, 1)),              # size-1 rows and columns
    ((0, 4), (4, 5)),              # empty rows
    ((2, 0), (0, 5)),              # empty contraction: zeros
])
@pytest.mark.parametrize("which", BATCHINGS, ids=["left", "right", "both"])
def test_broadcasting_and_degenerate_shapes(sa, sb, which):
    gen = torch.Generator().manual_seed(7)
    a, b = _make(sa, which[0], torch.float32, gen), _make(sb, which[1], torch.float32, gen)
    dims = tuple(0 if w else None for w in which)
    with _Taken() as taken:
        check_vmap(torch.matmul, (a, b), dims)
    assert taken.n > 0
    torch.testing.assert_close(ftrans.vmap(torch.matmul, in_dims=dims)(a, b),
                               torch.func.vmap(torch.matmul, in_dims=dims)(a, b))


def test_batch_of_one_and_non_contiguous_values():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(1, 2, 4, generator=gen)
    b = torch.randn(5, 4, generator=gen).t()  # a transposed (non-contiguous) matrix
    check_vmap(torch.matmul, (a, b), (0, None))
    x = torch.randn(6, B, 4, generator=gen)[::2]  # strided, batch at dim 1
    w = torch.randn(B, 4, 5, generator=gen).transpose(1, 2).contiguous().transpose(1, 2)
    check_vmap(torch.matmul, (x, w), (1, 0))


def test_errors_are_eagers():
    a, b = torch.randn(B, 2, 3), torch.randn(B, 4, 5)
    with pytest.raises(RuntimeError) as eager:
        torch.matmul(a[0], b[0])
    with pytest.raises(RuntimeError) as got:
        ftrans.vmap(torch.matmul)(a, b)
    assert str(eager.value) in str(got.value)
    assert "3" in str(got.value) and str(B) + "x" not in str(got.value)
    # dtype mismatch, a 0-dim operand: the normal path raises what eager raises
    for x, y in ((torch.randn(B, 3), torch.ones(B, 3, dtype=torch.int64)),
                 (torch.randn(B), torch.randn(B, 3))):
        with pytest.raises(RuntimeError) as eager:
            torch.matmul(x[0], y[0])
        with pytest.raises(RuntimeError) as got:
            ftrans.vmap(torch.matmul)(x, y)
        assert str(eager.value).split("\n")[0] in str(got.value)


@pytest.mark.parametrize("in_dims", [(0, 0), (0, None), (None, 0), (1, 0)])
def test_nested_vmap_and_mixed_levels(in_dims):
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(B, 4, 2, 5, generator=gen)  # outer batch B, inner batch 4
    b = torch.randn(B, 4, 5, 3, generator=gen)
    inner = ftrans.vmap(torch.matmul, in_dims=in_dims)
    outer_dims = (0, 0)
    if in_dims == (1, 0):
        a = a.movedim(1, 2)  # inner batch of a at its dim 1
    args = [a if in_dims[0] is not None else a[:, 0], b if in_dims[1] is not None else b[:, 0]]
    with _Taken() as taken, no_fallback():
        got = ftrans.vmap(inner, in_dims=outer_dims)(*args)
    assert taken.n > 0
    expected = torch.func.vmap(torch.func.vmap(torch.matmul, in_dims=in_dims),
                               in_dims=outer_dims)(*args)
    torch.testing.assert_close(got, expected)
    # one operand batched only by the outer vmap, the other only by the inner one
    x, y = torch.randn(B, 5, generator=gen), torch.randn(4, 5, 3, generator=gen)
    f = lambda x: ftrans.vmap(lambda y: x @ y)(y)  # noqa: E731
    g = lambda y: ftrans.vmap(lambda x: x @ y)(x)  # noqa: E731
    torch.testing.assert_close(ftrans.vmap(f)(x), torch.einsum("bk,nkm->bnm", x, y))
    torch.testing.assert_close(ftrans.vmap(g)(y), torch.einsum("bk,nkm->nbm", x, y))


def _loss(x, w):
    return torch.tanh(x @ w).sum()


def test_under_grad_vjp_jvp_jacrev():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(B, 4, generator=gen), torch.randn(4, 3, generator=gen)
    # per-example gradients: vmap(grad)
    got = ftrans.vmap(ftrans.grad(_loss, argnums=(0, 1)), in_dims=(0, None))(x, w)
    expected = torch.func.vmap(torch.func.grad(_loss, argnums=(0, 1)), in_dims=(0, None))(x, w)
    torch.testing.assert_close(got, expected)
    # grad of a vmapped function
    batch_loss = lambda x, w: ftrans.vmap(_loss, in_dims=(0, None))(x, w).sum()  # noqa: E731
    got = ftrans.grad(batch_loss, argnums=(0, 1))(x, w)
    expected = torch.func.grad(
        lambda x, w: torch.func.vmap(_loss, in_dims=(0, None))(x, w).sum(), argnums=(0, 1))(x, w)
    torch.testing.assert_close(got, expected)
    # jacrev of a vmapped matmul and vmap of jacrev
    mv = lambda x: torch.tanh(x @ w)  # noqa: E731
    torch.testing.assert_close(ftrans.jacrev(ftrans.vmap(mv))(x),
                               torch.func.jacrev(torch.func.vmap(mv))(x))
    torch.testing.assert_close(ftrans.vmap(ftrans.jacrev(mv))(x),
                               torch.func.vmap(torch.func.jacrev(mv))(x))
    # vjp / jvp through the vmapped matmul
    out, pull = ftrans.vjp(ftrans.vmap(mv), x)
    ct = torch.randn(out.shape, generator=gen)
    out_t, pull_t = torch.func.vjp(torch.func.vmap(mv), x)
    torch.testing.assert_close(out, out_t)
    torch.testing.assert_close(pull(ct), pull_t(ct))
    t = torch.randn(x.shape, generator=gen)
    got = ftrans.jvp(ftrans.vmap(mv), (x,), (t,))
    expected = torch.func.jvp(torch.func.vmap(mv), (x,), (t,))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(ftrans.vmap(lambda x, t: ftrans.jvp(mv, (x,), (t,)))(x, t),
                               torch.func.vmap(lambda x, t: torch.func.jvp(mv, (x,), (t,)))(x, t))


def test_plain_autograd_through_vmap_is_recorded():
    # Outside any ftrans autodiff transform: a captured requires-grad weight makes the rule
    # step aside, and backward gives the same gradients as the loop.
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(B, 4, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, generator=gen, requires_grad=True)
    with _Taken() as taken:
        out = ftrans.vmap(lambda v: v @ w)(x)
    assert taken.n == 0 and out.requires_grad
    out.pow(2).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.stack([v @ w2 for v in x2]).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    # under no_grad the rule may run: no graph
    with torch.no_grad(), _Taken() as taken:
        out = ftrans.vmap(lambda v: v @ w)(x)
    assert taken.n == 1 and not out.requires_grad
    torch.testing.assert_close(out, x.detach() @ w.detach())


def test_a_dispatch_mode_still_sees_the_ops():
    from _helpers import LogOps
    x, w = torch.randn(B, 4), torch.randn(4, 3)
    with LogOps() as seen:
        out = ftrans.vmap(lambda v: v @ w)(x)
    assert torch.ops.aten.mm.default in seen
    torch.testing.assert_close(out, x @ w)


def test_keyword_out_and_autocast_keep_the_normal_path():
    x, w = torch.randn(B, 4), torch.randn(4, 3)
    with _Taken() as taken:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ftrans.vmap(lambda v: v @ w)(x)
            expected = loop_reference(lambda v: v @ w, (x,), (0,))
    assert taken.n == 0
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


def test_where_names_the_rule():
    from ftrans.__main__ import where

    lines = where(torch.ops.aten.matmul.default)
    assert lines[0] == "aten.matmul.default: decomposition"
    assert lines[1].startswith("  above     ftrans._C.tfrules.matmul (ftrans/_C/tfrules.py:")
