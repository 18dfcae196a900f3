"""Rows for what torch.func cannot do or does slowly (issue 14, BEYOND.md sections 1 and 4):
divergent ``cond``, per-example ``while_loop``, an agreeing Python ``if``, automatic chunking.

The "loop" column is each row's oracle; rows say in their note what it is.
"""
from __future__ import annotations

import time

import torch
import torch.func

import ftrans
from ftrans import control_flow

from .common import median_ms, run_row


def _cond_row(device, quick):
    # BEYOND A.2: 1024 examples x 256 features, 10% take 20 x tanh(v @ W)
    n, d = (256, 64) if quick else (1024, 256)
    x = torch.randn(n, d, device=device)
    w = torch.randn(d, d, device=device) / d ** 0.5
    thr = x[:, 0].quantile(0.9)

    def expensive(v):
        for _ in range(20):
            v = torch.tanh(v @ w)
        return v

    def cheap(v):
        return v * 2

    def partition():
        m = x[:, 0] > thr
        out = torch.empty_like(x)
        out[m] = expensive(x[m])
        out[~m] = cheap(x[~m])
        return out

    impls = {
        "loop": partition,
        "ftrans": lambda: ftrans.vmap(lambda v: ftrans.cond(v[0] > thr, expensive, cheap, (v,)))(x),
        "torch.func": lambda: torch.func.vmap(
            lambda v: torch.cond(v[0] > thr, expensive, cheap, (v,)))(x),
    }
    row = run_row("vmap(cond), 10% expensive", f"{n}x{d}", impls, device, reps=3 if quick else 21)
    row.note += "loop = hand-written partition; torch.func = torch.cond under torch.vmap (both branches + where)"
    return row


def _newton(a):
    return ftrans.while_loop(lambda y: (y * y - a).abs() > 1e-6 * a,
                             lambda y: ((y + a / y) / 2,), (a.clone(),))[0]


def _while_row(device, quick):
    n = 128 if quick else 1024
    a = torch.logspace(-3, 6, n, device=device, dtype=torch.float64)

    def loop():
        out = []
        for ai in a:
            y = ai.clone()
            while (y * y - ai).abs() > 1e-6 * ai:
                y = (y + ai / y) / 2
            out.append(y)
        return torch.stack(out)

    trips = []
    for ai in a:
        y, k = ai.clone(), 0
        while (y * y - ai).abs() > 1e-6 * ai:
            y, k = (y + ai / y) / 2, k + 1
        trips.append(k)
    control_flow.reset_stats()
    ftrans.vmap(_newton)(a)
    lanes = control_flow.stats()["while_body_lanes"]
    impls = {"loop": loop, "ftrans": lambda: ftrans.vmap(_newton)(a), "torch.func": None}
    row = run_row("vmap(while_loop) Newton sqrt", f"B={n}", impls, device, reps=5 if quick else 15)
    row.note += (f"body evaluations {lanes} = {lanes / sum(trips):.2f} x sum of per-example trips "
                 f"(B * max = {n * max(trips)}); torch.func: vmap(while_loop) fails")
    return row


def _if_row(device, quick):
    x = torch.randn(256, 64, device=device)
    w = torch.randn(64, 64, device=device) / 8

    def plain(v):
        return torch.tanh(torch.tanh(v @ w) @ w)

    def with_if(v):
        if v.isnan().any():  # every example agrees: proceeds
            raise ValueError("nan")
        return plain(v)

    impls = {"loop": lambda: torch.stack([plain(v) for v in x]),
             "ftrans": lambda: ftrans.vmap(with_if)(x),
             "torch.func": lambda: torch.func.vmap(plain)(x)}
    row = run_row("vmap with an agreeing Python if", "256x64", impls, device,
                  reps=5 if quick else 21)
    ms = median_ms({"if": lambda: ftrans.vmap(with_if)(x), "no if": lambda: ftrans.vmap(plain)(x)},
                   device, reps=5 if quick else 21)
    row.note += (f"ftrans without the if {ms['no if']:.3f} ms (the if adds "
                 f"{100 * (ms['if'] / ms['no if'] - 1):.0f}%); torch.func column: no if "
                 "(torch.func raises on it)")
    return row


def _if_in_step_row(device, quick):
    """The same agreeing ``if`` (a NaN guard) inside a real step: per-sample gradients of the
    benchmarks' MLP (784-256-256-10), the guard on each example's loss."""
    import torch.nn.functional as F

    from . import models

    model, shape, classes = models.make("mlp", device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    B = 64
    x = torch.randn(B, *shape, device=device)
    y = torch.randint(0, classes, (B,), device=device)

    def loss(p, xb, yb, guard):
        out = F.cross_entropy(torch.func.functional_call(model, p, (xb[None],)), yb[None])
        if guard and out.isnan():  # every example agrees (no NaN): proceeds
            raise ValueError("nan loss")
        return out

    def step(lib, guard):
        return lib.vmap(lib.grad(lambda p, xb, yb: loss(p, xb, yb, guard)),
                        in_dims=(None, 0, 0))(params, x, y)

    impls = {"loop": lambda: step(ftrans, False), "ftrans": lambda: step(ftrans, True),
             "torch.func": lambda: step(torch.func, False)}
    row = run_row("per-sample grads with an agreeing Python if", f"mlp B={B}", impls, device,
                  reps=5 if quick else 21)
    row.note += ("loop = ftrans without the if (ratio loop/ftrans < 1 is the if's cost); "
                 "torch.func column: no if (torch.func raises on it)")
    return row


def _auto_chunk_row(device, quick):
    # BEYOND A.5: jacrev of R^512 -> R^4096 (2-layer tanh MLP, hidden 1024)
    n, h, m = (128, 256, 1024) if quick else (512, 1024, 4096)
    w1 = torch.randn(h, n, device=device) / n ** 0.5
    w2 = torch.randn(m, h, device=device) / h ** 0.5
    f = lambda x: w2 @ torch.tanh(w1 @ x)  # noqa: E731
    x = torch.randn(n, device=device)
    auto = ftrans.jacrev(f, chunk_size="auto")
    t0 = time.perf_counter()
    auto(x)
    first = (time.perf_counter() - t0) * 1e3
    fixed = {str(c): (lambda c=c: ftrans.jacrev(f, chunk_size=c)(x)) for c in (m // 8, m // 2)}
    ms = median_ms(dict(fixed, none=lambda: ftrans.jacrev(f)(x)), device, reps=3 if quick else 7)
    impls = {"loop": lambda: ftrans.jacrev(f)(x), "ftrans": lambda: auto(x),
             "torch.func": lambda: torch.func.jacrev(f)(x)}
    row = run_row("jacrev chunk_size='auto'", f"R^{n}->R^{m}", impls, device,
                  reps=3 if quick else 7)
    others = ", ".join(f"chunk {k}: {v:.1f} ms" for k, v in ms.items())
    row.note += (f"first call (probes) {first:.1f} ms; ftrans fixed: {others}; loop = ftrans "
                 "unchunked")
    return row


def rows(device, quick, only):
    makers = {"vmap(cond)": _cond_row, "vmap(while_loop)": _while_row,
              "vmap with an agreeing Python if": _if_row,
              "per-sample grads with an agreeing Python if": _if_in_step_row,
              "jacrev chunk_size='auto'": _auto_chunk_row}
    out = []
    for name, make in makers.items():
        if only and not any(o in name for o in only):
            continue
        out.append(make(device, quick))
    return out
