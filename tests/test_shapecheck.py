"""Per-example shape validity (ftrans/_C/shapecheck.py): under vmap an op rejects exactly the
per-example shapes it rejects eagerly, with eager's error (same type, eager's message first).

Before the mechanism, a rule that folds the vmap batch into a dim the kernel loops over accepted
shapes the op refuses for one example: ``vmap(linalg.det)`` over 5 vectors returned the
determinant of the whole 5x5 batch, five times.  The differential test below runs many ops on
invalid per-example shapes (and valid controls) and compares with eager on one example.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import ftrans
from ftrans._C import dispatch as _dispatch
from ftrans._C import fastpath, shapecheck

from _helpers import loop_reference

B = 5
r = torch.randn
pytestmark = pytest.mark.filterwarnings("ignore:Using torch.cross without specifying the dim")

# (name, fn, per-example args, in_dims). Each is invalid for one example; eager raises.
INVALID = [
    ("linalg.det vector", torch.linalg.det, (r(B, 5),), 0),
    ("linalg.inv vector", torch.linalg.inv, (r(B, 5),), 0),
    ("linalg.slogdet vector", torch.linalg.slogdet, (r(B, 5),), 0),
    ("linalg.svd vector", torch.linalg.svd, (r(B, 5),), 0),
    ("linalg.qr vector", torch.linalg.qr, (r(B, 5),), 0),
    ("linalg.eigh vector", torch.linalg.eigh, (r(B, 5),), 0),
    ("linalg.cholesky vector", torch.linalg.cholesky, (r(B, 5),), 0),
    ("linalg.matrix_exp vector", torch.linalg.matrix_exp, (r(B, 5),), 0),
    ("linalg.pinv vector", torch.linalg.pinv, (r(B, 5),), 0),
    ("linalg.lu_factor vector", torch.linalg.lu_factor, (r(B, 5),), 0),
    ("linalg.solve vector A", torch.linalg.solve, (r(B, 5), r(B, 5)), 0),
    ("linalg.det non-square", torch.linalg.det, (r(B, 2, 3),), 0),
    ("linalg.det batch last", torch.linalg.det, (r(4, B),), 1),
    ("t 3-d", torch.t, (r(B, 2, 3, 4),), 0),
    ("trace vector", torch.trace, (r(B, 5),), 0),
    ("triu vector", torch.triu, (r(B, 5),), 0),
    ("tril vector", torch.tril, (r(B, 5),), 0),
    ("roll dim", lambda x: torch.roll(x, 1, 1), (r(B, 3),), 0),
    ("linalg.cross size", torch.linalg.cross, (r(B, 4), r(B, 4)), 0),
    ("linalg.cross unbatched", torch.linalg.cross, (r(B, 4), r(4)), (0, None)),
    # Only the batch dim has size 3: the op must not pick it.
    ("cross no dim of size 3", torch.cross, (r(4, 3), r(4, 3)), 1),
    ("masked_fill_ mask larger", lambda x, m: x.clone().masked_fill_(m, 0.),
     (r(B, 3), torch.ones(B, 2, 3, dtype=torch.bool)), 0),
    ("masked_scatter_ mask larger", lambda x, m, s: x.clone().masked_scatter_(m, s),
     (r(B, 3), torch.ones(B, 2, 3, dtype=torch.bool), r(B, 6)), 0),
    ("masked_scatter uint8 mask", lambda x, m, s: x.masked_scatter(m, s),
     (r(B, 3), torch.ones(B, 3, dtype=torch.uint8), r(B, 3)), 0),
    ("mm vector", torch.mm, (r(B, 2, 2, 2), r(B, 2)), 0),
    ("mm mismatch", torch.mm, (r(B, 2, 3), r(B, 4, 2)), 0),
    ("mv vectors", torch.mv, (r(B, 2), r(B, 2)), 0),
    ("bmm 2-d", torch.bmm, (r(B, 2, 2), r(B, 2, 2)), 0),
    ("dot matrices", torch.dot, (r(B, 2, 2), r(B, 2)), 0),
    ("outer matrix", torch.outer, (r(B, 2, 2), r(B, 3)), 0),
    ("diag 3-d", torch.diag, (r(B, 2, 2, 2),), 0),
    ("sum dim", lambda x: x.sum(1), (r(B, 5),), 0),
    ("transpose dim", lambda x: x.transpose(0, 1), (r(B, 5),), 0),
    ("view size", lambda x: x.view(7), (r(B, 6),), 0),
    ("reshape size", lambda x: x.reshape(4, 2), (r(B, 6),), 0),
    ("expand rank", lambda x: x.expand(3), (r(B, 2, 3),), 0),
    ("index_select dim", lambda x: x.index_select(1, torch.tensor([0])), (r(B, 5),), 0),
    ("cat mismatch", lambda x, y: torch.cat([x, y], 1), (r(B, 2, 3), r(B, 3, 3)), 0),
    ("stack mismatch", lambda x, y: torch.stack([x, y]), (r(B, 2), r(B, 3)), 0),
    ("matmul mismatch", torch.matmul, (r(B, 2, 3), r(B, 2, 3)), 0),
    ("conv2d rank", lambda x, w: F.conv2d(x, w), (r(B, 3, 8), r(4, 3, 3, 3)), (0, None)),
    ("cumsum dim", lambda x: x.cumsum(2), (r(B, 5, 2),), 0),
    ("softmax dim", lambda x: x.softmax(1), (r(B, 5),), 0),
    ("add broadcast", torch.add, (r(B, 3), r(B, 4)), 0),
    ("mul broadcast unbatched", torch.mul, (r(B, 3), r(4)), (0, None)),
    ("pdist vector", F.pdist, (r(B, 5),), 0),
    ("gather rank", lambda x, i: x.gather(1, i),
     (r(B, 3), torch.zeros(B, 3, 1, dtype=torch.long)), 0),
    ("diagonal dims", lambda x: x.diagonal(0, 0, 2), (r(B, 3, 3),), 0),
]


def _one_example(args, in_dims):
    dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
    return [a if d is None else a.select(d, 0) for a, d in zip(args, dims)]


def _eager_error(fn, args, in_dims):
    with pytest.raises(Exception) as info:
        fn(*_one_example(args, in_dims))
    return info.value


@pytest.mark.parametrize("name,fn,args,in_dims", INVALID, ids=[c[0] for c in INVALID])
@pytest.mark.parametrize("grad", [False, True], ids=["plain", "requires_grad"])
def test_invalid_example_raises_eagers_error(name, fn, args, in_dims, grad):
    if grad:  # the normal dispatch path (autograd records) instead of the torch-function one
        args = tuple(a.clone().requires_grad_() if a.is_floating_point() else a for a in args)
    expected = _eager_error(fn, args, in_dims)
    before = [a.clone() for a in args]
    for _ in range(2):  # the second call hits every cache (fast path, verdicts)
        with pytest.raises(type(expected)) as info:
            ftrans.vmap(fn, in_dims=in_dims)(*args)
        assert str(info.value).startswith(str(expected)), (str(info.value), str(expected))
    for a, b in zip(args, before):
        assert torch.equal(a, b)  # nothing written into the user's data


@pytest.mark.parametrize("name,fn,args,in_dims", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_example_raises_nested(name, fn, args, in_dims):
    """The inner vmap's examples are checked too (shapes of the innermost level)."""
    dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
    outer = [a if d is None else torch.stack([a, a], d) for a, d in zip(args, dims)]
    expected = _eager_error(fn, args, in_dims)
    with pytest.raises(type(expected)) as info:
        ftrans.vmap(ftrans.vmap(fn, in_dims=in_dims), in_dims=in_dims)(*outer)
    assert str(info.value).startswith(str(expected))


