"""Tutorial 6: how ftrans works, and how to write a batching rule for your own op.

    python tutorials/06_how_ftrans_works.py

This is runnable prose.  By the end you will have written a batching rule for a ``torch.library``
custom op, and you will know enough of the machinery to write one for any op.

**The interpreter stack.**  Every active transform is a *level* on a stack: ``vmap`` pushes a
level when it is called and pops it when it returns.  Level ids come from one ever-increasing
counter, so an inner transform always has a higher id than any live outer one.

**Level-tagged tensors.**  Inside ``vmap``, each mapped input is a ``BatchedTensor``: a tensor
subclass whose *logical* shape is the shape of ONE example (what your function sees), holding the
*physical* tensor ``value`` (the whole batch), the batch dimension ``bdim`` of that physical
tensor, and the ``level`` it belongs to.  Nested vmaps nest the wrappers: the inner wrapper's
``value`` is itself a BatchedTensor of the outer level.

**Dispatch.**  Every aten op called on a BatchedTensor lands in one function.  It takes the
HIGHEST level among the arguments, replaces the tensors batched at that level by their physical
values (tensors of lower levels stay wrapped: when the rule calls a torch op on them, that call
dispatches again, one level down), and calls the op's *batching rule*.  The rule computes the
batched result with ordinary torch ops on the physical tensors and says where the batch dim of
the result is; dispatch wraps it back.  If an op has no rule, ftrans tries the op's own
decomposition into other aten ops, and as a last resort runs a (correct but slow) loop over the
examples, warning with ``ftrans.FallbackWarning``.  ``ftrans.op_status(op)`` tells you which.

**Autograd.**  ``grad`` is plain ``torch.autograd`` on the logical tensors: backward formulas are
aten ops too, so they are batched by the same rules.  That is why ``vmap(grad(f))`` gives
per-sample gradients with no extra machinery, and why rules for *backward* ops matter.
"""
from __future__ import annotations

import warnings

import torch

import ftrans
from ftrans._C import levels
from ftrans._C.batched import BatchedTensor
# Plumbing shared by the tutorials (command line, timing, plots): tutorials/_common.py.
from _common import cli


# ---------------------------------------------------------------------------------------------
# 1. Look inside a vmap.
# ---------------------------------------------------------------------------------------------

def look_inside() -> dict:
    seen = {}

    def f(x):
        # x is ONE example to the code here: shape [4].  Physically it is the whole batch.
        seen["type"] = type(x).__name__
        seen["logical_shape"] = tuple(x.shape)
        seen["physical_shape"] = tuple(x.value.shape)
        seen["bdim"] = x.bdim
        seen["stack"] = [lvl.kind for lvl in levels.current_stack()]
        return x.sin()

    ftrans.vmap(f, in_dims=1)(torch.randn(4, 3))      # map over dim 1: 3 examples of shape [4]
    print(f"inside vmap: {seen}")
    assert seen["logical_shape"] == (4,) and seen["physical_shape"] == (4, 3) and seen["bdim"] == 1

    # Nesting: the inner wrapper's value is a BatchedTensor of the outer level.
    def g(x):
        inner, outer = x, x.value
        seen["nested"] = (type(outer) is BatchedTensor, inner.level.id > outer.level.id,
                          tuple(inner.shape), tuple(outer.shape), tuple(outer.value.shape))
        return x * 2

    ftrans.vmap(ftrans.vmap(g))(torch.randn(2, 3, 5))
    print(f"nested: outer is batched={seen['nested'][0]}, inner level higher={seen['nested'][1]}, "
          f"logical shapes {seen['nested'][2]} / {seen['nested'][3]}, physical "
          f"{seen['nested'][4]}")
    assert seen["nested"] == (True, True, (5,), (3, 5), (2, 3, 5))
    # Once vmap returns, its level is popped.
    assert levels.current_stack() == []
    return seen


# ---------------------------------------------------------------------------------------------
# 2. What a rule receives.  A rule has the signature
#        rule(level, func, args, bdims, kwargs) -> (out, out_bdims)
#    ``args`` are the op's positional arguments with tensors batched at ``level`` replaced by
#    their physical values; ``bdims[i]`` is the batch dim of ``args[i]`` (None when the argument
#    is not batched at this level: a plain tensor, a lower-level BatchedTensor, or a non-tensor).
#    It returns the physical result and its batch dim (None if the result does not depend on the
#    batch).  Registering a rule for an op that already has one replaces it, so to *watch* the
#    calls without changing anything we wrap a custom op below instead of a built-in one.
# ---------------------------------------------------------------------------------------------

