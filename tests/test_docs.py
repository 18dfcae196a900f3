"""Documentation that executes: docstring examples of the public API and the docs' code blocks.

A wrong example in a docstring or a guide is a bug users copy.  Every name in ``ftrans.__all__``
has its docstring examples run with doctest, every public function must carry one (a short known
list excepted, which may only shrink), and every ```python block of ``docs/*.md`` runs, in order,
in one namespace per file.
"""
from __future__ import annotations

import doctest
import inspect
import os
import re
import warnings

import pytest
import torch

import ftrans

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

# Public callables that have no docstring example yet.  Remove a name when its example lands;
# adding one here needs a reason.
MISSING_EXAMPLE: set = set()


def _is_function(obj) -> bool:
    return callable(obj) and not (inspect.isclass(obj) and issubclass(obj, BaseException))


def _doctests(name):
    obj = getattr(ftrans, name)
    finder = doctest.DocTestFinder(recurse=False)
    return finder.find(obj, f"ftrans.{name}", globs={"torch": torch, "ftrans": ftrans})


@pytest.mark.parametrize("name", sorted(ftrans.__all__))
def test_docstring_examples(name):
    tests = [t for t in _doctests(name) if t.examples]
    if not tests:
        if _is_function(getattr(ftrans, name)):
            assert name in MISSING_EXAMPLE, f"ftrans.{name} has no docstring example"
        return
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ftrans.FallbackWarning)
        for t in tests:
            runner.run(t)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of ftrans.{name}"


def test_missing_example_list_is_current():
    have = {n for n in ftrans.__all__ if any(t.examples for t in _doctests(n))}
    stale = MISSING_EXAMPLE & have
    assert not stale, f"these now have examples; drop them from MISSING_EXAMPLE: {stale}"
    assert MISSING_EXAMPLE <= set(ftrans.__all__)


def test_every_public_name_has_a_docstring():
    undocumented = [n for n in ftrans.__all__ if not (getattr(ftrans, n).__doc__ or "").strip()]
    assert not undocumented, f"public names without a docstring: {undocumented}"


_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _doc_files():
    return sorted(f for f in os.listdir(DOCS) if f.endswith(".md"))


@pytest.mark.parametrize("fname", _doc_files() + ["../README.md"])
def test_doc_code_blocks_run(fname):
    text = open(os.path.join(DOCS, fname), encoding="utf-8").read()
    blocks = _BLOCK.findall(text)
    namespace = {"__name__": f"docs_{os.path.basename(fname)[:-3]}"}
    torch.manual_seed(0)
    for i, block in enumerate(blocks):
        code = compile(_dedent(block), f"docs/{fname}[block {i}]", "exec")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ftrans.FallbackWarning)
            exec(code, namespace)


def _dedent(block: str) -> str:
    import textwrap
    return textwrap.dedent(block)


def test_docs_exist_and_have_code():
    files = set(_doc_files())
    assert {"migrating.md", "limitations.md", "adding_rules.md"} <= files
    for f in ("migrating.md", "limitations.md", "adding_rules.md"):
        assert _BLOCK.search(open(os.path.join(DOCS, f), encoding="utf-8").read()), f


def test_migrating_guide_covers_the_public_api():
    text = open(os.path.join(DOCS, "migrating.md"), encoding="utf-8").read()
    for name in ftrans.__all__:
        assert name in text, f"docs/migrating.md does not mention {name}"
    for name in getattr(torch.func, "__all__", []):
        assert name in text, f"docs/migrating.md does not say what happened to torch.func.{name}"
