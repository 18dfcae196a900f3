"""``python -m benchmarks [--device cpu|cuda] [--quick] [--only NAME ...] [--out DIR]``.

Writes ``results.json`` and ``results.md`` into ``--out`` (default ``benchmarks/out``) and
prints the markdown table.  Times are medians in ms (``dispatch`` rows: us per op).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform

import torch

WORKLOADS = ["dispatch", "workloads", "dp"]


def to_markdown(rows, device) -> str:
    lines = [
        f"device: {device} ({torch.cuda.get_device_name() if device == 'cuda' else platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        "",
        "| workload | size | ftrans | torch.func | loop | ftrans / torch.func | loop / ftrans | note |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def f(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    for r in rows:
        lines.append(
            f"| {r.workload} | {r.size} | {f(r.ftrans_ms)} | {f(r.torch_func_ms)} | {f(r.loop_ms)} "
            f"| {f(r.vs_torch_func, '.2f')} | {f(r.speedup_vs_loop, '.1f')} | {r.note} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    p.add_argument("--only", nargs="*", default=None, help="workload name substrings")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for mod_name in WORKLOADS:
        mod = importlib.import_module(f"benchmarks.{mod_name}")
        for row in mod.rows(args.device, args.quick, args.only) if mod_name != "dispatch" else (
            mod.rows(args.device, args.quick)
            if not args.only or any(o in "dispatch" for o in args.only) else []
        ):
            print(row.workload, row.size, row.ftrans_ms, row.torch_func_ms, row.loop_ms, row.note,
                  flush=True)
            rows.append(row)
    md = to_markdown(rows, args.device)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"device": args.device, "torch": torch.__version__,
                   "rows": [r.as_dict() for r in rows]}, fh, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