# 3. A custom op.  ``row_normalize(x, eps)`` scales each row (last dim) of x to unit norm.  Its
#    kernel is written for one tensor of any rank; vmap knows nothing about it.

LIB = "ftrans_tutorial"
OP_NAME = f"{LIB}::row_normalize"

if not hasattr(getattr(torch.ops, LIB), "row_normalize"):   # re-importing must not redefine it
    @torch.library.custom_op(OP_NAME, mutates_args=())
    def row_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
        return x / (x.norm(dim=-1, keepdim=True) + eps)

    @row_normalize.register_fake
    def _(x, eps):
        return torch.empty_like(x)

    # The backward is written with aten ops, so vmap(grad(...)) batches it with existing rules.
    def _setup(ctx, inputs, output):
        x, eps = inputs
        ctx.save_for_backward(x)
        ctx.eps = eps

    def _backward(ctx, g):
        (x,) = ctx.saved_tensors
        n = x.norm(dim=-1, keepdim=True)
        d = n + ctx.eps
        # d/dx [x / (|x| + eps)] applied to g
        gx = g / d - x * (g * x).sum(-1, keepdim=True) / (d * d * n.clamp_min(1e-30))
        return gx, None

    row_normalize.register_autograd(_backward, setup_context=_setup)

OP = torch.ops.ftrans_tutorial.row_normalize.default


def reference(x, eps=1e-6):
    return x / (x.norm(dim=-1, keepdim=True) + eps)


CALLS: list = []   # what the rule received, to print


def row_normalize_rule(level, func, args, bdims, kwargs):
    """The batching rule.  The op normalizes the LAST logical dim; any leading dims are fine.

    So: move the batch dim to the front (it is then a leading dim, never the last one, as long
    as the example has at least one dim), call the op once on the whole batch, and report that
    the result is batched at dim 0.
    """
    x, eps = args
    bdim = bdims[0]
    CALLS.append((level.id, tuple(x.shape), tuple(bdims)))
    if x.dim() - 1 == 0:
        raise RuntimeError("row_normalize: expected a tensor with at least one dimension")
    x = x.movedim(bdim, 0)
    return func(x, eps, **kwargs), 0


def custom_op_demo() -> dict:
    x = torch.randn(8, 5)
    vnorm = ftrans.vmap(lambda r: OP(r, 1e-6))

    # Before: no rule, no decomposition -> the per-example loop fallback (correct, but slow).
    before = ftrans.op_status(OP)
    ftrans.reset_fallback_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out_before = vnorm(x)
    n_fallback = sum(ftrans.fallback_stats().values())
    warned = any(issubclass(w.category, ftrans.FallbackWarning) for w in caught)
    print(f"before: op_status={before!r}, FallbackWarning={warned}, fallback calls={n_fallback}")

    # Register the rule, exactly like ftrans's built-in rules are registered.
    ftrans.register_batch_rule(OP)(row_normalize_rule)
    after = ftrans.op_status(OP)
    ftrans.reset_fallback_stats()
    out_after = vnorm(x)
    # Nested vmap and per-sample gradients through the op: the rule runs at each level, and the
    # backward (aten ops) is batched by the built-in rules.
    nested = ftrans.vmap(ftrans.vmap(lambda r: OP(r, 1e-6)))(torch.randn(2, 3, 5))
    per_sample = ftrans.vmap(ftrans.grad(lambda r: (OP(r, 1e-6) * torch.arange(5.)).sum()))(x)
    per_sample_ref = torch.stack([
        torch.autograd.grad((reference(r.requires_grad_()) * torch.arange(5.)).sum(), r)[0]
        for r in x.clone()])
    stats = ftrans.fallback_stats()
    for level_id, shape, bd in CALLS[:3]:
        print(f"  rule called at level {level_id}: physical x {shape}, bdims {bd}")
    print(f"after:  op_status={after!r}, fallback calls={sum(stats.values())}")
    err = max((out_before - reference(x)).abs().max().item(),
              (out_after - reference(x)).abs().max().item(),
              (per_sample - per_sample_ref).abs().max().item())
    print(f"results match the reference (incl. per-sample grads): max err {err:.1e}; "
          f"nested vmap shape {tuple(nested.shape)}")
    assert after == "rule" and not stats and err < 1e-5 and nested.shape == (2, 3, 5)
    return {"status_before": before, "status_after": after, "fallback_warned": warned,
            "custom_op_err": err}


def main(fast: bool = True, plot_dir: str | None = None) -> dict:
    out = {"inside": look_inside()}
    out.update(custom_op_demo())
    return out


if __name__ == "__main__":
    cli(main, __doc__, plots=False, fast_help="(same size either way)")
