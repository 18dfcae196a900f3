"""Rules that replaced loop fallbacks found by the OpInfo sweeps: renorm, block_diag, anti-aliased
bilinear upsampling, in-place addr_ / floor_divide_, tensor-ended linspace / logspace, and the
geqrf / ormqr / LDL LAPACK wrappers.  Each is compared with a per-example loop for several batch
dim placements (no loop fallback allowed), and the differentiable ones also per-example
gradients (``vmap(grad)``, which runs their backward ops batched)."""
import pytest
import torch
import torch.nn.functional as F

import ftrans
from _helpers import check_grads, check_vmap, no_fallback

aten = torch.ops.aten
B = 3

COVERED = [
    "renorm.default", "block_diag.default", "_upsample_bilinear2d_aa.default",
    "_upsample_bilinear2d_aa_backward.default", "addr_.default", "floor_divide.default",
    "floor_divide.Scalar", "floor_divide_.Tensor", "floor_divide_.Scalar",
    "linspace.Tensor_Tensor", "linspace.Tensor_Scalar", "linspace.Scalar_Tensor",
    "logspace.Tensor_Tensor", "logspace.Tensor_Scalar", "logspace.Scalar_Tensor",
    "geqrf.default", "ormqr.default", "linalg_ldl_factor_ex.default", "linalg_ldl_solve.default",
]


@pytest.mark.parametrize("name", COVERED)
def test_op_has_a_rule(name):
    packet, overload = name.split(".")
    if not hasattr(aten, packet) or overload not in getattr(aten, packet).overloads():
        pytest.skip(f"no aten.{name} in this torch")
    assert ftrans.op_status(getattr(getattr(aten, packet), overload)) == "rule"




# ----------------------------------------------------------------------------------------------
# renorm
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p, dim", [(2, 0), (1, 1), (3.5, -1), (float("inf"), 1)])
def test_renorm(p, dim):
    # Mixed slice norms: some above maxnorm (scaled), some below (kept).
    x = torch.randn(B, 4, 3, 2, dtype=torch.float64) * torch.tensor([0.1, 1, 3, 10]).view(4, 1, 1)
    check_vmap(lambda t: torch.renorm(t, p, dim, 1.5), (x,))
    check_vmap(lambda t: torch.renorm(t, p, dim, 1.5), (x.movedim(1, 0),), in_dims=(1,))
    check_grads(lambda t: (torch.renorm(t, p, dim, 1.5) ** 2).sum(), (x,), (0,), 0)
    check_grads(lambda t: torch.renorm(t, p, dim, 1.5).sin().sum(), (x.movedim(0, 2),), (2,), 0)


def test_renorm_rejects_one_dim_examples():
    with pytest.raises(RuntimeError, match="at least 2 dimensions"):
        ftrans.vmap(lambda t: torch.renorm(t, 2, 0, 1.0))(torch.randn(B, 4))


# ----------------------------------------------------------------------------------------------
# block_diag
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_dims", [(0, 0, 0), (0, None, 0), (None, 0, None)])
def test_block_diag(in_dims):
    # check_vmap moves each batch dim to every position; None marks a shared block.
    a, b, c = torch.randn(B, 2, 3), torch.randn(B, 4), torch.randn(B)
    args = tuple(t if d is not None else t[0] for t, d in zip((a, b, c), in_dims))
    check_vmap(lambda x, y, z: torch.block_diag(x, y, z), args, in_dims=in_dims)
    check_vmap(lambda x, y, z: torch.block_diag(z, x, torch.ones(2, 1), y), args,
               in_dims=in_dims)


def test_block_diag_promotes_and_empty_blocks():
    a = torch.randint(0, 5, (B, 2, 2))
    b = torch.randn(B, 3, dtype=torch.float64)
    c = torch.tensor(2.5, dtype=torch.float64)  # 0-dim: promotes like a scalar
    check_vmap(lambda x, y: torch.block_diag(x, y, torch.empty(0, 2)), (a, b))
    check_vmap(lambda x: torch.block_diag(x, c), (a,))
    check_vmap(lambda x: torch.block_diag(x, torch.empty(2, 0)), (b,))