def test_message_names_the_call_and_the_shapes():
    with pytest.raises(RuntimeError) as info:
        ftrans.vmap(torch.linalg.det)(torch.randn(5, 5))
    msg = str(info.value)
    assert msg.startswith("linalg.det: The input tensor A must have at least 2 dimensions.")
    assert "vmap(linalg_det" in msg and "[5]" in msg and "linalg_det rejects" in msg


# Valid per-example shapes close to the invalid ones: the check must not refuse them, and the
# results must match a per-example loop.
VALID = [
    ("linalg.det", torch.linalg.det, (r(B, 3, 3),), 0),
    ("linalg.det batch last", torch.linalg.det, (r(3, 3, B),), 2),
    ("linalg.inv", torch.linalg.inv, (r(B, 3, 3) + 3 * torch.eye(3),), 0),
    ("t 2-d", torch.t, (r(B, 2, 3),), 0),
    ("t 1-d", torch.t, (r(B, 3),), 0),
    ("trace", torch.trace, (r(B, 3, 3),), 0),
    ("triu", torch.triu, (r(B, 3, 3),), 0),
    ("roll", lambda x: torch.roll(x, 1, 0), (r(B, 3),), 0),
    ("linalg.cross", torch.linalg.cross, (r(B, 3), r(B, 3)), 0),
    ("cross dim found", torch.cross, (r(4, 3, B), r(4, 3, B)), 2),
    ("masked_fill", lambda x, m: x.masked_fill(m, 0.), (r(B, 3), torch.rand(B, 3) > 0.5), 0),
    ("masked_fill broadcast", lambda x, m: x.masked_fill(m, 0.),
     (r(B, 3), torch.rand(B, 2, 3) > 0.5), 0),
    ("mm", torch.mm, (r(B, 2, 3), r(B, 3, 2)), 0),
    ("mm unbatched", torch.mm, (r(B, 2, 3), r(3, 2)), (0, None)),
    ("sum", lambda x: x.sum(0), (r(B, 5),), 0),
    ("view", lambda x: x.view(2, 3), (r(B, 6),), 0),
    ("add broadcast", torch.add, (r(B, 3), r(B, 1)), 0),
]


