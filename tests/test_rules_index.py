"""Batching rules for indexing, gathers/scatters, masked ops and joins (rules/index.py,
rules/scatter.py, rules/join.py): each checked against a per-example loop for every placement
of the batch dims and every batched/unbatched combination of the tensor arguments, with no loop
fallback allowed; backward ops through vmapped ``torch.autograd.grad``."""
import itertools

import pytest
import torch

import ftrans
from _helpers import check_vmap, no_fallback

aten = torch.ops.aten
B = 3


def combos(n):
    """Every in_dims tuple of n tensors with at least one mapped."""
    return [d for d in itertools.product((0, None), repeat=n) if any(x is not None for x in d)]


def batched(shape, dims, i, make):
    """Arg i of a call: with a leading batch of B when dims[i] is 0."""
    return make((B,) + tuple(shape)) if dims[i] == 0 else make(tuple(shape))


def randn(s):
    return torch.randn(s)


def randint(hi):
    return lambda s: torch.randint(0, hi, s)


def perm_index(n, k, lead=(), dim=-1):
    """Index of shape lead+(k,) along ``dim`` with distinct entries (deterministic scatters)."""
    def make(s):
        return torch.rand(s[:-1] + (n,)).argsort(-1)[..., :k].contiguous()
    return make


def mix(x, *others):
    """A copy of x that is batched whenever any argument is (so in-place writes are legal)."""
    return x + 0 * sum(o.sum() for o in others)


def run(fn, specs, dims, **kw):
    """specs: [(logical shape, maker)], one per tensor argument."""
    args = [batched(s, dims, i, m) for i, (s, m) in enumerate(specs)]
    check_vmap(fn, args, in_dims=dims, **kw)


# ---- index ------------------------------------------------------------------------------------