def test_block_diag_grads():
    a, b = torch.randn(B, 2, 3, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64)
    w = torch.randn(6, 7, dtype=torch.float64)
    f = lambda x, y: (torch.block_diag(x, y) * w[: 3, :]).sum() ** 2  # noqa: E731
    check_grads(f, (a, b), (0, 0), (0, 1))
    check_grads(f, (a.movedim(0, 2), b[0]), (2, None), 0)


# ----------------------------------------------------------------------------------------------
# anti-aliased bilinear upsampling (forward and backward)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, align", [((5, 3), False), ((2, 7), True)])
def test_upsample_bilinear_aa(size, align):
    x = torch.randn(B, 2, 3, 6, 4, dtype=torch.float64)
    f = lambda t: F.interpolate(t, size=size, mode="bilinear",  # noqa: E731
                                align_corners=align, antialias=True)
    check_vmap(f, (x,))
    check_grads(lambda t: (f(t) ** 2).sum(), (x,), (0,), 0)
    check_grads(lambda t: f(t).sin().sum(), (x.movedim(0, 3),), (3,), 0)


def test_upsample_bilinear_aa_scale_factor():
    x = torch.randn(B, 1, 2, 5, 5, dtype=torch.float64)
    f = lambda t: F.interpolate(t, scale_factor=0.6, mode="bilinear", antialias=True)  # noqa
    check_vmap(f, (x,))
    check_grads(lambda t: (f(t) ** 2).sum(), (x,), (0,), 0)


# ----------------------------------------------------------------------------------------------
# in-place addr_ and floor_divide_
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("in_dims", [(0, 0, 0), (1, None, 0), (0, 0, None), (1, None, None)])
def test_addr_inplace(in_dims):
    m = torch.randn(B, 4, 5)
    v1, v2 = torch.randn(B, 4), torch.randn(B, 5)
    args = [m.movedim(0, in_dims[0])]
    args += [v if d is not None else v[0] for v, d in zip((v1, v2), in_dims[1:])]

    def f(s, a, b):
        s = s.clone()
        return s.addr_(a, b, beta=0.5, alpha=2.0)

    check_vmap(f, tuple(args), in_dims=in_dims)


def test_addr_inplace_into_unbatched_self_raises():
    z = torch.zeros(4, 5)  # made before the call (one made inside would become batched)
    with pytest.raises(Exception):
        ftrans.vmap(lambda a: z.addr_(a, torch.ones(5)))(torch.randn(B, 4))
    a = torch.randn(B, 4)
    out = ftrans.vmap(lambda a: torch.zeros(4, 5).addr_(a, torch.ones(5)))(a)
    torch.testing.assert_close(out, a[:, :, None].expand(B, 4, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_floor_divide(dtype):
    x = (torch.randn(B, 4, 3) * 10).to(dtype)
    y = (torch.rand(B, 3) * 4 + 1).to(dtype) * torch.tensor([1, -1, 1]).to(dtype)

    def inplace(a, b):
        a = a.clone()
        return a.floor_divide_(b)

    def inplace_scalar(a):
        a = a.clone()
        return a.floor_divide_(3)

    check_vmap(inplace, (x, y))
    check_vmap(inplace, (x, y[0]), in_dims=(1, None))
    check_vmap(inplace_scalar, (x,))
    check_vmap(torch.floor_divide, (x, y))
    check_vmap(lambda a: torch.floor_divide(a, -2), (x,))


# ----------------------------------------------------------------------------------------------
# linspace / logspace with tensor ends
# ----------------------------------------------------------------------------------------------

_ENDS = {
    "Tensor_Tensor": lambda s, e: (s, e),
    "Tensor_Scalar": lambda s, e: (s, 7.25),
    "Scalar_Tensor": lambda s, e: (-3.5, e),
}


@pytest.mark.parametrize("overload", list(_ENDS))
@pytest.mark.parametrize("steps", [0, 1, 2, 7, 50])
@pytest.mark.parametrize("log", [False, True])
def test_linspace_logspace(overload, steps, log):
    s, e = torch.randn(B) * 3, torch.randn(B) * 3 + 1
    pick = _ENDS[overload]
    if log:
        def f(a, b):
            return torch.logspace(*pick(a, b), steps, base=2.0)
    else:
        def f(a, b):
            return torch.linspace(*pick(a, b), steps)
    check_vmap(f, (s, e), atol=1e-6, rtol=1e-6)
    check_vmap(f, (s, e[0]), in_dims=(0, None), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.complex64, torch.float16])
def test_linspace_dtypes(dtype):
    s, e = torch.randn(B, dtype=torch.float64) * 20, torch.randn(B, dtype=torch.float64) * 20
    tol = 1e-2 if dtype == torch.float16 else 1e-6
    check_vmap(lambda a, b: torch.linspace(a, b, 9, dtype=dtype), (s, e), atol=tol, rtol=tol)
    if dtype != torch.float16:
        check_vmap(lambda a, b: torch.logspace(a / 10, b / 10, 8, dtype=dtype), (s, e),
                   atol=tol, rtol=tol)
    # int ends keep the default float result
    check_vmap(lambda a: torch.linspace(a, 10, 5), (s.to(torch.int64),))


def test_linspace_complex_ends_and_errors():
    s = torch.randn(B, dtype=torch.complex64)
    check_vmap(lambda a: torch.linspace(a, 2.0, 6), (s,))
    with pytest.raises(RuntimeError, match="0-dimensional"):
        ftrans.vmap(lambda a: torch.linspace(a, 1.0, 3))(torch.randn(B, 2))


# ----------------------------------------------------------------------------------------------
# geqrf / ormqr / LDL
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 3), (3, 5), (2, 4, 4)])
def test_geqrf(shape):
    A = torch.randn((B,) + shape, dtype=torch.float64)
    check_vmap(torch.geqrf, (A,))


