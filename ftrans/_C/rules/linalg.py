"""Matmul family and ``torch.linalg``.

Matmul rules fold the vmap batch into a dimension the native kernel already loops over, so one
batched example set is ONE ``mm``/``bmm`` call: a batched left operand with an unbatched right
one becomes an ``mm`` on the rows ``[B*n, k]`` (this is what ``linear`` and the input gradient of
every layer hit), a batched right operand is folded into the columns when its batch dim already
sits next to them, and two batched operands become a ``bmm``.  Which fold is copy-free depends on
where the batch dim sits, so the rules pick the fold that keeps the physical layout and report
the batch dim where the fold left it (not always 0).

``torch.linalg`` kernels accept any number of leading batch dims, so their rules move the vmap
batch dim to the front, give unbatched operands a matching (expanded, copy-free) batch dim and
pad ranks so that torch's own broadcasting of batch dims cannot mis-align logical and physical
dims.  One subtlety is the solver's "is the right-hand side a vector?" test, which torch makes
on shapes: it is decided on the *logical* shapes and the physical call is shaped so that torch
decides the same way.
"""
from __future__ import annotations

import torch

from ..batched import BatchedTensor
from ..errors import VmapError, call_form
from ..registry import register_batch_rule
from ._util import aten_ops, batched_front, pad_rank, to_front, wrap_dim

aten = torch.ops.aten
_SetExclude = getattr(torch._C, "_SetExcludeDispatchKeyGuard", None)
_DK = torch._C.DispatchKey


# ----------------------------------------------------------------------------------------------
# matmul family
# ----------------------------------------------------------------------------------------------

def _fold_rows(a, da):
    """Logical ``[n, k]`` with a batch dim -> (``[rows, k]``, lead shape, batch dim in lead)."""
    if da == 2:
        a = a.movedim(2, 1)
        da = 1
    # Explicit row count: reshape(-1, 0) is ambiguous for empty matrices.
    return a.reshape(a.shape[0] * a.shape[1], a.shape[-1]), a.shape[:2], da


def _outer(a, b):
    """A product whose contraction dim has size 1 is an outer product: one broadcast ``mul``.

    This is every per-sample weight gradient (``grad_out[:, None] * input[None, :]`` per
    example); ``bmm`` with k=1 is 1.1-4x slower than the broadcast on CPU.  Only for equal
    dtypes, so ``mm``'s dtype error is kept.
    """
    return a.shape[-1] == 1 and a.dtype == b.dtype and not a.is_sparse and not b.is_sparse


def _mm(a, da, b, db, B):
    """Physical ``mm`` of logical ``[n, k] @ [k, m]``; returns (out, bdim)."""
    if da is None and db is None:  # only the addend of an addmm is batched
        return aten.mm(a, b), None
    if db is None:
        a2, lead, bd = _fold_rows(a, da)
        return aten.mm(a2, b).view(lead + (b.shape[-1],)), bd
    if da is None:
        if db == 1:  # [k, B, m]: the batch already sits next to the columns
            k, _, m = b.shape
            return aten.mm(a, b.reshape(k, B * m)).view(a.shape[0], B, m), 1
        b = to_front(b, db)
        if _outer(a, b):
            return aten.mul(a, b), 0
        return aten.bmm(a.expand((B,) + tuple(a.shape)), b), 0
    a, b = to_front(a, da), to_front(b, db)
    if _outer(a, b):
        return aten.mul(a, b), 0
    return aten.bmm(a, b), 0


