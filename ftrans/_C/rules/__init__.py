"""Batching rules, one file per op family.

Where is the rule for ``aten.mm``?  ``grep -rn "aten.mm" ftrans/_C/rules``: matmul-family rules
live in ``linalg.py``.  To add a rule, pick the family file (or start a new one and import it
below) and decorate a function with :func:`ftrans.register_batch_rule`; the registry module's
docstring gives the signature.

Families: ``pointwise`` (every op tagged pointwise, generically), ``views`` (view and shape
ops), ``reduce`` (reductions, scans, sort/topk), ``linalg`` (matmul family, linalg, fft),
``conv`` (convolution and pooling, forward and backward), ``nn`` (normalization, softmax, losses,
embedding), ``index`` (indexing, gather/scatter, masked ops, cat/stack), ``factory`` (new_* and
*_like), ``random`` (random ops), ``misc``.
"""
from __future__ import annotations

import importlib

from .pointwise import is_pointwise, pointwise_rule

_FAMILIES = ("views", "reduce", "linalg", "conv", "nn", "index", "scatter", "join", "factory",
             "misc", "fft", "loss", "distance", "embedding_bag", "stragglers", "static_size")
for _name in _FAMILIES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:  # a family not written yet
        if e.name != f"{__name__}.{_name}":
            raise


def tag_rule(func, tags):
    """A generic rule chosen from the op's tags, or None."""
    if is_pointwise(func, tags):
        return pointwise_rule
    return None