@pytest.mark.parametrize("left, transpose", [(True, False), (False, True)])
def test_ormqr(left, transpose):
    A = torch.randn(B, 4, 3, dtype=torch.float64)
    a, tau = torch.geqrf(A)
    C = torch.randn(B, 4, 4, dtype=torch.float64)
    f = lambda x, t, c: torch.ormqr(x, t, c, left=left, transpose=transpose)  # noqa: E731
    check_vmap(f, (a, tau, C))
    check_vmap(f, (a[0], tau, C), in_dims=(None, 0, 0))
    check_vmap(f, (a, tau[0], C[0]), in_dims=(0, None, None))
    check_grads(lambda x, t, c: f(x, t, c).pow(2).sum(), (a, tau, C), (0, 0, 0), (0, 1, 2))
    check_grads(lambda x, t, c: f(x, t, c).sin().sum(), (a[0], tau, C), (None, 0, 0), 2)


@pytest.mark.parametrize("hermitian", [False, True])
def test_ldl(hermitian):
    dtype = torch.complex128 if hermitian else torch.float64
    A = torch.randn(B, 4, 4, dtype=dtype)
    A = A + A.mH if hermitian else A + A.mT
    check_vmap(lambda a: torch.linalg.ldl_factor_ex(a, hermitian=hermitian), (A,))
    check_vmap(lambda a: torch.linalg.ldl_factor(a, hermitian=hermitian), (A,))
    LD, piv = torch.linalg.ldl_factor(A, hermitian=hermitian)
    rhs = torch.randn(B, 4, 2, dtype=dtype)
    f = lambda ld, p, r: torch.linalg.ldl_solve(ld, p, r, hermitian=hermitian)  # noqa: E731
    check_vmap(f, (LD, piv, rhs))
    check_vmap(f, (LD[0], piv[0], rhs), in_dims=(None, None, 0))
    check_vmap(f, (LD, piv, rhs[0]), in_dims=(0, 0, None))
    # End to end: the solve of each example's factorization solves its system.
    with no_fallback():
        x = ftrans.vmap(lambda a, r: torch.linalg.ldl_solve(
            *torch.linalg.ldl_factor(a, hermitian=hermitian), r, hermitian=hermitian))(A, rhs)
    torch.testing.assert_close(A @ x, rhs)