def _bmm(a, da, b, db, B):
    """Physical ``bmm`` of logical ``[g, n, k] @ [g, k, m]``; returns (out, bdim)."""
    if da is None and db is None:
        return aten.bmm(a, b), None
    if da is not None and db is not None:
        a, b = to_front(a, da), to_front(b, db)
        if _outer(a, b):
            return aten.mul(a, b), 0
        g, n, m = a.shape[1], a.shape[2], b.shape[3]
        out = aten.bmm(a.reshape(B * g, n, a.shape[3]), b.reshape(B * g, b.shape[2], m))
        return out.view(B, g, n, m), 0
    if db is None:  # fold the batch into the rows: [g, B*n, k]
        a = a.movedim(da, 1)
        g, _, n, k = a.shape
        out = aten.bmm(a.reshape(g, B * n, k), b)
        return out.view(g, B, n, b.shape[-1]), 1
    b = b.movedim(db, 2)  # fold into the columns: [g, k, B*m]
    g, k, _, m = b.shape
    out = aten.bmm(a, b.reshape(g, k, B * m))
    return out.view(g, a.shape[1], B, m), 2


def _mv(a, da, v, dv, B):
    if da is None and dv is None:
        return aten.mv(a, v), None
    if dv is None:
        a2, lead, bd = _fold_rows(a, da)
        return aten.mv(a2, v).view(lead), bd
    v = to_front(v, dv)
    if da is None:
        return aten.mm(a, v.t()), 1
    return aten.bmm(to_front(a, da), v.unsqueeze(-1)).squeeze(-1), 0


def _dot(a, da, b, db, B):
    if db is None:
        return aten.mv(to_front(a, da), b), 0
    if da is None:
        return aten.mv(to_front(b, db), a), 0
    a, b = to_front(a, da), to_front(b, db)
    return aten.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(B), 0


@register_batch_rule(aten.mm.default)
def mm_rule(level, func, args, bdims, kwargs):
    return _mm(args[0], bdims[0], args[1], bdims[1], level.batch_size)


@register_batch_rule(aten.bmm.default)
def bmm_rule(level, func, args, bdims, kwargs):
    return _bmm(args[0], bdims[0], args[1], bdims[1], level.batch_size)


@register_batch_rule(aten.mv.default)
def mv_rule(level, func, args, bdims, kwargs):
    return _mv(args[0], bdims[0], args[1], bdims[1], level.batch_size)


@register_batch_rule(aten.dot.default)
def dot_rule(level, func, args, bdims, kwargs):
    return _dot(args[0], bdims[0], args[1], bdims[1], level.batch_size)


@register_batch_rule(aten.vdot.default)
def vdot_rule(level, func, args, bdims, kwargs):
    # conj_physical, not conj(): below the Python key the Conjugate fallback is excluded, so
    # kernels would read a lazy conj bit as plain data (NOTE [view bits below the Python key]
    # in ops.py)
    return _dot(args[0].conj_physical(), bdims[0], args[1], bdims[1], level.batch_size)


def _combine(self, sbd, prod, pbd, rank, beta, alpha):
    """``beta * self + alpha * prod`` with the batch at 0 (``beta == 0`` ignores ``self``)."""
    if not (prod.is_floating_point() or prod.is_complex()):
        # Integer kernels truncate float scalars (torch.addmv(ints, beta=2.7) scales by 2).
        beta, alpha = int(beta), int(alpha)
    prod = to_front(prod, pbd)
    if beta == 0:
        return (prod if alpha == 1 else prod * alpha), (None if pbd is None else 0)
    if sbd is not None:
        self = to_front(self, sbd)
        missing = rank - (self.dim() - 1)
        if missing > 0:
            self = self.view((self.shape[0],) + (1,) * missing + tuple(self.shape[1:]))
    if beta != 1:
        self = self * beta
    return torch.add(self, prod, alpha=alpha), 0


def _beta_alpha(kwargs):
    return kwargs.get("beta", 1), kwargs.get("alpha", 1)


@register_batch_rule(aten.addmm.default)
def addmm_rule(level, func, args, bdims, kwargs):
    self, m1, m2 = args[:3]
    sbd, d1, d2 = bdims[:3]
    beta, alpha = _beta_alpha(kwargs)
    if sbd is None and d2 is None and (self.dim() < 2 or self.shape[0] == 1):
        # linear's path: one addmm on the folded rows, the bias broadcasts over them
        a2, lead, bd = _fold_rows(m1, d1)
        out = aten.addmm(self, a2, m2, beta=beta, alpha=alpha)
        return out.view(lead + (m2.shape[-1],)), bd
    prod, pbd = _mm(m1, d1, m2, d2, level.batch_size)
    return _combine(self, sbd, prod, pbd, 2, beta, alpha)


