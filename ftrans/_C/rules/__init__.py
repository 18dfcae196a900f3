"""Batching rules, one file per op family.

Where is the rule for an op?  ``python -m ftrans --where mm`` prints the file and line of the
rule for any aten op (however it was registered: decorator, table of names, or a generic rule
by tag) and which handler runs it.  To add a rule, pick the family file (or start a new one and
import it below) and decorate a function with :func:`ftrans.register_batch_rule`; the registry
module's docstring gives the signature.

Families:

- ``pointwise``: every op tagged pointwise, by one generic rule (chosen by tag, see
  :func:`tag_rule`);
- ``views``: view and shape ops;  ``reduce``: reductions, scans, sort/topk;
- ``linalg``: the matmul family and ``torch.linalg``;  ``fft``: FFT kernels;
- ``conv``: convolution, pooling, upsampling, im2col, padding (forward and backward);
- ``nn``: normalization, softmax, embedding, attention;  ``loss``: loss kernels;
- ``index``: indexing and gathers;  ``scatter``: scatters and dim-indexed writes;
  ``join``: ``cat``, ``stack``, masked writes;
- ``factory``: copies, fills, ``new_*`` and ``*_like``;
- ``distance``: ``cdist``/``pdist``;  ``embedding_bag``;
- ``static_size``: static-size forms of data-dependent ops (``nonzero_static``, ``size=``);
- ``other``: ops of no family above (``rsub.Tensor``, ``lu_unpack``, grid sampling, ``renorm``,
  ``block_diag``...; the module's docstring lists them);
- ``random``: randomness rules, how random ops draw under vmap's ``randomness=`` (registered
  with ``register_random_rule``; the policy is ``_C/random.py``).
"""
from __future__ import annotations

from .pointwise import is_pointwise, pointwise_rule

# In this order (a later family's registration for the same op would win):
from . import views, reduce, linalg, conv, nn, index, scatter, join  # noqa: F401,E402
from . import factory, fft, loss, distance, embedding_bag, other  # noqa: F401,E402
from . import static_size, random  # noqa: F401,E402


def tag_rule(func, tags):
    """A generic rule chosen from the op's tags, or None."""
    if is_pointwise(func, tags):
        return pointwise_rule
    return None
