"""Matmul family, torch.linalg and fft rules: vmap vs the per-example loop, no loop fallback."""
import pytest
import torch

import ftrans
from _helpers import check_vmap, loop_reference, no_fallback

B = 3


def _b(shape, batched):
    return torch.randn((B,) + shape) if batched else torch.randn(shape)


BATCHINGS = [(True, False), (False, True), (True, True)]


@pytest.mark.parametrize("which", BATCHINGS)
def test_mm_bmm_mv_dot(which):
    d = tuple(0 if w else None for w in which)
    check_vmap(torch.mm, (_b((4, 5), which[0]), _b((5, 6), which[1])), d)
    check_vmap(torch.bmm, (_b((2, 4, 5), which[0]), _b((2, 5, 6), which[1])), d)
    check_vmap(torch.mv, (_b((4, 5), which[0]), _b((5,), which[1])), d)
    check_vmap(torch.dot, (_b((5,), which[0]), _b((5,), which[1])), d)
    check_vmap(torch.outer, (_b((4,), which[0]), _b((5,), which[1])), d)


def test_vdot_complex():
    a = torch.randn(B, 5, dtype=torch.complex64)
    b = torch.randn(5, dtype=torch.complex64)
    check_vmap(torch.vdot, (a, b), (0, None))
    check_vmap(torch.vdot, (b, a), (None, 0))
    check_vmap(torch.vdot, (a, a.conj()), (0, 0))


@pytest.mark.parametrize("which", [(s, m1, m2) for s in (False, True) for m1, m2 in BATCHINGS]
                         + [(True, False, False)])
def test_addmm_family(which):
    d = tuple(0 if w else None for w in which)
    check_vmap(lambda s, a, b: torch.addmm(s, a, b, beta=0.5, alpha=2.0),
               (_b((6,), which[0]), _b((4, 5), which[1]), _b((5, 6), which[2])), d)
    check_vmap(torch.addmm, (_b((4, 6), which[0]), _b((4, 5), which[1]), _b((5, 6), which[2])), d)
    check_vmap(lambda s, a, b: torch.addmv(s, a, b, alpha=3.0),
               (_b((4,), which[0]), _b((4, 5), which[1]), _b((5,), which[2])), d)
    check_vmap(lambda s, a, b: torch.baddbmm(s, a, b, beta=2.0),
               (_b((2, 4, 6), which[0]), _b((2, 4, 5), which[1]), _b((2, 5, 6), which[2])), d)
    check_vmap(torch.addbmm,
               (_b((4, 6), which[0]), _b((2, 4, 5), which[1]), _b((2, 5, 6), which[2])), d)
    check_vmap(torch.addr, (_b((4, 6), which[0]), _b((4,), which[1]), _b((6,), which[2])), d)


def test_addmm_beta_zero_ignores_nan():
    s = torch.full((B, 6), float("nan"))
    check_vmap(lambda s, a, b: torch.addmm(s, a, b, beta=0), (s, _b((4, 5), 1), _b((5, 6), 0)),
               (0, 0, None))


@pytest.mark.parametrize("which", BATCHINGS)
def test_composites_matmul_linear_einsum_bilinear(which):
    d = tuple(0 if w else None for w in which)
    for sa, sb in [((5,), (5,)), ((5,), (5, 6)), ((4, 5), (5,)), ((4, 5), (5, 6)),
                   ((2, 4, 5), (5, 6)), ((4, 5), (2, 5, 6)), ((2, 4, 5), (2, 5, 6))]:
        check_vmap(torch.matmul, (_b(sa, which[0]), _b(sb, which[1])), d)
    check_vmap(torch.nn.functional.linear, (_b((4, 5), which[0]), _b((6, 5), which[1])), d)
    check_vmap(lambda x, w: torch.nn.functional.linear(x, w, torch.ones(6)),
               (_b((2, 4, 5), which[0]), _b((6, 5), which[1])), d)
    check_vmap(lambda a, b: torch.einsum("ij,jk->ik", a, b),
               (_b((4, 5), which[0]), _b((5, 6), which[1])), d)
    check_vmap(lambda a, b: torch.nn.functional.bilinear(a, b, torch.ones(2, 4, 5)),
               (_b((3, 4), which[0]), _b((3, 5), which[1])), d)


