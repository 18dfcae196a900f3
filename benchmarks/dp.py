"""DP-SGD step rows: ftrans.clipped_grad against the non-private step, vmap(grad) + clip and
Opacus (hooks and ghost clipping, when installed).

Columns of the shared table: ``ftrans`` = ``ftrans.clipped_grad`` (eager; the compiled time is
in the note), ``torch.func`` = ``torch.func.vmap(grad)`` + per-example clip + sum, ``loop`` = a
per-example loop + clip (the oracle every contender is checked against).  The note holds the
non-private step (one ``loss.backward()`` of the summed loss) and the ratios the issue targets,
Opacus's times, and with ``--mem`` three memory measurements (``python -m benchmarks.dp
--mem``):

- ``peak_rss_mb``: the peak RSS growth of three calls after set-up, each method in a fresh
  process (``ru_maxrss``).  The first call is in it, so one-off costs count: the imports and
  the trace of ``ftrans.compile``, the autograd engine's start, and memory glibc keeps after
  freeing.
- ``step_peak_mb``: the step itself, at steady state: in a fresh process with glibc's mmap
  threshold fixed at 64 KiB (every tensor above it is returned to the kernel when freed, so
  RSS follows the live tensors), one warm-up call, then the peak (``VmHWM``, reset through
  ``/proc/self/clear_refs``) of three calls over the RSS before them.  Linux only.
- ``graph_peak_mb``: the peak of live tensor bytes of the step's aten graph (``make_fx``,
  every storage freed after its last use as the replay does; inputs not counted): no
  allocator, deterministic.
"""
from __future__ import annotations

import functools
import subprocess
import sys

import torch
import torch.nn.functional as F

import ftrans

from . import models
from .common import median_ms, run_row

C = 1.0
SIZES = {"mlp-a3": 256, "cnn": 64, "transformer": 16}


def _model(name, device):
    if name == "mlp-a3":  # BEYOND.md A.3: 784-512-512-10
        torch.manual_seed(0)
        return models.MLP((784, 512, 512, 10)).to(device), (784,), 10
    if name == "transformer":  # the benchmarks' block at T=128
        torch.manual_seed(0)
        return models.TransformerBlock().to(device), (128, 64), 10
    return models.make(name, device)


def _clip_sum(per):
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in per.values()], 1)
    c = (C / flat.norm(dim=1)).clamp(max=1)
    return {k: torch.einsum("b,b...->...", c, g) for k, g in per.items()}


def setup(name, B, device="cpu"):
    model, shape, classes = _model(name, device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(B, *shape, device=device)
    y = torch.randint(0, classes, (B,), device=device)

    def loss(p, xb, yb):
        out = ftrans.functional_call(model, p, (xb.unsqueeze(0),))
        return F.cross_entropy(out, yb.unsqueeze(0))

    def tf_loss(p, xb, yb):
        out = torch.func.functional_call(model, p, (xb.unsqueeze(0),))
        return F.cross_entropy(out, yb.unsqueeze(0))

    live = dict(model.named_parameters())

    def nonprivate():
        grads = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"),
                                    list(live.values()))
        return dict(zip(live, grads))

    def loop():
        per = {k: [] for k in live}
        for i in range(B):
            g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]),
                                    list(live.values()))
            for k, gi in zip(live, g):
                per[k].append(gi)
        return _clip_sum({k: torch.stack(v) for k, v in per.items()})

    clipped = ftrans.clipped_grad(loss, C)
    compiled = ftrans.compile(clipped)
    # The whole DP step: clipped sum + Gaussian noise (sigma = 1), compiled; its noise drawn
    # ahead in a worker thread (the default) or inline.  Noisy: not compared with the loop.
    dpsgd = {k: ftrans.dp.DPSGD(loss, max_norm=C, noise_multiplier=1.0, sample_rate=0.01,
                                num_examples=100 * B, compile=True, accountant=None,
                                generator=torch.Generator().manual_seed(0),
                                prefetch_noise=k == "dpsgd")
             for k in ("dpsgd", "dpsgd inline")}
    impls = {
        "loop": loop,
        "ftrans": lambda: clipped(params, x, y),
        "torch.func": lambda: _clip_sum(torch.func.vmap(torch.func.grad(tf_loss),
                                                        in_dims=(None, 0, 0))(params, x, y)),
        "compiled": lambda: compiled(params, x, y),
        "nonprivate": nonprivate,
        **{k: functools.partial(d.step, params, x, y) for k, d in dpsgd.items()},
    }
    impls.update(_opacus(model, x, y))
    return impls


