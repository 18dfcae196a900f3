"""The ftrans core: levels, the level-tagged BatchedTensor, dispatch, rules."""
from .batched import BatchedTensor
from .dispatch import FallbackWarning, VmapError, fallback_stats, op_status, reset_fallback_stats
from .guards import install as _install_guards
from .registry import register_batch_rule
from . import rules as _rules  # noqa: F401  (registers the built-in rules)

__all__ = ["BatchedTensor", "FallbackWarning", "VmapError", "fallback_stats", "op_status",
           "reset_fallback_stats", "register_batch_rule"]

_install_guards()  # requires_grad_ / retain_grad inside transforms: see guards.py
