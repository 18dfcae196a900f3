"""Tutorial 7: per-example control flow under vmap (Newton to tolerance, piecewise functions).

    python tutorials/07_control_flow.py            # full size
    python tutorials/07_control_flow.py --fast     # what the test runs

A physics-style problem: each example is a ball launched at its own angle and speed against a
drag force, and we want, per example, the time at which it hits the ground, then the gradient of
a loss on the landing points with respect to the launch parameters.  Two things make this hard
for ``torch.func.vmap`` and ``jax.vmap``:

1. The landing time is the root of the height h(t), found by Newton's method *to a tolerance*:
   each example needs its own number of iterations.  ``ftrans.while_loop`` runs each example
   until its own test fails and retires it (the body runs on the examples still iterating), and
   reverse mode differentiates through it (JAX's ``while_loop`` cannot).
2. The ground is piecewise: a flat field, then a slope.  ``ftrans.cond`` runs each example only
   through its own branch (``torch.cond`` under ``torch.vmap`` runs both on every example).

Finally: a Python ``if`` on a value every example agrees on (a NaN check) just works, and
``vmap(..., control_flow="split")`` runs a function with a divergent ``if`` once per group.
"""
from __future__ import annotations

import torch

import ftrans
from ftrans import control_flow
# Plumbing shared by the tutorials (command line, timing): tutorials/_common.py.
from _common import cli, mean_time

G, DRAG = 9.81, 0.3


def height(t, vy):
    """Height at time t with linear drag: h(t) = (vy + g/k)(1 - e^{-kt})/k - g t / k."""
    k = DRAG
    return (vy + G / k) * (1 - torch.exp(-k * t)) / k - G * t / k


def distance(t, vx):
    return vx * (1 - torch.exp(-DRAG * t)) / DRAG


def landing_time(vy):
    """Newton's method on h(t) = 0, from a guess past the apex, to a tolerance."""
    def not_done(t, step):
        return step.abs() > 1e-10

    def newton(t, step):
        h = height(t, vy)
        dh = (vy + G / DRAG) * torch.exp(-DRAG * t) - G / DRAG   # h'(t)
        step = h / dh
        return t - step, step

    t0 = 2 * vy / G + 1.0
    t, _ = ftrans.while_loop(not_done, newton, (t0, torch.ones_like(t0)))
    return t


def ground(x):
    """Flat field up to 20 m, then a 10% slope: a piecewise function via ftrans.cond."""
    return ftrans.cond(x < 20.0, lambda x: x * 0.0, lambda x: 0.1 * (x - 20.0), (x,))


def landing_loss(launch):
    """One example: launch = (angle, speed).  How far from the 30 m target it lands, plus the
    ground height there."""
    angle, speed = launch[0], launch[1]
    if launch.isnan().any():          # every example agrees (none is NaN): a plain Python if
        raise ValueError("NaN launch parameters")
    vx, vy = speed * torch.cos(angle), speed * torch.sin(angle)
    t = landing_time(vy)
    x = distance(t, vx)
    return (x - 30.0) ** 2 + ground(x)


def _reference(launch):
    """The same, one example, in plain eager PyTorch (Python while/if): the oracle."""
    angle, speed = launch[0], launch[1]
    vx, vy = speed * torch.cos(angle), speed * torch.sin(angle)
    t = 2 * vy / G + 1.0
    step = torch.ones_like(t)
    while step.abs() > 1e-10:
        h = height(t, vy)
        dh = (vy + G / DRAG) * torch.exp(-DRAG * t) - G / DRAG
        step = h / dh
        t = t - step
    x = distance(t, vx)
    return (x - 30.0) ** 2 + (x * 0.0 if x < 20.0 else 0.1 * (x - 20.0))


