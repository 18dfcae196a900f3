"""The torch-function fast path (ftrans/_C/fastpath.py): taken when it may be, and never changes
a result, an autograd graph, what a dispatch mode sees, or an error."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ftrans
from ftrans._C import dispatch, fastpath
from ftrans._C.batched import BatchedTensor

from _helpers import check_vmap, entries, run_in_threads, tf_entry

pytestmark = pytest.mark.skipif(not fastpath.ENABLED, reason="torch lacks the dispatch-stack API")


@pytest.fixture(autouse=True, params=entries())
def _entry(request):
    """Every test under each torch-function entry: the compiled one (when built) and Python's."""
    with tf_entry(request.param):
        yield


class _CountEntries:
    """Counts calls that reach a dispatch entry (BatchedTensor's or the vmap mode's; the fast
    path skips both), by making counting entries the normal ones for a while."""

    def __enter__(self):
        self.n = 0
        self.orig = dict(dispatch.NORMAL_ENTRIES)
        sub, mode = self.orig["subclass"], self.orig["mode"]

        def counting(cls, func, types, args=(), kwargs=None):
            self.n += 1
            return sub(cls, func, types, args, kwargs)

        def counting_mode(m, func, types, args=(), kwargs=None):
            self.n += 1
            return mode(m, func, types, args, kwargs)

        dispatch.NORMAL_ENTRIES.update(subclass=counting, mode=counting_mode)
        dispatch.set_dispatch_entries(dispatch.NORMAL_ENTRIES)
        return self

    def __exit__(self, *exc):
        dispatch.NORMAL_ENTRIES.update(self.orig)
        dispatch.set_dispatch_entries(dispatch.NORMAL_ENTRIES)


def _chain(x):
    for _ in range(3):
        x = (x * 1.5 + 0.25).sin()
    return x


def test_learned_ops_skip_the_dispatcher():
    fastpath._CACHE.clear()  # a cache: forgetting it only costs relearning
    x = torch.randn(5, 4)
    ftrans.vmap(_chain)(x)  # learns the signatures
    with _CountEntries() as c:
        out = ftrans.vmap(_chain)(x)
    assert c.n == 0
    torch.testing.assert_close(out, _chain(x))
    # The same functions with a signature not seen before are learned again (float64).
    before = fastpath._counts["recorded"]
    ftrans.vmap(_chain)(x.double())
    assert fastpath._counts["recorded"] - before == 3  # mul, add, sin
    assert fastpath.stats()["signatures"] >= 3


def test_requires_grad_arguments_take_the_normal_path():
    w = torch.randn(4, requires_grad=True)
    x = torch.randn(5, 4)
    f = lambda x: (x * w).sin().sum()  # noqa: E731
    ftrans.vmap(lambda x: (x * 2.0).sin())(x)
    out = ftrans.vmap(f)(x)
    assert out.requires_grad
    out.sum().backward()
    expected = torch.autograd.grad(sum(f(xi) for xi in x), w)[0]
    torch.testing.assert_close(w.grad, expected)


@pytest.mark.parametrize("fn", [
    lambda x, y: x * y + 1,                          # tensor-tensor, scalar
    lambda x, y: torch.where(x > 0, x, y),           # three tensors, a bool one
    lambda x, y: x.sin() @ y.transpose(-1, -2),     # matmul (composite -> mm on matrices)
    lambda x, y: (x - y).abs().pow(2),
    lambda x, y: torch.maximum(x, y.sum()),           # a 0-dim batched argument
])
@pytest.mark.parametrize("in_dims", [(0, 0), (1, 0), (0, None), (None, 1)])
def test_same_results_as_a_loop_when_learned(fn, in_dims):
    x, y = torch.randn(3, 3, 3), torch.randn(3, 3, 3)
    for _ in range(2):  # the second call runs on learned signatures
        check_vmap(fn, (x, y), in_dims)


def test_rank_change_relearns():
    # torch.matmul is a composite: on matrices it is one mm, on 3-d tensors a bmm of reshapes.
    f = lambda a, b: torch.matmul(a, b)  # noqa: E731
    a2, b2 = torch.randn(4, 3, 5), torch.randn(4, 5, 2)
    a3, b3 = torch.randn(4, 2, 3, 5), torch.randn(4, 2, 5, 2)
    for a, b in ((a2, b2), (a3, b3), (a2, b2), (a3, b3)):
        torch.testing.assert_close(ftrans.vmap(f)(a, b), torch.stack([x @ y for x, y in zip(a, b)]))