def _opacus(model, x, y):
    """Opacus's two modes, each producing the clipped sum in ``p.grad``."""
    try:
        import opacus  # noqa: F401
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    except ImportError:
        return {}
    import copy
    out = {}
    hooks = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")

    def run_hooks():
        for p in hooks.parameters():
            p.grad_sample = None
            p.grad = None
        F.cross_entropy(hooks(x), y, reduction="sum").backward()
        names = [n for n, _ in hooks.named_parameters()]
        return _clip_sum({n.removeprefix("_module."): p.grad_sample
                          for n, p in zip(names, hooks.parameters())})
    out["opacus hooks"] = run_hooks
    try:
        ghost = GradSampleModuleFastGradientClipping(copy.deepcopy(model), max_grad_norm=C,
                                                     use_ghost_clipping=True,
                                                     loss_reduction="sum")
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(ghost.parameters(), lr=0.0),
                                              noise_multiplier=0.0, max_grad_norm=C,
                                              expected_batch_size=x.shape[0],
                                              loss_reduction="sum")
        crit = DPLossFastGradientClipping(ghost, opt, torch.nn.CrossEntropyLoss(reduction="sum"),
                                          loss_reduction="sum")

        def run_ghost():
            opt.zero_grad(True)
            crit(ghost(x), y).backward()
            return {n.removeprefix("_module."): p.grad for n, p in ghost.named_parameters()}
        out["opacus ghost"] = run_ghost
    except Exception:  # an Opacus version without this API: the row says so
        pass
    return out


def rows(device, quick, only):
    out = []
    for name, B in SIZES.items():
        wl = f"dp step {name}"
        if only and not any(o in wl for o in only):
            continue
        impls = setup(name, B, device)
        extra = {k: impls.pop(k) for k in list(impls) if k not in ("loop", "ftrans",
                                                                   "torch.func")}
        reps = 3 if quick else 11
        row = run_row(wl, f"B={B}", impls, device, reps=reps)
        nonpriv = extra.pop("nonprivate")
        checked = {}
        ref = impls["loop"]()
        from .common import same
        for k, fn in extra.items():
            if k.startswith("dpsgd"):
                checked[k] = fn  # (noisy; DPSGD is tested in tests/test_clipping_dpsgd.py)
                continue
            try:
                res = fn()
            except Exception as e:
                row.note += f"{k} failed: {type(e).__name__}; "
                continue
            if not same(res, ref):
                row.note += f"{k} WRONG RESULT; "
                continue
            checked[k] = fn
        ms = median_ms({"nonprivate": nonpriv, "ftrans": impls["ftrans"], **checked}, device,
                       reps=reps)
        base = ms["nonprivate"]
        row.note += (f"non-private {base:.2f} ms; ftrans {ms['ftrans'] / base:.2f}x non-private")
        if "compiled" in ms:
            row.note += f"; compiled {ms['compiled']:.2f} ms ({ms['compiled'] / base:.2f}x)"
        for k in ("dpsgd", "dpsgd inline"):
            if k in ms:
                what = "noise drawn ahead" if k == "dpsgd" else "noise drawn inline"
                row.note += (f"; DPSGD.step compiled, {what} {ms[k]:.2f} ms "
                             f"({ms[k] / base:.2f}x)")
        if row.torch_func_ms and row.ftrans_ms:
            row.note += f"; vmap(grad)+clip / ftrans {row.torch_func_ms / row.ftrans_ms:.1f}x"
        for k in ("opacus hooks", "opacus ghost"):
            if k in ms:
                row.note += f"; {k} {ms[k]:.2f} ms"
        out.append(row)
    return out


_MEM_CHILD = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from benchmarks import dp
torch.set_num_threads({threads})
impls = dp.setup({name!r}, {B})
fn = impls[{method!r}]
import gc; gc.collect()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(3):
    fn()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0)
"""


def peak_rss_mb(name, B, method, threads=1) -> float:
    """Peak RSS growth (MiB) of three calls of ``method`` after setup, in a fresh process."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _MEM_CHILD.format(root=root, threads=threads, name=name, B=B, method=method)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return float(res.stdout.strip().splitlines()[-1])


_STEP_CHILD = """
import gc, sys, torch
sys.path.insert(0, {root!r})
from benchmarks import dp
torch.set_num_threads({threads})
impls = dp.setup({name!r}, {B})
fn = impls[{method!r}]
fn()
gc.collect()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024.0
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
for _ in range(3):
    fn()
print(status("VmHWM") - before)
"""


