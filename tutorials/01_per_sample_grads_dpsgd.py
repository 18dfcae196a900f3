"""Tutorial 1: per-sample gradients of a CNN, clipping at the cost of one backward, and DP-SGD.

    python tutorials/01_per_sample_grads_dpsgd.py            # full size
    python tutorials/01_per_sample_grads_dpsgd.py --fast     # what the test runs

Differentially private SGD (Abadi et al., 2016) needs what ordinary training throws away: the
gradient of EACH training example.  Every per-example gradient is clipped to a norm bound C, the
clipped gradients are summed, Gaussian noise scaled to C is added, and only then is the step
taken.  A plain ``loss.backward()`` gives the batch SUM of gradients, too late to clip.

The obvious fix, a Python loop of one backward per example, is slow.  ftrans computes all of them
in one vectorized pass: write the loss of ONE example, take its gradient with ``ftrans.grad``,
and map that function over the batch with ``ftrans.vmap``.  This script does exactly that on a
small synthetic image task (no downloads), checks the result against the loop and times both.

DP-SGD does not need the B gradients themselves, only their norms and the clipped sum.
``ftrans.clipped_grad(loss_one, C)`` computes exactly ``sum_i g_i * min(1, C / ||g_i||)`` in one
forward and one backward over the batch, from per-layer norm rules (ghost norms, book-keeping),
without materialising the per-example gradients.  The script checks it against
``vmap(grad)`` + clip, times both (and Opacus, if installed), then trains privately (one epoch; three in --fast mode) with
``ftrans.dp.DPSGD``: Poisson-sampled batches of random size, padded to a few buckets so that
``ftrans.compile`` traces at most three times, Gaussian noise, and epsilon from Opacus's RDP
accountant (``pip install 'ftrans[dp]'``).
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

import ftrans
# Plumbing shared by the tutorials (command line, timing, plots): tutorials/_common.py.
from _common import cli, mean_time, pyplot_or_none, save_figure


# ---------------------------------------------------------------------------------------------
# Data: two Gaussian blobs rendered as 1x28x28 images.  Class 0 has its bright spot in the upper
# left, class 1 in the lower right; the exact centre jitters and pixel noise is added, so the
# task is easy but not trivial, and it is generated in milliseconds.
# ---------------------------------------------------------------------------------------------

def make_blob_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, 2, (n,), generator=generator)
    centres = torch.where(labels[:, None] == 0, torch.tensor([9.0, 9.0]), torch.tensor([18.0, 18.0]))
    centres = centres + 2.5 * torch.randn(n, 2, generator=generator)
    grid = torch.arange(28, dtype=torch.float32)
    dy = (grid[None, :] - centres[:, 0:1]) ** 2          # [n, 28]
    dx = (grid[None, :] - centres[:, 1:2]) ** 2          # [n, 28]
    images = torch.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * 3.0 ** 2))
    images = images + 0.3 * torch.randn(n, 28, 28, generator=generator)
    return images.unsqueeze(1), labels                   # [n, 1, 28, 28], [n]


class SmallCNN(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 7 * 7, 2)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


# ---------------------------------------------------------------------------------------------
# The one-example loss.  ``functional_call`` runs the module with the parameters we pass instead
# of its own, which is what lets ``grad`` differentiate with respect to them.  Inside vmap ``x``
# is ONE image [1, 28, 28] and ``y`` a 0-dim label, so we add a batch of one for the module.
# ---------------------------------------------------------------------------------------------

def loss_one_of(model: nn.Module):
    def loss_one(params, buffers, x, y):
        logits = ftrans.functional_call(model, (params, buffers), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))
    return loss_one


def make_per_sample_grads(model: nn.Module):
    loss_one = loss_one_of(model)
    # in_dims: parameters and buffers are shared (None), images and labels are mapped (0).
    return ftrans.vmap(ftrans.grad(loss_one), in_dims=(None, None, 0, 0))


def loop_per_sample_grads(model: nn.Module, x, y) -> dict:
    """The reference: one backward per example."""
    names = [n for n, _ in model.named_parameters()]
    rows = {n: [] for n in names}
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        for n, g in zip(names, torch.autograd.grad(loss, list(model.parameters()))):
            rows[n].append(g)
    return {n: torch.stack(v) for n, v in rows.items()}


# ---------------------------------------------------------------------------------------------
# DP-SGD's clipped sum, written out from materialised per-sample gradients: the per-sample norm
# is taken over ALL parameters together (the gradient of one example is one vector) and each
# example is scaled by min(1, C / norm).  ftrans.clipped_grad computes the same without them.
# ---------------------------------------------------------------------------------------------

def clipped_sum(per_sample: dict, max_norm: float, eps: float = 1e-6):
    flat = torch.cat([g.flatten(1) for g in per_sample.values()], dim=1)  # [B, n_params]
    norms = flat.norm(dim=1)
    scale = (max_norm / (norms + eps)).clamp(max=1.0)
    summed = {k: torch.einsum("b,b...->...", scale, g) for k, g in per_sample.items()}
    return summed, norms


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(fast: bool = True, plot_dir: str | None = None) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n_train, batch = (256, 32) if fast else (4096, 64)
    x_train, y_train = make_blob_images(n_train, gen)
    x_test, y_test = make_blob_images(512, gen)
    model = SmallCNN(width=4 if fast else 8)
    params = {k: v.detach() for k, v in model.named_parameters()}  # shared storage with model
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    per_sample_grads = make_per_sample_grads(model)

    # 1. Correctness: vmap(grad) equals the loop, parameter by parameter.
    xb, yb = x_train[:batch], y_train[:batch]
    grads = per_sample_grads(params, buffers, xb, yb)
    ref = loop_per_sample_grads(model, xb, yb)
    max_err = max((grads[k] - ref[k]).abs().max().item() for k in ref)
    print(f"per-sample grads: shapes {[tuple(g.shape) for g in grads.values()]}")
    print(f"max |vmap(grad) - loop| = {max_err:.2e}")
    assert max_err < 1e-5, max_err

    # 2. Timing (mean_time makes one untimed call first: the first ftrans call pays a warm-up).
    t_vmap = mean_time(lambda: per_sample_grads(params, buffers, xb, yb), reps=3)
    t_loop = mean_time(lambda: loop_per_sample_grads(model, xb, yb), reps=3)
    print(f"batch {batch}: vmap(grad) {t_vmap * 1e3:.1f} ms, loop {t_loop * 1e3:.1f} ms "
          f"({t_loop / t_vmap:.1f}x)")

    # 3. The clipped sum without per-example gradients: one forward, one backward.
    def loss_params(params, x, y):
        return loss_one_of(model)(params, buffers, x, y)
    clipped = ftrans.clipped_grad(loss_params, 1.0)
    fast_sum = clipped(params, xb, yb)
    slow_sum, _ = clipped_sum(per_sample_grads(params, buffers, xb, yb), 1.0, eps=0.0)
    err_clipped = max((fast_sum[k] - slow_sum[k]).abs().max().item() for k in slow_sum)
    print(f"max |clipped_grad - (vmap(grad) + clip)| = {err_clipped:.2e}")
    assert err_clipped < 1e-4, err_clipped
    reps = 1 if fast else 3
    t_clipped = mean_time(lambda: clipped(params, xb, yb), reps=reps)
    t_vmap_clip = mean_time(lambda: clipped_sum(per_sample_grads(params, buffers, xb, yb), 1.0),
                            reps=reps)
    t_nonprivate = mean_time(lambda: torch.autograd.grad(
        F.cross_entropy(model(xb), yb, reduction="sum"), list(model.parameters())), reps=reps)
    print(f"DP step, batch {batch}: non-private backward {t_nonprivate * 1e3:.1f} ms, "
          f"clipped_grad {t_clipped * 1e3:.1f} ms, vmap(grad) + clip {t_vmap_clip * 1e3:.1f} ms"
          + _opacus_time(model, xb, yb, reps))

    # 4. Private training with Poisson sampling, compiled, with accounting: one epoch (three of
    #    the small --fast set, whose 8 noisy steps an unlucky noise draw can undo).
    acc_before = accuracy(model, x_test, y_test)
    rate = batch / n_train
    try:
        import opacus  # noqa: F401
        accountant = "rdp"
    except ImportError:
        accountant = None
    dp = ftrans.dp.DPSGD(loss_params, max_norm=1.0, noise_multiplier=1.0, sample_rate=rate,
                         num_examples=n_train, compile=True, accountant=accountant,
                         generator=gen)
    losses = []
    steps = 3 * round(1 / rate) if fast else round(1 / rate)
    for idx in ftrans.dp.poisson_batches(n_train, rate, steps=steps, generator=gen):
        xb, yb = x_train[idx], y_train[idx]
        with torch.no_grad():
            losses.append(F.cross_entropy(model(xb), yb).item() if len(idx) else float("nan"))
        g = dp.step(params, xb, yb)
        with torch.no_grad():
            for k, p in params.items():
                p -= 2.0 * g[k]
    acc_after = accuracy(model, x_test, y_test)
    # The per-sample gradient norms after training, without per-sample gradients either.
    norms = ftrans.per_sample_grad_norms(loss_params)(params, x_train[:256], y_train[:256])
    eps = dp.epsilon(1e-5) if accountant else None
    print(f"test accuracy {acc_before:.3f} -> {acc_after:.3f} after private training "
          f"({dp.steps} Poisson batches, {dp.traces} traces); median per-sample grad norm now "
          f"{norms.median():.2g}, clipped fraction {(norms > 1.0).float().mean():.2f}; "
          + (f"epsilon {eps:.2f} at delta 1e-5" if eps is not None else
             "install opacus for epsilon"))
    assert acc_after > 0.8, acc_after

    if plot_dir is not None:
        _plot(plot_dir, norms, losses)
    return {"max_err": max_err, "acc_before": acc_before, "acc_after": acc_after,
            "t_vmap": t_vmap, "t_loop": t_loop, "n_steps": len(losses),
            "err_clipped": err_clipped, "t_clipped": t_clipped, "t_vmap_clip": t_vmap_clip,
            "traces": dp.traces, "epsilon": eps}


def _opacus_time(model, x, y, reps) -> str:
    """Opacus's per-sample gradients (hooks) + clip, for the speed comparison, if installed."""
    try:
        import copy
        from opacus import GradSampleModule
    except ImportError:
        return ""
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")

    def step():
        for p in gsm.parameters():
            p.grad_sample = None
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        clipped_sum({n: p.grad_sample for n, p in gsm.named_parameters()}, 1.0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus's full-backward-hook notice
        return f", Opacus (hooks) + clip {mean_time(step, reps=reps) * 1e3:.1f} ms"


def _plot(plot_dir, norms, losses):
    plt = pyplot_or_none()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.hist(norms.numpy(), bins=40)
    a.axvline(1.0, color="k", ls="--", label="clip bound C")
    a.set_xlabel("per-sample gradient norm"), a.legend()
    b.plot(losses), b.set_xlabel("step"), b.set_ylabel("batch loss")
    save_figure(fig, plot_dir, "01_dpsgd.png")


if __name__ == "__main__":
    cli(main, __doc__)
