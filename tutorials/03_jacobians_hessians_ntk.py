"""Tutorial 3: Jacobians, Hessians, and the empirical neural tangent kernel.

    python tutorials/03_jacobians_hessians_ntk.py            # full size
    python tutorials/03_jacobians_hessians_ntk.py --fast     # what the test runs

``torch.autograd.functional.jacobian`` computes a Jacobian one row at a time.  ftrans builds it
from two transforms instead: ``jacrev`` is ``vmap`` of a vector-Jacobian product over the rows of
an identity matrix (all rows in one batched backward pass), ``jacfwd`` is ``vmap`` of a
Jacobian-vector product over its columns (one batched forward pass).  Both return blocks of shape
``output.shape + input.shape``; ``hessian`` is the Jacobian of the gradient (torch.func takes
it as ``jacfwd(jacrev(f))``; ftrans as ``jacrev(jacrev(f))``, faster where forward mode is
built from reverse mode: the same matrix).

Which one to use is a matter of shape.  Reverse mode costs one pass per OUTPUT element, forward
mode one per INPUT element: for f: R^n -> R^m, prefer ``jacrev`` when m < n ("wide" Jacobians,
e.g. a loss against many parameters) and ``jacfwd`` when m > n ("tall" ones).

When the basis is large, the batched pass can need a lot of memory: ``chunk_size`` pushes at most
that many basis vectors at once, trading speed for memory, with identical results;
``chunk_size="auto"`` or ``memory_budget=`` let ftrans measure and choose the chunk.

Finally we compute the empirical NTK of a small network, Theta(x1, x2) = J(x1) J(x2)^T with J the
Jacobian of the network's output with respect to its parameters: ``vmap(jacrev(...))`` gives the
per-example Jacobians, an einsum contracts them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import ftrans
# Plumbing shared by the tutorials (command line, timing, plots): tutorials/_common.py.
from _common import cli, mean_time, pyplot_or_none, save_figure


def predict(weight, bias, x):
    return F.linear(x, weight, bias).tanh()


def jacobians(fast: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    d = 16 if fast else 64
    weight, bias, x = torch.randn(d, d, generator=gen), torch.randn(d, generator=gen), \
        torch.randn(d, generator=gen)

    # Jacobian of the output with respect to x (argnums=2).  Both modes give the same matrix,
    # and it matches torch.autograd.functional's row-by-row Jacobian.
    j_rev = ftrans.jacrev(predict, argnums=2)(weight, bias, x)
    j_fwd = ftrans.jacfwd(predict, argnums=2)(weight, bias, x)
    j_ref = torch.autograd.functional.jacobian(lambda x: predict(weight, bias, x), x)
    err_jac = max((j_rev - j_ref).abs().max().item(), (j_fwd - j_ref).abs().max().item())
    print(f"jacobian {tuple(j_rev.shape)}: max err vs autograd.functional {err_jac:.1e}")

    # Several argnums at once give a tuple of blocks, one per argument: [d, d, d] and [d, d].
    jw, jb = ftrans.jacrev(predict, argnums=(0, 1))(weight, bias, x)
    print(f"d/dweight {tuple(jw.shape)}, d/dbias {tuple(jb.shape)}")
    assert jw.shape == (d, d, d) and jb.shape == (d, d)

    # Forward vs reverse by shape: a wide map (many inputs, few outputs) and a tall one.
    n_big, n_small = (256, 8) if fast else (2048, 16)
    w_wide = torch.randn(n_small, n_big, generator=gen)
    w_tall = torch.randn(n_big, n_small, generator=gen)
    wide = lambda v: predict(w_wide, None, v)          # noqa: E731  R^big -> R^small
    tall = lambda v: predict(w_tall, None, v)          # noqa: E731  R^small -> R^big
    v_big, v_small = torch.randn(n_big, generator=gen), torch.randn(n_small, generator=gen)
    timings = {
        "wide jacrev": mean_time(lambda: ftrans.jacrev(wide)(v_big), reps=5),
        "wide jacfwd": mean_time(lambda: ftrans.jacfwd(wide)(v_big), reps=5),
        "tall jacrev": mean_time(lambda: ftrans.jacrev(tall)(v_small), reps=5),
        "tall jacfwd": mean_time(lambda: ftrans.jacfwd(tall)(v_small), reps=5),
    }
    print("  ".join(f"{k}: {v * 1e3:.2f} ms" for k, v in timings.items()))
    print("(reverse mode pays per output row, forward mode per input column; on tiny CPU problems "
          "the fixed per-op overhead can hide the difference)")

    # chunk_size: same Jacobian, at most 4 basis vectors in flight at a time.
    j_chunked = ftrans.jacrev(wide, chunk_size=4)(v_big)
    err_chunk = (j_chunked - ftrans.jacrev(wide)(v_big)).abs().max().item()
    j_chunked_f = ftrans.jacfwd(tall, chunk_size=4)(v_small)
    err_chunk = max(err_chunk, (j_chunked_f - ftrans.jacfwd(tall)(v_small)).abs().max().item())
    print(f"chunk_size=4 matches the unchunked Jacobian: max diff {err_chunk:.1e}")

    # Memory budgets.  The best chunk size is not knowable in advance (too small is slow, too
    # large can run out of memory and is often slower too), so let ftrans measure it:
    # chunk_size="auto" runs two tiny probe chunks, models the workspace as a + b * chunk and
    # picks the largest power of two that fits (32 MiB of workspace on CPU by default);
    # memory_budget= (bytes, or a fraction of the free device memory) sets the limit.  The
    # choice is cached per input shape, and a chunk that still runs out of memory is halved.
    j_auto = ftrans.jacrev(wide, chunk_size="auto")(v_big)
    j_budget = ftrans.jacfwd(tall, memory_budget=64 * 1024)(v_small)   # 64 KiB: many chunks
    h_budget = ftrans.hessian(lambda v: wide(v).sum(), memory_budget=0.25)(v_big)
    err_chunk = max(err_chunk, (j_auto - ftrans.jacrev(wide)(v_big)).abs().max().item(),
                    (j_budget - ftrans.jacfwd(tall)(v_small)).abs().max().item(),
                    (h_budget - ftrans.hessian(lambda v: wide(v).sum())(v_big)).abs().max().item())
    print(f"chunk_size='auto' and memory_budget= match too: max diff {err_chunk:.1e}")

    # Hessians.  hessian(f) = jacrev(jacrev(f)) here; jacfwd(jacrev(f)) is the same matrix.
    def energy(x):
        return (predict(weight, bias, x) ** 2).sum() + x.pow(4).sum() / 4

    h = ftrans.hessian(energy)(x)
    h_rr = ftrans.jacfwd(ftrans.jacrev(energy))(x)
    h_ref = torch.autograd.functional.hessian(energy, x)
    err_hess = max((h - h_ref).abs().max().item(), (h_rr - h_ref).abs().max().item())
    print(f"hessian {tuple(h.shape)}: max err vs autograd.functional {err_hess:.1e}, "
          f"symmetric to {(h - h.T).abs().max().item():.1e}")

    # Batched Hessians: vmap over a batch of points, one call.
    xs = torch.randn(5, d, generator=gen)
    hs = ftrans.vmap(ftrans.hessian(energy))(xs)
    err_vhess = max((hs[i] - torch.autograd.functional.hessian(energy, xs[i])).abs().max().item()
                    for i in range(5))
    print(f"vmap(hessian) {tuple(hs.shape)}: max err {err_vhess:.1e}")
    assert max(err_jac, err_chunk, err_hess, err_vhess) < 1e-4
    return {"err_jac": err_jac, "err_chunk": err_chunk, "err_hess": err_hess,
            "err_vhess": err_vhess, **{k.replace(" ", "_"): v for k, v in timings.items()}}


# ---------------------------------------------------------------------------------------------
# The empirical NTK.  fnet_single runs the network on ONE input; jacrev with respect to the
# parameter dict gives, for each parameter, a block [n_out, *param.shape]; vmap over the inputs
# adds the leading batch dim.  Theta[n, m, a, b] = sum_params <J[n, a, :], J[m, b, :]>.
# ---------------------------------------------------------------------------------------------

class SmallNet(nn.Module):
    def __init__(self, d_in=8, hidden=32, d_out=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                 nn.Tanh(), nn.Linear(hidden, d_out))

    def forward(self, x):
        return self.net(x)


def empirical_ntk(model, params, x1, x2, chunk_size=None):
    def fnet_single(p, x):
        return ftrans.functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac = ftrans.vmap(ftrans.jacrev(fnet_single, chunk_size=chunk_size), in_dims=(None, 0))
    j1, j2 = jac(params, x1), jac(params, x2)
    return sum(torch.einsum("Naf,Mbf->NMab", j1[k].flatten(2), j2[k].flatten(2)) for k in j1)


def ntk_by_loop(model, x1, x2):
    """Reference: per-example flattened parameter Jacobians from plain autograd."""
    def flat_jac(x):
        out = model(x.unsqueeze(0)).squeeze(0)
        rows = []
        for a in range(out.shape[0]):
            g = torch.autograd.grad(out[a], list(model.parameters()), retain_graph=True)
            rows.append(torch.cat([t.flatten() for t in g]))
        return torch.stack(rows)                                      # [n_out, n_params]
    j1 = torch.stack([flat_jac(x) for x in x1])
    j2 = torch.stack([flat_jac(x) for x in x2])
    return torch.einsum("Naf,Mbf->NMab", j1, j2)


def ntk(fast: bool, plot_dir: str | None) -> dict:
    torch.manual_seed(0)
    model = SmallNet()
    params = {k: v.detach() for k, v in model.named_parameters()}
    n = 8 if fast else 64
    # Inputs along a circle in a 2-D subspace, so the kernel has visible structure.
    angle = torch.linspace(0, 2 * torch.pi, n)
    x = torch.zeros(n, 8)
    x[:, 0], x[:, 1] = angle.cos(), angle.sin()

    theta = empirical_ntk(model, params, x, x)                         # [n, n, 3, 3]
    theta_chunked = empirical_ntk(model, params, x, x, chunk_size=1)
    theta_ref = ntk_by_loop(model, x, x)
    err_ntk = (theta - theta_ref).abs().max().item()
    err_ntk_chunk = (theta_chunked - theta).abs().max().item()
    # The kernel summed over output pairs (trace) must be symmetric positive semi-definite.
    k = theta.diagonal(dim1=2, dim2=3).sum(-1)                        # [n, n]
    min_eig = torch.linalg.eigvalsh(k).min().item()
    print(f"NTK {tuple(theta.shape)}: max err vs loop {err_ntk:.1e}, chunked {err_ntk_chunk:.1e}, "
          f"min eigenvalue of trace kernel {min_eig:.2e}")
    assert err_ntk < 1e-4 and err_ntk_chunk < 1e-5 and min_eig > -1e-3

    if plot_dir is not None:
        _plot(plot_dir, k)
    return {"err_ntk": err_ntk, "err_ntk_chunk": err_ntk_chunk, "ntk_min_eig": min_eig}


def main(fast: bool = True, plot_dir: str | None = None) -> dict:
    out = jacobians(fast)
    out.update(ntk(fast, plot_dir))
    return out


def _plot(plot_dir, k):
    plt = pyplot_or_none()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(k.numpy())
    ax.set_title("empirical NTK (trace over outputs)")
    fig.colorbar(im)
    save_figure(fig, plot_dir, "03_ntk.png")


if __name__ == "__main__":
    cli(main, __doc__)
