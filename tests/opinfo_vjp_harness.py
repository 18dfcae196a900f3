"""OpInfo sweep machinery for autodiff under vmap: batched vjps and per-example gradients.

The vmap sweep (opinfo_harness.py) checks forward batching rules.  Per-example gradients and
``jacrev`` run the *backward* formulas of every op under vmap, and those reach rules (and
decompositions of ``*_backward`` ops) that no forward test touches; the silent wrong answers the
feasibility study found (DESIGN.md pitfall 8) were mostly there.  So for every OpInfo that
supports autograd this module runs two checks on a few samples and compares each against a
per-example loop of plain ``torch.autograd.grad``:

1. ``vmap(vjp_fn)``: ``out, vjp_fn = ftrans.vjp(f, *primals)`` then ``ftrans.vmap(vjp_fn)`` over
   B distinct cotangents (what ``jacrev`` does, with a basis that can mix examples up).
2. ``vmap(grad)``: per-example gradients of a real scalar made from the op's outputs (a fixed
   random weighted sum; real part for complex outputs) over B distinct primals, batch dim 0,
   and batch dim last on the first sample.

``torch.func`` runs the same two checks on the same inputs, so a report can say how many of the
ops torch.func handles ftrans handles.  Choices, each for a reason:

- float64 when the op's backward supports it: gradients of ill-conditioned ops (inverses,
  eigen-decompositions) amplify rounding, and in float64 a mismatch is a bug, not noise.
- The sample's own ``requires_grad`` marks which tensors are differentiated (torch knows, e.g.,
  that indices and integer lengths are not); ``gradcheck_wrapper`` and the sample's
  ``output_process_fn_grad`` are applied as torch's gradcheck does, so outputs with a gauge
  freedom (singular vectors' signs) only enter through well-defined functions of them.
- Distinct per-example values come from the vmap harness's jitter (and the same retry with
  identical copies when the loop itself fails on jittered values).
- Random ops: for the vjp check every forward runs from the same seed, so values are compared;
  for ``vmap(grad)`` the op runs with ``randomness='same'`` and only shapes are compared.
- Status per op is the worst over samples and checks: wrong > error > fallback > pass > skip.
"""
from __future__ import annotations

import dataclasses
import time
import warnings

import torch
import torch.utils._pytree as pytree

import ftrans
import opinfo_harness as vh
import sweep_common as sc

B = 3
RANK = {"wrong": 5, "error": 4, "fallback": 3, "pass": 1, "skip": 0}
TF_RANK = vh.TF_RANK

# ~60 ops across families for the default pytest run, weighted towards backward formulas that
# are easy to get wrong under vmap (complex views, fft, padding modes, pooling, norms, linalg).
SLICE = [
    # pointwise, complex, type promotion
    "abs", "exp", "sigmoid", "nn.functional.gelu", "pow", "atan2", "div.no_rounding_mode",
    "where", "clamp", "lerp", "addcmul", "polar", "conj", "neg", "angle", "real", "view_as_real",
    "frexp", "sgn",
    # reductions, scans, sort
    "sum", "mean", "std", "amax", "max.reduction_with_dim", "logsumexp", "norm", "cumsum",
    "cumprod", "sort", "topk", "prod",
    # views and shape ops
    "reshape", "permute", "expand", "diagonal", "select", "narrow", "unbind", "as_strided",
    "repeat", "flip", "roll", "tril",
    # indexing, scatter, join
    "__getitem__", "index_select", "gather", "scatter_add", "index_put", "masked_fill", "cat",
    "stack",
    # linalg, fft
    "mm", "matmul", "addmm", "einsum", "linalg.inv", "linalg.det", "linalg.svd",
    "linalg.cholesky", "linalg.solve", "linalg.eigh", "fft.fft", "fft.ifft", "fft.rfft",
    "fft.hfft2", "fft.hfftn",
    # nn
    "nn.functional.conv2d", "nn.functional.max_pool2d", "nn.functional.avg_pool2d",
    "nn.functional.linear", "nn.functional.layer_norm", "nn.functional.embedding",
    "softmax", "nn.functional.cross_entropy", "nn.functional.pad.circular",
    "nn.functional.pad.reflect", "nn.functional.interpolate.bilinear",
    "nn.functional.dropout",
    # regressions this sweep found (stride-0 inputs to CPU kernels, empty matrices, 0-d unfold,
    # lazy conj before view_as_real, dim=() on a 0-d example, lstsq)
    "native_layer_norm", "nn.functional.group_norm", "nn.functional.adaptive_max_pool3d",
    "linalg.pinv", "unfold", "fft.hfft", "masked.logsumexp", "linalg.lstsq",
]

