"""Tutorial 4: MAML on few-shot sine-wave regression, vmapped over tasks.

    python tutorials/04_maml.py            # full size
    python tutorials/04_maml.py --fast     # what the test runs

Model-agnostic meta-learning (Finn et al., 2017) learns an initialization from which ONE gradient
step on a handful of examples fits a new task.  Each task here is a sine wave
y = A sin(x + phase) with random amplitude and phase, seen through K support points.

The inner step is a function of the parameters: params' = params - alpha * grad(support loss).
The meta-loss is the query loss at params', and the meta-gradient differentiates THROUGH the inner
gradient (second order).  With ftrans each piece is a plain function of one task:

    adapt      = params - alpha * ftrans.grad(loss)(params, x_support, y_support)
    task_loss  = loss(adapt, x_query, y_query)
    meta_loss  = ftrans.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, tasks...).mean()
    meta_grad  = ftrans.grad(meta_loss)(params)

so the batch of tasks runs as one vectorized computation, with no per-task Python loop, and
``grad(vmap(grad(...)))`` composes like any other function.  We check the meta-gradient against a
per-task loop with ``torch.autograd.grad(create_graph=True)``, then meta-train.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import ftrans
# Plumbing shared by the tutorials (command line, timing, plots): tutorials/_common.py.
from _common import cli, pyplot_or_none, save_figure


def init_params(gen, hidden=40):
    def layer(n_in, n_out):
        bound = 1 / math.sqrt(n_in)
        return ((torch.rand(n_out, n_in, generator=gen) * 2 - 1) * bound,
                (torch.rand(n_out, generator=gen) * 2 - 1) * bound)
    (w1, b1), (w2, b2), (w3, b3) = layer(1, hidden), layer(hidden, hidden), layer(hidden, 1)
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3}


def net(p, x):                                             # x: [K, 1] -> [K, 1]
    x = F.relu(F.linear(x, p["w1"], p["b1"]))
    x = F.relu(F.linear(x, p["w2"], p["b2"]))
    return F.linear(x, p["w3"], p["b3"])


def mse(p, x, y):
    return F.mse_loss(net(p, x), y)


def sample_tasks(n_tasks, k, gen):
    """Support and query sets of ``n_tasks`` sine waves: four tensors [n_tasks, k, 1]."""
    amp = torch.rand(n_tasks, 1, 1, generator=gen) * 4.9 + 0.1
    phase = torch.rand(n_tasks, 1, 1, generator=gen) * math.pi
    xs = torch.rand(n_tasks, k, 1, generator=gen) * 10 - 5
    xq = torch.rand(n_tasks, k, 1, generator=gen) * 10 - 5
    return xs, amp * torch.sin(xs + phase), xq, amp * torch.sin(xq + phase)


INNER_LR = 0.01


def adapt(params, x_support, y_support, steps=1):
    """The inner loop for ONE task: plain gradient steps, differentiable end to end."""
    for _ in range(steps):
        g = ftrans.grad(mse)(params, x_support, y_support)
        params = {k: params[k] - INNER_LR * g[k] for k in params}
    return params


def task_loss(params, xs, ys, xq, yq):
    return mse(adapt(params, xs, ys), xq, yq)


def meta_loss(params, xs, ys, xq, yq):
    # params shared (None), the four task tensors mapped over their leading task dim.
    return ftrans.vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(params, xs, ys, xq, yq).mean()


def meta_grad_by_loop(params, xs, ys, xq, yq):
    """Reference: per-task second-order MAML with torch.autograd, averaged over tasks."""
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    total = 0
    for t in range(xs.shape[0]):
        loss = mse(leaves, xs[t], ys[t])
        g = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        fast_w = {k: v - INNER_LR * gi for (k, v), gi in zip(leaves.items(), g)}
        total = total + mse(fast_w, xq[t], yq[t])
    grads = torch.autograd.grad(total / xs.shape[0], list(leaves.values()))
    return dict(zip(leaves, grads))


def evaluate(params, gen, n_tasks=100, k=10):
    """Mean query loss on fresh tasks before and after one adaptation step."""
    xs, ys, xq, yq = sample_tasks(n_tasks, k, gen)
    before = ftrans.vmap(mse, in_dims=(None, 0, 0))(params, xq, yq).mean().item()
    after = meta_loss(params, xs, ys, xq, yq).item()
    return before, after


def main(fast: bool = True, plot_dir: str | None = None) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    k = 10
    n_tasks, steps = (16, 300) if fast else (32, 2000)
    params = init_params(gen)

    # 1. The vmapped second-order meta-gradient equals the per-task loop.
    batch = sample_tasks(n_tasks, k, gen)
    g = ftrans.grad(meta_loss)(params, *batch)
    g_ref = meta_grad_by_loop(params, *batch)
    err = max((g[n] - g_ref[n]).abs().max().item() for n in g)
    print(f"meta-gradient: max |grad(vmap(grad)) - loop| = {err:.2e}")
    assert err < 1e-4, err

    # 2. Meta-train with Adam on the meta-gradient.
    eval_gen = torch.Generator().manual_seed(1)
    before0, after0 = evaluate(params, eval_gen)
    meta_params = {n: v.clone().requires_grad_() for n, v in params.items()}
    opt = torch.optim.Adam(meta_params.values(), lr=1e-3)
    curve = []
    for step in range(steps):
        batch = sample_tasks(n_tasks, k, gen)
        g, loss = ftrans.grad_and_value(meta_loss)(
            {n: v.detach() for n, v in meta_params.items()}, *batch)
        for n, v in meta_params.items():
            v.grad = g[n]
        opt.step()
        curve.append(loss.item())
        if step % max(1, steps // 5) == 0:
            print(f"step {step:5d}  meta-loss {loss.item():.3f}")
    trained = {n: v.detach() for n, v in meta_params.items()}
    eval_gen = torch.Generator().manual_seed(1)
    before1, after1 = evaluate(trained, eval_gen)
    print(f"fresh tasks, query MSE before/after one inner step: untrained {before0:.3f}/{after0:.3f}"
          f", meta-trained {before1:.3f}/{after1:.3f}")
    # Meta-training must make the one-step-adapted loss better than at initialization, and the
    # adaptation step itself must help.
    assert after1 < 0.8 * after0 and after1 < before1

    if plot_dir is not None:
        _plot(plot_dir, curve, trained, gen)
    return {"meta_grad_err": err, "after_untrained": after0, "after_trained": after1,
            "before_trained": before1}


def _plot(plot_dir, curve, params, gen):
    plt = pyplot_or_none()
    if plt is None:
        return
    xs, ys, _, _ = sample_tasks(1, 10, gen)
    grid = torch.linspace(-5, 5, 200)[:, None]
    adapted = adapt(params, xs[0], ys[0])
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(curve), a.set_xlabel("meta step"), a.set_ylabel("meta-loss"), a.set_yscale("log")
    with torch.no_grad():
        b.plot(grid, net(params, grid), label="meta-init")
        b.plot(grid, net(adapted, grid), label="after 1 step")
    b.scatter(xs[0, :, 0], ys[0, :, 0], c="k", label="support")
    b.legend()
    save_figure(fig, plot_dir, "04_maml.png")


if __name__ == "__main__":
    cli(main, __doc__)
