"""Pytree helpers shared by every transform: optree, with ``None`` as a leaf.

ftrans flattens with optree in its own namespace ``"ftrans"``.  Container types that users
registered with ``torch.utils._pytree.register_pytree_node`` (what torch.func honours) are
mirrored into that namespace the first time they could matter, so both registries work:
``optree.register_pytree_node(cls, flatten, unflatten, namespace="ftrans")`` or torch's.
Only per-call code uses these (never the per-op hot path).
"""
from __future__ import annotations

import collections
import functools

import optree

__all__ = ["tree_flatten", "tree_unflatten", "tree_leaves", "tree_structure",
           "tree_broadcast_prefix", "tree_map", "NAMESPACE"]

NAMESPACE = "ftrans"
_NATIVE = (tuple, list, dict, collections.OrderedDict, collections.defaultdict, collections.deque)
_synced = 0
_torch_pytree = None  # torch.utils._pytree, imported on first use (not at every call)


def _sync_torch_registry() -> None:
    """Mirror torch.utils._pytree registrations into optree's ``ftrans`` namespace."""
    global _synced, _torch_pytree
    if _torch_pytree is None:
        try:
            from torch.utils import _pytree
        except ImportError:  # pragma: no cover
            return
        _torch_pytree = _pytree
    nodes = _torch_pytree.SUPPORTED_NODES
    if len(nodes) == _synced:
        return
    for cls, node in list(nodes.items()):
        if cls in _NATIVE or optree.is_structseq_class(cls) or optree.is_namedtuple_class(cls):
            continue
        try:
            optree.register_pytree_node(
                cls,
                node.flatten_fn,
                functools.partial(_unflatten, node.unflatten_fn),
                namespace=NAMESPACE,
            )
        except (ValueError, TypeError):  # optree knows it already (built-in containers)
            pass
    _synced = len(nodes)


def _unflatten(fn, context, children):
    return fn(list(children), context)


def tree_flatten(tree):
    _sync_torch_registry()
    return optree.tree_flatten(tree, none_is_leaf=True, namespace=NAMESPACE)


def tree_unflatten(spec, leaves):
    return optree.tree_unflatten(spec, leaves)


def tree_leaves(tree):
    _sync_torch_registry()
    return optree.tree_leaves(tree, none_is_leaf=True, namespace=NAMESPACE)


def tree_structure(tree):
    _sync_torch_registry()
    return optree.tree_structure(tree, none_is_leaf=True, namespace=NAMESPACE)


def tree_broadcast_prefix(prefix, full):
    _sync_torch_registry()
    return optree.tree_broadcast_prefix(prefix, full, none_is_leaf=True, namespace=NAMESPACE)


def tree_map(fn, tree, *rest):
    _sync_torch_registry()
    return optree.tree_map(fn, tree, *rest, none_is_leaf=True, namespace=NAMESPACE)
