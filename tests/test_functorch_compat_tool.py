"""tools/functorch_compat.py: the source rewriting that substitutes ftrans for torch.func."""
from __future__ import annotations

import importlib.util
import os
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("functorch_compat",
                                               os.path.join(ROOT, "tools", "functorch_compat.py"))
fc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fc)


def test_names_in_code_are_substituted_and_strings_are_not():
    src = textwrap.dedent('''\
        y = torch.vmap(f)(x)
        z = torch.func.jacrev(f)(x) + functorch.grad(g)(x)
        keep = torch.func.functionalize(f)
        keep2 = torch._C._functorch.is_batchedtensor(x)
        msg = "called inside torch.vmap and torch.func.grad"
        w = a.torch.vmap
        ''')
    out = fc._rewrite_names(src)
    assert "y = ftrans.vmap(f)(x)" in out
    assert "z = ftrans.jacrev(f)(x) + ftrans.grad(g)(x)" in out
    assert "keep = torch.func.functionalize(f)" in out
    assert "torch._C._functorch.is_batchedtensor" in out
    assert '"called inside torch.vmap and torch.func.grad"' in out
    assert "w = a.torch.vmap" in out


def test_imports_split_public_names_from_the_rest():
    src = textwrap.dedent('''\
        from functorch import (
            combine_state_for_ensemble,
            grad,  # comment
            make_fx,
            vmap,
        )
        from torch.func import functional_call, functionalize
            from functorch import vmap as v
        ''')
    out = fc._rewrite_imports(src)
    assert "from functorch import combine_state_for_ensemble, make_fx\nfrom ftrans import grad, vmap" in out
    assert "from torch.func import functionalize\nfrom ftrans import functional_call" in out
    assert "    from ftrans import vmap as v" in out


def test_prepare_applies_shims(tmp_path):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    for name in fc.FILES:
        (src_dir / name).write_text("x = dict(dtypesIfGPU=1, backward_dtypesIfGPU=2)\n"
                                    "for sample, subtest_ctx in it:\n    pass\n"
                                    "jac = getattr(functorch, name)\n")
    fc.prepare(str(src_dir), str(tmp_path / "out"), substitute=True, gpu_shim=True)
    text = (tmp_path / "out" / "test_vmap.py").read_text()
    assert text.startswith("import ftrans")
    assert "dict(dtypesIfCUDA=1, backward_dtypesIfCUDA=2)" in text
    assert "for sample, subtest_ctx, *_ in it:" in text
    assert "jac = _ftrans_public(functorch, name)" in text
    ns = {}
    exec(text.split("x = dict")[0], ns)  # the prelude
    import ftrans
    import torch.func
    assert ns["_ftrans_public"](torch.func, "jacrev") is ftrans.jacrev
    assert ns["_ftrans_public"](torch.func, "functionalize") is torch.func.functionalize


def test_compare_counts_regressions_per_class():
    ref = {"TestA::t1": ("passed", ""), "TestA::t2": ("passed", ""), "TestOpInfoB::t3": ("failed", "x")}
    ours = {"TestA::t1": ("passed", ""), "TestA::t2": ("failed", "boom"), "TestOpInfoB::t3": ("passed", "")}
    per_class, regressions = fc.compare(ref, ours)
    assert per_class["TestA"]["regressed"] == 1 and per_class["TestA"]["ftrans pass"] == 1
    assert per_class["TestOpInfoB"]["only ftrans"] == 1
    assert regressions == [("TestA::t2", "failed", "boom")]
