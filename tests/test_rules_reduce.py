"""Batching rules for reductions, scans and sort/topk (ftrans/_C/rules/reduce.py), compared with
the per-example loop for every batch-dim placement with the loop fallback forbidden.  The cases
that go wrong when the batch dim is forgotten get their own entries: dim=None / dim=[] (all
*logical* dims), keepdim, negative dims and logical 0-dim inputs."""
import pytest
import torch

import ftrans
from tests._helpers import check_nested_vmap, check_vmap

aten = torch.ops.aten
B = 3

R = [
    ("sum", lambda x: x.sum()),
    ("sum_dtype", lambda x: x.sum(dtype=torch.float64)),
    ("sum_dim", lambda x: x.sum(-1)),
    ("sum_dims_keep", lambda x: x.sum((0, -1), keepdim=True)),
    ("sum_empty_list", lambda x: aten.sum.dim_IntList(x, [])),
    ("sum_none_keep", lambda x: aten.sum.dim_IntList(x, None, True)),
    ("nansum", lambda x: x.nansum(1)),
    ("nansum_all", lambda x: x.nansum()),
    ("mean", lambda x: x.mean()),
    ("mean_dim", lambda x: x.mean(0, keepdim=True)),
    ("prod", lambda x: x.prod()),
    ("prod_dim", lambda x: x.prod(-1, keepdim=True)),
    ("amax", lambda x: x.amax((0, 1))),
    ("amin_all", lambda x: x.amin()),
    ("max", lambda x: x.max()),
    ("min", lambda x: x.min()),
    ("max_dim", lambda x: x.max(-1)),
    ("min_dim_keep", lambda x: x.min(0, keepdim=True)),
    ("aminmax", lambda x: torch.aminmax(x)),
    ("aminmax_dim", lambda x: torch.aminmax(x, dim=-1, keepdim=True)),
    ("aminmax_none_keep", lambda x: torch.aminmax(x, keepdim=True)),
    ("argmax", lambda x: x.argmax()),
    ("argmax_keep", lambda x: x.argmax(keepdim=True)),
    ("argmax_dim", lambda x: x.argmax(-1)),
    ("argmin_dim_keep", lambda x: x.argmin(0, keepdim=True)),
    ("var", lambda x: x.var()),
    ("var_dim", lambda x: x.var(-1, correction=0)),
    ("std_keep", lambda x: x.std(0, keepdim=True)),
    ("std_all", lambda x: torch.std(x, unbiased=False)),
    ("var_mean", lambda x: torch.var_mean(x, 1)),
    ("std_mean_all", lambda x: torch.std_mean(x)),
    ("norm", lambda x: x.norm()),
    ("norm_p", lambda x: x.norm(1, -1)),
    ("norm_dtype", lambda x: aten.norm.ScalarOpt_dtype(x, 3, dtype=torch.float64)),
    ("norm_dim_dtype",
     lambda x: aten.norm.ScalarOpt_dim_dtype(x, 2, [0], True, dtype=torch.float64)),
    ("norm_scalar", lambda x: aten.norm.Scalar(x, 1)),
    ("vector_norm", lambda x: torch.linalg.vector_norm(x, 3)),
    ("vector_norm_dim", lambda x: torch.linalg.vector_norm(x, float("inf"), (-1,), True)),
    ("logsumexp", lambda x: x.logsumexp(-1)),
    ("logsumexp_dims", lambda x: x.logsumexp((0, 1), keepdim=True)),
    ("cumsum", lambda x: x.cumsum(-1)),
    ("cumsum_dtype", lambda x: x.cumsum(0, dtype=torch.float64)),
    ("cumprod", lambda x: x.cumprod(0)),
    ("cummax", lambda x: x.cummax(-1)),
    ("cummin", lambda x: x.cummin(0)),
    ("logcumsumexp", lambda x: x.logcumsumexp(1)),
    ("cumsum_", lambda x: x.clone().cumsum_(1)),
    ("cumprod_", lambda x: x.clone().cumprod_(-1)),
    ("sort", lambda x: x.sort()),
    ("sort_dim_desc", lambda x: x.sort(0, descending=True)),
    ("sort_stable", lambda x: x.sort(stable=True, dim=0)),
    ("argsort", lambda x: x.argsort(-1)),
    ("msort", lambda x: x.msort()),
    ("topk", lambda x: x.topk(2)),
    ("topk_dim", lambda x: x.topk(1, 0, largest=False)),
    ("kthvalue", lambda x: x.kthvalue(2)),
    ("kthvalue_dim_keep", lambda x: x.kthvalue(1, 0, keepdim=True)),
    ("median", lambda x: x.median()),
    ("median_dim", lambda x: x.median(-1)),
    ("nanmedian", lambda x: x.nanmedian()),
    ("nanmedian_dim", lambda x: x.nanmedian(0, keepdim=True)),
    ("mode", lambda x: x.round().mode()),
    ("mode_dim", lambda x: x.round().mode(0, keepdim=True)),
    ("all", lambda x: (x > -1).all()),
    ("all_dim", lambda x: (x > 0).all(-1)),
    ("all_dims", lambda x: aten.all.dims(x > 0, [0, 1], True)),
    ("all_dims_empty", lambda x: aten.all.dims(x > 0, [])),
    ("any", lambda x: (x > 1).any()),
    ("any_dim_keep", lambda x: (x > 0).any(0, keepdim=True)),
    ("any_dims_none", lambda x: aten.any.dims(x > 1, None)),
    ("count_nonzero", lambda x: (x > 0).count_nonzero()),
    ("count_nonzero_dim", lambda x: (x > 0).count_nonzero(-1)),
    ("count_nonzero_dims", lambda x: (x > 0).count_nonzero((0, 1))),
]