def main(fast: bool = True) -> dict:
    n = 64 if fast else 1024
    gen = torch.Generator().manual_seed(0)
    launch = torch.stack([torch.rand(n, generator=gen, dtype=torch.float64) * 1.2 + 0.2,
                          torch.rand(n, generator=gen, dtype=torch.float64) * 25 + 5], dim=1)

    # Values: vmap over the batch, checked against a Python loop.
    control_flow.reset_stats()
    loss = ftrans.vmap(landing_loss)(launch)
    lanes = control_flow.stats()["while_body_lanes"]
    ref = torch.stack([_reference(p) for p in launch])
    err_value = (loss - ref).abs().max().item()
    trips = []
    for p in launch:     # how many Newton steps each example needs on its own
        vy = p[1] * torch.sin(p[0])
        t, step, k = 2 * vy / G + 1.0, torch.ones(()), 0
        while step.abs() > 1e-10:
            step = height(t, vy) / ((vy + G / DRAG) * torch.exp(-DRAG * t) - G / DRAG)
            t, k = t - step, k + 1
        trips.append(k)
    print(f"landing loss of {n} launches: max err vs loop {err_value:.1e}")
    print(f"Newton body evaluations: {lanes} = sum of per-example steps {sum(trips)} "
          f"(running all to the slowest would be {n} x {max(trips)} = {n * max(trips)})")

    # Gradients through the while_loop and the cond: per-example, and of the batch mean.
    grads = ftrans.vmap(ftrans.grad(landing_loss))(launch)
    grads_ref = torch.stack([torch.autograd.grad(_reference(p), p)[0]
                             for p in launch.clone().requires_grad_().unbind(0)])
    err_grad = (grads - grads_ref).abs().max().item() / grads_ref.abs().max().item()
    mean_grad = ftrans.grad(lambda L: ftrans.vmap(landing_loss)(L).mean())(launch)
    err_mean = (mean_grad - grads_ref / n).abs().max().item() / (grads_ref / n).abs().max().item()
    print(f"vmap(grad) through while_loop + cond: rel err {err_grad:.1e}; grad(vmap): {err_mean:.1e}")

    # A few steps of gradient descent on the launch speeds: every ball should approach 30 m.
    params = launch.clone()
    for _ in range(20 if fast else 50):
        g = ftrans.vmap(ftrans.grad(landing_loss))(params)
        params = params - 0.2 * g / (g.norm(dim=1, keepdim=True) + 1e-3) * torch.tensor([0.0, 1.0],
                                                                                         dtype=g.dtype)
    before, after = loss.mean().item(), ftrans.vmap(landing_loss)(params).mean().item()
    print(f"mean loss before {before:.2f}, after 'aiming' the speeds {after:.2f}")

    # A divergent Python `if` raises, pointing at ftrans.cond; control_flow="split" runs the
    # function once per group of examples that agree instead.
    def piecewise_python(x):
        return x * 0.0 if x < 20.0 else 0.1 * (x - 20.0)

    xs = torch.linspace(0, 40, 9, dtype=torch.float64)
    try:
        ftrans.vmap(piecewise_python)(xs)
        raise AssertionError("a divergent Python if must raise")
    except ftrans.VmapError as e:
        assert "ftrans.cond" in str(e)
    split = ftrans.vmap(piecewise_python, control_flow="split")(xs)
    err_split = (split - ftrans.vmap(ground)(xs)).abs().max().item()
    print(f"control_flow='split' equals ftrans.cond: max diff {err_split:.1e}")

    t_vmap = mean_time(lambda: ftrans.vmap(landing_loss)(launch), reps=2)
    t_loop = mean_time(lambda: [_reference(p) for p in launch], reps=1 if fast else 2)
    print(f"time: vmap {t_vmap * 1e3:.1f} ms, Python loop {t_loop * 1e3:.1f} ms")

    assert err_value < 1e-8 and err_grad < 1e-6 and err_mean < 1e-6 and err_split == 0
    assert lanes == sum(trips) and after < before
    return {"err_value": err_value, "err_grad": err_grad, "err_mean": err_mean,
            "err_split": err_split, "body_lanes": lanes, "sum_trips": sum(trips),
            "before": before, "after": after}


if __name__ == "__main__":
    cli(main, __doc__, plots=False)
