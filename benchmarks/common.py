"""Timing and result checking shared by every workload.

Each row times the same work three ways (ftrans, torch.func, a per-example Python loop) in one
process, interleaved, reporting medians after warm-up.  Before timing, ftrans's and torch.func's
results are checked against the loop; a wrong result is flagged and never timed.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class Row:
    workload: str
    size: str
    ftrans_ms: Optional[float] = None
    torch_func_ms: Optional[float] = None
    loop_ms: Optional[float] = None
    note: str = ""

    @property
    def vs_torch_func(self):
        if self.ftrans_ms is None or self.torch_func_ms is None:
            return None
        return self.ftrans_ms / self.torch_func_ms

    @property
    def speedup_vs_loop(self):
        if self.ftrans_ms is None or self.loop_ms is None:
            return None
        return self.loop_ms / self.ftrans_ms

    def as_dict(self):
        d = dataclasses.asdict(self)
        d["ftrans/torch.func"] = self.vs_torch_func
        d["loop/ftrans"] = self.speedup_vs_loop
        return d


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fns: dict, device: str, warmup: int = 3, reps: int = 15, min_time: float = 0.0):
    """Median wall time in ms of each callable, interleaving them round by round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(reps):
        # Rotate who goes first each round: the first call after another one's large frees
        # can pay different page-fault costs.
        for k in order[r % len(order):] + order[:r % len(order)]:
            fn = fns[k]
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def same(a, b, atol=1e-3, rtol=1e-3, max_mismatch=1e-3) -> bool:
    """Results agree up to float32 summation order.  A ReLU unit whose pre-activation is within
    rounding of 0 can flip between a batched and a per-example computation, changing a few
    gradient entries by O(1); so up to ``max_mismatch`` of the elements may differ.  A
    batching bug (wrong example, wrong dim) changes most elements and is caught."""
    import optree

    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if x.shape != y.shape:
            return False
        close = torch.isclose(x.float(), y.float(), atol=atol, rtol=rtol)
        if (~close).float().mean().item() > max_mismatch:
            return False
    return True


def run_row(workload: str, size: str, impls: dict, device: str, reps: int = 15,
            check: Callable = same) -> Row:
    """``impls``: name -> zero-arg callable; 'loop' is the oracle."""
    row = Row(workload, size)
    ref = impls["loop"]()
    timed = {}
    for name, fn in impls.items():
        if fn is None:
            continue
        if name != "loop":
            try:
                out = fn()
            except Exception as e:  # a failure is a result, not a crash
                row.note += f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}; "
                continue
            if not check(out, ref):
                row.note += f"{name} WRONG RESULT (not timed); "
                continue
        timed[name] = fn
    ms = median_ms(timed, device, reps=reps)
    row.ftrans_ms = ms.get("ftrans")
    row.torch_func_ms = ms.get("torch.func")
    row.loop_ms = ms.get("loop")
    return row