@register_batch_rule(aten.addmv.default)
def addmv_rule(level, func, args, bdims, kwargs):
    prod, pbd = _mv(args[1], bdims[1], args[2], bdims[2], level.batch_size)
    return _combine(args[0], bdims[0], prod, pbd, 1, *_beta_alpha(kwargs))


@register_batch_rule(aten.baddbmm.default)
def baddbmm_rule(level, func, args, bdims, kwargs):
    prod, pbd = _bmm(args[1], bdims[1], args[2], bdims[2], level.batch_size)
    return _combine(args[0], bdims[0], prod, pbd, 3, *_beta_alpha(kwargs))


@register_batch_rule(aten.addbmm.default)
def addbmm_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    b1, b2 = batched_front(args[1], bdims[1], B), batched_front(args[2], bdims[2], B)
    prod, _ = _bmm(b1, 0, b2, 0, B)
    return _combine(args[0], bdims[0], prod.sum(1), 0, 2, *_beta_alpha(kwargs))


@register_batch_rule(aten.addr.default)
def addr_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    v1 = batched_front(args[1], bdims[1], B)
    v2 = batched_front(args[2], bdims[2], B)
    prod = v1.unsqueeze(2) * v2.unsqueeze(1)
    return _combine(args[0], bdims[0], prod, 0, 2, *_beta_alpha(kwargs))


@register_batch_rule(aten._trilinear.default)
def trilinear_rule(level, func, args, bdims, kwargs):
    B = level.batch_size
    i1, i2, i3 = (batched_front(args[i], bdims[i], B) for i in range(3))
    e1, e2, e3, sumdim = ([d + 1 for d in args[i]] for i in range(3, 7))
    unroll = args[7] if len(args) > 7 else kwargs.get("unroll_dim", 1)
    return func(i1, i2, i3, e1, e2, e3, sumdim, unroll + 1), 0


# ----------------------------------------------------------------------------------------------
# torch.linalg: leading batch dims
# ----------------------------------------------------------------------------------------------

def _out_bdims(out, B):
    """bdim 0 for real outputs; None for the empty placeholders some kernels return
    (``_linalg_svd(compute_uv=False)``'s U and Vh, ``linalg_qr(mode='r')``'s Q)."""
    def one(o):
        if not isinstance(o, torch.Tensor):
            return None
        if o.dim() == 0 or (o.dim() == 1 and o.shape[0] == 0 and B != 0):
            return None
        return 0

    if isinstance(out, torch.Tensor):
        return one(out)
    return tuple(one(o) for o in out)


def leading_batch_rule(cores):
    """Rule for a kernel with leading batch dims; ``cores[pos]`` is the rank of one logical
    operand's non-batch part (2 for matrices, 1 for pivots / tau / vectors, 0 for tolerances).
    Operands are front-batched, expanded and padded to a common batch rank."""

    def rule(level, func, args, bdims, kwargs):
        B = level.batch_size
        args = list(args)
        present = [p for p in cores if p < len(args) and isinstance(args[p], torch.Tensor)]
        R = max(args[p].dim() - (bdims[p] is not None) - cores[p] for p in present)
        for p in present:
            x = batched_front(args[p], bdims[p], B)
            missing = R + cores[p] - (x.dim() - 1)
            if missing > 0:
                x = x.view((B,) + (1,) * missing + tuple(x.shape[1:]))
            args[p] = x
        out = func(*args, **kwargs)
        return out, _out_bdims(out, B)

    return rule


