"""ModuleInfo sweep machinery: ``torch.nn`` modules under ftrans's transforms, against loops.

The OpInfo sweep checks single ops; real users transform whole modules, whose forwards mix
composite ops, in-place buffer updates (BatchNorm's running stats), fused kernels (RNNs) and
tuple outputs.  torch's ``module_db`` lists ~114 modules with sample inputs.  For each sample this
module runs three checks, each against a per-example loop, with ftrans and with torch.func:

1. ``forward``: ``vmap(module)`` over B stacked copies of the sample's forward inputs.  The batch
   dim is a NEW leading dim: each example is the sample's own input, which may itself carry the
   module's batch dim (BatchNorm in training needs one).  This is the only mapping whose
   per-example semantics equal the loop for every module.
2. ``grad``: per-sample gradients, ``vmap(grad(loss), in_dims=(None, ..., 0, ...))`` where
   ``loss`` sums the outputs of ``functional_call(module, (params, buffers), x)``.  Gradients are
   taken w.r.t. the parameters AND the float inputs, so parameter-free modules (activations,
   losses) still exercise their backward batching rules.
3. ``ensemble``: ``stack_module_state`` over M independently initialised copies and
   ``vmap(functional_call-based f, in_dims=(0, 0, None))``.

Design choices, each for a reason:

- Per-example values are distinct (identical copies cannot catch a rule that mixes examples
  up).  Floats are scaled by factors in (0.9, 1]: signs, zeros, ``[0, 1]`` ranges (BCELoss) and
  positivity (GaussianNLLLoss variances) survive.  Integer and bool inputs get their elements
  permuted, which keeps indices and labels valid.  If the loop fails on perturbed values the
  sample is retried with identical copies.
- Stateful modules (the loop sees a buffer change, e.g. running stats in training mode): each
  example, like each loop iteration on a fresh copy, owns its buffers, so the vmapped checks map
  over replicated buffers (torch.func's documented recipe) and compare the updated buffers too.
  Mapping with the module's own, unbatched buffers would ask vmap to write B different updates
  into one tensor; that call must raise a clear error, which is recorded as ``plain_stateful``.
- Lazy modules are materialised by one plain call first: parameter initialisation is random
  and shape-dependent, not something to map over.
- Status per check is the worst over samples: wrong > error > fallback > expected-error > pass;
  'skip' only when no sample could run.  'expected-error' means ftrans raised a clear error
  (VmapError or an in-place-into-unbatched message) where torch.func errors too.  A mismatch is
  never a tolerance to loosen: it is 'wrong', with the max difference.
"""
from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
import torch.utils._pytree as pytree

import ftrans
import sweep_common as sc

B = 3                      # examples per vmap call
M = 3                      # ensemble size
RANK = {"wrong": 5, "error": 4, "fallback": 3, "expected-error": 2, "pass": 1, "skip": 0}
CHECKS = ("forward", "grad", "ensemble")


class Skip(Exception):
    """The sample cannot be used (the loop itself fails, nothing to differentiate, ...)."""


@dataclasses.dataclass
class CheckResult:
    status: str
    reason: str = ""
    fallbacks: dict = dataclasses.field(default_factory=dict)
    sample: str = ""


@dataclasses.dataclass
class ModuleResult:
    name: str
    ftrans: dict              # check -> CheckResult (worst over samples)
    torch_func: dict          # check -> CheckResult
    n_samples: int = 0
    notes: list = dataclasses.field(default_factory=list)

    def worst(self) -> str:
        return max((r.status for r in self.ftrans.values()), key=RANK.__getitem__)


# ----------------------------------------------------------------------------------------------
# Transform backends: the same checks run with ftrans and with torch.func (the rival/oracle).
# ----------------------------------------------------------------------------------------------

class _Ftrans:
    name = "ftrans"
    vmap = staticmethod(ftrans.vmap)
    grad = staticmethod(ftrans.grad)
    functional_call = staticmethod(ftrans.functional_call)
    stack_module_state = staticmethod(ftrans.stack_module_state)