def test_mm_fold_is_one_mm():
    """batched x @ unbatched W is one mm on [B*n, k], not a loop nor a bmm."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
                seen.append((func, tuple(args[0].shape)))
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(B, 4, 5), torch.randn(5, 6)

    def f(x):
        return torch.mm(x, w)

    with Log():
        ftrans.vmap(f)(x)
    assert (torch.ops.aten.mm.default, (B * 4, 5)) in seen


def _spd(*shape):
    a = torch.randn(*shape, shape[-1])
    return a @ a.transpose(-1, -2) + shape[-1] * torch.eye(shape[-1])


SINGLE = [
    torch.linalg.inv, torch.inverse, torch.det, torch.linalg.det, torch.logdet,
    lambda a: torch.linalg.slogdet(a), torch.linalg.cholesky, torch.cholesky_inverse,
    lambda a: torch.linalg.qr(a), lambda a: torch.linalg.qr(a, mode="r")[1],
    torch.linalg.svdvals, lambda a: torch.linalg.svd(a)[1],
    lambda a: torch.linalg.eigh(a)[0], torch.linalg.eigvalsh,
    torch.linalg.matrix_exp, lambda a: torch.linalg.lu_factor(a),
    lambda a: torch.linalg.lu(a), torch.linalg.pinv, torch.trace,
    lambda a: torch.linalg.matrix_power(a, 3), lambda a: torch.linalg.inv_ex(a),
    lambda a: torch.linalg.cholesky_ex(a),
]


@pytest.mark.parametrize("fn", SINGLE)
def test_single_matrix_ops(fn):
    check_vmap(fn, (_spd(B, 4),), 0, atol=1e-4, rtol=1e-4)


def test_batched_logical_matrices():
    check_vmap(torch.linalg.inv, (_spd(B, 2, 4),), 0, atol=1e-4, rtol=1e-4)
    check_vmap(lambda a: torch.linalg.eigh(a)[0], (_spd(B, 2, 4),), 0, atol=1e-4, rtol=1e-4)


def test_svd_uv_abs():
    a = torch.randn(B, 4, 3)
    # signs of singular vectors are arbitrary: compare U S Vh
    check_vmap(lambda a: (lambda u, s, vh: (u * s) @ vh)(*torch.linalg.svd(a, False)), (a,), 0,
               atol=1e-4, rtol=1e-4)


def test_eig_eigvals():
    a = _spd(B, 4)
    check_vmap(lambda a: torch.linalg.eigvals(a).real.sort().values, (a,), 0,
               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("which", BATCHINGS)
def test_solvers(which):
    d = tuple(0 if w else None for w in which)
    A = _spd(B, 4) if which[0] else _spd(4)
    rhs = _b((4, 2), which[1])
    vec = _b((4,), which[1])
    kw = dict(atol=1e-4, rtol=1e-4)
    check_vmap(torch.linalg.solve, (A, rhs), d, **kw)
    check_vmap(torch.linalg.solve, (A, vec), d, **kw)
    check_vmap(lambda a, b: torch.linalg.solve(a, b, left=False), (A, _b((2, 4), which[1])),
               d, **kw)
    check_vmap(lambda a, b: torch.linalg.solve_ex(a, b)[0], (A, rhs), d, **kw)
    L = torch.linalg.cholesky(A)
    check_vmap(lambda b, l: torch.cholesky_solve(b, l), (rhs, L), d[::-1], **kw)
    check_vmap(lambda l, b: torch.linalg.solve_triangular(l, b, upper=False), (L, rhs), d, **kw)
    check_vmap(lambda b, l: torch.triangular_solve(b, l, upper=False)[0], (rhs, L), d[::-1],
               **kw)
    check_vmap(lambda a, b: torch.linalg.lu_solve(*torch.linalg.lu_factor(a), b), (A, rhs), d,
               **kw)
    check_vmap(lambda a, b: torch.lu_solve(b, *torch.linalg.lu_factor(a)), (A, rhs), d, **kw)


def test_solve_broadcast_vector_against_batch_of_matrices():
    A = _spd(B, 2, 4)
    check_vmap(torch.linalg.solve, (A, torch.randn(4)), (0, None), atol=1e-4, rtol=1e-4)
    check_vmap(torch.linalg.solve, (A, torch.randn(B, 4)), (0, 0), atol=1e-4, rtol=1e-4)


def test_householder_cross_kron_tensordot():
    a, tau = torch.randn(B, 4, 3), torch.rand(B, 3)
    check_vmap(torch.linalg.householder_product, (a, tau), (0, 0), atol=1e-4, rtol=1e-4)
    check_vmap(torch.linalg.householder_product, (a, tau[0]), (0, None), atol=1e-4, rtol=1e-4)
    check_vmap(torch.linalg.cross, (torch.randn(B, 2, 3), torch.randn(2, 3)), (0, None))
    check_vmap(torch.linalg.cross, (torch.randn(B, 1, 3), torch.randn(B, 2, 3)), (0, 0))
    check_vmap(lambda a, b: torch.cross(a, b, dim=0), (torch.randn(B, 3, 2), torch.randn(3, 2)),
               (0, None))
    check_vmap(torch.kron, (torch.randn(B, 2, 3), torch.randn(2, 2)), (0, None))
    check_vmap(lambda a, b: torch.tensordot(a, b, dims=([1], [0])),
               (torch.randn(B, 2, 3), torch.randn(3, 4)), (0, None))


def _per_example_grad(fn, args, in_dims, atol=1e-4):
    with no_fallback():
        got = ftrans.vmap(fn, in_dims=in_dims)(*args)
    expected = loop_reference(fn, args, in_dims)
    torch.testing.assert_close(got, expected, atol=atol, rtol=atol)


def test_per_sample_grad_mlp_and_linalg():
    def mlp(x, w1, w2):
        w1, w2 = w1.detach().requires_grad_(), w2.detach().requires_grad_()
        h = torch.tanh(x @ w1)
        loss = (h @ w2).pow(2).sum()
        return torch.autograd.grad(loss, (w1, w2))

    _per_example_grad(mlp, (torch.randn(B, 2, 5), torch.randn(5, 4), torch.randn(4, 3)),
                      (0, None, None))
    _per_example_grad(mlp, (torch.randn(2, 5), torch.randn(B, 5, 4), torch.randn(B, 4, 3)),
                      (None, 0, 0))

    def lin(a0, b):
        a = a0.detach().requires_grad_()
        out = torch.linalg.solve(a, b).sum() + torch.linalg.slogdet(a)[1] + torch.linalg.inv(a).sum()
        return torch.autograd.grad(out, a)[0]

    _per_example_grad(lin, (_spd(B, 4), torch.randn(4, 2)), (0, None))

    def eig(a0):
        a = a0.detach().requires_grad_()
        out = torch.linalg.eigvalsh(a).pow(2).sum() + torch.linalg.svdvals(a).sum()
        return torch.autograd.grad(out, a)[0]

    _per_example_grad(eig, (_spd(B, 4),), (0,))


# ---------------------------------------------------------------------------------------------
# fft
# ---------------------------------------------------------------------------------------------

FFTS = [
    torch.fft.fft, torch.fft.ifft, torch.fft.rfft, torch.fft.irfft, torch.fft.fft2,
    torch.fft.ifft2, torch.fft.fftn, torch.fft.ifftn, torch.fft.rfft2, torch.fft.irfft2,
    torch.fft.hfft, torch.fft.ihfft, torch.fft.hfft2, torch.fft.hfftn, torch.fft.ihfft2,
    torch.fft.fftshift, torch.fft.ifftshift, lambda x: torch.fft.fft(x, n=7, dim=0, norm="ortho"),
    lambda x: torch.fft.rfftn(x, s=(4, 6), norm="forward"),
]


@pytest.mark.parametrize("fn", FFTS)
def test_fft_forward(fn):
    check_vmap(fn, (torch.randn(B, 4, 6),), 0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fn", [torch.fft.fft, torch.fft.ifft, torch.fft.fft2, torch.fft.ifftn,
                                torch.fft.hfft, torch.fft.hfft2, torch.fft.hfftn])
def test_fft_forward_complex(fn):
    check_vmap(fn, (torch.randn(B, 4, 6, dtype=torch.complex64),), 0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fn", [torch.fft.fft, torch.fft.ifft, torch.fft.rfft, torch.fft.irfft,
                                torch.fft.hfft, torch.fft.ihfft, torch.fft.hfft2, torch.fft.hfftn,
                                torch.fft.ifft2, torch.fft.irfftn])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_fft_vjp_under_vmap(fn, dtype):
    """Pitfall 8: conj/neg view bits gave silently wrong fft gradients; compare with a loop."""
    if dtype.is_complex and fn in (torch.fft.rfft, torch.fft.ihfft):
        pytest.skip("real-input transform")

    def g(x0, v):
        x = x0.detach().requires_grad_()
        y = fn(x)
        if y.is_complex():
            out = (y * v[..., : y.shape[-1]].to(y.dtype)).real.sum() + y.abs().pow(2).sum()
        else:
            out = (y * v[..., : y.shape[-1]].real).sum()
        return torch.autograd.grad(out, x)[0]

    x = torch.randn(B, 4, 6, dtype=dtype)
    v = torch.randn(B, 4, 12, dtype=torch.complex64)
    _per_example_grad(g, (x, v), (0, 0))
    _per_example_grad(g, (x, v[0]), (0, None))


def _value_and_grad(f, n_grad=1):
    """fn(*xs) -> (f(*xs), grads of sum(|f|^2) wrt the first n_grad inputs)."""
    def fn(*xs):
        xs = [x.detach().requires_grad_() if i < n_grad else x for i, x in enumerate(xs)]
        out = f(*xs)
        loss = (out.abs() ** 2).sum() if out.is_complex() else (out ** 2).sum()
        return (out,) + torch.autograd.grad(loss, xs[:n_grad])
    return fn


def test_matrix_exp_permuted_layouts_and_grad():
    # torch's kernel rejects some permuted layouts; the batch dim at the end / nested makes them.
    x = torch.randn(B, 2, 4, 4, dtype=torch.float64) / 3
    check_vmap(_value_and_grad(torch.matrix_exp), (x,))
    check_vmap(ftrans.vmap(torch.matrix_exp, in_dims=2), (x.movedim(1, 3),), (0,))


def test_kron_permuted_layouts_and_grad():
    a, b = torch.randn(B, 2, 3, dtype=torch.float64), torch.randn(B, 3, 2, dtype=torch.float64)
    check_vmap(_value_and_grad(torch.kron, 2), (a, b))
    check_vmap(_value_and_grad(torch.kron, 2), (a, b[0]), (0, None))
    check_vmap(ftrans.vmap(torch.kron, in_dims=(1, None)), (torch.randn(2, 4, 3, B), b[0]),
               (3, None))


def test_pinv_batched_tolerances():
    A = torch.randn(B, 2, 4, 5, dtype=torch.float64)
    atol, rtol = torch.rand(B, 2, dtype=torch.float64), torch.rand(B, dtype=torch.float64)
    f = lambda a, t, r: torch.linalg.pinv(a, atol=t, rtol=r)  # noqa: E731
    check_vmap(_value_and_grad(f), (A, atol, rtol))
    check_vmap(f, (A[:, 0], atol[:, 0], rtol[0]), (0, 0, None))
    check_vmap(lambda a, t: torch.linalg.pinv(a, atol=t), (A[0], atol), (None, 0))


def test_complex_and_polar_grads():
    re, im = torch.randn(B, 4, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64)
    check_vmap(_value_and_grad(torch.complex, 2), (re, im))
    check_vmap(_value_and_grad(torch.complex, 2), (re[0], im), (None, 0))
    check_vmap(_value_and_grad(torch.polar, 2), (re.abs(), im))
    check_vmap(_value_and_grad(torch.polar, 2), (re.abs(), im[0, :1]), (0, None))


@pytest.mark.parametrize("op, shapes", [
    (torch.addmv, ((4,), (4, 5), (5,))),
    (torch.addmm, ((4, 6), (4, 5), (5, 6))),
    (torch.baddbmm, ((2, 4, 6), (2, 4, 5), (2, 5, 6))),
    (torch.addbmm, ((4, 6), (2, 4, 5), (2, 5, 6))),
])
def test_integer_addmm_family_truncates_float_scalars_like_eager(op, shapes):
    args = tuple(torch.randint(-5, 5, (3,) + s) for s in shapes)
    f = lambda a, b, c: op(a, b, c, beta=2.7, alpha=1.6)  # noqa: E731
    for d in [(0, 0, 0), (0, None, 0), (None, 0, 0)]:
        got = ftrans.vmap(f, in_dims=d)(*[t if di == 0 else t[0] for t, di in zip(args, d)])
        ref = torch.stack([f(*[t[i] if di == 0 else t[0] for t, di in zip(args, d)])
                           for i in range(3)])
        assert got.dtype == ref.dtype == torch.int64
        assert torch.equal(got, ref)
