"""The README demo: per-sample gradients of an MLP with ftrans, checked against a Python loop.

    python tutorials/demo.py            # B=256
    python tutorials/demo.py --batch 64

Per-sample gradients are what DP-SGD clips: one gradient per training example instead of the
batch average.  With ftrans you write the loss for ONE example, take its gradient with
``ftrans.grad`` and map that over the batch with ``ftrans.vmap``.
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import ftrans


def main(batch=256, reps=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(batch, 784)
    y = torch.randint(0, 10, (batch,))

    # The loss of ONE example: x is [784], y is a 0-dim label.
    def loss(params, x, y):
        logits = ftrans.functional_call(model, params, (x,))
        return F.cross_entropy(logits, y)

    per_sample_grads = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0, 0))

    def loop():
        out = {k: [] for k in params}
        for i in range(batch):
            g = torch.autograd.grad(F.cross_entropy(model(x[i]), y[i]), list(model.parameters()))
            for k, gi in zip(params, g):
                out[k].append(gi)
        return {k: torch.stack(v) for k, v in out.items()}

    grads, ref = per_sample_grads(params, x, y), loop()
    err = max((grads[k] - ref[k]).abs().max().item() for k in params)
    print(f"per-sample gradients: {len(params)} tensors, e.g. {tuple(grads['0.weight'].shape)}")
    print(f"max |ftrans - loop| = {err:.2e}")

    def best(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    # ftrans.compile traces the transformed function once and replays the flat aten graph
    # (on CPU it also reuses the memory of the previous step's gradients once they are dropped).
    compiled = ftrans.compile(per_sample_grads)
    err_c = max((compiled(params, x, y)[k] - ref[k]).abs().max().item() for k in params)

    t_ftrans = best(lambda: per_sample_grads(params, x, y))
    t_compiled = best(lambda: compiled(params, x, y))
    t_loop = best(loop)
    print(f"batch {batch}: ftrans {t_ftrans * 1e3:.1f} ms, ftrans.compile {t_compiled * 1e3:.1f} "
          f"ms, Python loop {t_loop * 1e3:.1f} ms: speed-up {t_loop / t_ftrans:.1f}x eager, "
          f"{t_loop / t_compiled:.1f}x compiled")
    return max(err, err_c), t_loop / t_ftrans


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    main(p.parse_args().batch)
