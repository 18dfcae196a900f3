"""ftrans: JAX-style functional transforms for PyTorch.

Write a function for one example, then lift it: ``vmap`` maps it over a batch dimension,
``grad`` differentiates it, and the transforms nest in any order.
"""
from ._C import (FallbackWarning, VmapError, fallback_stats, op_status, register_batch_rule,
                 reset_fallback_stats)
from .vmap import vmap
from .compiler import CompileCheckError, CompileWarning, compile
from .control_flow import cond, scan, switch, while_loop
from .static_shape import argwhere, bincount, masked_select, nonzero, unique
from .autodiff import grad, grad_and_value, jacrev, vjp
from .forward import hessian, jacfwd, jvp, linearize
from .nn import functional_call, stack_module_state

from . import dp
from .dp import (clipped_grad, norm_rule_stats, per_sample_grad_cross, per_sample_grad_dots,
                 per_sample_grad_norms, register_norm_rule, reset_norm_rule_stats)

__version__ = "0.1.0"

__all__ = ["vmap", "compile", "CompileWarning", "CompileCheckError", "FallbackWarning", "VmapError", "fallback_stats", "reset_fallback_stats",
           "op_status", "register_batch_rule", "grad", "grad_and_value", "vjp", "jacrev", "jvp",
           "jacfwd", "hessian", "linearize", "functional_call", "stack_module_state",
           "per_sample_grad_norms", "clipped_grad", "per_sample_grad_dots", "per_sample_grad_cross",
           "register_norm_rule", "norm_rule_stats", "reset_norm_rule_stats", "dp",
           "cond", "switch", "while_loop", "scan", "nonzero", "argwhere", "unique",
           "masked_select", "bincount"]
