"""The direct physical call of the hot view ops (``dispatch.direct_view``, ``rules/views.py``'s
``DIRECT``): every batch-dim layout, nested and mixed levels give torch.func's and a loop's
values, results stay real views (in-place writes reach the base, version counters, autograd),
and errors are still eager's."""
import pytest
import torch
import torch.func

import ftrans

from _helpers import count_direct_calls

# (name, per-example function, example shape); each is one of the direct ops on its own.
CASES = [
    ("t", lambda x: x.t(), (3, 4)),
    ("t 1-d", lambda x: x.t(), (3,)),
    ("transpose", lambda x: x.transpose(0, -1), (2, 3, 4)),
    ("transpose same", lambda x: x.transpose(1, 1), (2, 3)),
    ("permute", lambda x: x.permute(2, 0, 1), (2, 3, 4)),
    ("permute neg", lambda x: x.permute(-1, -2), (3, 4)),
    ("unsqueeze 0", lambda x: x.unsqueeze(0), (3, 4)),
    ("unsqueeze mid", lambda x: x.unsqueeze(1), (3, 4)),
    ("unsqueeze end", lambda x: x.unsqueeze(-1), (3, 4)),
    ("view", lambda x: x.view(2, 6), (3, 4)),
    ("view -1", lambda x: x.view(-1), (3, 4)),
    ("view of scalar", lambda x: x.view(1, 1), ()),
    ("expand same rank", lambda x: x.expand(3, 4), (1, 4)),
    ("expand -1", lambda x: x.expand(-1, 5), (3, 1)),
    ("expand new dims", lambda x: x.expand(2, 5, 3, 4), (3, 4)),
    ("expand scalar", lambda x: x.expand(6), ()),
    ("select", lambda x: x[1], (3, 4)),
    ("select neg", lambda x: x.select(-1, -2), (3, 4)),
    ("slice", lambda x: x[1:], (3, 4)),
    ("slice step", lambda x: x[:, ::2], (3, 5)),
    ("slice clamped", lambda x: x[-10:100], (3, 4)),
    ("slice neg dim", lambda x: x.narrow(-1, 1, 2), (3, 4)),
    ("detach", lambda x: x.detach(), (3, 4)),
    ("alias", lambda x: torch.ops.aten.alias.default(x), (3, 4)),
]


def _loop(f, x, in_dim):
    return torch.stack([f(xi) for xi in x.unbind(in_dim)])


def _counting(monkeypatch):
    return count_direct_calls(monkeypatch, "direct_view")


