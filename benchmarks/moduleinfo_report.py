"""Run the ModuleInfo sweep and write benchmarks/MODULEINFO.md.

The sweep (tests/moduleinfo_harness.py) runs three checks per ``torch.nn`` module -- forward
under vmap, per-sample gradients through functional_call, ensembles through stack_module_state
-- with ftrans and with torch.func, each against a per-example loop.  This script tabulates it
so the gaps are visible in one place: per module and check the status, the first line of each
error, and the aten ops that fell back to the per-example loop; and, next to it, torch.func's
status, so the report says where each library is ahead.

Usage::

    python benchmarks/moduleinfo_report.py                 # all samples (slow, ~10+ min)
    python benchmarks/moduleinfo_report.py --samples 1     # the fast slice
    python benchmarks/moduleinfo_report.py --json out.json # also dump raw results
    python benchmarks/moduleinfo_report.py --from-json out.json  # re-render only
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "tests"))

import moduleinfo_harness as h  # noqa: E402

STATUSES = ("pass", "fallback", "expected-error", "error", "wrong", "skip")

STATEFUL_POLICY = """\
## Training-mode BatchNorm / InstanceNorm with running stats

A per-example loop over fresh copies of the module gives every example its own running-stat
update; one unbatched `running_mean` cannot hold B different updates.  So:

