"""Tutorial 5: per-sample clipping inside torch.distributed data parallelism.

    python tutorials/05_distributed_dpsgd.py            # full size
    python tutorials/05_distributed_dpsgd.py --fast     # what the test runs

DP-SGD scales out like ordinary data parallelism, with one twist: clipping is per EXAMPLE, so it
must happen before the gradients are combined.  Each rank computes the clipped sum of its own
shard with ``ftrans.clipped_grad`` (``sum_i g_i * min(1, C / ||g_i||)`` in one forward and one
backward, the per-example gradients never formed); the ranks then all-reduce those clipped SUMS
(and their example counts) like ordinary gradients.  Because clipping is per example and
summing is associative, the result equals the single-process clipped sum over the union of the
shards, which is what this script checks.  Noise is added once, after the all-reduce, from a
generator seeded identically on every rank, so all ranks take the same step and stay in sync.

The privacy spent is what one process would spend on the whole batch: the accountant (Opacus's
RDP accountant, as ``ftrans.dp.DPSGD`` uses; ``pip install 'ftrans[dp]'``) is stepped once per
step with the noise multiplier and the sampling rate (here every step uses the whole data set,
``sample_rate=1``; Poisson subsampling would draw the batch on every rank from one more shared
generator with ``ftrans.dp.poisson_batches`` and take each rank's share of it).

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
DELTA = 1e-5
NOISE_SEED = 1234


def make_model() -> nn.Module:
    torch.manual_seed(0)                  # every rank builds the same initial model
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 2))


def make_data(n: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 20, generator=gen)
    y = (x[:, :5].sum(1) > 0).long()
    return x, y


def clipped_grad_sum(model: nn.Module, x, y) -> dict:
    """The shard's (x, y) per-example gradients, clipped to MAX_NORM and summed, without
    forming them: ``ftrans.clipped_grad`` of the one-example loss."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(ftrans.functional_call(model, p, (xi,)), yi)

    if x.shape[0] == 0:                   # an empty shard contributes nothing
        return {k: torch.zeros_like(v) for k, v in params.items()}
    return ftrans.clipped_grad(loss_one, MAX_NORM)(params, x, y)


def clipped_grad_sum_vmap(model: nn.Module, x, y) -> dict:
    """The same from instantiated per-example gradients: ``vmap(grad)``, clip, sum."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return F.cross_entropy(ftrans.functional_call(model, p, (xi,)), yi)

    per_sample = ftrans.vmap(ftrans.grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.cat([g.flatten(1) for g in per_sample.values()], 1).norm(dim=1)
    scale = (MAX_NORM / norms).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", scale, g) for k, g in per_sample.items()}


def clipped_grad_sum_loop(model: nn.Module, x, y) -> dict:
    """The same with one plain backward per example (the check that ftrans is right at all)."""
    names = [k for k, _ in model.named_parameters()]
    out = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for xi, yi in zip(x, y):
        g = torch.autograd.grad(F.cross_entropy(model(xi), yi), list(model.parameters()))
        norm = torch.cat([t.flatten() for t in g]).norm()
        scale = (MAX_NORM / norm).clamp(max=1.0)
        for k, t in zip(names, g):
            out[k] += scale * t
    return out


def noisy_step(model: nn.Module, summed: dict, count: int, gen: torch.Generator):
    """The DP-SGD update: the same noise on every rank because the generators are seeded alike
    and drawn from in the same order (``N(0, (NOISE_MULTIPLIER * MAX_NORM)^2)`` per coordinate,
    then divided by the batch size, as ``ftrans.dp.DPSGD`` does)."""
    with torch.no_grad():
        for k, p in model.named_parameters():
            noise = NOISE_MULTIPLIER * MAX_NORM * torch.randn(p.shape, generator=gen)
            p -= LR * (summed[k] + noise) / count


def accountant_or_none():
    """Opacus's RDP accountant through ftrans.dp (None if Opacus is not installed)."""
    try:
        return ftrans.dp.make_accountant("rdp")
    except ImportError as e:
        print(f"(no privacy accounting: {e})")
        return None


def worker(rank: int, world_size: int, port: int, n: int, steps: int, out_dir: str):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = make_model()
        x, y = make_data(n)
        xs, ys = x[rank::world_size], y[rank::world_size]        # this rank's shard
        gen = torch.Generator().manual_seed(NOISE_SEED)          # the same seed on every rank
        first, counts = None, []
        for _ in range(steps):
            summed = clipped_grad_sum(model, xs, ys)
            for g in summed.values():                           # sum of clipped sums
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
            count = torch.tensor([xs.shape[0]])
            dist.all_reduce(count, op=dist.ReduceOp.SUM)
            counts.append(int(count))
            if first is None:
                first = {k: v.clone() for k, v in summed.items()}
            noisy_step(model, summed, int(count), gen)

        torch.save({"summed": first, "counts": counts,
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
    steps = 3 if fast else 20
    world_size = 2
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world_size, free_port(), n, steps, out_dir), nprocs=world_size,
                 join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]

    # The single-process computation on the union of the shards, step for step.
    model = make_model()
    x, y = make_data(n)
    ref_summed = clipped_grad_sum(model, x, y)
    loop_summed = clipped_grad_sum_loop(model, x, y)
    vmap_summed = clipped_grad_sum_vmap(model, x, y)
    err_loop = max((loop_summed[k] - ref_summed[k]).abs().max().item() for k in ref_summed)
    err_vmap = max((vmap_summed[k] - ref_summed[k]).abs().max().item() for k in ref_summed)
    gen = torch.Generator().manual_seed(NOISE_SEED)
    accountant = accountant_or_none()
    for step in range(steps):
        summed = ref_summed if step == 0 else clipped_grad_sum(model, x, y)
        noisy_step(model, summed, n, gen)
        if accountant is not None:
            accountant.step(noise_multiplier=NOISE_MULTIPLIER, sample_rate=1.0)
    ref_params = {k: v.detach() for k, v in model.named_parameters()}
    epsilon = None if accountant is None else float(accountant.get_epsilon(delta=DELTA))

    err_sum = max((r["summed"][k] - ref_summed[k]).abs().max().item()
                  for r in results for k in ref_summed)
    err_params = max((r["params"][k] - ref_params[k]).abs().max().item()
                     for r in results for k in ref_params)
    print(f"{world_size} ranks x {n // world_size} examples: all-reduced clipped sum vs single "
          f"process max err {err_sum:.1e}; parameters after {steps} noisy steps max err "
          f"{err_params:.1e}; counts {[r['counts'] for r in results]}")
    print(f"single-process clipped_grad vs a per-example loop: max err {err_loop:.1e}; vs "
          f"vmap(grad) + clip: {err_vmap:.1e}")
    if epsilon is not None:
        print(f"privacy spent: ({epsilon:.2f}, {DELTA})-DP after {steps} full-batch steps at "
              f"noise multiplier {NOISE_MULTIPLIER}")
    # The clipped sums add up n float32 gradients in a different order on each side: compare
    # them relative to their size (an absolute bound would have to grow with n).
    scale = max(v.abs().max().item() for v in ref_summed.values())
    assert all(c == n for r in results for c in r["counts"])
    assert err_sum < 1e-5 * scale and err_params < 1e-5
    assert err_loop < 1e-5 * scale and err_vmap < 1e-5 * scale
    return {"err_sum": err_sum, "err_params": err_params, "err_loop": err_loop,
            "err_vmap": err_vmap, "count": results[0]["counts"][0], "steps": steps,
            "epsilon": epsilon}


if __name__ == "__main__":
    cli(main, __doc__)