@pytest.mark.parametrize("fn", [c[1] for c in R], ids=[c[0] for c in R])
def test_reduction(fn):
    check_vmap(fn, (torch.randn(B, 4, 5),))


# Ops accepting dim 0/-1 (or no dim) on a logical 0-dim tensor: physically 1-dim.
SCALAR = [
    lambda x: x.sum(), lambda x: x.sum(0), lambda x: x.sum(-1, keepdim=True),
    lambda x: x.mean(0), lambda x: x.prod(0), lambda x: x.amax(), lambda x: x.max(),
    lambda x: x.max(0), lambda x: x.argmax(), lambda x: x.argmax(0, keepdim=True),
    lambda x: x.cumsum(0), lambda x: x.cummax(-1), lambda x: x.sort(), lambda x: x.topk(1),
    lambda x: x.kthvalue(1), lambda x: x.median(), lambda x: x.median(0),
    lambda x: x.var(0, correction=0), lambda x: x.norm(), lambda x: x.logsumexp(0),
    lambda x: (x > 0).all(), lambda x: (x > 0).any(0), lambda x: torch.aminmax(x),
    lambda x: x.count_nonzero(), lambda x: torch.std_mean(x, correction=0),
]


@pytest.mark.parametrize("i", range(len(SCALAR)))
def test_reduction_of_0dim(i):
    check_vmap(SCALAR[i], (torch.randn(B),))


def test_reduction_dtypes():
    x = torch.randint(-3, 4, (B, 4, 5))
    check_vmap(lambda t: t.sum(), (x,))
    check_vmap(lambda t: t.sum(0), (x,))
    check_vmap(lambda t: t.prod(), (x,))
    check_vmap(lambda t: t.cumsum(0), (x,))
    check_vmap(lambda t: t.sum(), (torch.randn(B, 2) > 0,))
    check_vmap(lambda t: t.amax(0), (x,))


def test_reduction_two_batched_levels():
    x = torch.randn(2, 3, 4, 5)
    fns = [lambda t: t.sum(), lambda t: t.sum(-1, keepdim=True), lambda t: t.max(0)[1],
           lambda t: t.argmax(), lambda t: t.sort(-1)[0], lambda t: torch.var_mean(t, 0)[0],
           lambda t: t.cumsum(1), lambda t: t.median()]
    check_nested_vmap(fns, x)


