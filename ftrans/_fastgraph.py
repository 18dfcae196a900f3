"""A replay's graph as one plain Python function calling torch's operator bindings directly.

``torch.fx`` writes an aten op as ``torch.ops.aten.mm.default(a, b)``: four attribute lookups
and the Python frame of ``OpOverload.__call__``, which only calls the op's C++ binding ``_op``.
A replay of a per-sample-gradient step or a Jacobian is 50-150 such calls, most of them views
whose kernel costs less than that frame.  :func:`fast_graph` generates the same code with each
overload bound once to its binding, and calls it without ``GraphModule.__call__``'s module
machinery (hooks, the wrapped-call shim).  The graph module stays the runner's ``graph`` source
of truth; only how it is called changes.

Used where torch's ``OpOverload.__call__`` is exactly ``return self._op(*args, **kwargs)``
(checked once); otherwise the graph module is called as it is.
"""
from __future__ import annotations

import functools
import inspect
import re

import torch
import torch.fx

__all__ = ["fast_graph", "FastGraph"]

_OVERLOAD = re.compile(r"\btorch\.ops\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\.([A-Za-z_]\w*)\(")


def _call_is_plain() -> bool:
    try:
        src = inspect.getsource(torch._ops.OpOverload.__call__)
    except (OSError, TypeError):
        return False
    body = [ln.strip() for ln in src.splitlines()[1:] if ln.strip()
            and not ln.strip().startswith("#")]
    return body == ["return self._op(*args, **kwargs)"]


ENABLED = _call_is_plain()


class FastGraph:
    """Calls ``gm``'s graph as generated Python with direct operator bindings.  ``graph`` and
    ``gm`` stay readable (tests and passes inspect the nodes)."""

    __slots__ = ("gm", "_fn", "__weakref__")

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self._fn = _compile(gm)

    @property
    def graph(self):
        return self.gm.graph

    def __call__(self, *args):
        return self._fn(*args)


def fast_graph(gm):
    """A :class:`FastGraph` for ``gm``, or ``gm`` itself where that is not possible."""
    if not ENABLED or not isinstance(gm, torch.fx.GraphModule):
        return gm
    try:
        return FastGraph(gm)
    except Exception:  # any codegen surprise: the module runs as it is
        return gm


def _compile(gm):
    code = gm.graph.python_code(root_module="self")
    glb = dict(code.globals)
    bound: dict = {}

    def bind(m):
        ns, op, overload = m.groups()
        key = f"{ns}.{op}.{overload}"
        name = bound.get(key)
        if name is None:
            target = getattr(getattr(getattr(torch.ops, ns), op), overload)
            if not isinstance(target, torch._ops.OpOverload):
                return m.group(0)
            name = f"_ftrans_op{len(bound)}"
            glb[name] = target._op
            bound[key] = name
        return name + "("

    src = _OVERLOAD.sub(bind, code.src)
    exec(compile(src, f"<ftrans replay {id(gm):x}>", "exec"), glb)
    return functools.partial(glb["forward"], gm)
