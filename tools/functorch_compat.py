"""Run PyTorch's own functorch tests twice, on torch.func and on ftrans, and compare.

    python tools/functorch_compat.py --tests DIR [--out OUT] [--only eager|vmap] [-k EXPR]
                                     [--jobs N] [--timeout S] [--skip-torch]

DIR holds four files of pytorch/pytorch's ``test/functorch/`` (not shipped with ftrans):
``test_eager_transforms.py``, ``test_vmap.py``, ``common_utils.py`` and
``functorch_additional_op_db.py``.  The runner copies them twice into OUT:

- ``OUT/torch_func``: as written (the oracle);
- ``OUT/ftrans``: the public transform names (``vmap``, ``grad``, ``grad_and_value``, ``vjp``,
  ``jvp``, ``jacrev``, ``jacfwd``, ``hessian``, ``linearize``, ``functional_call``,
  ``stack_module_state``) taken from ftrans wherever the files import them from ``functorch`` or
  ``torch.func`` or spell them ``torch.vmap`` / ``torch.func.X`` / ``functorch.X`` /
  ``getattr(functorch, name)`` in code (never inside string literals).  Every torch internal is left in place.

Two shims apply to both copies, so that test files and torch need not be of the same release:
newer op-db helpers pass ``dtypesIfGPU=`` / ``backward_dtypesIfGPU=``, which older torch spells
``dtypesIfCUDA=`` (renamed when this torch's ``OpInfo`` lacks the keyword); older test files
unpack two values from ``sample_inputs(..., use_subtests=True)``, where newer torch yields three.

It runs pytest on each copy (JUnit XML), then prints, per test class, how many tests pass on
torch.func, pass on ftrans, and pass on torch.func but fail on ftrans, and writes the failing
tests with their first error line to ``OUT/regressions.txt`` (``OUT/summary.json`` holds it all).
Classes whose name contains ``OpInfo`` are the OpInfo sweeps; the others are hand-written.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tokenize
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

FILES = ("test_eager_transforms.py", "test_vmap.py", "common_utils.py", "functorch_additional_op_db.py")
PUBLIC = ("vmap", "grad", "grad_and_value", "vjp", "jvp", "jacrev", "jacfwd", "hessian", "linearize",
          "functional_call", "stack_module_state")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _needs_gpu_shim() -> bool:
    import inspect

    from torch.testing._internal.opinfo.core import OpInfo

    return "dtypesIfGPU" not in inspect.signature(OpInfo).parameters


def _rewrite_names(src: str) -> str:
    """torch.vmap / torch.func.NAME / functorch.NAME -> ftrans.NAME, in code tokens only."""
    toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    lines = src.splitlines(keepends=True)
    edits = []  # (row, col_start, col_end, text)
    for i, t in enumerate(toks):
        if t.type != tokenize.NAME or t.string not in ("torch", "functorch"):
            continue
        if i > 0 and toks[i - 1].string == ".":
            continue  # part of a longer dotted name

        def at(k):
            return toks[i + k] if i + k < len(toks) else None

        path = [t]
        k = 1
        while at(k) is not None and at(k).string == "." and at(k + 1) is not None and at(k + 1).type == tokenize.NAME:
            path.append(at(k + 1))
            k += 2
        names = [p.string for p in path]
        end = None
        if names[:2] == ["torch", "vmap"]:
            end = path[1]
        elif names[:2] == ["torch", "func"] and len(names) > 2 and names[2] in PUBLIC:
            end = path[2]
        elif names[0] == "functorch" and len(names) > 1 and names[1] in PUBLIC:
            end = path[1]
        if end is None or t.start[0] != end.end[0]:
            continue
        edits.append((t.start[0], t.start[1], end.end[1], "ftrans." + end.string))
    for row, c0, c1, text in sorted(edits, reverse=True):
        line = lines[row - 1]
        lines[row - 1] = line[:c0] + text + line[c1:]
    return "".join(lines)


_IMPORT = re.compile(r"^(?P<indent>[ \t]*)from (?P<mod>functorch|torch\.func) import (?P<body>\([^)]*\)|[^\n]*)",
                     re.M)


def _rewrite_imports(src: str) -> str:
    """`from functorch|torch.func import a, vmap, b` -> public names from ftrans, the rest kept."""
    def repl(m):
        body = m.group("body").strip()
        if body.startswith("("):
            body = body[1:-1]
        body = re.sub(r"#[^\n]*", "", body)
        names = [n.strip() for n in body.replace("\n", " ").split(",") if n.strip()]
        ours = [n for n in names if n.split(" as ")[0].strip() in PUBLIC]
        theirs = [n for n in names if n not in ours]
        ind = m.group("indent")
        out = []
        if theirs:
            out.append(f"{ind}from {m.group('mod')} import {', '.join(theirs)}")
        if ours:
            out.append(f"{ind}from ftrans import {', '.join(ours)}")
        return "\n".join(out) if out else f"{ind}pass"
    return _IMPORT.sub(repl, src)


_PRELUDE = """import ftrans  # functorch_compat: public names from ftrans


def _ftrans_public(module, name, *default):  # getattr(functorch|torch.func, name)
    return getattr(ftrans, name) if name in {public!r} else getattr(module, name, *default)


