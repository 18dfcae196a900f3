"""The package's import graph is a ladder: no circle, and no module imports a higher layer.

The layers are the diagram at the top of ``ftrans/_C/__init__.py``.  Imports are read with
``ast`` (module-level and function-level alike: a lazy import is still a dependency), resolved
to the package's own modules; an import of a module's parent package is not an edge (Python has
already started importing the parent).  A new module must be placed in :data:`LAYERS`.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "ftrans"

_C = [
    # ground
    ["ftrans._pytree", "ftrans._C.levels", "ftrans._C.errors", "ftrans._C.batched"],
    # plumbing: what handlers share, and torch-level overrides that know no dispatch
    ["ftrans._C.ops", "ftrans._C.registry", "ftrans._C.shapecheck", "ftrans._C.fresh",
     "ftrans._C.autograd", "ftrans._C.aliasing", "ftrans._C.indexing", "ftrans._C.rnn",
     "ftrans._C.tensor_guards", "ftrans._C.agree", "ftrans._C.dropout", "ftrans._C.function",
     "ftrans._C.guards", "ftrans._C.lanes"],
    # handlers: rules, randomness policy, loop fallback, custom ops' own vmap rules
    ["ftrans._C.rules", "ftrans._C.rules.*", "ftrans._C.random", "ftrans._C.fallback",
     "ftrans._C.custom_vmap"],
    # routing
    ["ftrans._C.dispatch", "ftrans._C.fastpath", "ftrans._C.tfrules"],
    # the torch-function entry
    ["ftrans._C.torch_function"],
    # wiring: attaches BatchedTensor's entry points
    ["ftrans._C"],
]
LAYERS = _C + [
    # transforms and their helpers
    ["ftrans._vmap_args", "ftrans._split", "ftrans._chunking", "ftrans._autodiff_common",
     "ftrans.vmap", "ftrans.autodiff", "ftrans.forward", "ftrans.nn", "ftrans.control_flow",
     "ftrans.static_shape", "ftrans.compiler", "ftrans._outpool", "ftrans._fastgraph",
     "ftrans._guards",
     "ftrans._statewatch", "ftrans._joint", "ftrans.dp", "ftrans.dp.*"],
    # public API
    ["ftrans", "ftrans.__main__"],
]


def modules(root: pathlib.Path) -> dict:
    """``{dotted module name: path}`` for every ``.py`` file of the package at ``root``."""
    out = {}
    for p in root.rglob("*.py"):
        rel = p.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def imports(root: pathlib.Path) -> dict:
    """``{module: {(imported module, line)}}``, module-level and function-level imports."""
    mods = modules(root)
    graph = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    head = ".".join(parts + ([node.module] if node.module else []))
                else:
                    head = node.module or ""
                names = [head] + [f"{head}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                # importing a module's own parent package is no edge: it is being imported
                if name and name != mod and not mod.startswith(name + "."):
                    edges.add((name, node.lineno))
        graph[mod] = edges
    return graph


def layer_of(layers, mod):
    for i, row in enumerate(layers):
        for pattern in row:
            if mod == pattern or (pattern.endswith(".*") and mod.startswith(pattern[:-1])):
                return i
    return None


def upward_imports(root, layers) -> list:
    graph = imports(root)
    bad = []
    for mod, edges in sorted(graph.items()):
        lm = layer_of(layers, mod)
        for target, line in sorted(edges):
            lt = layer_of(layers, target)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{mod}:{line} imports {target} (layer {lt} > {lm})")
    return bad


def circles(root) -> list:
    graph = {m: {t for t, _ in e} for m, e in imports(root).items()}
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    unplaced = [m for m in modules(ROOT) if layer_of(LAYERS, m) is None]
    assert unplaced == [], f"place these modules in tests/test_layering.py's LAYERS: {unplaced}"


def test_no_import_circle():
    assert circles(ROOT) == []


def test_no_upward_import():
    assert upward_imports(ROOT, LAYERS) == []


_DIAGRAM_ROWS = {"ground": 0, "plumbing": 1, "handlers": 2, "routing": 3, "TF entry": 4,
                 "wiring": 5}


def _diagram():
    """``{file name in the diagram of ftrans/_C/__init__.py: its row}`` for the core's rows."""
    doc = ast.get_docstring(ast.parse((ROOT / "_C" / "__init__.py").read_text()))
    block = doc.split("::\n", 1)[1].split("\n\n", 1)[0]
    rows, row = {}, None
    for line in block.splitlines():
        label = line[:16].strip()
        if label:
            row = _DIAGRAM_ROWS.get(label)
        if row is None:
            continue
        for word in line[16:].split():
            if word.endswith(".py") or word.startswith("rules/"):
                rows[word] = row
    return rows


def test_the_diagram_is_the_layer_table():
    """The diagram in ``ftrans/_C/__init__.py`` is the table above, in words: every core module
    is drawn in the row the table gives it."""
    drawn = _diagram()
    for i, row in enumerate(_C):
        for mod in row:
            if mod == "ftrans._pytree":
                continue  # drawn as "(and ftrans/_pytree.py)" on the ground row
            if mod == "ftrans._C":
                name = "_C/__init__.py"
            elif mod.startswith("ftrans._C.rules"):
                name = "rules/*"
            else:
                name = mod.rpartition(".")[2] + ".py"
            assert drawn.get(name) == i, f"{name}: row {drawn.get(name)} in the diagram, {i} here"


def test_entry_points_are_set_in_one_place():
    """BatchedTensor's ``__torch_function__`` is attached by ``_C/__init__.py``; both
    ``__torch_dispatch__`` hooks are written only by ``dispatch.set_dispatch_entries`` (which
    ``_C/__init__.py`` calls, and the fast path while it records)."""
    writers = []
    for mod, path in sorted(modules(ROOT).items()):
        tree = ast.parse(path.read_text())
        for fn in [None] + [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]:
            body = tree.body if fn is None else fn.body
            for node in body:
                for sub in ast.walk(node) if fn is not None else [node]:
                    if isinstance(sub, ast.Assign):
                        for t in sub.targets:
                            if isinstance(t, ast.Attribute) and t.attr in (
                                    "__torch_function__", "__torch_dispatch__"):
                                writers.append((mod, fn.name if fn else "<module>", t.attr))
    assert sorted(set(writers)) == [
        ("ftrans._C", "<module>", "__torch_function__"),
        ("ftrans._C.dispatch", "set_dispatch_entries", "__torch_dispatch__"),
    ]


def _package(tmp_path, files):
    root = tmp_path / "pkg"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


SYNTHETIC_LAYERS = [["pkg.low"], ["pkg.high"], ["pkg"]]


@pytest.mark.parametrize("where", ["module level", "function level"])
def test_checker_finds_an_upward_import(tmp_path, where):
    bad = ("from .high import f\n" if where == "module level"
           else "def g():\n    from .high import f\n    return f\n")
    root = _package(tmp_path, {"__init__.py": "from . import high\n",
                               "low.py": bad,
                               "high.py": "from . import low\n\ndef f():\n    pass\n"})
    assert upward_imports(root, SYNTHETIC_LAYERS) == [
        f"pkg.low:{1 if where == 'module level' else 2} imports pkg.high (layer 1 > 0)"]
    assert circles(root) == [["pkg.high", "pkg.low"]]


def test_checker_passes_a_ladder(tmp_path):
    root = _package(tmp_path, {"__init__.py": "from .high import f\n",
                               "low.py": "import torch\n",
                               "high.py": "from .low import torch\nfrom . import low\n"})
    assert upward_imports(root, SYNTHETIC_LAYERS) == []
    assert circles(root) == []