load_op_db = vh.load_op_db
op_key = vh.op_key


@dataclasses.dataclass
class VjpResult:
    name: str
    dtype: str = ""
    status: str = "skip"
    reason: str = ""
    fallback_ops: list = dataclasses.field(default_factory=list)
    tf_status: str = "skip"
    tf_reason: str = ""
    checks: int = 0                # (sample, check) pairs that ran
    notes: list = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def tf_handles(self) -> bool:
        return self.tf_status == "pass"


def _backward_dtypes(op):
    get = getattr(op, "supported_backward_dtypes", None) or op.supported_dtypes
    return get("cpu")


def pick_dtype(op):
    dtypes = _backward_dtypes(op)
    for d in (torch.float64, torch.float32, torch.complex128, torch.complex64):
        if d in dtypes:
            return d
    return None


def _merge(r, status, reason, fell=()):
    sc.merge(r, RANK, status, reason, fell)


def _zeros(g, x):
    return torch.zeros_like(x) if g is None else g


def _compare(got, expected, shape_only=False):
    """None if the tuple ``got`` matches the stacked ``expected`` tensors, else a message."""
    leaves = pytree.tree_leaves(got)
    if len(leaves) != len(expected):
        return f"{len(leaves)} gradients, loop gave {len(expected)}"
    for j, (g, e) in enumerate(zip(leaves, expected)):
        if not isinstance(g, torch.Tensor):
            return f"gradient {j} is a {type(g).__name__}"
        if type(g) is not torch.Tensor:
            return f"gradient {j} leaked a {type(g).__name__}"
        if g.shape != e.shape or g.dtype != e.dtype:
            return (f"gradient {j}: shape/dtype {tuple(g.shape)}/{g.dtype}, loop "
                    f"{tuple(e.shape)}/{e.dtype}")
        if shape_only:
            continue
        bad = sc.mismatch(g, e)
        if bad is not None:
            return f"gradient {j}: {bad[1]}"[:400]
    return None


def _run(label, body, expected, shape_only):
    """Run ``body()``; return (status, message, fallbacks)."""
    before = ftrans.fallback_stats()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = body()
    except Exception as e:  # noqa: BLE001 - any failure is a result to record
        return "error", f"[{label}] {sc.first_line(e)}", []
    after = ftrans.fallback_stats()
    fell = sorted(k for k, v in after.items() if v != before.get(k, 0))
    msg = _compare(got, expected, shape_only)
    if msg is not None:
        return "wrong", f"[{label}] {msg}", fell
    if fell:
        return "fallback", f"[{label}] fell back: " + ", ".join(fell), fell
    return "pass", "", fell


# ----------------------------------------------------------------------------------------------
# Building f(*differentiable tensors) -> tuple of float/complex outputs
# ----------------------------------------------------------------------------------------------

