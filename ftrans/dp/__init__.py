"""Per-example gradient norms, clipped sums and DP-SGD at the cost of one backward.

``per_sample_grad_norms`` / ``clipped_grad`` / ``per_sample_grad_dots`` /
``per_sample_grad_cross`` are transforms of a one-example loss (``transforms.py``); the
per-op norm rules that make them cheap live in ``norm_rules.py`` (register your own with
``register_norm_rule``), the factored per-example gradients in ``factors.py``, the capture
engine in ``capture.py``.
"""
from .norm_rules import (get_norm_rule, norm_rule_stats, register_norm_rule,
                         reset_norm_rule_stats)
from .factors import Dense, Outer, Scatter
from .dpsgd import DPSGD, bucket_size, make_accountant, pad_batch, poisson_batches
from .transforms import (clipped_grad, per_sample_grad_cross, per_sample_grad_dots,
                         per_sample_grad_norms)

__all__ = ["per_sample_grad_norms", "clipped_grad", "per_sample_grad_dots",
           "per_sample_grad_cross", "register_norm_rule", "get_norm_rule", "norm_rule_stats",
           "reset_norm_rule_stats", "Dense", "Outer", "Scatter", "DPSGD", "poisson_batches",
           "bucket_size", "pad_batch", "make_accountant"]
