"""Run the OpInfo sweep of autodiff under vmap and write benchmarks/OPINFO_VJP.md.

Why a report as well as a test: the aggregate is the useful view.  Per-sample gradients and
jacrev run every op's *backward* under vmap, so the question is how many ops torch.func gets
right that ftrans does not, which aten ops (mostly ``*_backward``) still fall back to the
per-example loop and how many OpInfos each affects, which errors share a cause, and above all
whether any gradient is silently wrong.  Machinery: tests/opinfo_vjp_harness.py.

Usage::

    python benchmarks/opinfo_vjp_report.py                   # full sweep -> OPINFO_VJP.md
    python benchmarks/opinfo_vjp_report.py --ops polar fft.ifft   # a subset, printed only
    python benchmarks/opinfo_vjp_report.py --write-expected  # refresh opinfo_vjp_expected.json

The expected file lists ops whose status is error/fallback (never 'wrong'), so
tests/test_opinfo_vjp.py can xfail them with their reason.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

import _report_common as rc  # noqa: E402
import opinfo_vjp_harness as h  # noqa: E402
from _report_common import cause  # noqa: E402

EXPECTED = os.path.join(ROOT, "tests", "opinfo_vjp_expected.json")


def sweep(names, samples, timeout, with_torch_func, log, dtype=None):
    """Run the ops in a worker process, restarting it after a crash.

    A few CPU kernels segfault on unusual (expanded) inputs that a batching rule can produce;
    in-process, one such op would end the whole sweep without a report.
    """
    import subprocess

    results, todo = [], list(names)
    while todo:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--samples", str(samples),
               "--timeout", str(timeout)] + (["--no-torch-func"] if not with_torch_func else []) \
            + (["--dtype", dtype] if dtype else [])
        proc = subprocess.Popen(cmd + ["--ops"] + todo, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            r = h.VjpResult(**json.loads(line))
            results.append(r)
            todo.remove(r.name)
            log.write(f"{len(results):4d}/{len(names)} {r.name:45s} {r.status:9s} "
                      f"tf={r.tf_status:5s} {r.seconds:6.2f}s {r.reason[:160]}\n")
            log.flush()
        if proc.wait() != 0 and todo:
            r = h.VjpResult(todo.pop(0), status="error",
                            reason=f"process crashed (exit {proc.returncode})")
            results.append(r)
            log.write(f"{len(results):4d}/{len(names)} {r.name:45s} CRASHED\n")
    return results


def worker(names, samples, timeout, with_torch_func, dtype=None):
    db = h.load_op_db()
    dtype = getattr(torch, dtype) if dtype else None
    for name in names:
        r = h.run_op(db[name], samples, with_torch_func=with_torch_func, timeout=timeout,
                     dtype=dtype)
        print(json.dumps(r.__dict__), flush=True)


def summarize(results):
    by = collections.Counter(r.status for r in results)
    tf = [r for r in results if r.tf_handles]
    return {
        "total": len(results), **{k: by[k] for k in h.RANK},
        "autograd": sum(r.reason != "OpInfo does not support autograd" for r in results),
        "tf_pass": len(tf), "tf_error": sum(r.tf_status == "error" for r in results),
        "tf_wrong": sum(r.tf_status == "wrong" for r in results),
        "correct_of_tf": sum(r.status in ("pass", "fallback") for r in tf),
        "pass_of_tf": sum(r.status == "pass" for r in tf),
    }


def markdown(results, s, elapsed, samples, dtype=None):
    lines = [
        "# OpInfo sweep: autodiff under ftrans.vmap vs a per-example autograd loop",
        "",
        f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M} by `benchmarks/opinfo_vjp_report.py`"
        f" on torch {torch.__version__}, CPU, {elapsed / 60:.1f} min; up to {samples} samples "
        "per op, " + (f"dtype {dtype} (ops without it skipped). " if dtype else
                      "float64 where the op's backward supports it (else float32, then "
                      "complex). ") +
        "Checks per sample: `vmap(vjp_fn)` over 3 distinct cotangents, and `vmap(grad(loss))` "
        "over 3 distinct primals (batch dim 0; batch dim last on the first sample), each against "
        "a loop of `torch.autograd.grad`. torch.func runs the same checks on the same inputs. "
        "Statuses are the worst over samples and checks.",
        "",
        "| status | ops |", "|---|---|",
    ]
    for k in ("pass", "fallback", "error", "wrong", "skip"):
        lines.append(f"| {k} | {s[k]} |")
    lines += [
        f"| **total** | {s['total']} ({s['autograd']} with supports_autograd) |", "",
        f"torch.func on the same checks: passes {s['tf_pass']}, errors {s['tf_error']}, "
        f"mismatches {s['tf_wrong']}.", "",
        f"**ftrans passes {s['correct_of_tf']} of the {s['tf_pass']} ops torch.func handles** "
        f"({s['pass_of_tf']} of them without any loop fallback).", "",
        "## Wrong results (must be zero)", "",
    ]
    lines += [f"- `{r.name}` ({r.dtype}): {r.reason} (torch.func: {r.tf_status})"
              for r in results if r.status == "wrong"] or ["None."]
    lines += rc.error_and_fallback_sections(results)
    only_tf = rc.only_tf(results)
    lines += ["", f"## torch.func handles, ftrans does not ({len(only_tf)})", ""]
    lines += [f"- `{r.name}` [{r.status}]: {r.reason[:160]}" for r in only_tf] or ["None."]
    lines += rc.only_ftrans_section(results)
    lines += ["", "## Skipped", ""]
    skips = collections.defaultdict(list)
    for r in results:
        if r.status == "skip":
            skips[cause(r.reason)].append(r.name)
    lines += [f"- {c} ({len(ns)}): {', '.join(f'`{n}`' for n in ns)}"
              for c, ns in sorted(skips.items(), key=lambda kv: -len(kv[1]))] or ["None."]
    lines += ["", "Checked with identical per-example primals (the loop failed on jittered "
              "ones): " + (", ".join(f"`{r.name}`" for r in results
                                     if "identical" in r.reason) or "none") + "."]
    return "\n".join(lines) + "\n"


def complex_section(results, s):
    lines = ["", "## Second pass: complex128 inputs", "",
             f"Every op whose backward supports complex128 ({s['total'] - s['skip']} ran): "
             f"pass {s['pass']}, fallback {s['fallback']}, error {s['error']}, "
             f"**wrong {s['wrong']}**; torch.func passes {s['tf_pass']}, and ftrans passes "
             f"{s['correct_of_tf']} of those.", ""]
    lines += [f"- wrong: `{r.name}`: {r.reason[:200]} (torch.func: {r.tf_status})"
              for r in results if r.status == "wrong"]
    lines += [f"- torch.func handles, ftrans does not: `{r.name}` [{r.status}]: {r.reason[:140]}"
              for r in results if r.tf_handles and r.status not in ("pass", "fallback", "wrong")]
    return "\n".join(lines) + "\n"


EXPECTED_ABOUT = (
    "Ops whose autodiff-under-vmap status is error/fallback (from "
    "benchmarks/opinfo_vjp_report.py --write-expected). tests/test_opinfo_vjp.py "
    "xfails them (strict=False) with this reason; 'wrong' is never listed.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    rc.add_common_args(p, "run every op in this dtype (e.g. complex128, where lazy conj bits "
                       "matter) instead of float64; the report goes to --out only")
    p.add_argument("--no-complex", action="store_true",
                   help="skip the second, complex128 pass of the full report")
    rc.add_output_args(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.ops, a.samples, a.timeout, not a.no_torch_func, a.dtype)
    names, results, s, elapsed = rc.run_sweep(a, h.load_op_db, sweep, summarize, a.dtype)
    out = a.out or (None if a.ops or a.dtype else
                    os.path.join(ROOT, "benchmarks", "OPINFO_VJP.md"))
    if out:
        text = markdown(results, s, elapsed, a.samples, a.dtype)
        if not a.dtype and not a.no_complex:
            # Real samples never take the complex backward paths (lazy conj/neg bits).
            cres = sweep(names, a.samples, a.timeout, not a.no_torch_func, sys.stdout,
                         "complex128")
            text += complex_section(cres, summarize(cres))
        with open(out, "w") as f:
            f.write(text)
        print("wrote", out)
    rc.maybe_write_expected(a, EXPECTED, results, EXPECTED_ABOUT)


if __name__ == "__main__":
    main()
