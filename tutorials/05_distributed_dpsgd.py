"""Tutorial 5: per-sample clipping inside torch.distributed data parallelism.

    python tutorials/05_distributed_dpsgd.py            # full size
    python tutorials/05_distributed_dpsgd.py --fast     # what the test runs

DP-SGD scales out like ordinary data parallelism, with one twist: clipping is per EXAMPLE, so it
must happen before the gradients are combined.  Each rank computes the per-sample gradients of
its own shard with ``vmap(grad(loss))``, clips them, and sums them; the ranks then all-reduce
those clipped SUMS (and their example counts).  Because clipping is per example and summing is
associative, the result equals the single-process clipped sum over the union of the shards,
which is what this script checks.  Noise is added once, after the all-reduce, from a generator
seeded identically on every rank, so all ranks take the same step and stay in sync.

(``DistributedDataParallel`` is not used: it all-reduces the *unclipped* gradient of ``.backward()``
during the backward pass.  With ftrans the per-sample gradients never go through ``.backward()``,
so one explicit ``all_reduce`` per parameter is all that is needed.)

Two processes on localhost with the gloo backend, launched with ``torch.multiprocessing.spawn``;
the port is chosen at run time.
"""
from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import ftrans
# Plumbing shared by the tutorials (command line, timing, plots): tutorials/_common.py.
from _common import cli

MAX_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LR = 0.5


def make_model() -> nn.Module:
    torch.manual_seed(0)                  # every rank builds the same initial model
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 2))


def make_data(n: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 20, generator=gen)
    y = (x[:, :5].sum(1) > 0).long()
    return x, y


def clipped_grad_sum(model: nn.Module, x, y) -> dict:
    """Per-sample gradients of the shard (x, y), clipped to MAX_NORM, summed over the shard."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(ftrans.functional_call(model, p, (xi,)), yi)

    per_sample = ftrans.vmap(ftrans.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.cat([g.flatten(1) for g in per_sample.values()], 1).norm(dim=1)
    scale = (MAX_NORM / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", scale, g) for k, g in per_sample.items()}


def clipped_grad_sum_loop(model: nn.Module, x, y) -> dict:
    """The same with one plain backward per example (the check that ftrans is right at all)."""
    names = [k for k, _ in model.named_parameters()]
    out = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for xi, yi in zip(x, y):
        g = torch.autograd.grad(F.cross_entropy(model(xi), yi), list(model.parameters()))
        norm = torch.cat([t.flatten() for t in g]).norm()
        scale = (MAX_NORM / (norm + 1e-6)).clamp(max=1.0)
        for k, t in zip(names, g):
            out[k] += scale * t
    return out


def noisy_step(model: nn.Module, summed: dict, count: int, step_seed: int):
    """The DP-SGD update: same noise on every rank because the generator seed is shared."""
    gen = torch.Generator().manual_seed(step_seed)
    with torch.no_grad():
        for k, p in model.named_parameters():
            noise = NOISE_MULTIPLIER * MAX_NORM * torch.randn(p.shape, generator=gen)
            p -= LR * (summed[k] + noise) / count


def worker(rank: int, world_size: int, port: int, n: int, out_dir: str):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = make_model()
        x, y = make_data(n)
        xs, ys = x[rank::world_size], y[rank::world_size]        # this rank's shard

        summed = clipped_grad_sum(model, xs, ys)
        for g in summed.values():                               # sum of clipped sums
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
        count = torch.tensor([xs.shape[0]])
        dist.all_reduce(count, op=dist.ReduceOp.SUM)
        noisy_step(model, summed, int(count), step_seed=1234)

        torch.save({"summed": summed, "count": int(count),
                    "params": {k: v.detach() for k, v in model.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(fast: bool = True, plot_dir: str | None = None) -> dict:
    n = 64 if fast else 4096
    world_size = 2
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world_size, free_port(), n, out_dir), nprocs=world_size,
                 join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]

    # The single-process computation on the union of the shards.
    model = make_model()
    x, y = make_data(n)
    ref_summed = clipped_grad_sum(model, x, y)
    loop_summed = clipped_grad_sum_loop(model, x, y)
    err_loop = max((loop_summed[k] - ref_summed[k]).abs().max().item() for k in ref_summed)
    noisy_step(model, ref_summed, n, step_seed=1234)
    ref_params = {k: v.detach() for k, v in model.named_parameters()}

    err_sum = max((r["summed"][k] - ref_summed[k]).abs().max().item()
                  for r in results for k in ref_summed)
    err_params = max((r["params"][k] - ref_params[k]).abs().max().item()
                     for r in results for k in ref_params)
    print(f"{world_size} ranks x {n // world_size} examples: all-reduced clipped sum vs single "
          f"process max err {err_sum:.1e}; parameters after the noisy step max err "
          f"{err_params:.1e}; counts {[r['count'] for r in results]}")
    print(f"single-process vmap(grad) clipped sum vs a per-example loop: max err {err_loop:.1e}")
    # The clipped sums add up n float32 gradients in a different order on each side: compare
    # them relative to their size (an absolute bound would have to grow with n).
    scale = max(v.abs().max().item() for v in ref_summed.values())
    assert all(r["count"] == n for r in results)
    assert err_sum < 1e-5 * scale and err_params < 1e-5 and err_loop < 1e-5 * scale
    return {"err_sum": err_sum, "err_params": err_params, "err_loop": err_loop,
            "count": results[0]["count"]}


if __name__ == "__main__":
    cli(main, __doc__)