class _TorchFunc:
    name = "torch.func"

    @staticmethod
    def vmap(*a, **k):
        return torch.func.vmap(*a, **k)

    @staticmethod
    def grad(*a, **k):
        return torch.func.grad(*a, **k)

    @staticmethod
    def functional_call(*a, **k):
        return torch.func.functional_call(*a, **k)

    @staticmethod
    def stack_module_state(*a, **k):
        return torch.func.stack_module_state(*a, **k)


BACKENDS = {"ftrans": _Ftrans, "torch.func": _TorchFunc}


# ----------------------------------------------------------------------------------------------
# Samples
# ----------------------------------------------------------------------------------------------

def load_module_db() -> dict:
    from torch.testing._internal.common_modules import module_db
    return {m.name: m for m in module_db}


def _dtype(info):
    dts = info.dtypes if info.dtypes else (torch.float64,)
    return torch.float64 if torch.float64 in dts else torch.float32


def samples(info, training=True):
    return list(info.module_inputs_func(info, device="cpu", dtype=_dtype(info),
                                        requires_grad=False, training=training))


def _sample_name(s, i) -> str:
    return f"#{i}" + (f"({s.desc})" if s.desc else "")


def build(info, sample, training, seed=0):
    torch.manual_seed(seed)
    ci = sample.constructor_input
    m = info.module_cls(*copy.deepcopy(ci.args), **copy.deepcopy(ci.kwargs))
    m.to(_dtype(info))  # as torch's own module tests do; integer buffers keep their dtype
    m.train(training)
    if info.is_lazy:
        args, kwargs = sample.forward_input.args, sample.forward_input.kwargs
        with torch.no_grad():
            m(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    return m


class Inputs:
    """A sample's forward inputs as a flat list of tensors plus a way to rebuild the call."""

    def __init__(self, sample):
        fi = sample.forward_input
        leaves, self.spec = pytree.tree_flatten((list(fi.args), dict(fi.kwargs)))
        self.leaves = leaves
        self.pos = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        self.tensors = [leaves[i] for i in self.pos]

    def call(self, module, tensors):
        args, kwargs = _rebuild(self, tensors)
        return module(*args, **kwargs)

    def float_positions(self):
        return [j for j, t in enumerate(self.tensors) if t.is_floating_point()]


def perturb(t, i, distinct):
    """Example ``i``'s copy of ``t``: distinct values that keep the input's domain."""
    if not distinct or i == 0:
        return t.clone()
    g = torch.Generator().manual_seed(1000 + i)
    if t.is_floating_point() or t.is_complex():
        return t * (1 - 0.1 * torch.rand(t.shape, generator=g, dtype=t.real.dtype))
    if t.numel() <= 1:
        return t.clone()
    flat = t.reshape(-1)
    return flat[torch.randperm(flat.numel(), generator=g)].reshape(t.shape).clone()


def stacked(tensors, distinct):
    """(per-example lists, stacked [B, ...] tensors)."""
    per = [[perturb(t, i, distinct) for t in tensors] for i in range(B)]
    return per, [torch.stack([per[i][j] for i in range(B)]) for j in range(len(tensors))]


def _tensor_leaves(out):
    return [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]


def _float_sum(out):
    parts = [o.sum() for o in _tensor_leaves(out) if o.is_floating_point() or o.is_complex()]
    if not parts:
        raise Skip("module output has no floating-point tensor to differentiate")
    return sum(parts[1:], parts[0]).real


def _stack_results(results):
    """Stack B per-example lists of tensors position-wise."""
    return [torch.stack([r[j] for r in results]) for j in range(len(results[0]))]


def _buffers(m):
    return {k: v.detach().clone() for k, v in m.named_buffers()}


def _is_stateful(info, sample, training, inputs):
    """Does one forward call change a buffer (running stats in training)?"""
    m = build(info, sample, training)
    before = _buffers(m)
    with torch.no_grad():
        inputs.call(m, [t.clone() for t in inputs.tensors])
    after = _buffers(m)
    return any(not torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------------------------
# The three checks.  Each returns (expected, got) lists of tensors; raises Skip when the
# per-example loop itself is unusable.
# ----------------------------------------------------------------------------------------------

def _loop(fn):
    try:
        return fn()
    except Skip:
        raise
    except Exception as e:  # the oracle failing means the sample is unusable here
        raise Skip(f"loop failed: {type(e).__name__}: {_first_line(e)}") from e


def check_forward(T, info, sample, training, inputs, stateful, distinct):
    base = build(info, sample, training)
    per, xs = stacked(inputs.tensors, distinct)

    def one(i):
        m = copy.deepcopy(base)
        out = _tensor_leaves(inputs.call(m, per[i]))
        return out + (list(_buffers(m).values()) if stateful else [])

    expected = _loop(lambda: _stack_results([one(i) for i in range(B)]))
    m = copy.deepcopy(base)
    if not stateful:
        got = T.vmap(lambda *ts: tuple(_tensor_leaves(inputs.call(m, list(ts)))))(*xs)
        return expected, list(got)
    bufs, bdims = per_example_buffers(base)

    def f(b, *ts):
        args, kwargs = _rebuild(inputs, ts)
        return tuple(_tensor_leaves(T.functional_call(m, b, args, kwargs)))

    got = list(T.vmap(f, in_dims=(bdims,) + (0,) * len(xs))(bufs, *xs))
    return expected, got + [v if bdims[k] == 0 else v.expand((B,) + v.shape)
                            for k, v in bufs.items()]


def per_example_buffers(module):
    """Buffers for mapping a stateful module: (dict, in_dims dict).

    Float buffers (running stats) are replicated to ``[B, ...]``: each example updates its own.
    Integer counters (``num_batches_tracked``) stay unbatched: every example increments its copy
    by the same amount, and BatchNorm with ``momentum=None`` reads the counter with ``float()``,
    which no vmap can do on a per-example value.
    """
    bufs, bdims = {}, {}
    for k, v in _buffers(module).items():
        batched = v.is_floating_point() or v.is_complex()
        bufs[k] = v.unsqueeze(0).repeat((B,) + (1,) * v.dim()) if batched else v
        bdims[k] = 0 if batched else None
    return bufs, bdims


def _rebuild(inputs, ts):
    """functional_call takes (args, kwargs): rebuild the sample's call from flat tensors."""
    leaves = list(inputs.leaves)
    for i, t in zip(inputs.pos, ts):
        leaves[i] = t
    args, kwargs = pytree.tree_unflatten(leaves, inputs.spec)
    return tuple(args), kwargs


def plain_stateful(T, info, sample, training, inputs):
    """vmap a stateful module with its own (unbatched) buffers: must raise."""
    m = build(info, sample, training)
    _, xs = stacked(inputs.tensors, True)
    T.vmap(lambda *ts: tuple(_tensor_leaves(inputs.call(m, list(ts)))))(*xs)


def check_grad(T, info, sample, training, inputs, stateful, distinct):
    base = build(info, sample, training)
    params = {k: v.detach().clone() for k, v in base.named_parameters()}
    floats = inputs.float_positions()
    per, xs = stacked(inputs.tensors, distinct)
    n = len(xs)

    def make_loss(module, fcall):
        def loss(p, b, *ts):
            args, kwargs = _rebuild(inputs, ts)
            return _float_sum(fcall(module, (p, b), args, kwargs))
        return loss

    def loop_grads(wrt):
        res = []
        for i in range(B):
            m = copy.deepcopy(base)
            p = {k: v.clone().requires_grad_() for k, v in params.items()}
            ts = [t.clone().requires_grad_() if j in wrt else t for j, t in enumerate(per[i])]
            out = make_loss(m, torch.func.functional_call)(p, _buffers(base), *ts)
            leaves = list(p.values()) + [ts[j] for j in wrt]
            if not leaves:
                raise Skip("nothing to differentiate (no parameters, no float inputs)")
            gs = torch.autograd.grad(out, leaves, allow_unused=True)
            res.append([torch.zeros_like(l) if g is None else g for l, g in zip(leaves, gs)])
        return _stack_results(res)

    # Some losses have no derivative w.r.t. their target: drop inputs until the loop works.
    candidates = [floats, floats[:1], []]
    err = None
    for wrt in candidates:
        try:
            expected = loop_grads(wrt)
            break
        except Skip:
            raise
        except Exception as e:
            err = e
    else:
        raise Skip(f"loop failed: {type(err).__name__}: {_first_line(err)}")

    m = copy.deepcopy(base)
    bufs, bdims = per_example_buffers(base) if stateful else (_buffers(base), None)
    argnums = (0,) + tuple(2 + j for j in wrt)
    g = T.grad(make_loss(m, T.functional_call), argnums=argnums)
    in_dims = (None, bdims) + (0,) * n
    got = T.vmap(g, in_dims=in_dims)(params, bufs, *xs)
    return expected, list(got[0].values()) + list(got[1:])


def check_ensemble(T, info, sample, training, inputs, stateful, distinct):
    models = []
    for s in range(M):
        m = build(info, sample, training, seed=s)
        with torch.no_grad():
            for p in m.parameters():
                # Deterministic inits (LayerNorm's ones) would make the copies identical.
                g = torch.Generator().manual_seed(100 + s)
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        models.append(m)
    if not any(True for _ in models[0].parameters()) and not any(True for _ in models[0].buffers()):
        raise Skip("no parameters or buffers to stack")
    xs = [t.clone() for t in inputs.tensors]

    def one(i):
        m = copy.deepcopy(models[i])
        out = _tensor_leaves(inputs.call(m, [t.clone() for t in xs]))
        return [o.detach() for o in out] + list(_buffers(m).values())

    expected = _loop(lambda: _stack_results([one(i) for i in range(M)]))
    params, bufs = T.stack_module_state(models)
    base = copy.deepcopy(models[0])

    def f(p, b, *ts):
        args, kwargs = _rebuild(inputs, ts)
        return tuple(_tensor_leaves(T.functional_call(base, (p, b), args, kwargs)))

    got = T.vmap(f, in_dims=(0, 0) + (None,) * len(xs))(params, bufs, *xs)
    return expected, [o.detach() for o in got] + [b.detach() for b in bufs.values()]


CHECK_FNS = {"forward": check_forward, "grad": check_grad, "ensemble": check_ensemble}


# ----------------------------------------------------------------------------------------------
# Running and classifying
# ----------------------------------------------------------------------------------------------

_first_line = sc.message_line
time_limit = sc.time_limit  # raises TimeoutError("timed out after {seconds}s")


def _compare(expected, got):
    if len(expected) != len(got):
        return f"{len(got)} outputs, loop gave {len(expected)}"
    for j, (e, g) in enumerate(zip(expected, got)):
        if e.shape != g.shape or e.dtype != g.dtype:
            return f"output {j}: {tuple(g.shape)} {g.dtype}, loop gave {tuple(e.shape)} {e.dtype}"
        try:
            torch.testing.assert_close(g, e, equal_nan=True)
        except AssertionError as err:
            diff = (g.double() - e.double()).abs()
            diff = diff[~diff.isnan()]
            return f"output {j}: max abs diff {diff.max().item() if diff.numel() else 'nan'}: " \
                   f"{_first_line(err)}"
    return None


def run_check(backend, check, info, sample, training, inputs, stateful, timeout=120):
    """One check, one sample, one backend -> CheckResult (status 'skip' if the loop fails)."""
    T = BACKENDS[backend]
    before = ftrans.fallback_stats()
    for distinct in (True, False):
        try:
            with time_limit(timeout), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected, got = CHECK_FNS[check](T, info, sample, training, inputs, stateful,
                                                 distinct)
        except Skip as e:
            if distinct:
                continue  # perturbed values may leave the module's domain: retry identical
            return CheckResult("skip", str(e))
        except Exception as e:
            return CheckResult("error", f"{type(e).__name__}: {_first_line(e)}",
                               _new_fallbacks(before))
        break
    bad = _compare(expected, got)
    fb = _new_fallbacks(before)
    if bad:
        return CheckResult("wrong", bad, fb)
    if fb and backend == "ftrans":
        return CheckResult("fallback", "ops fell back: " + ", ".join(sorted(fb)), fb)
    return CheckResult("pass", "" if distinct else "identical copies (loop rejects perturbed)")


def _new_fallbacks(before):
    after = ftrans.fallback_stats()
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def _worse(a: CheckResult | None, b: CheckResult) -> CheckResult:
    if a is None or RANK[b.status] > RANK[a.status]:
        return b
    if b.status == a.status == "fallback":
        a.fallbacks = {**a.fallbacks, **b.fallbacks}
        a.reason = "ops fell back: " + ", ".join(sorted(a.fallbacks))
    return a


def run_module(info, max_samples=1, timeout=120, oracle="always", modes=None) -> ModuleResult:
    """All checks for the first ``max_samples`` samples (None: all) of one ModuleInfo.

    ``oracle="on-error"`` runs torch.func only where ftrans errors (all 'expected-error'
    needs): the fast path for tests.  The report uses "always" to compare the two libraries.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _run_module(info, max_samples, timeout, oracle, modes)


def _run_module(info, max_samples, timeout, oracle, modes):
    backends = ("ftrans", "torch.func") if oracle == "always" else ("ftrans",)
    if modes is None:
        modes = (True, False) if (info.train_and_eval_differ and max_samples != 1) else (True,)
    res = ModuleResult(info.name, {c: None for c in CHECKS}, {c: None for c in CHECKS})
    for training in modes:
        try:
            ss = samples(info, training)
        except Exception as e:
            res.notes.append(f"sample generation failed: {_first_line(e)}")
            continue
        for i, s in enumerate(ss[:max_samples] if max_samples else ss):
            res.n_samples += 1
            name = _sample_name(s, i) + ("" if training else "[eval]")
            inputs = Inputs(s)
            try:
                stateful = _is_stateful(info, s, training, inputs)
            except Exception as e:
                for store in (res.ftrans, res.torch_func):
                    for c in CHECKS:
                        store[c] = _worse(store[c], CheckResult(
                            "skip", f"loop failed: {_first_line(e)}", sample=name))
                continue
            if stateful and oracle == "always":
                _note_plain_stateful(res, info, s, training, inputs, name, backends, timeout)
            for c in CHECKS:
                r = run_check("ftrans", c, info, s, training, inputs, stateful, timeout)
                r.sample = name
                if oracle == "always" or r.status == "error":
                    t = run_check("torch.func", c, info, s, training, inputs, stateful, timeout)
                    t.sample = name
                    res.torch_func[c] = _worse(res.torch_func[c], t)
                    if r.status == "error" and t.status == "error" and _clear_error_text(r.reason):
                        r.status = "expected-error"
                res.ftrans[c] = _worse(res.ftrans[c], r)
    for store in (res.ftrans, res.torch_func):
        for c in CHECKS:
            if store[c] is None:
                store[c] = CheckResult("skip", "no sample ran")
    return res


def _note_plain_stateful(res, info, s, training, inputs, name, backends, timeout):
    if any("plain_stateful" in n for n in res.notes):
        return
    outcome = {}
    for backend in backends:
        try:
            with time_limit(timeout), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plain_stateful(BACKENDS[backend], info, s, training, inputs)
            outcome[backend] = "NO ERROR (running stats cannot hold B updates)"
        except Exception as e:
            outcome[backend] = f"{type(e).__name__}: {_first_line(e)[:160]}"
    res.notes.append(f"plain_stateful {name}: vmap with the module's own buffers: " +
                     "; ".join(f"{k}: {v}" for k, v in outcome.items()))


def _clear_error_text(reason: str) -> bool:
    low = reason.lower()
    return reason.startswith("VmapError") or "in-place" in low or "inplace" in low