def test_integer_and_complex_and_neg_bit_values():
    xi = torch.randint(-5, 5, (4, 3))
    xc = torch.randn(4, 3, dtype=torch.complex64)
    for _ in range(2):
        check_vmap(lambda x: x * 3 + 1, (xi,), (0,))
        check_vmap(lambda x: x * 1.5, (xi,), (0,))  # int tensor * float scalar -> float
        check_vmap(lambda z: (z * 2).conj() * 1j, (xc,), (0,))
        # conj().imag is a real tensor with the negative bit set: it must be read as negated
        check_vmap(lambda z: z.conj().imag * 2.0 + 1.0, (xc,), (0,))


def test_nested_vmap():
    x = torch.randn(3, 4, 5)
    for _ in range(2):
        out = ftrans.vmap(ftrans.vmap(_chain))(x)
    torch.testing.assert_close(out, _chain(x))


def test_autocast_is_honoured():
    x, w = torch.randn(4, 3, 8), torch.randn(8, 6)
    f = lambda x: torch.mm(x, w)  # noqa: E731
    ftrans.vmap(f)(x)  # learned outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ftrans.vmap(f)(x)
        expected = torch.stack([torch.mm(xi, w) for xi in x])
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)


class _Recorder(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_a_users_dispatch_mode_still_sees_the_ops():
    x = torch.randn(4, 3)
    ftrans.vmap(lambda x: x.sin())(x)
    rec = _Recorder()
    rec.seen = []

    def f(x):
        with rec:
            return x.sin()

    out = ftrans.vmap(f)(x)
    torch.testing.assert_close(out, x.sin())
    assert torch.ops.aten.sin.default in rec.seen


def test_compile_after_eager_traces_the_physical_ops():
    x = torch.randn(4, 3)
    g = ftrans.vmap(lambda x: (x * 2.0).cos())
    g(x)
    compiled = ftrans.compile(g)
    torch.testing.assert_close(compiled(x), (x * 2.0).cos())
    gm = next(iter(compiled.cache.values())).runner
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.cos.default in targets


def test_escaped_value_still_raises():
    box = []
    x = torch.randn(3, 2)

    def f(x):
        y = x.sin()
        y.sin()  # learned while the level is alive
        box.append(y)
        return y

    ftrans.vmap(f)(x)
    with pytest.raises(ftrans.VmapError, match="escaped"):
        box[0].sin()


def test_random_ops_are_never_cached():
    x = torch.randn(3, 2)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="random"):
            ftrans.vmap(lambda x: torch.rand_like(x))(x)
    out = ftrans.vmap(lambda x: torch.rand_like(x), randomness="different")(x)
    assert not torch.equal(out[0], out[1])


def test_registering_a_rule_drops_learned_signatures():
    @torch.library.custom_op("ftrans_test_fastpath::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @twice.register_fake
    def _(x):
        return torch.empty_like(x)

    op = torch.ops.ftrans_test_fastpath.twice.default
    x = torch.randn(4, 3)
    ftrans.reset_fallback_stats()
    with pytest.warns(ftrans.FallbackWarning):
        for _ in range(2):  # learned: the loop fallback is the handler
            torch.testing.assert_close(ftrans.vmap(op)(x), x * 2)
    assert ftrans.fallback_stats()

    calls = []

    @ftrans.register_batch_rule(op)
    def rule(level, func, args, bdims, kwargs):
        calls.append(1)
        return func(args[0]), bdims[0]

    ftrans.reset_fallback_stats()
    torch.testing.assert_close(ftrans.vmap(op)(x), x * 2)
    assert calls and not ftrans.fallback_stats()


@pytest.mark.parametrize("fn", [torch.nn.functional.hardswish, torch.nn.functional.hardtanh])
def test_decompositions_that_call_torch_functions_do_not_recurse(fn):
    # hardswish_backward's decomposition calls torch.where, whose ops (composite below autograd)
    # must not be learned as fast: their handler would call the same torch function again.
    x = torch.randn(5, dtype=torch.float64) * 4
    cts = torch.randn(3, 5, dtype=torch.float64)
    for _ in range(3):
        _, vjp_fn = ftrans.vjp(fn, x)
        (got,) = ftrans.vmap(vjp_fn)(cts)
    _, tf_vjp = torch.func.vjp(fn, x)
    (expected,) = torch.func.vmap(tf_vjp)(cts)
    torch.testing.assert_close(got, expected)


def test_threads_learning_and_using_signatures_concurrently():
    import threading

    fastpath._CACHE.clear()
    barrier = threading.Barrier(4)

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        dtype = (torch.float32, torch.float64)[seed % 2]
        x = torch.randn(6, 5, generator=g, dtype=dtype)
        barrier.wait()
        for _ in range(20):
            torch.testing.assert_close(ftrans.vmap(_chain)(x), _chain(x))

    run_in_threads(work, 4)
    # the entry points are the normal ones again once every recording ended
    assert BatchedTensor.__dict__["__torch_dispatch__"].__func__ is dispatch.subclass_entry
    assert dispatch.VmapMode.__dict__["__torch_dispatch__"] is dispatch.mode_entry
