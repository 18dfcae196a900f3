"""Rendering and CLI pieces shared by the OpInfo reports (opinfo_report.py, opinfo_vjp_report.py).

Both reports answer the same questions about different checks -- which errors share a cause,
which aten ops to write rules for next, what ftrans handles that torch.func does not -- and both
feed an expected file that the tests xfail from.  One copy of those sections keeps the two
reports comparable: a change to how causes are grouped, or to the expected file's format, must
reach both or the tests and reports drift apart.
"""
from __future__ import annotations

import collections
import json
import re
import sys
import time

import torch


def cause(reason: str) -> str:
    """A normalized first line, so errors with one cause group together."""
    r = re.sub(r"^\[[^\]]*\]\s*", "", reason)
    r = re.sub(r"vmap\(.*?\.\.\.\)(\(<inputs>\))?:\s*", "", r)
    r = re.sub(r"\[[\d, ]*\]|\([\d, ]*\)", "[#]", r)
    r = re.sub(r"\b\d+\b", "#", r)
    return r[:110]


def add_common_args(p, dtype_help):
    """The options every OpInfo report takes, in the order its --help lists them."""
    p.add_argument("--ops", nargs="*", help="OpInfo names (default: all of op_db)")
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--timeout", type=int, default=120, help="seconds per op")
    p.add_argument("--no-torch-func", action="store_true")
    p.add_argument("--dtype", help=dtype_help)


def add_output_args(p):
    p.add_argument("--out")
    p.add_argument("--json", help="also dump per-op results as JSON here")
    p.add_argument("--write-expected", action="store_true")


def dump_json(path, results):
    with open(path, "w") as f:
        json.dump([r.__dict__ for r in results], f, indent=1)


def error_and_fallback_sections(results):
    """'Errors, grouped by likely cause' and the table of loop fallbacks by aten op."""
    lines = ["", "## Errors, grouped by likely cause", ""]
    groups = collections.defaultdict(list)
    for r in results:
        if r.status == "error":
            groups[cause(r.reason)].append(r)
    for c, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        names = ", ".join(f"`{r.name}`" + ("" if r.tf_handles else "*") for r in rs)
        lines.append(f"- **{c}** ({len(rs)}): {names}")
    lines += ["", "(`*`: torch.func does not handle this op either.)", "",
              "## Loop fallbacks, by aten op (write these rules next)", "",
              "| aten op | OpInfos affected | examples |", "|---|---|---|"]
    fb = collections.defaultdict(list)
    for r in results:
        for f in r.fallback_ops:
            fb[f].append(r.name)
    for f, names in sorted(fb.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"| `{f}` | {len(names)} | {', '.join(names[:6])}"
                     f"{' ...' if len(names) > 6 else ''} |")
    return lines


def only_tf(results):
    return [r for r in results if r.tf_handles and r.status not in ("pass", "fallback")]


def only_ftrans_section(results):
    only_ft = [r for r in results if not r.tf_handles and r.status in ("pass", "fallback")]
    lines = ["", f"## ftrans handles, torch.func does not ({len(only_ft)})", ""]
    lines += [f"- `{r.name}`: torch.func {r.tf_status}: {r.tf_reason[:140]}" for r in only_ft] \
        or ["None."]
    return lines


def run_sweep(a, load_op_db, sweep, summarize, dtype):
    """Sweep ``a.ops`` (default: all of op_db), print the summary, dump --json if asked.

    Returns (names, results, summary, elapsed seconds).
    """
    names = a.ops or list(load_op_db())
    start = time.perf_counter()
    results = sweep(names, a.samples, a.timeout, not a.no_torch_func, sys.stdout, dtype)
    elapsed = time.perf_counter() - start
    s = summarize(results)
    print(json.dumps(s, indent=1))
    if a.json:
        dump_json(a.json, results)
    return names, results, s, elapsed


def maybe_write_expected(a, path, results, about):
    """--write-expected only after a full sweep in the default dtype: a subset would shrink it."""
    if a.write_expected and not a.ops and not a.dtype:
        write_expected(path, results, about)
        print("wrote", path)


def write_expected(path, results, about):
    """The ops whose status is error/fallback ('wrong' is never listed: it must fail tests)."""
    ops = {r.name: {"status": r.status, "reason": r.reason[:300], "torch_func": r.tf_status}
           for r in results if r.status in ("error", "fallback")}
    doc = {
        "_about": about,
        "torch": torch.__version__,
        "ops": dict(sorted(ops.items())),
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