"""


def prepare(src_dir: str, dst: str, substitute: bool, gpu_shim: bool) -> None:
    os.makedirs(dst, exist_ok=True)
    for name in FILES:
        with open(os.path.join(src_dir, name)) as f:
            src = f.read()
        if gpu_shim:
            src = re.sub(r"\b(backward_)?dtypesIfGPU=", lambda m: (m.group(1) or "") + "dtypesIfCUDA=", src)
        # Older files unpack two values from `op.sample_inputs(..., use_subtests=True)`; newer
        # torch yields a third (the sample's skip/xfail context).
        src = re.sub(r"for (\w+), subtest_ctx in ", r"for \1, subtest_ctx, *_ in ", src)
        if substitute:
            src = _rewrite_imports(_rewrite_names(src))
            src = re.sub(r"\bgetattr\((functorch|torch\.func),", r"_ftrans_public(\1,", src)
            src = _PRELUDE.format(public=PUBLIC) + src
        with open(os.path.join(dst, name), "w") as f:
            f.write(src)


def run(dst: str, files, extra, env) -> str:
    xml = os.path.join(dst, "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           f"--junitxml={xml}", "-o", "junit_family=xunit1", *files, *extra]
    print("+", " ".join(cmd), f"(in {dst})", flush=True)
    with open(os.path.join(dst, "pytest.log"), "w") as log:
        subprocess.run(cmd, cwd=dst, env=env, stdout=log, stderr=subprocess.STDOUT)
    return xml


def outcomes(xml: str) -> dict:
    """test id -> (outcome, first line of the failure)."""
    res = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        tid = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        state, msg = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                state = "failed"
                msg = (child.get("message") or child.text or "").strip().splitlines()
                msg = msg[0][:300] if msg else ""
                break
            if child.tag == "skipped":
                state = "skipped"
        res[tid] = (state, msg)
    return res


def compare(ref: dict, ours: dict):
    per_class = defaultdict(Counter)
    regressions = []
    for tid, (state, _) in sorted(ref.items()):
        cls = tid.split("::")[0]
        o_state, o_msg = ours.get(tid, ("missing", ""))
        per_class[cls]["tests"] += 1
        per_class[cls]["torch.func pass"] += state == "passed"
        per_class[cls]["ftrans pass"] += o_state == "passed"
        if state == "passed" and o_state != "passed":
            per_class[cls]["regressed"] += 1
            regressions.append((tid, o_state, o_msg))
        if state != "passed" and o_state == "passed":
            per_class[cls]["only ftrans"] += 1
    return per_class, regressions


def report(per_class, regressions, out):
    cols = ["tests", "torch.func pass", "ftrans pass", "regressed", "only ftrans"]
    print(f"\n{'class':44s} " + " ".join(f"{c:>15s}" for c in cols))
    groups = {"hand-written": Counter(), "OpInfo sweeps": Counter()}
    for cls in sorted(per_class):
        c = per_class[cls]
        groups["OpInfo sweeps" if "OpInfo" in cls else "hand-written"].update(c)
        print(f"{cls:44s} " + " ".join(f"{c[k]:15d}" for k in cols))
    for g, c in groups.items():
        print(f"{'TOTAL ' + g:44s} " + " ".join(f"{c[k]:15d}" for k in cols))
    with open(os.path.join(out, "regressions.txt"), "w") as f:
        for tid, state, msg in regressions:
            f.write(f"{tid}\t{state}\t{msg}\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"per_class": {k: dict(v) for k, v in per_class.items()},
                   "totals": {k: dict(v) for k, v in groups.items()},
                   "regressions": regressions}, f, indent=1)
    print(f"\n{len(regressions)} tests pass on torch.func and not on ftrans: {os.path.join(out, 'regressions.txt')}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", required=True, help="directory with the four pytorch test files")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "functorch_compat"))
    ap.add_argument("--only", choices=("eager", "vmap"), help="run one of the two test files")
    ap.add_argument("-k", dest="kexpr", help="pytest -k expression")
    ap.add_argument("--skip-torch", action="store_true", help="reuse the torch.func run in OUT")
    ap.add_argument("--timeout", type=int, default=0, help="per-test timeout (needs pytest-timeout)")
    args = ap.parse_args(argv)

    missing = [f for f in FILES if not os.path.exists(os.path.join(args.tests, f))]
    if missing:
        ap.error(f"--tests {args.tests}: missing {', '.join(missing)}")
    files = {"eager": ["test_eager_transforms.py"], "vmap": ["test_vmap.py"]}.get(
        args.only, ["test_eager_transforms.py", "test_vmap.py"])
    extra = ["-k", args.kexpr] if args.kexpr else []
    if args.timeout:
        extra += [f"--timeout={args.timeout}"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTORCH_TEST_WITH_SLOW", "0")
    shim = _needs_gpu_shim()
    ref_dir, our_dir = os.path.join(args.out, "torch_func"), os.path.join(args.out, "ftrans")
    if not args.skip_torch:
        prepare(args.tests, ref_dir, substitute=False, gpu_shim=shim)
        run(ref_dir, files, extra, env)
    prepare(args.tests, our_dir, substitute=True, gpu_shim=shim)
    run(our_dir, files, extra, env)
    per_class, regressions = compare(outcomes(os.path.join(ref_dir, "junit.xml")),
                                     outcomes(os.path.join(our_dir, "junit.xml")))
    report(per_class, regressions, args.out)


if __name__ == "__main__":
    main()
