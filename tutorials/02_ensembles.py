"""Tutorial 2: model ensembling -- many models, one vectorized call.

    python tutorials/02_ensembles.py            # full size
    python tutorials/02_ensembles.py --fast     # what the test runs

An ensemble of M models of the same architecture is usually run as a loop of M forward passes.
ftrans turns the loop into one batched pass: ``stack_module_state`` stacks the M models'
parameters along a new leading dimension, and ``vmap(functional_call)`` maps over that dimension,
so every linear layer becomes one batched matmul.

This script shows the three things one needs:

1. the same minibatch for every member (``in_dims=(0, 0, None)``) and a different minibatch per
   member (``in_dims=(0, 0, 0)``), each checked against the loop;
2. dropout inside the ensemble: ``randomness='different'`` gives each member its own mask
   (``'same'`` one shared mask, and the default ``'error'`` refuses, since silently sharing
   randomness is a classic bug);
3. training all members at once: ``vmap(grad(loss))`` gives each member its own gradient, and
   one optimizer steps the stacked parameters.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import ftrans
# Plumbing shared by the tutorials (command line, timing, plots): tutorials/_common.py.
from _common import cli, mean_time, pyplot_or_none, save_figure


class MLP(nn.Module):
    def __init__(self, d_in=16, hidden=64, d_out=3, p_drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)
        self.drop = nn.Dropout(p_drop)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(x))))


def make_data(n, teacher, gen):
    """Three-class data labelled by a fixed random linear teacher."""
    x = torch.randn(n, teacher.shape[0], generator=gen)
    return x, (x @ teacher).argmax(1)


def main(fast: bool = True, plot_dir: str | None = None) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    n_models, d_in = (4, 16) if fast else (16, 16)
    models = [MLP(d_in) for _ in range(n_models)]

    # stack_module_state returns two dicts name -> tensor with a leading [n_models] dim.  The
    # stacked tensors are new leaves: training them does not touch the original modules.
    params, buffers = ftrans.stack_module_state(models)
    print({k: tuple(v.shape) for k, v in params.items()})

    # functional_call needs a module only for its *code*; a copy on the meta device holds no
    # memory and makes it obvious that its own parameters are never used.
    base = copy.deepcopy(models[0]).to("meta")

    def one_model(p, b, x):
        return ftrans.functional_call(base, (p, b), (x,))

    # --- 1a. Same minibatch for every member: x is not mapped (None).
    x = torch.randn(32, d_in, generator=gen)
    same = ftrans.vmap(one_model, in_dims=(0, 0, None))(params, buffers, x)   # [M, 32, 3]
    ref_same = torch.stack([m(x) for m in models])
    err_same = (same - ref_same).abs().max().item()

    # --- 1b. A different minibatch per member: x gets a leading [M] dim and is mapped too.
    xs = torch.randn(n_models, 32, d_in, generator=gen)
    diff = ftrans.vmap(one_model)(params, buffers, xs)                         # in_dims=0 for all
    ref_diff = torch.stack([m(xi) for m, xi in zip(models, xs)])
    err_diff = (diff - ref_diff).abs().max().item()
    print(f"same minibatch {tuple(same.shape)} err {err_same:.1e}; "
          f"different minibatches {tuple(diff.shape)} err {err_diff:.1e}")
    assert err_same < 1e-5 and err_diff < 1e-5

    # Timing.  For tiny models ftrans's per-op Python dispatch costs more than the loop saves;
    # ``ftrans.compile`` traces the vmapped function once into a flat aten graph and replays it.
    ens = ftrans.vmap(one_model, in_dims=(0, 0, None))
    ens_compiled = ftrans.compile(ens)
    # The parameters require grad, so (under grad mode) the replay is differentiable: it was
    # traced with its backward, and .backward() on its output reaches `params` as eager does.
    out = ens_compiled(params, buffers, x)
    assert torch.allclose(out, same, atol=1e-6)
    (g_replay,) = torch.autograd.grad(out.square().sum(), [params["fc1.weight"]])
    (g_eager,) = torch.autograd.grad(same.square().sum(), [params["fc1.weight"]])
    assert torch.allclose(g_replay, g_eager, atol=1e-5)
    with torch.no_grad():  # no gradient wanted: a plain replay (one more trace)
        times = {name: mean_time(fn, reps=20) for name, fn in [
            ("vmap", lambda: ens(params, buffers, x)),
            ("compile(vmap)", lambda: ens_compiled(params, buffers, x)),
            ("loop", lambda: torch.stack([m(x) for m in models]))]}
    print("ensemble forward: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()))

    # --- 2. Dropout.  The same input through every member, with p=0.5 and identical weights,
    # so any difference between members comes from the dropout masks alone.
    drop_models = [MLP(d_in, p_drop=0.5) for _ in range(n_models)]
    for m in drop_models[1:]:
        m.load_state_dict(drop_models[0].state_dict())
    dparams, dbuffers = ftrans.stack_module_state(drop_models)
    dbase = copy.deepcopy(drop_models[0]).to("meta")   # .train() mode: dropout is active

    def one_dropout_model(p, b, x):
        return ftrans.functional_call(dbase, (p, b), (x,))

    outs = {}
    for randomness in ("same", "different"):
        outs[randomness] = ftrans.vmap(one_dropout_model, in_dims=(0, 0, None),
                                       randomness=randomness)(dparams, dbuffers, x)
    spread_same = (outs["same"] - outs["same"][0]).abs().max().item()
    spread_diff = (outs["different"] - outs["different"][0]).abs().max().item()
    try:
        ftrans.vmap(one_dropout_model, in_dims=(0, 0, None))(dparams, dbuffers, x)
        refused = False
    except RuntimeError as e:       # randomness='error' (the default)
        refused = True
        print(f"default randomness='error' refuses: {str(e).splitlines()[0][:90]}...")
    print(f"dropout spread between members: same={spread_same:.2e}, different={spread_diff:.2e}")
    assert spread_same == 0.0 and spread_diff > 0.1 and refused

    # --- 3. Train all members at once.  Each member sees its own bootstrap resample of the
    # data (a "bagged" ensemble), so they stay different models.
    n_train, steps = (512, 60) if fast else (4096, 300)
    teacher = torch.randn(d_in, 3, generator=gen)
    x_all, y_all = make_data(n_train, teacher, gen)
    x_val, y_val = make_data(1024, teacher, gen)

    def loss_fn(p, b, x, y):
        return F.cross_entropy(one_model(p, b, x), y)

    # grad w.r.t. the parameters of ONE member; vmap over members (and their minibatches).
    # The gradient is taken inside the compiled function: traced once, replayed every step.
    member_grads = ftrans.compile(ftrans.vmap(ftrans.grad(loss_fn), in_dims=(0, 0, 0, 0)))
    trained = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(trained.values(), lr=1e-2)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, n_train, (n_models, 64), generator=gen)
        xb, yb = x_all[idx], y_all[idx]                       # [M, 64, d], [M, 64]
        grads = member_grads({k: v.detach() for k, v in trained.items()}, buffers, xb, yb)
        for k, v in trained.items():
            v.grad = grads[k]
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            with torch.no_grad():
                losses.append(ftrans.vmap(loss_fn, in_dims=(0, 0, 0, 0))(
                    trained, buffers, xb, yb).mean().item())

    with torch.no_grad():
        logits = ftrans.vmap(one_model, in_dims=(0, 0, None))(trained, buffers, x_val)
    member_acc = (logits.argmax(-1) == y_val).float().mean(1)           # [M]
    ensemble_acc = (logits.softmax(-1).mean(0).argmax(-1) == y_val).float().mean().item()
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; member accuracy "
          f"{[round(a, 3) for a in member_acc.tolist()]}, ensemble {ensemble_acc:.3f}")
    assert losses[-1] < 0.5 * losses[0] and ensemble_acc > 0.8

    if plot_dir is not None:
        _plot(plot_dir, losses)
    return {"err_same": err_same, "err_diff": err_diff, "spread_same": spread_same,
            "spread_diff": spread_diff, "refused": refused, "loss_first": losses[0],
            "loss_last": losses[-1], "ensemble_acc": ensemble_acc,
            "member_acc_min": member_acc.min().item()}


def _plot(plot_dir, losses):
    plt = pyplot_or_none()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(losses), ax.set_xlabel("step / 10"), ax.set_ylabel("mean member loss")
    save_figure(fig, plot_dir, "02_ensemble_training.png")


if __name__ == "__main__":
    cli(main, __doc__)
