"""Torch-function-level rules: composite torch functions batched as ONE physical call.

``torch.matmul`` is a CompositeImplicitAutograd function: it never reaches ``__torch_dispatch__``
as itself but as the ops its C++ decomposition makes on the *logical* shapes, one dispatch each.
``v @ w`` for a per-example vector ``v`` is ``unsqueeze`` + ``mm`` + ``squeeze_`` (three
dispatches, the last an in-place view op that re-syncs the wrapper); ranks above two add
``expand``/``reshape``/``bmm``.  Under vmap the physical tensors already carry the batch as one
more leading dim, and ``torch.matmul`` itself broadcasts leading dims, so the whole call is one
``torch.matmul`` on the physical values once the ranks are aligned: :func:`matmul`.

A rule here runs from ``torch_function.batched_torch_function`` under the fast path's conditions
(``fastpath.py``): nothing autograd would record (no argument requires grad, or grad mode is
off; no autodiff transform open), no forward-AD level, no autocast, no dispatch mode but vmap's
own, no keyword arguments.  Anything else returns :data:`MISS` and takes the normal path (the
decomposition, which autograd records op by op), and so does a physical call that raises: the
normal path then raises and explains eager's per-example error.

Only the highest level among the arguments is unwrapped; values batched at lower levels (nested
vmaps) are passed on as they are, so the physical ``torch.matmul`` on them comes back here one
level down.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _fwad

from .batched import BatchedTensor, make_batched
from .dispatch import only_vmap_mode

__all__ = ["RULES", "FOR_OP", "MISS", "matmul"]

MISS = object()

_Tensor = torch.Tensor
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_DisableTF = torch._C.DisableTorchFunctionSubclass
_NoPythonDispatch = torch._C._DisableTorchDispatch
_grad_enabled = torch.is_grad_enabled
_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_strided = torch.strided


def _operand(a, grad) -> bool:
    """Whether the rule takes operand ``a``: a plain strided real tensor, or wrappers of live
    levels around one, none of which autograd would record.  Runs with subclass torch
    functions off (``a`` may be a wrapper)."""
    t = type(a)
    if t is BatchedTensor:
        while type(a) is BatchedTensor:  # every level: none may be recorded by autograd
            if not a.level.alive or (grad and a.requires_grad):
                return False
            a = a.value
        if type(a) is not _Tensor:
            return False
    elif t not in _PLAIN:
        return False
    return not ((grad and a.requires_grad) or a.layout is not _strided or a.is_complex()
                or a.is_neg())


def _lift(x, k):
    """``x`` (batch at dim 0) with ``k`` size-1 dims inserted after the batch dim."""
    for _ in range(k):
        x = x.unsqueeze(1)
    return x


def _physical(a, ba, ra, b, bb, rb):
    """The physical ``torch.matmul`` of logical ``a @ b`` (ranks ``ra``, ``rb`` >= 1); batched
    operands have the batch at dim 0 (``ba``/``bb``).  Returns (out, batch dim of out).

    ``torch.matmul`` broadcasts the leading (batch) dims of its operands right-aligned, so the
    vmap batch dim must never line up with a logical batch dim of the other operand: the batched
    operand gets size-1 dims after its batch dim up to the other's rank.  A logical vector keeps
    torch's vector semantics by a size-1 matrix dim removed again afterwards."""
    if ba and bb:
        if ra == 1 and rb == 1:  # dot: [B, 1, n] @ [B, n, 1]
            out = torch.matmul(a.unsqueeze(1), b.unsqueeze(2))
            return out.squeeze(2).squeeze(1), 0
        if ra == 1:  # [B, 1.., 1, n] @ [B, *bb, n, m] -> [B, *bb, 1, m]
            return torch.matmul(_lift(a, rb - 1), b).squeeze(-2), 0
        if rb == 1:  # [B, *ab, k, n] @ [B, 1.., n, 1] -> [B, *ab, k, 1]
            return torch.matmul(a, _lift(b.unsqueeze(-1), ra - 2)).squeeze(-1), 0
        return torch.matmul(_lift(a, rb - ra), _lift(b, ra - rb)), 0
    if ba:
        if rb <= 2:  # matrix or vector on the right: [B, ..., n] @ b, its own broadcasting
            return torch.matmul(a, b), 0
        if ra == 1:  # [B, 1.., 1, n] @ [*bb, n, m] -> [B, *bb, 1, m]
            return torch.matmul(_lift(a, rb - 1), b).squeeze(-2), 0
        return torch.matmul(_lift(a, rb - ra), b), 0
    # only the right operand is batched
    if rb == 1:
        if ra == 1:  # dot: [B, n] @ [n]
            return torch.matmul(b, a), 0
        out = torch.matmul(a, b.t())  # [*ab, k, n] @ [n, B] -> [*ab, k, B]
        return out, out.dim() - 1
    if ra == 1:  # torch's own vector rule: [n] @ [B, *bb, n, m] -> [B, *bb, m]
        return torch.matmul(a, b), 0
    return torch.matmul(a, _lift(b, ra - rb)), 0


def matmul(args):
    """``torch.matmul(a, b)`` (also ``a.matmul(b)``, ``a @ b``) as one physical ``matmul``, or
    :data:`MISS`."""
    if len(args) != 2:
        return MISS
    if _autocast() or _fwad._current_level >= 0:
        return MISS
    if not only_vmap_mode():
        return MISS  # another dispatch mode must see the ops
    a, b = args
    grad = _grad_enabled()
    with _DisableTF():
        if not (_operand(a, grad) and _operand(b, grad)):
            return MISS
        ra, rb = a.dim(), b.dim()
        if ra < 1 or rb < 1:
            return MISS  # torch's error ("need to be at least 1D")
        la = a.level if type(a) is BatchedTensor else None
        lb = b.level if type(b) is BatchedTensor else None
        level = la if lb is None or (la is not None and la.id >= lb.id) else lb
        ba, bb = la is level, lb is level
        if ba:
            a = a.value if a.bdim == 0 else a.value.movedim(a.bdim, 0)
        if bb:
            b = b.value if b.bdim == 0 else b.value.movedim(b.bdim, 0)
        nested = type(a) is BatchedTensor or type(b) is BatchedTensor
    try:
        if nested:  # lower levels' wrappers: their torch functions batch them in turn
            out, bdim = _physical(a, ba, ra, b, bb, rb)
        else:
            with _NoPythonDispatch():
                out, bdim = _physical(a, ba, ra, b, bb, rb)
    except Exception:  # eager's per-example error comes from the normal path
        return MISS
    return make_batched(out, bdim, level)


RULES = {
    torch.matmul: matmul,
    torch.Tensor.matmul: matmul,
    torch.Tensor.__matmul__: matmul,
}

# The aten composite each rule stands in for (``python -m ftrans --where matmul`` names it).
FOR_OP = {torch.ops.aten.matmul.default: matmul}
