"""The interpreter stack.

Every active transform (a ``vmap`` or a ``grad``-family call) is a :class:`Level` pushed on a
stack for the duration of the call.  Level ids come from one global, ever-increasing counter, so
an inner transform always has a higher id than any live outer one, and an id is never reused:
a tensor tagged with a level can always tell which transform made it, even after that transform
has returned (``alive`` is then False: see NOTE [exited levels]).

NOTE [exited levels]: tensors a vmapped function closes over (captured parameters) get
per-example gradients, because autograd only sees logical shapes.  A gradient that leaves
``torch.autograd.grad`` still carrying the batch dim of a vmap that has returned must be summed
over that level (``autograd.sum_exited_levels``; per use, ``autograd.py`` says why).  Whether a
level still applies is decided by ``alive``, never by comparing ids with the grad level: a vjp
function may legitimately be called later under a *newer* vmap, whose per-example results are
wanted as they are.  The same flag lets dispatch refuse a value that escaped its vmap
(``errors.escaped``).

NOTE [threads]: the stack itself is thread-local (two threads running transforms never see each
other's levels), but nothing in dispatch reads it: a batched tensor carries its :class:`Level`
object, so the backward passes that autograd runs on its own device threads (every CUDA
backward) dispatch from the tensors' tags alone.
"""
from __future__ import annotations

import itertools
import threading

__all__ = ["Level", "push", "pop", "current_stack", "VMAP", "GRAD", "JVP"]

VMAP = "vmap"
GRAD = "grad"
JVP = "jvp"

_ids = itertools.count(1)
_tls = threading.local()


class Level:
    """One transform on the stack.  ``id`` orders levels; ``alive`` is False once it exited."""

    __slots__ = ("id", "kind", "batch_size", "randomness", "alive", "origin", "__weakref__")

    def __init__(self, kind: str, batch_size: int = 0, randomness: str = "error"):
        self.id = next(_ids)
        self.kind = kind
        self.batch_size = batch_size
        self.randomness = randomness
        self.alive = True
        self.origin = None  # str or callable giving the user's call form, for error messages

    def __repr__(self) -> str:
        extra = f", batch_size={self.batch_size}" if self.kind == VMAP else ""
        state = "" if self.alive else ", exited"
        return f"Level({self.kind}, id={self.id}{extra}{state})"


def current_stack() -> list:
    """This thread's stack of live levels, outermost first."""
    stack = getattr(_tls, "stack", None)
    if stack is None:
        stack = _tls.stack = []
    return stack


def push(level: Level) -> Level:
    current_stack().append(level)
    if level.kind != VMAP:
        AUTODIFF_DEPTH[0] += 1
    return level


# How many grad/jvp-family levels are live, in all threads: a hint for the torch-function fast
# path, which stands back while one is (nearly every op inside records autograd, and the fast
# path's own requires-grad check would only cost time).  A hint only: the fast path checks
# requires_grad itself, so a count that a thread race left off changes speed, never results.
AUTODIFF_DEPTH = [0]

# Non-zero while ftrans sums exited levels out of a gradient (autograd.sum_exited_levels): a
# gradient may carry several (the chunks of one inner jacrev), and while one is summed the
# others are still inside it, which dispatch would otherwise refuse as an escaped value.
SUMMING_EXITED = [0]


def pop(level: Level) -> None:
    """Pop ``level`` (and, defensively, anything an exception left above it) and mark it exited."""
    stack = current_stack()
    while stack:
        top = stack.pop()
        top.alive = False
        if top.kind != VMAP:
            AUTODIFF_DEPTH[0] = max(0, AUTODIFF_DEPTH[0] - 1)
        if top is level:
            return
    level.alive = False