@pytest.mark.parametrize("name,fn,args,in_dims", VALID, ids=[c[0] for c in VALID])
def test_valid_example_matches_loop(name, fn, args, in_dims):
    dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ftrans.FallbackWarning)
        for _ in range(2):
            out = ftrans.vmap(fn, in_dims=in_dims)(*args)
            torch.testing.assert_close(out, loop_reference(fn, args, dims))


def test_verdict_is_cached_per_signature(monkeypatch):
    """The meta run happens once per (op, shape signature); ints count (dim=0 vs dim=1)."""
    calls = []
    real = shapecheck._verdict

    def counting(op, args, kwargs):
        calls.append(op.name)
        return real(op, args, kwargs)

    monkeypatch.setattr(shapecheck, "_verdict", counting)
    op = _dispatch._OPS.get(torch.ops.aten._linalg_det.default)
    if op is not None:
        op.ok_shapes.clear()
    x = torch.randn(4, 3, 3)
    for _ in range(3):
        ftrans.vmap(torch.linalg.det)(x)
    assert calls.count("aten::_linalg_det") == 1
    ftrans.vmap(torch.linalg.det)(torch.randn(4, 2, 2))  # a new signature
    assert calls.count("aten::_linalg_det") == 2
    calls.clear()
    ftrans.vmap(lambda x: x.cumsum(0))(torch.randn(4, 3, 2))
    ftrans.vmap(lambda x: x.cumsum(1))(torch.randn(4, 3, 2))
    assert calls.count("aten::cumsum") == 2


def test_fast_path_honours_the_check():
    """A signature the torch-function fast path learned (by rank) still gets the size check."""
    before = fastpath.stats()["signatures"]
    ok = torch.randn(4, 3, 3)
    for _ in range(2):
        ftrans.vmap(torch.mm)(ok, ok)
    assert fastpath.stats()["signatures"] >= before  # learned (or already known)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        ftrans.vmap(torch.mm)(torch.randn(4, 3, 2), torch.randn(4, 3, 2))


