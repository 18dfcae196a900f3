"""``python -m ftrans``: the environment report and the vmap coverage counts it prints.

The counts must agree with :func:`ftrans.op_status` op by op (the report is only useful if it
is the classifier's own answer), and the command must work as users run it, in a subprocess.
"""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest
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
    assert str(aten.unique_consecutive.default) in cov["error"]
    assert str(aten.nonzero.default) in cov["rule"]  # batched when the counts agree
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
    assert "error:" in out and "aten.unique_consecutive.default" in out


# ----------------------------------------------------------------------------------------------
# --where OP
# ----------------------------------------------------------------------------------------------

def _where(capsys, name):
    assert cli.main(["--where", name]) == 0
    return capsys.readouterr().out


def _source_line(location):
    """The source line a ``(path:line)`` in --where's output points at."""
    path, line = re.search(r"\((\S+\.py):(\d+)\)", location).groups()
    root = pathlib.Path(ftrans.__file__).resolve().parent.parent
    return (root / path).read_text().splitlines()[int(line) - 1]


@pytest.mark.parametrize("name", ["mm", "aten.mm", "aten.mm.default", "mm.default",
                                  "torch.ops.aten.mm.default", "aten::mm.default"])
def test_where_accepts_every_spelling_of_an_op(capsys, name):
    out = _where(capsys, name)
    first = out.splitlines()[0]
    assert first == "aten.mm.default: rule"
    rule_line = next(l for l in out.splitlines() if l.startswith("  rule "))
    assert "ftrans/_C/rules/linalg.py:" in rule_line and "mm_rule" in rule_line
    # the file:line is where the rule is defined (its decorator or its def)
    src = _source_line(rule_line)
    assert src.startswith("@register_batch_rule") or src.startswith("def mm_rule"), src
    assert "registered for this op" in rule_line
    handler = next(l for l in out.splitlines() if l.startswith("  handler "))
    assert "ftrans/_C/dispatch.py:" in handler


def test_where_tells_rule_by_tag_decomposition_fallback_error(capsys):
    out = _where(capsys, "add.Tensor")
    assert "pointwise_rule" in out and "chosen by the op's tag: pointwise" in out
    out = _where(capsys, "matmul.default")
    assert out.startswith("aten.matmul.default: decomposition")
    assert "CompositeImplicitAutograd" in out
    out = _where(capsys, "unique_consecutive.default")
    assert out.startswith("aten.unique_consecutive.default: error")
    assert "refuse_data_dependent (ftrans/_C/errors.py:" in out
    fallback = cli.coverage()["fallback"][0]
    out = _where(capsys, fallback)
    assert out.startswith(f"{fallback}: fallback")
    assert "loop_fallback (ftrans/_C/fallback.py:" in out
    assert _source_line(out).startswith("def loop_fallback")


def test_where_and_op_status_report_random_ops(capsys):
    aten = torch.ops.aten
    for op in (aten.rand.default, aten.bernoulli.default, aten.native_dropout.default):
        assert ftrans.op_status(op) == "rule", op
    assert ftrans.op_status(aten.rand.out) == "error"  # random out= forms are refused
    cov = cli.coverage()
    assert str(aten.native_dropout.default) in cov["rule"]
    assert str(aten.native_dropout.default) not in cov.get("decomposition", [])
    out = _where(capsys, "rand.default")
    assert out.startswith("aten.rand.default: rule")
    assert "random_dispatch (ftrans/_C/random.py:" in out
    out = _where(capsys, "native_dropout.default")
    same = next(l for l in out.splitlines() if l.startswith("  same "))
    assert "native_dropout_same (ftrans/_C/rules/random.py:" in same
    assert "native_dropout" in _source_line(same) or "register_random_rule" in _source_line(same)
    out = _where(capsys, "aten.multinomial.default")
    different = next(l for l in out.splitlines() if l.startswith("  different "))
    assert "multinomial_different" in different


def test_where_unknown_op_fails():
    proc = subprocess.run([sys.executable, "-m", "ftrans", "--where", "no_such_op_xyz"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no op named 'no_such_op_xyz'" in proc.stderr


def test_where_command_line():
    proc = subprocess.run([sys.executable, "-m", "ftrans", "--where", "aten.mm.default"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("aten.mm.default: rule\n")
    assert "ftrans/_C/rules/linalg.py:" in proc.stdout
