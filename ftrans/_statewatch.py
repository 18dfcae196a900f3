"""Copy-on-write backups and value reads while ``ftrans.compile`` traces (or checks) a call.

Tracing runs with fake inputs, but torch runs ops whose inputs are all real tensors for real:
a BatchNorm's ``num_batches_tracked.add_(1)`` would advance the user's counter at trace time
and again at every replay.  :class:`StateWatch` backs up each real tensor before its first
in-place write and puts it back afterwards, and it records the values a call reads out of
tensors (``.item()``, ``float()``, ``tolist()``), which a trace freezes.
"""
from __future__ import annotations

import torch

__all__ = ["StateWatch", "written"]


class StateWatch:
    """A dispatch mode for the trace (or a checked eager call): copy-on-write backups.

    While a function is traced with fake inputs, ops whose inputs are all real tensors (a
    counter buffer's ``add_(1)``, an EMA's ``mul_``) run for real.  Before the first in-place
    write to a real tensor, this keeps a copy, so that :meth:`undo` puts every such tensor back
    and tracing leaves no trace in the user's state.  It also records the values the function
    read from real tensors (``.item()``, ``float()``, ``bool()``): those are value reads that the
    trace froze.
    """

    def __init__(self, only=None):
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        watch = self
        self.only = only  # ids of the tensors to back up (None: every real tensor)
        self.backups: dict = {}
        self.reads: list = []

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                for pos in written(func):
                    t = args[pos] if isinstance(pos, int) and pos < len(args) else kwargs.get(pos)
                    watch._backup(t)
                out = func(*args, **kwargs)
                if func is _LOCAL_SCALAR and (_is_real(args[0])
                                              or getattr(args[0], "constant", None) is not None):
                    # a real tensor, or a fake one computed from real tensors (its value known)
                    watch.reads.append((args[0], "item", out))
                return out

        class _Lists(TorchFunctionMode):
            # ``tolist()`` reads values without an aten op: seen at the torch-function level
            def __torch_function__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if func is _TOLIST and (_is_real(args[0])
                                        or getattr(args[0], "constant", None) is not None):
                    watch.reads.append((args[0], "tolist", out))
                return out

        self.mode = _Mode()
        self.lists = _Lists()

    def _backup(self, t):
        if not _is_real(t) or id(t) in self.backups:
            return
        if self.only is not None and id(t) not in self.only:
            return
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes(), torch.no_grad():
            self.backups[id(t)] = (t, t.clone())

    def __enter__(self):
        self.lists.__enter__()
        try:
            self.mode.__enter__()
        except BaseException:
            self.lists.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.mode.__exit__(*exc)
        finally:
            self.lists.__exit__(*exc)

    def mutated(self):
        return [t for t, _ in self.backups.values()]

    def undo(self):
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes(), torch.no_grad():
            for t, copy in self.backups.values():
                t.copy_(copy)


_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default
_TOLIST = torch.Tensor.tolist
_WRITTEN: dict = {}


def written(func):
    """Positions (or keyword names) of the arguments ``func`` writes into."""
    pos = _WRITTEN.get(func)
    if pos is None:
        pos = []
        schema = getattr(func, "_schema", None)
        for i, a in enumerate(schema.arguments if schema is not None else ()):
            if a.alias_info is not None and a.alias_info.is_write:
                pos.append(a.name if a.kwarg_only else i)
        pos = _WRITTEN[func] = tuple(pos)
    return pos


def _is_real(t) -> bool:
    if not isinstance(t, torch.Tensor):
        return False
    # a plain tensor (or Parameter): not fake, no wrapper subclass such as BatchedTensor
    return type(t).__torch_dispatch__ is _PLAIN_DISPATCH


_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__