class _Recorder(vh._Recorder):
    """Records whether a random op ran, without changing results.

    Below the Python dispatch key torch excludes the Conjugate/Negative fallbacks, so under
    any TorchDispatchMode a kernel that makes lazy ``conj()`` views internally reads them as
    plain data: complex ``linalg.pinv``/``lstsq`` come out wrong (torch 2.13).  The reference
    loop must be plain torch, so the keys are re-enabled around each op.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.random = True
        if _SetExclude is None:
            return func(*args, **(kwargs or {}))
        with _SetExclude(_DK.Conjugate, False), _SetExclude(_DK.Negative, False):
            return func(*args, **(kwargs or {}))


_SetExclude = getattr(torch._C, "_SetExcludeDispatchKeyGuard", None)
_DK = torch._C.DispatchKey


def _is_diff_dtype(t):
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def make_function(op, sample):
    """(f, primals) for one sample, or (None, why)."""
    leaves, spec = pytree.tree_flatten((sample.input, list(sample.args), dict(sample.kwargs)))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if any(t.layout != torch.strided for t in tensors):
        return None, "sparse input"
    dpos = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not dpos:
        return None, "no differentiable input"
    leaves = [x.detach() if isinstance(x, torch.Tensor) else x for x in leaves]
    wrapper = getattr(op, "gradcheck_wrapper", None)
    process = getattr(sample, "output_process_fn_grad", None) or (lambda o: o)

    def f(*xs):
        vals = list(leaves)
        for i, x in zip(dpos, xs):
            vals[i] = x
        inp, args, kwargs = pytree.tree_unflatten(vals, spec)
        out = wrapper(op.op, inp, *args, **kwargs) if wrapper else op.op(inp, *args, **kwargs)
        out = process(out)
        return tuple(o for o in pytree.tree_leaves(out) if _is_diff_dtype(o))

    return f, [leaves[i] for i in dpos]


# ----------------------------------------------------------------------------------------------
# Check 1: vmap over a vjp function with B distinct cotangents
# ----------------------------------------------------------------------------------------------

def _loop_vjp(f, primals, cots, seed):
    torch.manual_seed(seed)
    xs = [p.detach().clone().requires_grad_() for p in primals]
    rec = _Recorder()
    with rec:
        outs = f(*xs)
    live = [j for j, o in enumerate(outs) if o.requires_grad]
    per = []
    for b in range(B):
        if live:
            # Cloned: a slice of the stacked cotangents has a storage offset, which
            # as_strided-based backward formulas would read as absolute.
            gs = torch.autograd.grad([outs[j] for j in live], xs,
                                     [cots[j][b].clone() for j in live],
                                     retain_graph=True, allow_unused=True)
        else:
            gs = [None] * len(xs)
        per.append([_zeros(g, x) for g, x in zip(gs, xs)])
    return [torch.stack([p[i] for p in per]) for i in range(len(xs))], rec.random


def check_vjp(f, primals, gen, seed, with_torch_func):
    """((status, msg, fell), tf-or-None) for vmap over vjp_fn, or (None, why)."""
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs = f(*primals)
    except Exception as e:  # noqa: BLE001
        return None, "forward failed: " + sc.first_line(e)
    if not outs:
        return None, "no float/complex output"
    cots = []
    for o in outs:
        c = torch.randn((B,) + tuple(o.shape), generator=gen,
                        dtype=torch.complex128 if o.is_complex() else torch.float64)
        cots.append(c.to(o.dtype))
    try:
        expected, _ = _loop_vjp(f, primals, cots, seed)
    except Exception as e:  # noqa: BLE001
        return None, "loop failed: " + sc.first_line(e)

    def body(vjp, vmap):
        def run():
            torch.manual_seed(seed)
            _, vjp_fn = vjp(f, *[p.clone() for p in primals])
            return vmap(vjp_fn)(tuple(c.clone() for c in cots))
        return run

    res = _run("vmap(vjp_fn)", body(ftrans.vjp, ftrans.vmap), expected, False)
    tf = None
    if with_torch_func:
        tf = _run("vmap(vjp_fn)", body(torch.func.vjp, torch.func.vmap), expected, False)
    return (res, tf), None


# ----------------------------------------------------------------------------------------------
# Check 2: vmap(grad) per-example gradients over B distinct primals
# ----------------------------------------------------------------------------------------------

def scalar_loss(f, weights):
    def loss(*xs):
        total = 0
        for o, w in zip(f(*xs), weights):
            s = (o * w).sum()
            total = total + (s.real if s.is_complex() else s)
        if not isinstance(total, torch.Tensor):  # no outputs at all
            total = sum(x.sum() * 0 for x in xs)
        return total
    return loss


def check_grad(f, primals, gen, dim_last, with_torch_func):
    """((status, msg, fell), tf-or-None) for vmap(grad), or (None, why)."""
    for distinct in (True, False):
        examples = [vh._examples(p, B, gen, distinct) for p in primals]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outs0 = f(*[ex[0] for ex in examples])
                weights = [torch.randn(o.shape, generator=gen, dtype=torch.complex128
                                       if o.is_complex() else torch.float64).to(o.dtype)
                           for o in outs0]
                loss = scalar_loss(f, weights)
                rec = _Recorder()
                per = []
                with rec:
                    for b in range(B):
                        xs = [ex[b].clone().requires_grad_() for ex in examples]
                        val = loss(*xs)
                        gs = (torch.autograd.grad(val, xs, allow_unused=True)
                              if val.requires_grad else [None] * len(xs))
                        per.append([_zeros(g, x) for g, x in zip(gs, xs)])
            expected = [torch.stack([p[i] for p in per]) for i in range(len(primals))]
            break
        except Exception as e:  # noqa: BLE001
            why = sc.first_line(e)
    else:
        return None, "loop failed: " + why
    dims = tuple(ex[0].dim() if dim_last else 0 for ex in examples)
    randomness = "same" if rec.random else "error"
    argnums = tuple(range(len(primals)))
    label = "vmap(grad) bdim-" + ("last" if dim_last else "0")

    def body(vmap, grad):
        def run():
            phys = [torch.stack(ex, dim=d) for ex, d in zip(examples, dims)]
            return vmap(grad(loss, argnums=argnums), in_dims=dims, randomness=randomness)(*phys)
        return run

    res = _run(label, body(ftrans.vmap, ftrans.grad), expected, rec.random)
    tf = None
    if with_torch_func:
        tf = _run(label, body(torch.func.vmap, torch.func.grad), expected, rec.random)
    if not distinct and res[0] != "pass":
        res = res[:1] + (res[1] + " (identical examples)",) + res[2:]
    return (res, tf), None


# ----------------------------------------------------------------------------------------------
# One op
# ----------------------------------------------------------------------------------------------

def _record(r, outcome, why, label):
    if outcome is None:
        sc.note(r, f"{label}: {why}")
        return
    (status, msg, fell), tf = outcome
    r.checks += 1
    _merge(r, status, msg, fell)
    if tf is not None:
        sc.merge_tf(r, TF_RANK, tf[0], tf[1])


def run_op(op, n_samples=3, *, with_torch_func=True, timeout=None, checks=("vjp", "grad"),
           last_samples=1, dtype=None) -> VjpResult:
    """Sweep one OpInfo; never raises (failures are statuses).

    ``dtype``: run in this dtype instead of :func:`pick_dtype`'s (skip if the op's backward
    does not support it); complex128 is where lazy conj/neg view bits show up.
    """
    start = time.perf_counter()
    r = VjpResult(op_key(op))
    if not getattr(op, "supports_autograd", False):
        r.reason = "OpInfo does not support autograd"
        return r
    dtype = sc.choose_dtype(r, op, dtype, _backward_dtypes, pick_dtype,
                            "no float/complex backward dtype on CPU")
    if dtype is None:
        return r

    def body(samples, gen):
        for k, sample in enumerate(samples):
            f, primals = make_function(op, sample)
            if f is None:
                sc.note(r, f"sample {k}: {primals}")
                continue
            seed = 1000 + k
            if "vjp" in checks:
                out, why = check_vjp(f, primals, gen, seed, with_torch_func)
                _record(r, out, why, f"sample {k} vjp")
            if "grad" in checks:
                # as_strided & co. read explicit strides: only contiguous examples agree.
                with_last = k < last_samples and r.name not in vh.LAYOUT_DEPENDENT
                for last in ((False, True) if with_last else (False,)):
                    out, why = check_grad(f, primals, gen, last, with_torch_func)
                    _record(r, out, why, f"sample {k} grad{' last' if last else ''}")

    if not sc.run_samples(r, RANK, op, dtype, n_samples, True, timeout, body):
        return r
    return sc.finish(r, r.checks, start)
