"""The per-sample-gradient, Jacobian, ensemble and meta-learning workloads."""
from __future__ import annotations

import copy
import time

import torch
import torch.func
import torch.nn.functional as F

import ftrans

from . import models
from .common import run_row


def _per_sample_grads(lib, model, params, buffers, x, y):
    def loss(p, xb, yb):
        out = lib.functional_call(model, (p, buffers), (xb.unsqueeze(0),))
        return F.cross_entropy(out, yb.unsqueeze(0))

    return lib.vmap(lib.grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _loop_grads(model, params, x, y):
    names = list(params)
    grads = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1])
        g = torch.autograd.grad(F.cross_entropy(out, y[i:i + 1]), [params[n] for n in names])
        grads.append(g)
    return {n: torch.stack([g[j] for g in grads]) for j, n in enumerate(names)}


def per_sample_rows(device, quick, only):
    sizes = {
        "mlp": (64, 512), "cnn": (32, 256), "transformer": (16, 64), "gru": (16, 64),
    }
    rows = []
    for name, bs in sizes.items():
        if only and not any(o in f"per-sample {name}" for o in only):
            continue
        model, shape, classes = models.make(name, device)
        params = {k: v.detach() for k, v in model.named_parameters()}
        live = dict(model.named_parameters())
        buffers = {k: v for k, v in model.named_buffers()}
        for B in (bs[:1] if quick else bs):
            x = torch.randn(B, *shape, device=device)
            y = torch.randint(0, classes, (B,), device=device)
            impls = {
                "loop": lambda: _loop_grads(model, live, x, y),
                "ftrans": lambda: _per_sample_grads(ftrans, model, params, buffers, x, y),
                "torch.func": lambda: _per_sample_grads(torch.func, model, params, buffers, x, y),
            }
            rows.append(run_row(f"per-sample grads {name}", f"B={B}", impls, device,
                                reps=5 if quick else 21))
            compiled = ftrans.compile(
                lambda p, xb, yb: _per_sample_grads(ftrans, model, p, buffers, xb, yb))
            t0 = time.perf_counter()
            compiled(params, x, y)
            trace_s = time.perf_counter() - t0
            impls["ftrans"] = lambda: compiled(params, x, y)
            row = run_row(f"per-sample grads {name} [ftrans.compile]", f"B={B}", impls, device,
                          reps=5 if quick else 21)
            row.note += f"first call (trace) {trace_s:.2f} s"
            rows.append(row)
    return rows


def _impls(loop, run):
    """The three contenders of a row: ``run(lib)`` with lib = ftrans or torch.func."""
    return {"loop": loop, "ftrans": lambda: run(ftrans), "torch.func": lambda: run(torch.func)}


def _f_nd(x):
    return (x.sin() * x.cos().sum() + x ** 2).tanh()


def jacobian_rows(device, quick, only):
    rows = []
    dims = (64,) if quick else (64, 512)
    for n in dims:
        if only and not any(o in "jacrev" for o in only):
            break
        x = torch.randn(n, device=device)
        impls = _impls(lambda: torch.autograd.functional.jacobian(_f_nd, x),
                       lambda lib: lib.jacrev(_f_nd)(x))
        rows.append(run_row("jacrev", f"n={n}", impls, device, reps=5 if quick else 21))
        rows.append(_compiled_row("jacrev", f"n={n}", impls, ftrans.jacrev(_f_nd), (x,), device,
                                  reps=5 if quick else 21))
    if not only or any(o in "vmap(jacrev)" for o in only):
        xs = torch.randn(32, 64, device=device)
        impls = _impls(
            lambda: torch.stack([torch.autograd.functional.jacobian(_f_nd, x) for x in xs]),
            lambda lib: lib.vmap(lib.jacrev(_f_nd))(xs))
        rows.append(run_row("vmap(jacrev)", "32 x n=64", impls, device, reps=5 if quick else 21))
    if not only or any(o in "hessian" for o in only):
        n = 64 if quick else 256
        x = torch.randn(n, device=device)
        g = lambda x: _f_nd(x).sum()  # noqa: E731
        impls = _impls(lambda: torch.autograd.functional.hessian(g, x),
                       lambda lib: lib.hessian(g)(x))
        rows.append(run_row("hessian", f"n={n}", impls, device, reps=3 if quick else 15))
        rows.append(_compiled_row("hessian", f"n={n}", impls, ftrans.hessian(g), (x,), device,
                                  reps=3 if quick else 15))
    return rows