@pytest.mark.parametrize("name,f,shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("in_dim", [0, 1, -1])
def test_values_every_batch_dim(name, f, shape, in_dim):
    if in_dim != 0 and not shape:
        pytest.skip("a scalar example has one batch dim position")
    x = torch.randn(shape[:1] + (5,) + shape[1:] if in_dim == 1 else
                    (5,) + shape if in_dim == 0 else shape + (5,))
    try:
        want = _loop(f, x, in_dim)
    except RuntimeError as e:  # a view of a non-contiguous example: eager refuses it
        with pytest.raises(RuntimeError, match=str(e)[:30]):
            ftrans.vmap(f, in_dims=in_dim)(x)
        return
    got = ftrans.vmap(f, in_dims=in_dim)(x)
    torch.testing.assert_close(got, torch.func.vmap(f, in_dims=in_dim)(x))
    torch.testing.assert_close(got, want)


def test_the_direct_call_is_taken(monkeypatch):
    hits = _counting(monkeypatch)
    for name, f, shape in CASES:
        hits.clear()
        ftrans.vmap(f)(torch.randn((5,) + shape))
        if name not in ("t 1-d",):  # rank < 2: the rule's alias
            assert any(hits), name


@pytest.mark.parametrize("name,f,shape", CASES, ids=[c[0] for c in CASES])
def test_nested_levels(name, f, shape):
    x = torch.randn((4, 3) + shape)
    if not shape:  # a scalar example: the nested levels need dims of their own
        x = torch.randn(4, 3)
    for dims in ((0, 0), (0, 1)):
        a = ftrans.vmap(ftrans.vmap(f, in_dims=dims[0]), in_dims=dims[1])(x)
        b = torch.func.vmap(torch.func.vmap(f, in_dims=dims[0]), in_dims=dims[1])(x)
        torch.testing.assert_close(a, b)
    # A captured outer value under an inner vmap (mixed levels).
    y = torch.randn(2)
    a = ftrans.vmap(lambda xo: ftrans.vmap(lambda yi: f(xo) * yi)(y))(x[:, 0])
    b = torch.func.vmap(lambda xo: torch.func.vmap(lambda yi: f(xo) * yi)(y))(x[:, 0])
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("in_dim", [0, 1])
def test_writes_through_direct_views_reach_the_base(in_dim):
    def f(x):
        y = x.clone()
        y.t().mul_(2)
        y.unsqueeze(0).transpose(0, 1)[0].add_(1)
        if in_dim == 0:  # (under vmap a copy of a non-contiguous example keeps its strides)
            y.view(-1)[0] = 7.0
        y.permute(1, 0).expand(2, 4, 3)[0, 0].sub_(3)
        return y

    x = torch.randn(5, 3, 4) if in_dim == 0 else torch.randn(3, 5, 4)
    torch.testing.assert_close(ftrans.vmap(f, in_dims=in_dim)(x),
                               torch.func.vmap(f, in_dims=in_dim)(x))
    torch.testing.assert_close(ftrans.vmap(f, in_dims=in_dim)(x), _loop(f, x, in_dim))


def test_outputs_are_views_of_the_callers_tensor():
    x = torch.randn(5, 3, 4)
    for f in (lambda v: v.t(), lambda v: v.view(12), lambda v: v.unsqueeze(1),
              lambda v: v.permute(1, 0), lambda v: v.transpose(0, 1), lambda v: v.detach()):
        out = ftrans.vmap(f)(x)
        assert out._base is x or out._base is x._base
        v0 = x._version
        out.add_(1)  # through the view: the caller's tensor sees it, and its version moves
        torch.testing.assert_close(f(x[0]), out[0])
        assert x._version > v0


def test_in_place_on_the_input_through_a_direct_view():
    x = torch.randn(5, 3, 4)
    x2 = x.clone()

    def f(v):
        v.t().mul_(3)
        return v

    ftrans.vmap(f)(x)
    torch.func.vmap(f)(x2)
    torch.testing.assert_close(x, x2)


def test_autograd_through_direct_views():
    w = torch.randn(3, 4)

    def loss(lib, w):
        def one(x):
            h = (x.unsqueeze(0) * w).view(-1, 2).t()
            h = h.permute(1, 0).expand(2, 6, 2).transpose(0, 2)
            return (h.sin() * h.detach()).sum()

        return lib.vmap(one)(torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0)))\
            .sum()

    torch.testing.assert_close(ftrans.grad(lambda w: loss(ftrans, w))(w),
                               torch.func.grad(lambda w: loss(torch.func, w))(w))
    x = torch.randn(6, 3, 4)
    g = lambda v: (v.t() @ v).view(-1).sin().sum()  # noqa: E731
    torch.testing.assert_close(ftrans.vmap(ftrans.grad(g))(x), torch.func.vmap(torch.func.grad(g))(x))
    torch.testing.assert_close(ftrans.vmap(ftrans.hessian(lambda v: g(v.view(3, 4))))(x.view(6, 12)),
                               torch.func.vmap(torch.func.hessian(
                                   lambda v: g(v.view(3, 4))))(x.view(6, 12)))


