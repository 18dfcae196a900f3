"""ftrans: JAX-style functional transforms for PyTorch.

Write a function for one example, then lift it: ``vmap`` maps it over a batch dimension,
``grad`` differentiates it, and the transforms nest in any order.
"""
from ._C import (FallbackWarning, VmapError, fallback_stats, op_status, register_batch_rule,
                 reset_fallback_stats)
from .vmap import vmap

__version__ = "0.1.0"

__all__ = ["vmap", "FallbackWarning", "VmapError", "fallback_stats", "reset_fallback_stats",
           "op_status", "register_batch_rule"]