def test_reduction_with_unbatched_second_arg():
    # max(x, other) / cumsum over a batched + unbatched mix goes through pointwise + reduce.
    x, y = torch.randn(B, 4), torch.randn(4)
    check_vmap(lambda a, b: torch.max(a, b).sum(0), (x, y), in_dims=(0, None))


COVERED = [
    "sum.default", "sum.dim_IntList", "nansum.default", "mean.default", "mean.dim",
    "prod.default", "prod.dim_int", "amax.default", "amin.default", "max.default", "max.dim",
    "min.default", "min.dim", "aminmax.default", "argmax.default", "argmin.default",
    "var.correction", "std.correction", "var_mean.correction", "std_mean.correction",
    "norm.Scalar", "norm.ScalarOpt_dim", "norm.ScalarOpt_dim_dtype", "norm.ScalarOpt_dtype",
    "linalg_vector_norm.default", "logsumexp.default", "cumsum.default", "cumsum_.default",
    "cumprod.default", "cumprod_.default", "cummax.default", "cummin.default",
    "logcumsumexp.default", "sort.default", "sort.stable", "topk.default", "kthvalue.default",
    "median.default", "median.dim", "nanmedian.default", "nanmedian.dim", "mode.default",
    "all.default", "all.dim", "all.dims", "any.default", "any.dim", "any.dims",
    "count_nonzero.default", "count_nonzero.dim_IntList",
]


@pytest.mark.parametrize("name", COVERED)
def test_op_status_is_rule(name):
    packet, _, overload = name.partition(".")
    p = getattr(aten, packet)
    if overload not in p.overloads():
        pytest.skip(f"{name} not in this torch")
    assert ftrans.op_status(getattr(p, overload)) == "rule"


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "min", "prod"])
def test_segment_reduce_and_grad(reduce):
    data = torch.randn(3, 2, 6, dtype=torch.float64)
    lengths = torch.tensor([[[2, 4], [1, 5]], [[3, 3], [6, 0]], [[0, 6], [4, 2]]])
    offsets = torch.cat([torch.zeros(3, 2, 1, dtype=torch.long), lengths.cumsum(-1)], -1)
    initial = 0.0 if reduce in ("sum", "prod") else None

    def fn(d0, lens, offs):
        d = d0.detach().requires_grad_()
        a = torch.segment_reduce(d, reduce, lengths=lens, axis=1, initial=initial)
        b = torch.segment_reduce(d, reduce, offsets=offs, axis=-1, initial=initial)
        return (a, b) + torch.autograd.grad(((a + b) ** 2).sum(), d)

    check_vmap(fn, (data, lengths, offsets), (0, 0, 0))
    check_vmap(fn, (data, lengths[0], offsets[0]), (0, None, None))
    check_vmap(fn, (data[0], lengths, offsets), (None, 0, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_histc_matches_torch_exactly(dtype):
    x = torch.randn(4, 5, 30, dtype=dtype)
    x[0, 0, :3] = x[0].max()   # repeated top edge
    x[1] = 1.5                 # empty data range: widened by 1 each way
    edges = torch.linspace(-1, 1, 11, dtype=dtype).repeat(3, 1)  # values on the bin edges
    for kw in ({}, {"bins": 7}, {"bins": 10, "min": -1, "max": 1},
               {"bins": 4, "min": 0.5, "max": 0.5}, {"bins": 3, "min": -0.5, "max": 2}):
        check_vmap(lambda a: torch.histc(a, **kw), (x,), atol=0, rtol=0)
        check_vmap(lambda a: torch.histc(a, **kw), (edges,), atol=0, rtol=0)
    y = torch.rand(6, 1000, dtype=dtype) * torch.rand(6, 1, dtype=dtype) * 10 - 3
    for bins in (3, 13, 100):
        check_vmap(lambda a: torch.histc(a, bins), (y,), atol=0, rtol=0)
        check_vmap(lambda a: torch.histc(a, bins, -2.3, 4.1), (y,), atol=0, rtol=0)