@pytest.mark.parametrize("f,match", [
    (lambda x: x.t(), "expects a tensor with <= 2 dimensions"),
    (lambda x: x.transpose(0, 3), "out of range"),
    (lambda x: x.permute(0, 1), "does not match the length"),
    (lambda x: x.permute(0, 0, 1), "duplicate dims"),
    (lambda x: x.unsqueeze(5), "out of range"),
    (lambda x: x.view(5, 5), "invalid for input of size"),
    (lambda x: x.expand(-1, 2, 3, 4), "allowed in a leading, non-existing dimension"),
    (lambda x: x.expand(2, 4), "must be greater or equal to the number of dimensions"),
    (lambda x: x.expand(3, 3, 4), "must match the existing size"),
    (lambda x: x[2], "out of bounds"),
    (lambda x: x.select(-1, -5), "out of range"),
    (lambda x: torch.ops.aten.slice.Tensor(x, 1, 0, 3, 0), "slice step must be positive"),
])
def test_errors_are_eagers(f, match):
    x = torch.randn(5, 2, 3, 4)
    with pytest.raises((RuntimeError, IndexError), match=match) as eager:
        f(x[0])
    # (torch's dimension IndexError is also a RuntimeError; a plain one stays an IndexError)
    kind = RuntimeError if isinstance(eager.value, RuntimeError) else type(eager.value)
    with pytest.raises(kind, match=match):
        ftrans.vmap(f)(x)


def test_view_of_a_non_contiguous_example_refused_as_eager():
    x = torch.randn(5, 4, 3).transpose(1, 2)  # each example is a transposed [3, 4]
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        x[0].view(12)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        ftrans.vmap(lambda v: v.view(12))(x)
    # The batch dim elsewhere with contiguous examples: the rule, same values as torch.func.
    y = torch.randn(1, 5, 12)
    torch.testing.assert_close(ftrans.vmap(lambda v: v.view(2, 6), in_dims=1)(y),
                               torch.func.vmap(lambda v: v.view(2, 6), in_dims=1)(y))


def test_empty_batch():
    x = torch.randn(0, 3, 4)
    for f in (lambda v: v.t(), lambda v: v.expand(2, 3, 4), lambda v: v.view(2, 6),
              lambda v: v.unsqueeze(0), lambda v: v.permute(1, 0)):
        assert ftrans.vmap(f)(x).shape == torch.func.vmap(f)(x).shape
    # -1 over an empty batch is ambiguous for the physical call, as in torch.func.
    with pytest.raises(RuntimeError, match="ambiguous"):
        ftrans.vmap(lambda v: v.view(-1))(x)


def test_complex_and_neg_bit_values():
    z = torch.randn(5, 3, 4, dtype=torch.complex64)
    for f in (lambda v: v.conj().t(), lambda v: v.view(-1), lambda v: v.conj().unsqueeze(0)):
        torch.testing.assert_close(ftrans.vmap(f)(z), torch.func.vmap(f)(z))
    x = torch.randn(5, 3, 4)
    n = torch._neg_view(x)
    for f in (lambda v: v.t() * 1, lambda v: v.view(-1) + 0, lambda v: v.expand(2, 3, 4) * 1):
        torch.testing.assert_close(ftrans.vmap(f)(n), f(-x[0]).unsqueeze(0) * 0 +
                                   torch.stack([f(-xi) for xi in x]))


def test_unsafe_view_of_a_batch_dim_elsewhere_needs_no_earlier_call():
    # kron's composite _unsafe_views a product that is contiguous eagerly but not under vmap
    # when the batch dim is not at 0; first call with these shapes (nothing cached).
    b = torch.randn(3, 5)
    x = torch.randn(2, 7, 3, 4)[..., 0]  # per example [2, 3] after in_dims=1
    got = ftrans.vmap(torch.kron, in_dims=(1, None))(x, b)
    torch.testing.assert_close(got, torch.stack([torch.kron(x[:, i], b) for i in range(7)]))
    torch.testing.assert_close(got, torch.func.vmap(torch.kron, in_dims=(1, None))(x, b))