_SINGLE = aten_ops(
    "linalg_inv_ex", "_linalg_det", "_linalg_slogdet", "cholesky", "linalg_cholesky_ex",
    "cholesky_inverse", "linalg_qr", "_linalg_svd", "_linalg_eigh", "linalg_eig", "linalg_lu",
    "linalg_lu_factor_ex", "_linalg_eigvals", "linalg_eigvals",
    "linalg_eigvalsh", "inverse", "linalg_inv", "det", "logdet", "linalg_det",
)
register_batch_rule(*_SINGLE)(leading_batch_rule({0: 2}))


@register_batch_rule(*aten_ops("linalg_matrix_exp"))
def matrix_exp_rule(level, func, args, bdims, kwargs):
    # torch 2.13's kernel views its input as [-1, n, n]: it fails on the permuted physical
    # layouts (batch dim moved to the front) that per-example calls never see.
    return func(to_front(args[0], bdims[0]).contiguous()), 0
register_batch_rule(*aten_ops("cholesky_solve", "triangular_solve", "linalg_solve_triangular",
                          "_cholesky_solve_helper"))(leading_batch_rule({0: 2, 1: 2}))
register_batch_rule(*aten_ops("linalg_householder_product"))(leading_batch_rule({0: 2, 1: 1}))
register_batch_rule(*aten_ops("linalg_lu_solve"))(leading_batch_rule({0: 2, 1: 1, 2: 2}))
register_batch_rule(*aten_ops("lu_solve"))(leading_batch_rule({0: 2, 1: 2, 2: 1}))
if hasattr(aten, "linalg_pinv") and "atol_rtol_tensor" in aten.linalg_pinv.overloads():
    @register_batch_rule(aten.linalg_pinv.atol_rtol_tensor)
    def pinv_rule(level, func, args, bdims, kwargs):
        """Tolerances are keyword-only tensors broadcasting against A's batch shape: a batched
        one gets the vmap dim in front and its logical dims aligned right of it."""
        B = level.batch_size
        A = batched_front(args[0], bdims[0], B)
        kw = getattr(bdims, "kw", {})
        kwargs = dict(kwargs)
        tols = {k: to_front(kwargs[k], d) for k, d in kw.items()}
        rank = max([A.dim() - 3] + [t.dim() - 1 for t in tols.values()]
                   + [kwargs[k].dim() for k in ("atol", "rtol")
                      if k not in tols and isinstance(kwargs.get(k), torch.Tensor)])
        A = pad_rank(A, rank + 2)
        for k, t in tols.items():
            kwargs[k] = pad_rank(t, rank)
        if not A.is_complex() or _SetExclude is None:
            return func(A, *args[1:], **kwargs), 0
        # The CPU kernel makes lazy conj views (mH) internally, and below the Python key the
        # Conjugate fallback is excluded, so they would be read as plain data: re-enable it.
        with _SetExclude(_DK.Conjugate, False), _SetExclude(_DK.Negative, False):
            return func(A, *args[1:], **kwargs), 0

    pinv_rule.kw_bdims = True

_solve_matrix = leading_batch_rule({0: 2, 1: 2})


@register_batch_rule(*aten_ops("_linalg_solve_ex"))
def linalg_solve_rule(level, func, args, bdims, kwargs):
    A, Bm = args[0], args[1]
    dA, dB = bdims[0], bdims[1]
    rA, rB = A.dim() - (dA is not None), Bm.dim() - (dB is not None)
    lshape_A = A.shape if dA is None else A.shape[:dA] + A.shape[dA + 1:]
    lshape_B = Bm.shape if dB is None else Bm.shape[:dB] + Bm.shape[dB + 1:]
    vector = rB == 1 or (rA - 1 == rB and lshape_B == lshape_A[:-1])
    if not vector:
        return _solve_matrix(level, func, args, bdims, kwargs)
    # Vector right-hand side: shape B like A's batch + [n] physically, so torch sees a vector.
    n = lshape_B[-1]
    Bsz = level.batch_size
    A = batched_front(A, dA, Bsz)
    Bm = batched_front(Bm, dB, Bsz)
    nb = max(rA - 2, rB - 1)  # logical batch ranks, aligned right after the vmap dim
    A = A.view((Bsz,) + (1,) * (nb - rA + 2) + tuple(A.shape[1:]))
    Bm = Bm.view((Bsz,) + (1,) * (nb - rB + 1) + tuple(Bm.shape[1:]))
    batch = torch.broadcast_shapes(A.shape[:-2], Bm.shape[:-1])
    A = A.expand(batch + A.shape[-2:])
    Bm = Bm.expand(batch + (n,))
    out = func(A, Bm, *args[2:], **kwargs)
    return out, _out_bdims(out, Bsz)


