"""Calling ``nn.Module``s as pure functions of their parameters: the bridge to the transforms.

``grad`` and ``vmap`` differentiate and map over function *arguments*, while a module keeps its
parameters as attributes.  ``functional_call`` swaps given tensors in for the module's
parameters and buffers for the duration of one call (restoring them in ``finally``, even when
the call raises), so ``grad(lambda p: loss(functional_call(model, p, x)))`` works, and per-
example or per-model parameters (BatchedTensors inside ``vmap``) flow through the module's
ordinary forward.  The swapping itself is torch's own ``_reparametrize_module`` (the machinery
behind ``torch.func.functional_call``; not torch.func itself), so tied weights and ``strict``
behave exactly as in torch.func.

``stack_module_state`` turns ``M`` same-shaped models into one dict of ``[M, ...]`` tensors for
model ensembling with ``vmap(functional_call)``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

__all__ = ["functional_call", "stack_module_state"]


def _merge_dicts(parameter_and_buffer_dicts) -> dict:
    if isinstance(parameter_and_buffer_dicts, dict):
        return parameter_and_buffer_dicts
    if isinstance(parameter_and_buffer_dicts, Sequence) and not isinstance(
            parameter_and_buffer_dicts, (str, bytes)):
        if not all(isinstance(d, dict) for d in parameter_and_buffer_dicts):
            raise ValueError(
                "functional_call: Expected all elements of parameter_and_buffer_dicts to be "
                "dictionaries"
            )
        seen: dict = {}
        for d in parameter_and_buffer_dicts:
            for k in d:
                seen[k] = seen.get(k, 0) + 1
        repeated = [k for k, n in seen.items() if n > 1]
        if repeated:
            raise ValueError(
                f"functional_call: {repeated} appeared in multiple dictionaries; behavior of "
                "functional call is ambiguous"
            )
        return {k: v for d in parameter_and_buffer_dicts for k, v in d.items()}
    raise ValueError(
        "functional_call: Expected parameter_and_buffer_dicts to be a dict, or a list/tuple of "
        f"dicts, but got {type(parameter_and_buffer_dicts)}"
    )


def functional_call(module: nn.Module, parameter_and_buffer_dicts, args: Any = None,
                    kwargs: dict | None = None, *, tie_weights: bool = True,
                    strict: bool = False):
    """Call ``module`` with its parameters and buffers replaced by the given tensors.

    ``parameter_and_buffer_dicts`` is a dict ``{name: tensor}`` (state-dict names) or a tuple
    of dicts with distinct keys.  ``args`` is a single argument or a tuple of them.  Names not
    given keep the module's own tensors (unless ``strict=True``, which requires an exact
    match).  With ``tie_weights=True`` tied parameters stay tied.  The module is restored
    afterwards, even if the call raises.

    Example:
        >>> import torch, ftrans
        >>> lin = torch.nn.Linear(2, 1)
        >>> params = {'weight': torch.ones(1, 2), 'bias': torch.zeros(1)}
        >>> ftrans.functional_call(lin, params, (torch.tensor([1., 2.]),))
        tensor([3.])
    """
    parameters_and_buffers = _merge_dicts(parameter_and_buffer_dicts)
    if isinstance(module, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise RuntimeError("functional_call: The stateless API can't be used with Jitted modules")
    if isinstance(module, nn.DataParallel):
        raise RuntimeError(
            "functional_call: The stateless API can't be used with nn.DataParallel module"
        )
    if kwargs is None:
        kwargs = {}
    if args is None:
        args = ()
    elif not isinstance(args, tuple):
        args = (args,)
    with _reparametrize_module(module, parameters_and_buffers, tie_weights=tie_weights,
                               strict=strict):
        return module(*args, **kwargs)


def _stack_leaf(tensors, name: str):
    all_rg = all(t.requires_grad for t in tensors)
    if not all_rg and any(t.requires_grad for t in tensors):
        raise RuntimeError(
            f"stack_module_state: Expected {name} from each model to have the same .requires_grad"
        )
    out = torch.stack([t.detach() for t in tensors])
    # New leaves, unrelated to the original parameters, so an optimizer can own them.
    return out.requires_grad_() if all_rg else out


def stack_module_state(models) -> tuple[dict, dict]:
    """Stack the parameters and buffers of ``M`` same-class models: ``(params, buffers)``.

    Each entry has a leading dimension of size ``M``.  Stacked parameters are new leaves that
    require grad when the originals do.  Use with ``vmap(functional_call)`` to run an ensemble.

    Example:
        >>> import torch, ftrans
        >>> models = [torch.nn.Linear(3, 2) for _ in range(4)]
        >>> params, buffers = ftrans.stack_module_state(models)
        >>> params['weight'].shape
        torch.Size([4, 2, 3])
        >>> def run(p, b, x):
        ...     return ftrans.functional_call(models[0], (p, b), (x,))
        >>> ftrans.vmap(run, in_dims=(0, 0, None))(params, buffers, torch.randn(5, 3)).shape
        torch.Size([4, 5, 2])
    """
    models = list(models)
    if len(models) == 0:
        raise RuntimeError("stack_module_state: Expected at least one model, got 0.")
    if not (all(m.training for m in models) or not any(m.training for m in models)):
        raise RuntimeError(
            "stack_module_state: Expected all models to have the same training/eval mode."
        )
    t0 = type(models[0])
    if not all(type(m) is t0 for m in models):
        raise RuntimeError("stack_module_state: Expected all models to be of the same class.")
    all_params = [dict(m.named_parameters()) for m in models]
    params = {k: _stack_leaf([p[k] for p in all_params], k) for k in all_params[0]}
    all_buffers = [dict(m.named_buffers()) for m in models]
    buffers = {k: _stack_leaf([b[k] for b in all_buffers], k) for k in all_buffers[0]}
    return params, buffers