def step_peak_mb(name, B, method, threads=1) -> float:
    """Peak RSS (MiB) of three steady-state calls of ``method`` over the RSS before them, with
    freed tensors returned to the kernel (see the module docstring); Linux only."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _STEP_CHILD.format(root=root, threads=threads, name=name, B=B, method=method)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    return float(res.stdout.strip().splitlines()[-1])


def live_peak_bytes(gm) -> int:
    """Peak live tensor bytes of an aten ``GraphModule`` run in order, each storage freed after
    the last use of any of its views (outputs kept; placeholders not counted)."""
    nodes = list(gm.graph.nodes)
    root, last, outs = {}, {}, set()
    for i, n in enumerate(nodes):
        schema = getattr(n.target, "_schema", None)
        aliases = (n.target is torch.ops.aten._unsafe_view.default or (
            schema is not None and len(schema.returns) == 1
            and schema.returns[0].alias_info is not None))
        base = n.args[0] if n.op == "call_function" and n.args else None
        root[n] = root[base] if aliases and isinstance(base, torch.fx.Node) else n
        for a in n.all_input_nodes:
            last[root[a]] = i
            if n.op == "output":
                outs.add(root[a])
    live, cur, best = {}, 0, 0
    for i, n in enumerate(nodes):
        if n.op == "call_function" and root[n] is n:
            vals = n.meta.get("val")
            vals = vals if isinstance(vals, (list, tuple)) else [vals]
            live[n] = sum(v.numel() * v.element_size() for v in vals
                          if isinstance(v, torch.Tensor))
            cur += live[n]
        best = max(best, cur)
        for r in [r for r in live if last.get(r, -1) <= i and r not in outs]:
            cur -= live.pop(r)
    return best


def graph_peak_mb(name, B) -> dict:
    """``{"nonprivate": MiB, "clipped": MiB}``: :func:`live_peak_bytes` of the two steps'
    aten graphs (the graph ``ftrans.compile`` replays, before its clean-up)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    model, shape, classes = _model(name, "cpu")
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(B, *shape)
    y = torch.randint(0, classes, (B,))

    def loss(p, xb, yb):
        out = ftrans.functional_call(model, p, (xb.unsqueeze(0),))
        return F.cross_entropy(out, yb.unsqueeze(0))

    clipped = ftrans.clipped_grad(loss, C)

    def nonprivate(p, x, y):
        leaves = {k: v.requires_grad_() for k, v in p.items()}
        with torch.enable_grad():
            out = torch.func.functional_call(model, leaves, (x,))
            grads = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"),
                                        list(leaves.values()))
        return dict(zip(leaves, grads))

    res = {}
    for label, fn in (("nonprivate", nonprivate), ("clipped", clipped)):
        p = {k: v.clone() for k, v in params.items()}
        gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(p, x, y)
        res[label] = live_peak_bytes(gm) / 2 ** 20
    return res


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mem", action="store_true", help="also measure peak RSS per method")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    for r in rows("cpu", args.quick, None):
        print(f"| {r.workload} | {r.size} | {r.ftrans_ms:.2f} | {r.torch_func_ms or 0:.2f} | "
              f"{r.loop_ms:.2f} | {r.note} |", flush=True)
    if args.mem:
        for name, B in SIZES.items():
            cells = []
            for m in ("nonprivate", "ftrans", "compiled", "torch.func", "opacus hooks",
                      "opacus ghost"):
                try:
                    cells.append(f"{m} {peak_rss_mb(name, B, m):.1f} MiB")
                except Exception:
                    cells.append(f"{m} -")
            print(f"peak RSS growth {name} B={B}: " + "; ".join(cells), flush=True)
            cells = []
            for m in ("nonprivate", "ftrans", "compiled", "opacus ghost"):
                try:
                    cells.append(f"{m} {step_peak_mb(name, B, m):.1f} MiB")
                except Exception:
                    cells.append(f"{m} -")
            print(f"steady-state step peak {name} B={B}: " + "; ".join(cells), flush=True)
            g = graph_peak_mb(name, B)
            print(f"graph live-tensor peak {name} B={B}: nonprivate {g['nonprivate']:.2f} MiB; "
                  f"clipped {g['clipped']:.2f} MiB ({g['clipped'] / g['nonprivate']:.2f}x)",
                  flush=True)


if __name__ == "__main__":
    main()