@register_batch_rule(*aten_ops("trace"))
def trace_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0])
    return x.diagonal(0, 1, 2).sum(-1), 0


@register_batch_rule(*aten_ops("linalg_cross"))
def cross_rule(level, func, args, bdims, kwargs):
    a, b = args[0], args[1]
    dim = kwargs.get("dim", -1)
    ra, rb = a.dim() - (bdims[0] is not None), b.dim() - (bdims[1] is not None)
    rank = max(ra, rb)
    dim = wrap_dim(dim, rank)
    B = level.batch_size
    xs = []
    for x, d, r in ((a, bdims[0], ra), (b, bdims[1], rb)):
        x = batched_front(x, d, B)
        if r < rank:
            x = x.view((B,) + (1,) * (rank - r) + tuple(x.shape[1:]))
        xs.append(x)
    shape = (B,) + torch.broadcast_shapes(xs[0].shape[1:], xs[1].shape[1:])
    return func(xs[0].expand(shape), xs[1].expand(shape), dim=dim + 1), 0


if hasattr(aten, "_linalg_check_errors"):
    @register_batch_rule(aten._linalg_check_errors.default)
    def check_errors_rule(level, func, args, bdims, kwargs):
        """``info`` of every example at once: an error in any example raises."""
        func(to_front(args[0], bdims[0]), args[1], is_matrix=False)
        return None, None


if hasattr(aten, "linalg_lstsq"):
    @register_batch_rule(aten.linalg_lstsq.default)
    def lstsq_rule(level, func, args, bdims, kwargs):
        """Batched lstsq.  The op is tagged dynamic-shape because residuals are empty unless
        every matrix is full rank with m > n: a batch mixing full-rank and rank-deficient
        examples has no stacked answer, so that case raises instead."""
        A, b = args[0], args[1]
        B = level.batch_size
        # lstsq does not broadcast batch dims, and a front batch dim keeps torch's vector-rhs
        # test (b.dim() == A.dim() - 1) as it was per example.
        A, b = batched_front(A, bdims[0], B), batched_front(b, bdims[1], B)
        sol, res, rank, sv = func(A, b, *args[2:], **kwargs)
        m, n = A.shape[-2], A.shape[-1]
        # With a lower level's BatchedTensor the check below runs when that level dispatches
        # this physical call (on plain tensors): here it would be a Python `if` on a batch.
        if (m > n and type(rank) is not BatchedTensor and res.numel() == 0
                and rank.numel() > 0):
            deficient = rank < n
            if bool(deficient.any()) and not bool(deficient.all()):
                raise VmapError(f"{call_form(level)}: linalg.lstsq residuals exist only for the "
                                "full-rank examples of this batch, so they have no batched form")

        def per_example(o):
            return o.new_empty((B, 0)) if o.dim() == 1 and o.numel() == 0 else o

        return (sol, per_example(res), per_example(rank), per_example(sv)), (0, 0, 0, 0)


# geqrf / ormqr / LDL: LAPACK wrappers looping over leading batch dims like the ones above
# (the Householder factors are matrices, tau and pivots vectors).
register_batch_rule(*aten_ops("geqrf", "linalg_ldl_factor_ex"))(leading_batch_rule({0: 2}))
register_batch_rule(*aten_ops("ormqr", "linalg_ldl_solve"))(leading_batch_rule({0: 2, 1: 1, 2: 2}))