INDEX_CASES = {
    "first": (lambda x, i, j: x[i], (5, 4, 6)),
    "middle": (lambda x, i, j: x[:, i], (4, 5, 6)),
    "adjacent0": (lambda x, i, j: x[i, j], (5, 5, 6)),
    "adjacent1": (lambda x, i, j: x[:, i, j], (4, 5, 5)),
    "nonadjacent": (lambda x, i, j: x[i, :, j], (5, 4, 5)),
    "nonadjacent1": (lambda x, i, j: x[:, i, :, j], (2, 5, 3, 5)),
    "broadcast": (lambda x, i, j: x[:, i[:, None], j], (4, 5, 5)),
    "negative": (lambda x, i, j: x[:, i - 5], (4, 5, 6)),
    "ellipsis": (lambda x, i, j: x[..., i], (4, 6, 5)),
    "all_adjacent": (lambda x, i, j: x[i, j, i], (5, 5, 5)),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
@pytest.mark.parametrize("dims", combos(3))
def test_index(case, dims):
    fn, shape = INDEX_CASES[case]
    run(fn, [(shape, randn), ((2, 3), randint(5)), ((3,), randint(5))], dims)


def test_index_scalar_index_and_int32():
    x = torch.randn(B, 4, 5)
    i = torch.randint(0, 4, (B,))
    # (Python's x[i] turns a 0-dim integer tensor into an int; call aten.index directly.)
    check_vmap(lambda x, i: aten.index(x, [i]), (x, i))
    check_vmap(lambda x, i: aten.index(x, [None, i]), (x, i), in_dims=(0, 0))
    check_vmap(lambda x, i: x[i.int()], (x, torch.randint(0, 4, (B, 2))))
    check_vmap(lambda x, i: aten._unsafe_index(x, [None, i]), (x, i), in_dims=(0, 0))


def test_index_unbatched_bool_mask():
    x = torch.randn(B, 4, 5)
    m = torch.tensor([True, False, True, True, False])
    check_vmap(lambda x, m: x[:, m], (x, m), in_dims=(0, None))
    m2 = torch.rand(4, 5) > 0.5
    check_vmap(lambda x, m: x[m], (x, m2), in_dims=(0, None))


def test_index_batched_bool_mask_raises():
    x, m = torch.randn(B, 5), torch.rand(B, 5) > 0.5
    with pytest.raises(RuntimeError, match="data-dependent"):
        ftrans.vmap(lambda x, m: x[m])(x, m)


# ---- index_put ------------------------------------------------------------------------------

PUT_CASES = {
    # name: (fn(x, i, j, v), x shape, v shape)
    "first": (lambda x, i, j, v, a: aten.index_put(x, [i], v, a), (5, 4), (3, 4)),
    "middle": (lambda x, i, j, v, a: aten.index_put(x, [None, i], v, a), (4, 5), (4, 3)),
    "nonadjacent": (lambda x, i, j, v, a: aten.index_put(x, [i, None, j], v, a), (5, 2, 5), (3, 2)),
    "adjacent1": (lambda x, i, j, v, a: aten.index_put(x, [None, i, j], v, a), (2, 5, 5), (2, 3)),
    "broadcast_v": (lambda x, i, j, v, a: aten.index_put(x, [None, i], v[:1], a), (4, 5), (4, 3)),
}


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("case", sorted(PUT_CASES))
@pytest.mark.parametrize("dims", combos(4))
def test_index_put(case, dims, accumulate):
    fn, xs, vs = PUT_CASES[case]
    idx = perm_index(5, 3) if not accumulate else randint(5)
    specs = [(xs, randn), ((3,), idx), ((3,), idx), (vs, randn)]
    run(lambda x, i, j, v: fn(x, i, j, v, accumulate), specs, dims)


@pytest.mark.parametrize("dims", combos(3))
def test_index_put_inplace(dims):
    def f(x, i, v):
        y = x + 0 * (v.sum() + i.sum())  # batched whenever anything is
        y[:, i] = v
        y[i[:1]] += 1
        aten._index_put_impl_(y, [None, i], v, True, False)
        return y

    run(f, [((5, 5), randn), ((3,), perm_index(5, 3)), ((5, 3), randn)], dims)


def test_index_put_batched_into_unbatched_raises():
    x, i = torch.zeros(5), torch.tensor([1, 3])
    with pytest.raises(RuntimeError, match="not batched"):
        ftrans.vmap(lambda v: x.index_put_((i,), v))(torch.randn(B, 2))
    with pytest.raises(RuntimeError, match="not batched"):
        ftrans.vmap(lambda j: x.index_put_((j,), torch.ones(())))(torch.randint(0, 5, (B, 2)))


def test_unsafe_index_put():
    x, i, v = torch.randn(B, 5), torch.randint(0, 5, (B, 3)), torch.randn(B, 3)
    for dims in combos(3):
        args = [a if d == 0 else a[0] for a, d in zip((x, i, v), dims)]
        check_vmap(lambda x, i, v: aten._unsafe_index_put(x, [i], v, True), args, in_dims=dims)


# ---- index_select / gather / take / put -------------------------------------------------------

@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("dims", combos(2))
def test_index_select(dim, dims):
    run(lambda x, i: torch.index_select(x, dim, i), [((4, 5), randn), ((3,), randint(4))], dims)


def test_index_select_0dim():
    for dims in combos(2):
        run(lambda x, i: torch.index_select(x, 0, i), [((4,), randn), ((), randint(4))], dims)
        run(lambda x, i: torch.index_select(x, 0, i), [((), randn), ((), randint(1))], dims)


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("dims", combos(2))
def test_gather(dim, dims):
    run(lambda x, i: torch.gather(x, dim, i), [((4, 5), randn), ((3, 2), randint(2))], dims)


def test_gather_0dim():
    for dims in combos(2):
        run(lambda x, i: torch.gather(x, 0, i), [((4,), randn), ((), randint(4))], dims)
        run(lambda x, i: torch.gather(x, 0, i), [((), randn), ((), randint(1))], dims)


@pytest.mark.parametrize("dims", combos(2))
def test_take_and_take_along_dim(dims):
    run(lambda x, i: torch.take(x, i - 10), [((4, 5), randn), ((2, 3), randint(20))], dims)
    run(lambda x, i: torch.take_along_dim(x, i, 1), [((4, 5), randn), ((4, 2), randint(5))],
        dims)
    run(lambda x, i: torch.take_along_dim(x, i), [((4, 5), randn), ((6,), randint(20))], dims)


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("dims", combos(3))
def test_put(dims, accumulate):
    idx = randint(20) if accumulate else perm_index(20, 6)
    specs = [((4, 5), randn), ((6,), idx), ((6,), randn)]
    run(lambda x, i, s: x.put(i - 3, s, accumulate), specs, dims)
    if dims[0] == 0:
        run(lambda x, i, s: x.clone().t().put_(i, s, accumulate), specs, dims)


# ---- scatter family ---------------------------------------------------------------------------

SCATTERS = {
    "src": lambda x, d, i, s: torch.scatter(x, d, i, s),
    "value": lambda x, d, i, s: torch.scatter(x, d, i, 2.5),
    "reduce_add": lambda x, d, i, s: torch.scatter(x, d, i, s, reduce="add"),
    "reduce_mul": lambda x, d, i, s: torch.scatter(x, d, i, s, reduce="multiply"),
    "value_reduce": lambda x, d, i, s: torch.scatter(x, d, i, 2.0, reduce="add"),
    "add": lambda x, d, i, s: torch.scatter_add(x, d, i, s),
    "sum": lambda x, d, i, s: torch.scatter_reduce(x, d, i, s, "sum"),
    "prod": lambda x, d, i, s: torch.scatter_reduce(x, d, i, s, "prod", include_self=False),
    "mean": lambda x, d, i, s: torch.scatter_reduce(x, d, i, s, "mean"),
    "amax": lambda x, d, i, s: torch.scatter_reduce(x, d, i, s, "amax", include_self=False),
    "amin": lambda x, d, i, s: torch.scatter_reduce(x, d, i, s, "amin"),
    "inplace_src": lambda x, d, i, s: mix(x, i, s).scatter_(d, i, s),
    "inplace_add": lambda x, d, i, s: mix(x, i, s).scatter_add_(d, i, s),
    "inplace_reduce": lambda x, d, i, s: mix(x, i, s).scatter_reduce_(d, i, s, "amax"),
    "inplace_value": lambda x, d, i, s: mix(x, i, s).scatter_(d, i, -1.0, reduce="multiply"),
}


@pytest.mark.parametrize("name", sorted(SCATTERS))
@pytest.mark.parametrize("dims", combos(3))
def test_scatter(name, dims):
    fn = SCATTERS[name]
    # distinct targets per row so non-accumulating scatters are deterministic
    run(lambda x, i, s: fn(x, 1, i, s), [((3, 6), randn), ((2, 4), perm_index(6, 4)),
                                          ((3, 5), randn)], dims)
    if name in ("add", "sum", "mean"):  # accumulating: duplicate targets are fine
        run(lambda x, i, s: fn(x, 0, i, s), [((6, 3), randn), ((4, 2), randint(6)),
                                              ((5, 3), randn)], dims)
    if name in ("src", "add", "amax"):
        run(lambda x, i, s: fn(x, 0, i, s), [((), randn), ((), randint(1)), ((), randn)], dims)


INDEX_OPS = {
    "add": lambda x, i, s: torch.index_add(x, 1, i, s, alpha=2.0),
    "copy": lambda x, i, s: torch.index_copy(x, 1, i, s),
    "fill": lambda x, i, s: torch.index_fill(x, 1, i, -2.0),
    "fill_tensor": lambda x, i, s: torch.index_fill(x, 1, i, s[0, 0]),
    "reduce_prod": lambda x, i, s: x.index_reduce(1, i, s, "prod"),
    "reduce_mean": lambda x, i, s: x.index_reduce(1, i, s, "mean", include_self=False),
    "reduce_amax": lambda x, i, s: x.index_reduce(1, i, s, "amax"),
    "inplace_add": lambda x, i, s: mix(x, i, s).index_add_(-1, i, s),
    "inplace_copy": lambda x, i, s: mix(x, i, s).index_copy_(1, i, s),
    "inplace_fill": lambda x, i, s: mix(x, i, s).index_fill_(1, i, s[0, 1]),
    "inplace_reduce": lambda x, i, s: mix(x, i, s).index_reduce_(1, i, s, "amin"),
}


@pytest.mark.parametrize("name", sorted(INDEX_OPS))
@pytest.mark.parametrize("dims", combos(3))
def test_index_ops(name, dims):
    run(INDEX_OPS[name], [((4, 6), randn), ((3,), perm_index(6, 3)), ((4, 3), randn)], dims)


def test_index_ops_0dim_index():
    for dims in combos(3):
        run(lambda x, i, s: torch.index_add(x, 0, i, s), [((5,), randn), ((), randint(5)),
                                                           ((1,), randn)], dims)
        run(lambda x, i, s: torch.index_copy(x, 0, i, s), [((), randn), ((), randint(1)),
                                                            ((), randn)], dims)
        run(lambda x, i, s: torch.index_fill(x, 0, i, s), [((), randn), ((), randint(1)),
                                                            ((), randn)], dims)


@pytest.mark.parametrize("dims", combos(2))
def test_view_scatters(dims):
    run(lambda x, s: torch.select_scatter(x, s, 1, -2), [((4, 5), randn), ((4,), randn)], dims)
    run(lambda x, s: torch.slice_scatter(x, s, -1, 1, 5, 2), [((4, 5), randn), ((4, 2), randn)],
        dims)
    run(lambda x, s: torch.diagonal_scatter(x, s, 1, 0, -1), [((4, 5), randn), ((4,), randn)],
        dims)
    # as_strided offsets are storage offsets: compare on per-example storages starting at 0.
    run(lambda x, s: torch.as_strided_scatter(x.clone(), s, (2, 2), (1, 3), 1),
        [((4, 5), randn), ((2, 2), randn)], dims)


# ---- masked ops, where, cat/stack --------------------------------------------------------------

def bool_mask(s):
    return torch.rand(s) > 0.5


@pytest.mark.parametrize("dims", combos(3))
def test_masked(dims):
    specs = [((4, 5), randn), ((5,), bool_mask), ((), randn)]
    run(lambda x, m, v: x.masked_fill(m, 3.0), specs, dims)
    run(lambda x, m, v: x.masked_fill(m, v), specs, dims)
    run(lambda x, m, v: torch.where(m, x, v), specs, dims)
    specs_src = [((4, 5), randn), ((5,), bool_mask), ((4, 5), randn)]
    run(lambda x, m, s: x.masked_scatter(m, s), specs_src, dims)
    run(lambda m, x, s: x.masked_scatter(m, s),
        [((4, 5), bool_mask), ((5,), randn), ((4, 5), randn)], dims)
    if dims[0] == 0:
        run(lambda x, m, v: x.clone().masked_fill_(m, v), specs, dims)
        run(lambda x, m, v: x.t().clone().t().masked_fill_(m, -1.0), specs, dims)
        run(lambda x, m, s: x.clone().masked_scatter_(m, s), specs_src, dims)


@pytest.mark.parametrize("dims", combos(3))
def test_cat_stack(dims):
    specs = [((2, 3), randn), ((4, 3), randn), ((2, 3), randn)]
    run(lambda a, b, c: torch.cat([a, b, c]), specs, dims)
    run(lambda a, b, c: torch.cat([a.t(), b.t()], -1), specs, dims)
    run(lambda a, b, c: torch.cat([a, torch.empty(0), c], 1), specs, dims)
    run(lambda a, b, c: torch.stack([a, c], 1), specs, dims)
    run(lambda a, b, c: torch.stack([a, c], -1), specs, dims)
    run(lambda a, b, c: torch.hstack([a, c]), specs, dims)
    run(lambda a, b, c: torch.vstack([a, b, c]), specs, dims)
    run(lambda a, b, c: torch.dstack([a, c]), specs, dims)
    run(lambda a, b, c: torch.column_stack([a, c]), specs, dims)


def test_cat_legacy_empty_batched():
    check_vmap(lambda a, e: torch.cat([e, a, e]), (torch.randn(B, 2, 3), torch.empty(B, 0)))


# ---- backward ops: vmap of autograd.grad --------------------------------------------------------

def grad_of(op):
    def f(x, *rest):
        x = x.detach().requires_grad_()
        y = op(x, *rest)
        (g,) = torch.autograd.grad((y.sin() * torch.arange(y.numel()).view(y.shape)).sum(), x)
        return g
    return f


BACKWARD = {
    "index": (lambda x, i: x[:, i], [((4, 5), randn), ((3,), randint(5))]),
    "index2": (lambda x, i: x[i, :, i], [((5, 2, 5), randn), ((3,), randint(5))]),
    "gather": (lambda x, i: x.gather(1, i), [((4, 5), randn), ((4, 3), randint(5))]),
    "index_select": (lambda x, i: x.index_select(1, i), [((4, 5), randn), ((3,), randint(5))]),
    "take": (lambda x, i: x.take(i), [((4, 5), randn), ((3,), randint(20))]),
    "scatter": (lambda x, i: x.scatter(1, i, 0.5), [((4, 5), randn), ((4, 2), perm_index(5, 2))]),
    "scatter_add": (lambda x, i: torch.zeros(4, 6).scatter_add(1, i, x),
                    [((4, 5), randn), ((4, 5), randint(6))]),
    "index_add": (lambda x, i: torch.zeros(4, 6).index_add(1, i, x),
                  [((4, 3), randn), ((3,), randint(6))]),
    "masked_fill": (lambda x, m: x.masked_fill(m, 0.0), [((4, 5), randn), ((5,), bool_mask)]),
    "masked_scatter": (lambda x, m: torch.zeros(4, 5).masked_scatter(m, x),
                       [((4, 5), randn), ((4, 5), bool_mask)]),
    "select": (lambda x, i: x.select(1, 2) * i.sum(), [((4, 5), randn), ((3,), randn)]),
    "slice": (lambda x, i: x[:, 1:4:2] * i.sum(), [((4, 5), randn), ((3,), randn)]),
    "diagonal": (lambda x, i: x.diagonal(1) * i.sum(), [((4, 5), randn), ((3,), randn)]),
    "unfold": (lambda x, i: x.unfold(1, 2, 1) * i.sum(), [((4, 5), randn), ((3,), randn)]),
    "cat": (lambda x, i: torch.cat([x, i.expand(4, 3)], 1), [((4, 5), randn), ((3,), randn)]),
    "stack": (lambda x, i: torch.stack([x[:, :3], i.expand(4, 3)], 1),
              [((4, 5), randn), ((3,), randn)]),
    "index_put": (lambda x, i: aten.index_put(torch.zeros(4, 6), [None, i], x[:, :3], True),
                  [((4, 5), randn), ((3,), randint(6))]),
}


@pytest.mark.parametrize("name", sorted(BACKWARD))
@pytest.mark.parametrize("dims", [(0, 0), (0, None), (None, 0)])
def test_backward(name, dims):
    op, specs = BACKWARD[name]
    run(grad_of(op), specs, dims)


# ---- in place through a non-front batch dim; nested vmap -----------------------------------------

INPLACE = {
    "index_put_": lambda x, i, s: x.clone().index_put_((i,), s, accumulate=True),
    "setitem": lambda x, i, s: _setitem(x.clone(), i, s),
    "scatter_": lambda x, i, s: x.clone().scatter_(0, i[:, None].expand(3, 4), s),
    "scatter_add_": lambda x, i, s: x.clone().scatter_add_(0, i[:, None].expand(3, 4), s),
    "index_add_": lambda x, i, s: x.clone().index_add_(0, i, s),
    "index_copy_": lambda x, i, s: x.clone().index_copy_(0, i, s),
    "index_fill_": lambda x, i, s: x.clone().index_fill_(0, i, 0.5),
    "masked_fill_": lambda x, i, s: x.clone().masked_fill_(x > 0, s[0, 0]),
    "masked_scatter_": lambda x, i, s: x.clone().masked_scatter_(x > 0, s),
    "put_": lambda x, i, s: x.clone().put_(i, s[:, 0], accumulate=True),
}


def _setitem(y, i, s):
    y[i] = s
    return y


@pytest.mark.parametrize("name", sorted(INPLACE))
def test_inplace_non_front_batch_dim(name):
    x = torch.randn(5, B, 4)  # the batch dim in the middle: in-place rules write through a view
    i = torch.rand(B, 5).argsort(-1)[:, :3]
    s = torch.randn(B, 3, 4)
    for dims in ((1, 0, 0), (1, None, None), (1, 0, None), (1, None, 0)):
        args = [x, i if dims[1] == 0 else i[0], s if dims[2] == 0 else s[0]]
        check_vmap(INPLACE[name], args, in_dims=dims, all_placements=False)


NESTED = {
    "gather": lambda x, i: x.gather(1, i),
    "index": lambda x, i: x[i[0], :][:, i[1]],
    "index_put": lambda x, i: aten.index_put(x, [None, i[0]], torch.ones(()), True),
    "scatter_add": lambda x, i: x.scatter_add(1, i, x[:, :2]),
    "index_select": lambda x, i: x.index_select(1, i[0]),
    "cat": lambda x, i: torch.cat([x, i.to(x.dtype)], 1),
    "masked_scatter": lambda x, i: x.masked_scatter(x > 0, x * 2),
}


@pytest.mark.parametrize("name", sorted(NESTED))
def test_nested_vmap(name):
    fn = NESTED[name]
    x = torch.randn(2, 3, 4, 5)
    i = torch.randint(0, 4, (2, 3, 4, 2))

    def double_loop(xs, xi, is_, ii):
        return torch.stack([torch.stack([fn(xs(a, b), is_(a, b)) for b in range(3)])
                            for a in range(2)])

    with no_fallback():
        got = ftrans.vmap(ftrans.vmap(fn))(x, i)
        torch.testing.assert_close(
            got, double_loop(lambda a, b: x[a, b], None, lambda a, b: i[a, b], None))
        # index unbatched at the inner level, batched at the outer one
        got = ftrans.vmap(ftrans.vmap(fn, in_dims=(0, None)))(x, i[:, 0])
        torch.testing.assert_close(
            got, double_loop(lambda a, b: x[a, b], None, lambda a, b: i[a, 0], None))
        # self unbatched at the inner level
        got = ftrans.vmap(ftrans.vmap(fn, in_dims=(None, 0)))(x[:, 0], i)
        torch.testing.assert_close(
            got, double_loop(lambda a, b: x[a, 0], None, lambda a, b: i[a, b], None))
        # self batched only at the inner level, index only at the outer one
        got = ftrans.vmap(ftrans.vmap(fn, in_dims=(0, None)), in_dims=(None, 0))(x[0], i[:, 0])
        torch.testing.assert_close(
            got, double_loop(lambda a, b: x[0, b], None, lambda a, b: i[a, 0], None))


def test_setitem_batched_bool_mask():
    """``x[mask] = v`` with a per-example mask has a fixed-shape result (a ``where``)."""
    def put_scalar(x, m):
        y = x.clone()
        y[m] = 0.5
        return y

    def put_row(x, m, v):
        y = x + 0 * v.sum()
        y[m] = v
        return y

    def put_middle(x, m, v):
        return aten.index_put(x, [None, m], v[0], True)

    x, m, v = torch.randn(B, 4, 5), torch.rand(B, 4) > 0.5, torch.randn(B, 5)
    check_vmap(put_scalar, (x, m), in_dims=(0, 0))
    for dims in ((0, 0, 0), (0, 0, None), (None, 0, 0)):
        args = [a if d == 0 else a[0] for a, d in zip((x, m, v), dims)]
        check_vmap(put_row, args, in_dims=dims)
    check_vmap(put_middle, (x, torch.rand(B, 5) > 0.5, v), in_dims=(0, 0, 0))
    with pytest.raises(RuntimeError, match="data-dependent"):  # one value per selected row
        ftrans.vmap(lambda x, m: aten.index_put(x, [m], torch.ones(2, 5)))(x, m)


@pytest.mark.parametrize("right", [False, True])
def test_searchsorted_bucketize(right):
    seq = torch.randn(3, 7).sort(-1).values
    seq_nd = torch.randn(3, 4, 7).sort(-1).values
    v = torch.randn(3, 4, 5)
    f = lambda s, v: torch.searchsorted(s, v, right=right)  # noqa: E731
    for s in (seq, seq_nd):  # one sequence, and a stack matching the values' leading dims
        check_vmap(f, (s, v), (0, 0))
        check_vmap(f, (s[0], v), (None, 0))
        check_vmap(f, (s, v[0]), (0, None))
    check_vmap(lambda s: torch.searchsorted(s, 0.3, right=right, out_int32=True), (seq,))
    g = lambda v, b: torch.bucketize(v, b, right=right, out_int32=True)  # noqa: E731
    check_vmap(g, (v, seq), (0, 0))
    check_vmap(g, (v[0], seq), (None, 0))
    check_vmap(g, (v, seq[0]), (0, None))
    check_vmap(lambda b: torch.bucketize(0.3, b, right=right), (seq,))


def test_searchsorted_sorter():
    u, v = torch.randn(3, 7), torch.randn(3, 4, 5)
    order = u.argsort(-1)
    f = lambda s, v, o: torch.searchsorted(s, v, sorter=o, side="right")  # noqa: E731
    check_vmap(f, (u, v, order), (0, 0, 0))
    check_vmap(f, (u[0], v, order[0]), (None, 0, None))
    check_vmap(f, (u, v[0], order), (0, None, 0))


def test_masked_select_with_unbatched_mask_is_static():
    x = torch.randn(3, 4, 5)
    for m in (torch.randn(4, 5) > 0, torch.randn(5) > 0):
        check_vmap(lambda t: torch.masked_select(t, m), (x,), 0)
    m = torch.randn(4, 5) > 0
    g = ftrans.vmap(ftrans.grad(lambda t: torch.masked_select(t, m).sin().sum()))(x)
    torch.testing.assert_close(g, torch.where(m, x.cos(), 0.0))


def test_masked_select_with_batched_mask_is_data_dependent():
    with pytest.raises(RuntimeError, match="data-dependent"):
        ftrans.vmap(torch.masked_select)(torch.randn(3, 4), torch.randn(3, 4) > 0)