- **Checks 1 and 2 map over replicated buffers** (`functional_call(module, buffers, x)` with
  the float buffers expanded to `[B, ...]`, torch.func's documented recipe) and compare the
  updated buffers with the loop's as well as the outputs.  This is the semantics that equals
  the loop.  The integer counter `num_batches_tracked` stays unbatched: every example
  increments it identically, and BatchNorm with `momentum=None` reads it with `float()`.
- **Check 3 (ensembles)** uses `stack_module_state` as a user would, so every buffer is
  per-model; with `momentum=None` (cumulative average) BatchNorm then calls `float()` on a
  per-model counter, which no vmap can do: ftrans raises a clear `VmapError` (`.item()` on a
  per-example value) and torch.func errors too, so that sample is **expected-error**.
- **vmap with the module's own, unbatched buffers** must raise a clear error: ftrans raises
  `VmapError` naming the problem and the fixes (eval mode, `track_running_stats=False`, or
  batched buffers); torch.func raises too.  The Notes section records both messages.
- Modules without running stats (InstanceNorm's default, `track_running_stats=False`) and
  eval mode are ordinary and must pass with the module's own buffers.
"""


OPEN_GAPS = """\
## Open gaps: minimal repros (rule files owned by other helpers)

```python
import torch, ftrans, torch.nn.functional as F
# 1. CTCLoss: dispatch refuses _ctc_loss (tagged dynamic_output_shape) even with int-list
#    lengths; torch.func runs it.  Fix: a rule in loss.py folding the vmap batch into N
#    (log_probs [T, B*N, C], targets [B*N, S], lengths tiled), same for _ctc_loss_backward.
lp = torch.randn(3, 50, 2, 15).log_softmax(-1); t = torch.randint(1, 15, (3, 2, 30))
ftrans.vmap(lambda lp, t: F.ctc_loss(lp, t, [50, 50], [30, 25]))(lp, t)   # VmapError
# 2. multilabel_margin_loss, 1-D input, reduction='none': shape [3, 1] instead of [3]
#    (torch's own decomposition returns [1] for a 1-D input).  Fix: a rule in loss.py.
x = torch.randn(3, 10); y = torch.randint(0, 10, (3, 10))
ftrans.vmap(lambda a, b: F.multilabel_margin_loss(a, b, reduction='none'))(x, y).shape
# 3. loop fallbacks: multi_margin_loss_backward, multilabel_margin_loss_backward (loss.py)
ftrans.vmap(ftrans.grad(F.multi_margin_loss))(torch.randn(3, 10), torch.randint(0, 10, (3,)))
# 4. fractional_max_pool{2,3}d and _backward have no rule (conv.py)
m = torch.nn.FractionalMaxPool2d(2, output_ratio=0.5, _random_samples=torch.rand(1, 3, 2))
ftrans.vmap(m)(torch.randn(3, 1, 3, 7, 7))
# 5. a batched keyword-only tensor sends any op to the loop fallback (dispatch.py's
#    kw_tensor branch), although nn.py's attention rule handles attn_mask:
q = torch.randn(3, 1, 2, 3, 2); mask = torch.randn(3, 1, 1, 1, 3)
ftrans.vmap(lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m))(q, mask)
# 6. LinearCrossEntropyLoss: torch 2.13's custom ops torch_nn::_linear_cross_entropy_batch_
#    chunked[_no_reduction] have no rule (torch.func's registered vmap rule loops too).
```
"""


def _row_status(r: dict) -> str:
    s = r["status"]
    if s == "fallback":
        return "fallback: " + ", ".join(f"`{k}`" for k in sorted(r["fallbacks"]))
    if s in ("error", "expected-error", "wrong", "skip"):
        reason = r["reason"].replace("|", "\\|").replace("\n", " ")
        return f"{s}: {reason[:160]}" + (f" [{r['sample']}]" if r.get("sample") else "")
    return s


def _counts(results, who):
    out = {c: collections.Counter() for c in h.CHECKS}
    for r in results:
        for c in h.CHECKS:
            out[c][r[who][c]["status"]] += 1
    return out


def render(results, meta) -> str:
    lines = ["# ModuleInfo sweep: torch.nn modules under ftrans (and torch.func)", "",
             "Generated by `benchmarks/moduleinfo_report.py` "
             f"({meta['samples']} samples per module, {meta['n_samples']} samples in all, "
             f"torch {meta['torch']}, {meta['seconds']:.0f} s).  Checks, each against a "
             "per-example loop: **forward** = `vmap(module)` over a new leading dim of B=3 "
             "perturbed copies of the sample input; **grad** = `vmap(grad(loss))` per-sample "
             "gradients w.r.t. parameters and float inputs through `functional_call`; "
             "**ensemble** = `stack_module_state` over M=3 differently initialised copies + "
             "`vmap(functional_call)`.  Status per check is the worst over samples "
             "(wrong > error > fallback > expected-error > pass); ensemble 'skip' means the "
             "module has no parameters or buffers to stack.  Modules whose train and eval "
             "modes differ run both.", ""]
    lines += ["## Totals (modules per status)", "",
              "| check | library | " + " | ".join(STATUSES) + " |",
              "|---|---|" + "---|" * len(STATUSES)]
    for who in ("ftrans", "torch_func"):
        cnt = _counts(results, who)
        for c in h.CHECKS:
            lines.append(f"| {c} | {who.replace('_', '.')} | " +
                         " | ".join(str(cnt[c].get(s, 0)) for s in STATUSES) + " |")
    lines.append("")
    ahead = [r["name"] for r in results
             if any(r["ftrans"][c]["status"] in ("pass", "fallback") and
                    r["torch_func"][c]["status"] in ("error", "wrong") for c in h.CHECKS)]
    behind = [r["name"] for r in results
              if any(h.RANK[r["ftrans"][c]["status"]] > h.RANK["pass"] and
                     r["torch_func"][c]["status"] == "pass" for c in h.CHECKS)]
    lines += [f"**ftrans is correct (pass, or fallback) where torch.func errors** ({len(ahead)}): " +
              (", ".join(ahead) or "none"), "",
              f"**torch.func passes where ftrans does not (error/fallback/wrong)** "
              f"({len(behind)}): " + (", ".join(behind) or "none"), ""]
    lines += [STATEFUL_POLICY, "## Per module", "",
              "| module | samples | forward | grad | ensemble | torch.func (fwd / grad / ens) |",
              "|---|---|---|---|---|---|"]
    for r in results:
        tf = " / ".join(r["torch_func"][c]["status"] for c in h.CHECKS)
        lines.append(f"| {r['name']} | {r['n_samples']} | " +
                     " | ".join(_row_status(r["ftrans"][c]) for c in h.CHECKS) + f" | {tf} |")
    lines.append("")
    tf_errs = [(r["name"], c, r["torch_func"][c]) for r in results for c in h.CHECKS
               if r["torch_func"][c]["status"] in ("error", "wrong")]
    if tf_errs:
        lines += ["## torch.func failures (first line)", ""]
        for name, c, t in tf_errs:
            lines.append(f"- {name} / {c}: {t['status']}: {t['reason'][:200]} [{t['sample']}]")
        lines.append("")
    lines.append(OPEN_GAPS)
    notes = [(r["name"], n) for r in results for n in r["notes"]]
    if notes:
        lines += ["## Notes (plain stateful vmap, sample generation)", ""]
        lines += [f"- {name}: {n[:400]}" for name, n in notes]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=0, help="samples per module (0: all)")
    ap.add_argument("--modules", nargs="*", help="only these ModuleInfo names")
    ap.add_argument("--json", help="also write raw results here")
    ap.add_argument("--from-json", help="render from a previous --json dump")
    ap.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "MODULEINFO.md"))
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
    else:
        import torch
        db = h.load_module_db()
        names = args.modules or list(db)
        t0 = time.time()
        results = []
        for name in names:
            t = time.time()
            r = h.run_module(db[name], max_samples=args.samples or None)
            d = dataclasses.asdict(r)
            results.append(d)
            print(f"{name:32s} {time.time() - t:6.1f}s n={r.n_samples:4d} " +
                  " ".join(f"{c}={d['ftrans'][c]['status']}" for c in h.CHECKS), flush=True)
        data = {"meta": {"samples": args.samples or "all", "torch": torch.__version__,
                         "n_samples": sum(r["n_samples"] for r in results),
                         "seconds": time.time() - t0}, "results": results}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(data, f, indent=1)
    with open(args.out, "w") as f:
        f.write(render(data["results"], data["meta"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
