"""What a trace of ``ftrans.compile`` read, and one generated check that it still holds.

A replay is only right while everything the traced function read still has the value it had
during tracing.  Tensor *inputs* are covered by the cache key (shape, strides, dtype, ...) and
the global torch state by :func:`global_state`.  Everything else the function can reach is found
by walking, once per trace, from the function object: its closure cells, defaults, the globals
its code (and nested code) names, bound ``self``, ``functools.partial`` arguments, the functions
that ftrans's own transforms wrap (closure cells holding callables), and from there every
``nn.Module`` (its whole ``__dict__``: ``training``, scalar settings such as ``p`` or
``momentum``, the parameter/buffer/submodule/hook dicts), plain objects, lists and dicts.
Each place becomes a *source* (``R[3].cell_contents``, ``v7['lr']``) with one check, as
Dynamo's guards do:

- Python scalars (``int``, ``float``, ``str``, ``None``, dtypes, ...): type and value;
- tensors: identity and ``requires_grad`` (their values are read at replay time: graph
  constants are the tensors themselves); ``.item()`` of one during tracing adds its value;
- functions, modules and other objects: identity, then their contents;
- containers: length, then their elements.

All checks of a trace become the lines of one generated Python function (``guard``), which
returns the index of the first failing check (or -1), so a failure can be named.  The walk also
keeps shallow copies of every container it passed, so that Python state a trace changed (a loss
appended to a list, an attribute set) is detected (the guard fails right after tracing) and put
back before the signature runs eagerly.

Tensor state is the other half: ``ftrans/_statewatch.py`` undoes in-place updates that ran
during tracing and records the tensor values a trace read.

What this cannot see: state reached only through code the walk does not enter (library
functions' globals, objects read through ``getattr`` with computed names, C extension
objects' internals), the contents of numpy arrays, and I/O.  See docs/compile.md.
"""
from __future__ import annotations

import enum
import functools
import sys
import types
import weakref

import torch

__all__ = ["Reads", "global_state"]

_SCALARS = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device,
            torch.layout, torch.memory_format)
_MAX_CHECKS = 20000
_MAX_ELEMS = 256
_LIB_ROOTS = {"torch", "ftrans", "functools", "numpy", "optree", "typing", "abc", "builtins",
              "contextlib", "collections", "copy", "warnings"}
_stdlib = getattr(sys, "stdlib_module_names", frozenset())


def _is_lib(module_name) -> bool:
    if not module_name:
        return True
    top = module_name.split(".")[0]
    return top in _LIB_ROOTS or top in _stdlib


def _autocast_state():
    state = []
    for dev in ("cpu", "cuda"):
        try:
            on = torch.is_autocast_enabled(dev)
            state.append((on, torch.get_autocast_dtype(dev) if on else None))
        except (TypeError, AttributeError, RuntimeError):  # torch < 2.4 spellings
            if dev == "cpu":
                on = torch.is_autocast_cpu_enabled()
                state.append((on, torch.get_autocast_cpu_dtype() if on else None))
            else:
                on = torch.is_autocast_enabled()
                state.append((on, torch.get_autocast_gpu_dtype() if on else None))
    return tuple(state)


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def global_state():
    """The torch state a trace depends on beyond its inputs (part of every cache key)."""
    autocast = _autocast_state() if (_any_autocast is None or _any_autocast()) else None
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
            torch.get_default_dtype(), autocast,
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