def test_in_place_and_random_ops_have_no_side_effects():
    """The eager check on example 0 clones what the op writes and forks the generator."""
    x = torch.randn(B, 3)
    mask = torch.ones(B, 2, 3, dtype=torch.bool)
    snapshot = x.clone()
    with pytest.raises(RuntimeError):
        ftrans.vmap(lambda x, m: x.masked_fill_(m, 0.))(x, mask)
    assert torch.equal(x, snapshot)
    p = torch.rand(B, 2, 2, 2)
    torch.manual_seed(3)
    ftrans.vmap(lambda p: p.sum(), randomness="different")(p)  # no draw
    state = torch.get_rng_state()
    torch.manual_seed(3)
    with pytest.raises(RuntimeError):
        ftrans.vmap(lambda p: torch.multinomial(p, 1), randomness="different")(p)
    assert torch.equal(torch.get_rng_state(), state)


def test_random_op_invalid_example():
    p = torch.rand(B, 2, 2, 2)
    expected = _eager_error(lambda p: torch.multinomial(p, 1), (p,), 0)
    for randomness in ("different", "same"):
        with pytest.raises(type(expected)) as info:
            ftrans.vmap(lambda p: torch.multinomial(p, 1), randomness=randomness)(p)
        assert str(info.value).startswith(str(expected))


def test_ops_without_meta_kernel_still_work():
    """No meta kernel (or one that needs data): eager on one example decides, once."""
    lib = torch.library.Library("ftrans_shapecheck", "DEF")
    lib.define("rowsum(Tensor x) -> Tensor")
    lib.impl("rowsum", lambda x: x.sum(-1), "CPU")

    @ftrans.register_batch_rule(torch.ops.ftrans_shapecheck.rowsum)
    def rule(level, func, args, bdims, kwargs):
        x = args[0].movedim(bdims[0], 0)
        return x.sum(-1), 0

    x = torch.randn(4, 3, 2)
    torch.testing.assert_close(ftrans.vmap(torch.ops.ftrans_shapecheck.rowsum)(x), x.sum(-1))


# Where torch.func words an error its own way, its message is contained too (code and tests
# written against torch.func keep matching), after eager's.
TORCH_FUNC_WORDING = [
    (lambda: ftrans.vmap(torch.mm)(r(B, 2, 2, 2), r(B, 2)), RuntimeError, "Shape mismatch: Got "
     "incorrect dims for mm(a, b). a has dim 3and b has dim 1but expected them to have dim 2 "
     "and dim 2"),
    (lambda: ftrans.vmap(torch.mv)(r(B, 2), r(B, 2)), RuntimeError, "Shape mismatch: Got "
     "incorrect dims for mv(a, b)."),
    (lambda: ftrans.vmap(torch.bmm)(r(B, 2, 2, 2), r(B, 2)), RuntimeError, "Shape mismatch: Got "
     "incorrect dims for bmm(a, b)."),
    (lambda: ftrans.vmap(torch.dot)(r(B, 2, 2), r(B, 2)), RuntimeError, "Got wrong shapes for dot"),
    (lambda: ftrans.vmap(lambda x: x.as_strided([2, 3], [0]))(r(B, 6)), RuntimeError,
     "size and stride must have the same length"),
    (lambda: ftrans.vmap(lambda x: x, chunk_size=-1)(r(B)), ValueError,
     "vmap: chunk_size should be None or greater than 0."),
    (lambda: ftrans.vmap(torch.Tensor.copy_, in_dims=(None, 0))(r(3), r(2, 3)), RuntimeError,
     "vmap: inplace arithmetic(self, *extra_args) is not possible"),
]


@pytest.mark.parametrize("call,exc,message", TORCH_FUNC_WORDING)
def test_torch_func_wording_is_contained(call, exc, message):
    with pytest.raises(exc) as info:
        call()
    assert message in str(info.value)


def test_eager_index_error_is_also_a_runtime_error():
    # Eager raises IndexError for squeeze(dim=1) of a vector; torch.func's rule raises
    # RuntimeError: the error is both, so code written against either catches it.
    with pytest.raises(IndexError, match="Dimension out of range") as info:
        ftrans.vmap(lambda x: torch.squeeze(x, dim=1))(torch.rand(10))
    assert isinstance(info.value, RuntimeError)