def nested_dot_rows(device, quick, only):
    if only and not any(o in "nested vmap dot" for o in only):
        return []
    x, y = torch.randn(64, 32, 128, device=device), torch.randn(64, 32, 128, device=device)
    impls = _impls(lambda: torch.stack([torch.stack([a.dot(b) for a, b in zip(xa, ya)])
                                        for xa, ya in zip(x, y)]),
                   lambda lib: lib.vmap(lib.vmap(torch.dot))(x, y))
    return [run_row("nested vmap dot", "64x32x128", impls, device, reps=5 if quick else 15)]


def ensemble_rows(device, quick, only):
    if only and not any(o in "ensemble" for o in only):
        return []
    rows = []
    for n_models in ((8,) if quick else (8, 32)):
        ms = [models.MLP((64, 128, 128, 10)).to(device) for _ in range(n_models)]
        x = torch.randn(64, 64, device=device)
        base = copy.deepcopy(ms[0]).to("meta")

        def run(lib):
            params, buffers = lib.stack_module_state(ms)
            f = lambda p, b, x: lib.functional_call(base, (p, b), (x,))  # noqa: E731
            return lib.vmap(f, in_dims=(0, 0, None))(params, buffers, x)

        impls = {
            "loop": lambda: torch.stack([m(x) for m in ms]),
            "ftrans": lambda: run(ftrans),
            "torch.func": lambda: run(torch.func),
        }
        rows.append(run_row("ensemble MLP", f"{n_models} models", impls, device,
                            reps=5 if quick else 15))
    return rows


def training_rows(device, quick, only):
    """Training steps whose backward runs outside the function (``loss.backward()``): an
    ensemble over stacked parameters that require grad, and a fine-tuning step closing over a
    model's parameters.  ``[ftrans.compile]`` is a differentiable replay (ftrans/_joint.py);
    every contender returns the loss and the gradients, checked against the loop."""
    rows = []
    if not only or any(o in "ensemble training step" for o in only):
        for n_models in ((8,) if quick else (8, 32)):
            ms = [models.MLP((64, 128, 128, 10)).to(device) for _ in range(n_models)]
            x = torch.randn(64, 64, device=device)
            y = torch.randint(0, 10, (64,), device=device)
            base = copy.deepcopy(ms[0]).to("meta")

            def ensemble_loss(lib, p, x, y):
                logits = lib.vmap(lambda q: lib.functional_call(base, q, (x,)))(p)
                return F.cross_entropy(logits.flatten(0, 1), y.repeat(logits.shape[0]))

            params, _ = torch.func.stack_module_state(ms)
            compiled = ftrans.compile(lambda p, x, y: ensemble_loss(ftrans, p, x, y))

            def step(loss_fn):
                for v in params.values():
                    v.grad = None
                loss = loss_fn()
                loss.backward()
                return loss.detach(), {k: v.grad for k, v in params.items()}

            def loop():
                for m in ms:
                    m.zero_grad()
                loss = sum(F.cross_entropy(m(x), y) for m in ms) / n_models
                loss.backward()
                return loss.detach(), {k: torch.stack([getattr_path(m, k).grad for m in ms])
                                       for k in params}

            impls = {"loop": loop,
                     "ftrans": lambda: step(lambda: compiled(params, x, y)),
                     "torch.func": lambda: step(lambda: ensemble_loss(torch.func, params, x, y))}
            t0 = time.perf_counter()
            step(lambda: compiled(params, x, y))
            trace_s = time.perf_counter() - t0
            row = run_row("ensemble training step [ftrans.compile]", f"{n_models} models", impls,
                          device, reps=5 if quick else 15)
            row.note += f"loss.backward() outside; first call (trace) {trace_s:.2f} s"
            rows.append(row)
    if not only or any(o in "fine-tuning step" for o in only):
        model, shape, classes = models.make("transformer", device)
        B = 16
        x = torch.randn(B, *shape, device=device)
        y = torch.randint(0, classes, (B,), device=device)
        params = dict(model.named_parameters())

        def finetune(lib):
            def loss_fn(x, y):
                if lib is None:
                    return F.cross_entropy(model(x), y)
                return F.cross_entropy(lib.functional_call(model, params, (x,)), y)
            return loss_fn

        compiled = ftrans.compile(finetune(None))

        def step(loss_fn):
            model.zero_grad()
            loss = loss_fn(x, y)
            loss.backward()
            return loss.detach(), {k: v.grad.clone() for k, v in params.items()}

        impls = {"loop": lambda: step(finetune(None)),
                 "ftrans": lambda: step(compiled),
                 "torch.func": lambda: step(finetune(torch.func))}
        t0 = time.perf_counter()
        step(compiled)
        trace_s = time.perf_counter() - t0
        row = run_row("fine-tuning step transformer [ftrans.compile]", f"B={B}", impls, device,
                      reps=5 if quick else 15)
        row.note += (f"loss.backward() outside; loop = plain module eager; first call (trace) "
                     f"{trace_s:.2f} s")
        rows.append(row)
    return rows


