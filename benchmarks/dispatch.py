"""Per-op dispatch cost: a chain of tiny elementwise ops inside vmap (and nested vmap)."""
from __future__ import annotations

import torch
import torch.func

import ftrans

from .common import Row, median_ms

N_OPS = 60


def chain(x):
    for _ in range(N_OPS // 3):
        x = x * 1.01 + 0.5
        x = x.sin()
    return x


def rows(device: str, quick: bool):
    x = torch.randn(8, 4, device=device)
    x2 = torch.randn(4, 8, 4, device=device)
    reps = 7 if quick else 21
    out = []
    impls = {
        "plain": lambda: chain(x),
        "ftrans": lambda: ftrans.vmap(chain)(x),
        "torch.func": lambda: torch.func.vmap(chain)(x),
    }
    torch.testing.assert_close(impls["ftrans"](), chain(x))
    ms = median_ms(impls, device, reps=reps)
    r = Row("dispatch: us/op, vmap of 60 tiny ops", "B=8", ms["ftrans"] * 1e3 / N_OPS,
            ms["torch.func"] * 1e3 / N_OPS, None, f"plain torch {ms['plain'] * 1e3 / N_OPS:.2f} us/op")
    out.append(r)
    impls = {
        "ftrans": lambda: ftrans.vmap(ftrans.vmap(chain))(x2),
        "torch.func": lambda: torch.func.vmap(torch.func.vmap(chain))(x2),
    }
    torch.testing.assert_close(impls["ftrans"](), chain(x2))
    ms = median_ms(impls, device, reps=reps)
    out.append(Row("dispatch: us/op, nested vmap", "B=4x8", ms["ftrans"] * 1e3 / N_OPS,
                   ms["torch.func"] * 1e3 / N_OPS))
    return out