class Reads:
    """The walk's result: sources, checks, reachable tensors, and Python state to restore."""

    def __init__(self):
        self.roots: list = []      # R[i]: objects the guard starts from (cells, dicts, ...)
        self.consts: list = []     # C[i]: expected values and identities
        self.lines: list = []      # guard body
        self.names: list = []      # per check: what it reads, for messages
        self.tensors: dict = {}    # id -> (tensor, source variable, name)
        self.saved: list = []      # (restore function) for Python state the trace may change
        self.unguardable = None    # why the reachable state is too large, or None
        self._seen: set = set()
        self._names: set = set()   # attribute names the walked code uses
        self._deferred: list = []  # plain objects, walked by those names in finish()
        self._vars = 0
        self._guard = None

    # -- building ---------------------------------------------------------------------------
    def _root(self, obj) -> str:
        self.roots.append(obj)
        return f"R[{len(self.roots) - 1}]"

    def _const(self, obj) -> str:
        self.consts.append(obj)
        return f"C[{len(self.consts) - 1}]"

    def _bind(self, expr: str) -> str:
        self._vars += 1
        var = f"v{self._vars}"
        self.lines.append(f"{var} = {expr}")
        return var

    def _check(self, cond_fails: str, name: str):
        if len(self.names) >= _MAX_CHECKS:
            self.unguardable = self.unguardable or (
                f"the state it can reach is too large to guard (over {_MAX_CHECKS} checks, "
                f"at {name})")
            return
        self.lines.append(f"if {cond_fails}: return {len(self.names)}")
        self.names.append(name)

    def function(self, fn, name: str):
        """Walk from the compiled function (held, so not itself checked)."""
        try:
            if isinstance(fn, types.FunctionType):
                self._visit_function(fn, self._root(fn), name, is_root=True)
            else:  # a bound method, a partial, a module, a callable object
                self._visit(fn, self._root(fn), name)
        except RecursionError:
            self.unguardable = "the state it can reach is nested too deeply to guard"

    def leaf(self, index: int, obj, name: str):
        """Walk a non-tensor argument leaf: ``L[index]`` at call time."""
        if type(obj) in _SCALARS or isinstance(obj, torch.Tensor):
            return  # in the cache key already
        self._visit(obj, f"L[{index}]", name)

    def leaf_value(self, index: int, value, name: str):
        """A Python number argument the trace specialized on."""
        self._check(f"L[{index}] != {self._const(value)}", name)

    def leaf_offset(self, index: int, offset: int, name: str):
        self._check(f"L[{index}].storage_offset() != {offset}", f"the storage offset of {name}")

    def value_read(self, tensor, how, value) -> bool:
        """``.item()`` / ``.tolist()`` of a reachable tensor during tracing: check the value.
        False: not a tensor the guard can reach."""
        hit = self.tensors.get(id(tensor))
        if hit is None or hit[0] is not tensor:
            return False
        _, var, name = hit
        self._check(f"{var}.{how}() != {self._const(value)}", f"the value of {name}")
        return True

    # -- the walk ---------------------------------------------------------------------------
    def _visit(self, obj, expr: str, name: str):
        t = type(obj)
        if t in _SCALARS or isinstance(obj, enum.Enum):
            if obj is None or t is bool:
                self._check(f"{expr} is not {self._const(obj)}", name)
            else:
                c = self._const(obj)
                self._check(f"type({expr}) is not {self._const(t)} or {expr} != {c}", name)
            return
        if isinstance(obj, (types.ModuleType, type, types.BuiltinFunctionType,
                            types.BuiltinMethodType, types.MethodDescriptorType,
                            types.WrapperDescriptorType, types.GetSetDescriptorType,
                            torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return  # code, not state
        if isinstance(obj, weakref.ref):
            return  # a cache of something reachable otherwise (an RNN's _flat_weight_refs)
        var = self._bind(expr)
        if isinstance(obj, torch.Tensor):
            self._check(f"{var} is not {self._const(obj)} or {var}.requires_grad is not "
                        f"{obj.requires_grad}", name)
            self.tensors.setdefault(id(obj), (obj, var, name))
            return
        if t in (tuple, list, dict, set, frozenset) or isinstance(obj, (list, dict)):
            if id(obj) in self._seen:  # reached before (or a cycle): the same object
                self._check(f"{var} is not {self._const(obj)}", name)
                return
            self._seen.add(id(obj))
            self._visit_container(obj, var, name)
            return
        self._check(f"{var} is not {self._const(obj)}", name)
        if id(obj) in self._seen:
            return
        self._seen.add(id(obj))
        if isinstance(obj, types.FunctionType):
            self._visit_function(obj, var, name)
        elif isinstance(obj, types.MethodType):
            self._visit(obj.__self__, f"{var}.__self__", name.rsplit(".", 1)[0])
            self._visit(obj.__func__, f"{var}.__func__", name)
        elif isinstance(obj, functools.partial):
            self._visit(obj.func, f"{var}.func", name)
            self._visit(obj.args, f"{var}.args", f"{name}.args")
            self._visit(obj.keywords, f"{var}.keywords", f"{name}.keywords")
        elif isinstance(obj, torch.nn.Module):
            self._visit_object(obj, var, name, _MODULE_DICTS)
            self._visit_method(type(obj), "forward", name)
        elif hasattr(obj, "__dict__") and isinstance(getattr(obj, "__dict__", None), dict):
            # A plain object: only the attributes the walked code names (``cfg.lr``), once
            # all the code is known (see finish).
            self._deferred.append((obj, var, name))
            self._visit_method(type(obj), "__call__", name)

    def finish(self):
        """Walk the plain objects found, by the attribute names of all the code walked."""
        try:
            self._finish()
        except RecursionError:
            self.unguardable = "the state it can reach is nested too deeply to guard"

    def _finish(self):
        while self._deferred:
            obj, var, name = self._deferred.pop(0)
            d = obj.__dict__
            cls = type(obj)
            dvar = self._bind(f"{var}.__dict__")
            self._save_dict(d)
            self._check(f"len({dvar}) != {len(d)}", f"the attributes of {name}")
            done: set = set()
            while self._names - done:  # a property's code may name more attributes
                for attr in sorted(self._names - done):
                    done.add(attr)
                    if attr in d:
                        self._check(f"{attr!r} not in {dvar}", f"{name}.{attr}")
                        self._visit(d[attr], f"{dvar}[{attr!r}]", f"{name}.{attr}")
                        continue
                    found = getattr(cls, attr, _MISSING)
                    if isinstance(found, property) and isinstance(found.fget, types.FunctionType):
                        self._visit_code(found.fget, f"{name}.{attr}")
                    elif type(found) in _SCALARS:  # a class attribute (unless shadowed)
                        self._check(f"{attr!r} in {dvar}", f"{name}.{attr}")
                        self._visit(found, f"{self._const(cls)}.{attr}", f"{name}.{attr}")

    def _visit_method(self, cls, attr, name):
        self._visit_code(getattr(cls, attr, None), f"{name}.{attr}")

    def _visit_code(self, fn, name):
        """A user function reached through a class (a method, a property): its reads."""
        if isinstance(fn, types.FunctionType) and not _is_lib(fn.__globals__.get("__name__")) \
                and id(fn) not in self._seen:
            self._seen.add(id(fn))
            self._visit_function(fn, self._root(fn), name, is_root=True)

    def _visit_object(self, obj, var, name, flat):
        d = obj.__dict__
        dvar = self._bind(f"{var}.__dict__")
        self._save_dict(d)
        self._check(f"len({dvar}) != {len(d)}", f"the attributes of {name}")
        # Few lines, not one per attribute: a module's __dict__ is mostly settings (one tuple
        # comparison), empty hook dicts (one truth test) and its three tensor/submodule dicts.
        settings, empty = [], []
        for key, value in list(d.items()):
            if key in _NOT_READ:
                continue
            t = type(value)
            if t in _SCALARS or isinstance(value, enum.Enum):
                settings.append(key)
            elif t in (dict, list, set, collections_OrderedDict) and not value:
                empty.append(key)
            elif key in flat and t in (dict, collections_OrderedDict):
                self._visit_members(value, f"{dvar}[{key!r}]", name, key)
            else:
                self._visit(value, f"{dvar}[{key!r}]", f"{name}.{key}")
        if settings:
            tup = "(" + "".join(f"{dvar}[{k!r}], " for k in settings) + ")"
            vals = tuple(d[k] for k in settings)
            what = (f"{name}.{settings[0]}" if len(settings) == 1 else
                    f"{name}.{settings[0]} (or another setting of {name or 'it'}: "
                    f"{', '.join(settings[1:])})")
            tv = self._bind(tup)
            self._check(f"{tv} != {self._const(vals)} or tuple(map(type, {tv})) != "
                        f"{self._const(tuple(map(type, vals)))}", what)
        if empty:
            self._check(" or ".join(f"{dvar}[{k!r}]" for k in empty),
                        f"{name}'s {', '.join(empty)} (empty when traced)")

    def _visit_members(self, members, expr, name, key):
        """``_parameters`` / ``_buffers`` / ``_modules``: names and identities in two checks."""
        sub = self._bind(expr)
        self._save_dict(members)
        self._check(f"[*{sub}] != {self._const(list(members))} or [*map(id, {sub}.values())] "
                    f"!= {self._const([id(v) for v in members.values()])}",
                    f"{name}.{key} (an entry replaced, added or removed)")
        self.consts.append(list(members.values()))  # keeps the ids above alive
        tensors = [k for k, v in members.items() if isinstance(v, torch.Tensor)]
        if tensors:
            flags = tuple(members[k].requires_grad for k in tensors)
            self._check(f"(" + "".join(f"{sub}[{k!r}].requires_grad, " for k in tensors)
                        + f") != {self._const(flags)}", f"requires_grad of {name}.{key}")
        for k, v in list(members.items()):
            full = f"{name}.{k}" if name else k
            if isinstance(v, torch.Tensor):
                self.tensors.setdefault(id(v), (v, f"{sub}[{k!r}]", full))
            elif v is not None and isinstance(k, str):
                self._visit(v, f"{sub}[{k!r}]", full)

    def _visit_container(self, obj, var, name):
        t = type(obj)
        if isinstance(obj, (set, frozenset)):
            if isinstance(obj, set):
                self.saved.append(functools.partial(_restore_set, obj, set(obj)))
            self._check(f"type({var}) is not {self._const(t)} or {var} != "
                        f"{self._const(set(obj))}", name)
            return
        if isinstance(obj, list):
            self.saved.append(functools.partial(_restore_list, obj, list(obj)))
        elif isinstance(obj, dict):
            self._save_dict(obj)
        self._check(f"type({var}) is not {self._const(t)} or len({var}) != {len(obj)}",
                    f"the length of {name}")
        if len(obj) > _MAX_ELEMS:
            self.unguardable = self.unguardable or (
                f"it can reach a container too large to guard ({name}, {len(obj)} items)")
            return
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in list(items):
            if isinstance(key, (str, int)) and not isinstance(key, bool):
                self._visit(value, f"{var}[{key!r}]", f"{name}[{key!r}]")

    def _visit_function(self, fn, var, name, is_root=False):
        # (where the code lives: functools.wraps copies the wrapped function's __module__)
        lib = _is_lib(fn.__globals__.get("__name__"))
        code = fn.__code__
        for i, cell in enumerate(fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # not yet bound
                continue
            if lib and not (callable(value) or isinstance(value, torch.nn.Module)):
                continue  # a library wrapper's own settings and caches
            self.saved.append(functools.partial(_restore_cell, cell, value))
            self._visit(value, f"{self._root(cell)}.cell_contents", code.co_freevars[i])
        wrapped = getattr(fn, "__wrapped__", None)
        if wrapped is not None:
            self._visit(wrapped, f"{var}.__wrapped__", name)
        if lib:
            return
        self._names.update(_code_names(code))
        if fn.__defaults__:
            self._visit(fn.__defaults__, f"{var}.__defaults__", f"the defaults of {name}")
        if fn.__kwdefaults__:
            self._visit(fn.__kwdefaults__, f"{var}.__kwdefaults__", f"the defaults of {name}")
        g = fn.__globals__
        gvar = None
        for gname in _code_names(code):
            if gname not in g:
                continue
            value = g[gname]
            if isinstance(value, types.ModuleType):
                self._visit_user_module(value, code, gname)
                continue
            if gvar is None:
                gvar = self._root(g)
            self.saved.append(functools.partial(_restore_item, g, gname, value))
            self._visit(value, f"{gvar}[{gname!r}]", gname)

    def _visit_user_module(self, mod, code, mname):
        """``config.LR`` where ``config`` is the user's own module: its named attributes."""
        if _is_lib(mod.__name__) or "-packages" in (getattr(mod, "__file__", "") or ""):
            return
        if id(mod) in self._seen:
            return
        self._seen.add(id(mod))
        d = mod.__dict__
        dvar = self._root(d)
        for attr in _code_names(code):
            if attr in d and not isinstance(d[attr], types.ModuleType):
                self.saved.append(functools.partial(_restore_item, d, attr, d[attr]))
                self._visit(d[attr], f"{dvar}[{attr!r}]", f"{mname}.{attr}")

    def _save_dict(self, d):
        self.saved.append(functools.partial(_restore_dict, d, dict(d)))

    # -- checking ---------------------------------------------------------------------------
    def compile(self):
        """Generate ``guard(L) -> index of the first failing check, or -1``."""
        body = "\n".join("        " + line for line in self.lines) or "        pass"
        src = (f"def make(R, C):\n    def guard(L):\n{body}\n        return -1\n    return guard\n")
        ns: dict = {}
        exec(compile(src, "<ftrans.compile guard>", "exec"), ns)  # noqa: S102
        raw = ns["make"](self.roots, self.consts)

        def guard(leaves):
            try:
                return raw(leaves)
            except Exception:  # a source vanished (a key deleted, a cell emptied): stale
                return len(self.names)

        self._guard = raw
        return guard

    def describe(self, index: int) -> str:
        if 0 <= index < len(self.names):
            return self.names[index]
        return "a place it read (it no longer exists)"

    def restore(self):
        """Put back the Python state (lists, dicts, attributes, cells) as the walk found it."""
        for undo in reversed(self.saved):
            undo()


collections_OrderedDict = __import__("collections").OrderedDict
_MODULE_DICTS = ("_parameters", "_buffers", "_modules")
_MISSING = object()
# nn.Module attributes a call never reads (state_dict / load_state_dict machinery), or that
# are caches of its parameters rebuilt by each forward (RNNs; functional_call swaps them)
_NOT_READ = frozenset({"_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                       "_load_state_dict_post_hooks", "_non_persistent_buffers_set",
                       "_flat_weights", "_flat_weight_refs"})


def _code_names(code, _cache={}):  # noqa: B006 (a cache by design)
    names = _cache.get(code)
    if names is None:
        acc = list(code.co_names)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                acc.extend(_code_names(c))
        names = _cache[code] = tuple(dict.fromkeys(acc))
    return names


def _restore_list(lst, saved):
    if len(lst) != len(saved) or any(a is not b for a, b in zip(lst, saved)):
        lst[:] = saved


def _restore_dict(d, saved):
    if len(d) != len(saved) or any(d.get(k, d) is not v for k, v in saved.items()):
        d.clear()
        d.update(saved)


def _restore_set(s, saved):
    if s != saved:
        s.clear()
        s.update(saved)


def _restore_cell(cell, value):
    try:
        if cell.cell_contents is value:
            return
    except ValueError:
        pass
    cell.cell_contents = value


def _restore_item(d, key, value):
    if d.get(key, d) is not value:
        d[key] = value

