"""The ftrans core: levels, the level-tagged BatchedTensor, dispatch, rules."""
from .batched import BatchedTensor
from .dispatch import FallbackWarning, VmapError, fallback_stats, op_status, reset_fallback_stats
from .registry import register_batch_rule
from . import rules as _rules  # noqa: F401  (registers the built-in rules)
from . import function as _function
from . import guards as _guards

_function.install()  # autograd.Function's vmap staticmethod / generate_vmap_rule under vmap
_guards.install()  # requires_grad_/retain_grad refused inside transforms, as torch.func does

__all__ = ["BatchedTensor", "FallbackWarning", "VmapError", "fallback_stats", "op_status",
           "reset_fallback_stats", "register_batch_rule"]