def getattr_path(module, dotted):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def maml_rows(device, quick, only):
    if only and not any(o in "maml" for o in only):
        return []
    rows = []
    model = models.MLP((1, 40, 40, 1)).to(device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    tasks = 16
    xs, ys = torch.randn(tasks, 10, 1, device=device), torch.randn(tasks, 10, 1, device=device)

    for steps in ((1,) if quick else (1, 5)):
        def meta_loss(lib, p, x, y):
            def inner_loss(p):
                return F.mse_loss(lib.functional_call(model, p, (x,)), y)

            for _ in range(steps):
                g = lib.grad(inner_loss)(p)
                p = {k: p[k] - 0.1 * g[k] for k in p}
            return inner_loss(p)

        def run(lib):
            return lib.grad(lambda p: lib.vmap(
                lambda x, y: meta_loss(lib, p, x, y))(xs, ys).mean())(params)

        def loop():
            p0 = {k: v.clone().requires_grad_() for k, v in params.items()}
            total = 0
            for t in range(tasks):
                p = dict(p0)
                for _ in range(steps):
                    l = F.mse_loss(torch.func.functional_call(model, p, (xs[t],)), ys[t])
                    g = torch.autograd.grad(l, list(p.values()), create_graph=True)
                    p = {k: v - 0.1 * gi for (k, v), gi in zip(p.items(), g)}
                total = total + F.mse_loss(torch.func.functional_call(model, p, (xs[t],)), ys[t])
            g = torch.autograd.grad(total / tasks, list(p0.values()))
            return dict(zip(p0, g))

        impls = {"loop": loop, "ftrans": lambda: run(ftrans), "torch.func": lambda: run(torch.func)}
        rows.append(run_row("MAML sine", f"{tasks} tasks, {steps} steps", impls, device,
                            reps=3 if quick else 15))
    return rows


def _compiled_row(workload, size, impls, fn, args, device, reps):
    """The same row with ftrans's entry replaced by ``ftrans.compile(fn)`` (trace time noted)."""
    compiled = ftrans.compile(fn)
    t0 = time.perf_counter()
    compiled(*args)
    trace_s = time.perf_counter() - t0
    row = run_row(f"{workload} [ftrans.compile]", size,
                  dict(impls, ftrans=lambda: compiled(*args)), device, reps=reps)
    row.note += f"first call (trace) {trace_s:.2f} s"
    return row


def rows(device, quick, only):
    out = []
    for fn in (per_sample_rows, jacobian_rows, nested_dot_rows, ensemble_rows,
               training_rows, maml_rows):
        out.extend(fn(device, quick, only))
    return out
