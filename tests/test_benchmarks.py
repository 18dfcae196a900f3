"""The benchmark harness runs and checks results before timing (no timings are asserted)."""
import json

import torch

from benchmarks import __main__ as bench
from benchmarks.common import run_row, same


def test_quick_run_writes_json_and_markdown(tmp_path):
    bench.main(["--quick", "--only", "nested vmap dot", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    (row,) = [r for r in data["rows"] if r["workload"] == "nested vmap dot"]
    assert row["ftrans_ms"] > 0 and row["torch_func_ms"] > 0 and row["loop_ms"] > 0
    assert "WRONG" not in row["note"]
    assert "| nested vmap dot |" in (tmp_path / "results.md").read_text()


def test_a_wrong_result_is_flagged_and_not_timed():
    x = torch.randn(8, 4)
    row = run_row("probe", "B=8", {"loop": lambda: x.sum(1), "ftrans": lambda: x.sum(1).flip(0),
                                   "torch.func": lambda: x.sum(1)}, "cpu", reps=2)
    assert row.ftrans_ms is None and "ftrans WRONG RESULT" in row.note
    assert row.torch_func_ms is not None


def test_result_check_tolerates_rare_flips_but_not_batching_bugs():
    a = torch.randn(1000, 100)
    b = a.clone()
    b[0, :5] += 1.0  # five ReLU-threshold flips out of 100k entries
    assert same(a, b)
    assert not same(a, a.flip(0))  # examples in the wrong order
