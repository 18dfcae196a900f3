"""``python -m ftrans``: the environment report and the vmap coverage counts it prints.

The counts must agree with :func:`ftrans.op_status` op by op (the report is only useful if it
is the classifier's own answer), and the command must work as users run it, in a subprocess.
"""
from __future__ import annotations

import re
import subprocess
import sys

import torch

import ftrans
from ftrans import __main__ as cli


def test_command_line_report():
    proc = subprocess.run([sys.executable, "-m", "ftrans"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"ftrans {ftrans.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert re.search(r"^device: (cpu|cuda|mps)", out, re.M)
    counts = {k: int(n) for k, n in re.findall(r"^  (\w+)\s+(\d+)\s+[\d.]+%", out, re.M)}
    assert set(counts) == set(cli.CATEGORIES)
    total = int(re.search(r"coverage of (\d+) aten overloads", out).group(1))
    assert sum(counts.values()) == total
    assert counts["rule"] > counts["fallback"]


def test_coverage_agrees_with_op_status():
    cov = cli.coverage()
    aten = torch.ops.aten
    # Known classifications: a rule, a pointwise op by tag, data-dependent ops that raise.
    assert str(aten.mm.default) in cov["rule"]
    assert str(aten.add.Tensor) in cov["rule"]
    assert str(aten.nonzero.default) in cov["error"]
    assert str(aten._local_scalar_dense.default) in cov["error"]
    # Every listed op is classified as op_status says, and out= overloads are left out.
    for kind in cli.CATEGORIES:
        for name in cov.get(kind, [])[:25]:
            packet, overload = name.split(".")[1:3] if name.count(".") >= 2 else (None, None)
            op = getattr(getattr(aten, packet), overload)
            assert ftrans.op_status(op) == kind, name
            assert not cli._is_out_variant(op), name
    assert str(aten.sum.IntList_out) not in sum((cov.get(k, []) for k in cli.CATEGORIES), [])


def test_list_option(capsys):
    assert cli.main(["--list", "error"]) == 0
    out = capsys.readouterr().out
    assert "error:" in out and "aten.nonzero.default" in out
