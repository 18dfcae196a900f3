"""The ftrans core: levels, the level-tagged BatchedTensor, dispatch, rules.  Python, with one
optional C file (``_fastc.c``: the torch-function fast path's simplest hit, built at install
where a compiler is present; everything works without it).  The name follows torch's
``torch._C``, where the core lives.

The layers, bottom to top.  A module imports only from its own row or the rows below it
(``tests/test_layering.py`` checks it, module-level and function-level imports alike)::

    public      ftrans/__init__.py, ftrans/__main__.py
    transforms  vmap.py  autodiff.py  forward.py  nn.py  control_flow.py  compiler.py  dp/ ...
                _autodiff_common.py (what reverse and forward mode share)  _vmap_args.py
                _split.py  _chunking.py  _joint.py  _outpool.py ...
    ------------------------------------ ftrans/_C ------------------------------------------
    wiring      _C/__init__.py     attaches BatchedTensor's two entry points (below), loads rules
    TF entry    torch_function.py  overrides -> tfrules / fast path -> per-use lift -> autograd
    routing     fastpath.py        learned signatures: calls an op's handler directly
                tfrules.py         composite functions (matmul) batched whole, one physical call
                dispatch.py        per-op cache, handler choice, dispatch(), the vmap mode
    handlers    rules/*  (batching rules; rules/random.py: randomness rules)
                random.py (randomness policy)  fallback.py (loop)  custom_vmap.py
    plumbing    ops.py (schema facts, unwrap/wrap)  registry.py  shapecheck.py  fresh.py
                autograd.py (boundary Functions, sums, lift helpers)  aliasing.py
                indexing.py  rnn.py  tensor_guards.py  dropout.py  (torch-level overrides)
                agree.py  function.py  guards.py  lanes.py
    ground      levels.py  errors.py  batched.py   (and ftrans/_pytree.py)

How torch reaches ftrans: a torch call with a BatchedTensor argument runs
``BatchedTensor.__torch_function__`` (above autograd), then autograd, then
``BatchedTensor.__torch_dispatch__`` (below autograd); inside a vmap the vmap mode's
``__torch_dispatch__`` sees every op first.  Both dispatch hooks are set only by
``dispatch.set_dispatch_entries`` (the fast path swaps in recording entries through it while it
learns a signature).
"""
from .batched import BatchedTensor
from .dispatch import FallbackWarning, VmapError, fallback_stats, op_status, reset_fallback_stats
from .dispatch import NORMAL_ENTRIES as _NORMAL_ENTRIES, set_dispatch_entries as _set_entries
from .registry import register_batch_rule
from .torch_function import TORCH_FUNCTION as _TORCH_FUNCTION
from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from . import function as _function
from . import guards as _guards

# BatchedTensor's entry points: classmethods of the functions themselves (no extra frame per op).
BatchedTensor.__torch_function__ = classmethod(_TORCH_FUNCTION)
_set_entries(_NORMAL_ENTRIES)  # BatchedTensor.__torch_dispatch__ and VmapMode.__torch_dispatch__

_function.install()  # autograd.Function's vmap staticmethod / generate_vmap_rule under vmap
_guards.install()  # requires_grad_/retain_grad refused inside transforms, as torch.func does

__all__ = ["BatchedTensor", "FallbackWarning", "VmapError", "fallback_stats", "op_status",
           "reset_fallback_stats", "register_batch_rule"]
