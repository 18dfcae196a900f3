"""Run the full OpInfo vmap sweep and write benchmarks/OPINFO.md.

Why a report and not only a test: coverage of ~700 operators moves every time a rule lands, and
the useful view is aggregate: how many ops pass, which aten ops still fall back to the loop (and
how many OpInfos each one affects, i.e. which rule to write next), which errors share a cause,
and, above all, any 'wrong' result.  torch.func runs on the same inputs, so the report can say
how many of the ops torch.func handles ftrans handles.

Usage::

    python benchmarks/opinfo_report.py                      # full sweep -> benchmarks/OPINFO.md
    python benchmarks/opinfo_report.py --ops abs mm sum     # a subset, printed only
    python benchmarks/opinfo_report.py --write-expected     # also refresh tests/opinfo_expected.json

The expected file lists every op whose status is error/fallback (never 'wrong': a wrong answer
must fail the tests), so tests/test_opinfo_vmap.py can xfail them with their reason; it shrinks
as rules are added.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

import _report_common as rc  # noqa: E402
import opinfo_harness as h  # noqa: E402

EXPECTED = os.path.join(ROOT, "tests", "opinfo_expected.json")


def sweep(names, samples, timeout, with_torch_func, log, dtype=None):
    db = h.load_op_db()
    results = []
    for i, name in enumerate(names):
        r = h.run_op(db[name], samples, with_torch_func=with_torch_func, timeout=timeout,
                     dtype=dtype)
        results.append(r)
        log.write(f"{i + 1:4d}/{len(names)} {r.name:45s} {r.status:14s} tf={r.tf_status:5s} "
                  f"{r.seconds:6.2f}s {r.reason[:140]}\n")
        log.flush()
    return results


def summarize(results):
    by = collections.Counter(r.status for r in results)
    tf = [r for r in results if r.tf_handles]
    correct = [r for r in tf if r.status in ("pass", "fallback")]
    clean = [r for r in tf if r.status == "pass"]
    ok = by["pass"] + by["fallback"]
    return {
        "total": len(results), **{k: by[k] for k in h.RANK},
        "tf_pass": len(tf), "tf_error": sum(r.tf_status == "error" for r in results),
        "tf_wrong": sum(r.tf_status == "wrong" for r in results),
        "correct_of_tf": len(correct), "pass_of_tf": len(clean),
        "no_fallback_pct": 100.0 * by["pass"] / ok if ok else 0.0,
    }


def markdown(results, s, elapsed, samples, dtype=None):
    lines = [
        "# OpInfo sweep: ftrans.vmap vs per-example loop (and torch.func.vmap)",
        "",
        f"Generated {datetime.datetime.now():%Y-%m-%d %H:%M} by `benchmarks/opinfo_report.py` "
        f"on torch {torch.__version__}, CPU, {elapsed / 60:.1f} min; up to {samples} samples per "
        "op, " + (f"dtype {dtype} (ops without it skipped)" if dtype else
                  "one dtype per op (float32 if supported)") + ". Placements: batch dim 0, "
        "batch dim last, "
        "mixed with unbatched args, nested vmap(vmap), in-place with self batched; distinct "
        "per-example values. Statuses are the worst over samples and placements.",
        "",
        "| status | ops |", "|---|---|",
    ]
    for k in ("pass", "fallback", "expected-error", "error", "wrong", "skip"):
        lines.append(f"| {k} | {s[k]} |")
    lines += [
        f"| **total** | {s['total']} |", "",
        f"torch.func.vmap on the same inputs: passes {s['tf_pass']}, errors {s['tf_error']}, "
        f"mismatches {s['tf_wrong']}.", "",
        f"**ftrans is correct on {s['correct_of_tf']} of the {s['tf_pass']} ops torch.func "
        f"handles** ({s['pass_of_tf']} of them without any loop fallback). Of all ops ftrans "
        f"gets right, {s['no_fallback_pct']:.1f}% need no fallback.", "",
    ]
    wrong = [r for r in results if r.status == "wrong"]
    lines += ["## Wrong results (must be zero)", ""]
    lines += [f"- `{r.name}` ({r.dtype}): {r.reason}" for r in wrong] or ["None."]
    lines += rc.error_and_fallback_sections(results)
    lines += ["", "## Ops with status 'fallback'", ""]
    lines += [f"- `{r.name}`: {', '.join(r.fallback_ops)}" for r in results
              if r.status == "fallback"] or ["None."]
    lines += ["", "## Expected errors (data-dependent; torch.func errors too)", ""]
    lines.append(", ".join(f"`{r.name}`" for r in results if r.status == "expected-error")
                 or "None.")
    lines += ["", "## Skipped (sample generation or the loop itself failed)", ""]
    lines += [f"- `{r.name}`: {r.reason[:160]}" for r in results if r.status == "skip"] \
        or ["None."]
    lines += ["", "## Notes", "",
              "Ops whose float32 mismatch vanished in float64 (kernel summation order, e.g. bmm "
              "vs mm; a batching bug mismatches in any precision):", ""]
    lines.append(", ".join(f"`{r.name}`" for r in results
                           if any("float32 rounding" in n for n in r.notes)) or "None.")
    lines += ["", "Ops checked with identical per-example values (the loop failed on jittered "
              "ones):", ""]
    lines.append(", ".join(f"`{r.name}`" for r in results
                           if any("identical examples" in n for n in r.notes)) or "None.")
    lines += ["", "Random ops (randomness='same', compared on shape and dtype only):", ""]
    lines.append(", ".join(f"`{r.name}`" for r in results
                           if any("random op" in n for n in r.notes)) or "None.")
    only_tf = rc.only_tf(results)
    lines += ["", f"## torch.func handles, ftrans does not ({len(only_tf)})", ""]
    lines.append(", ".join(f"`{r.name}`" for r in only_tf) or "None.")
    lines += rc.only_ftrans_section(results)
    return "\n".join(lines) + "\n"


EXPECTED_ABOUT = (
    "Ops whose ftrans.vmap status is error/fallback (from benchmarks/opinfo_report.py"
    " --write-expected). tests/test_opinfo_vmap.py xfails them (strict=False) with "
    "this reason; 'wrong' is never listed. Regenerate as rules land.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    rc.add_common_args(p, "run every op in this dtype (e.g. int64, float64) instead of "
                       "float32; ops without it are skipped; the report goes to --out only if "
                       "given explicitly")
    rc.add_output_args(p)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype) if a.dtype else None
    _, results, s, elapsed = rc.run_sweep(a, h.load_op_db, sweep, summarize, dtype)
    out = a.out or (None if a.dtype else os.path.join(ROOT, "benchmarks", "OPINFO.md"))
    if not a.ops and out:
        with open(out, "w") as f:
            f.write(markdown(results, s, elapsed, a.samples, a.dtype))
        print("wrote", out)
    rc.maybe_write_expected(a, EXPECTED, results, EXPECTED_ABOUT)


if __name__ == "__main__":
    main()
