"""Views and in-place writes under vmap: gradients, ``_base``, version counters, as in eager.

Differential tests: in-place writes through views inside the transformed function, against a
per-example loop of eager autograd (float64); vmap outputs and mutated inputs against torch.func
(which runs the physical ops through autograd, so its answers are eager's).
"""
from __future__ import annotations

import pytest
import torch
import torch.func as tf

import ftrans

DT = torch.float64

# (name, view of a per-example [3, 4] tensor) -- each result can be written in place in eager.
VIEWS = [
    ("view", lambda y: y.view(12)),
    ("reshape", lambda y: y.reshape(2, 6)),
    ("select", lambda y: y.select(0, 1)),
    ("getitem", lambda y: y[1]),
    ("slice", lambda y: y[:, 1:3]),
    ("step_slice", lambda y: y[::2, ::3]),
    ("transpose", lambda y: y.transpose(0, 1)),
    ("t", lambda y: y.t()),
    ("mT", lambda y: y.mT),
    ("permute", lambda y: y.permute(1, 0)),
    ("movedim", lambda y: y.movedim(0, 1)),
    ("diagonal", lambda y: y.diagonal()),
    ("diagonal_offset", lambda y: y.diagonal(1)),
    ("narrow", lambda y: y.narrow(1, 1, 2)),
    ("unfold", lambda y: y.unfold(1, 2, 2)),
    ("squeeze", lambda y: y[0:1].squeeze(0)),
    ("unsqueeze", lambda y: y.unsqueeze(0)),
    ("flatten", lambda y: y.flatten()),
    ("unflatten", lambda y: y.unflatten(1, (2, 2))),
    ("view_as", lambda y: y.view_as(y)),
    ("as_strided", lambda y: y.as_strided((2, 2), (1, 4))),
    ("chain", lambda y: y.t()[1:].diagonal()),
]


def _f(view, mode):
    def f(x, w):
        y = x * 1.0
        v = view(y)
        if mode == "mul":
            v.mul_(w[0])
        else:
            v.copy_(w[:1].expand_as(v) * 3)
        return (y * y.exp()).sum() + v.sin().sum()
    return f


def _loop_grads(f, x, w):
    """Per-example eager autograd (the oracle)."""
    gx, gw = [], []
    for xi, wi in zip(x, w):
        xi, wi = xi.clone().requires_grad_(), wi.clone().requires_grad_()
        a, b = torch.autograd.grad(f(xi, wi), (xi, wi))
        gx.append(a)
        gw.append(b)
    return torch.stack(gx), torch.stack(gw)


@pytest.mark.parametrize("mode", ["mul", "copy"])
@pytest.mark.parametrize("name, view", VIEWS, ids=[v[0] for v in VIEWS])
def test_inplace_through_view_gradients(name, view, mode):
    f = _f(view, mode)
    x = torch.randn(5, 3, 4, dtype=DT)
    w = torch.randn(5, 2, dtype=DT)
    ref = _loop_grads(f, x, w)

    got = ftrans.vmap(ftrans.grad(f, argnums=(0, 1)))(x, w)
    torch.testing.assert_close(got, ref)

    # The batch dim last: the physical layout of every per-example view differs.  (Explicit
    # strides name a different selection there, in torch.func too: as_strided is layout-bound.)
    xl, wl = x.movedim(0, -1).contiguous(), w.movedim(0, -1).contiguous()
    if name != "as_strided":
        got = ftrans.vmap(ftrans.grad(f, argnums=(0, 1)), in_dims=(2, 1))(xl, wl)
        torch.testing.assert_close(got, ref)

    got = ftrans.grad(lambda x, w: ftrans.vmap(f)(x, w).sum(), argnums=(0, 1))(x, w)
    torch.testing.assert_close(got, ref)

    xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
    ftrans.vmap(f)(xx, ww).sum().backward()
    torch.testing.assert_close((xx.grad, ww.grad), ref)

    out, vjp_fn = ftrans.vjp(ftrans.vmap(f), x, w)
    torch.testing.assert_close(vjp_fn(torch.ones_like(out)), ref)


def test_multi_output_view_inplace_raises_as_in_eager():
    # unbind/split return several views; eager forbids writing into them in place.
    def f(x):
        y = x * 1.0
        y.unbind(0)[1].mul_(2)
        return y.sum()

    with pytest.raises(RuntimeError, match="modified inplace"):
        ftrans.vmap(ftrans.grad(f))(torch.randn(2, 3, 4, dtype=DT))


# ----------------------------------------------------------------------------------------------
# vmap's outputs that alias its inputs are views of them (as torch.func's are)
# ----------------------------------------------------------------------------------------------

OUT_VIEWS = [
    ("select", lambda t: t[1], 0),
    ("slice", lambda t: t[1:], 0),
    ("transpose", lambda t: t.t(), 0),
    ("diagonal", lambda t: t.diagonal(), 0),
    ("expand", lambda t: t[:1].expand(3, 4), 0),
    ("unbind", lambda t: t.unbind(1)[2], 0),
    ("identity", lambda t: t, 0),
    ("identity_out_dim", lambda t: t, 1),
    ("view_out_dim", lambda t: t[1].view(2, 2), 1),
    ("real", lambda t: torch.view_as_real(t.to(torch.complex128)).select(-1, 0), 0),
]


def _root(x):
    return x if x._base is None else x._base


@pytest.mark.parametrize("name, fn, out_dim", OUT_VIEWS, ids=[v[0] for v in OUT_VIEWS])
def test_output_is_a_view_of_the_input(name, fn, out_dim):
    for x in (torch.randn(5, 3, 4, dtype=DT), torch.randn(3, 5, 4, dtype=DT).transpose(0, 1)):
        out = ftrans.vmap(fn, out_dims=out_dim)(x)
        ref = tf.vmap(fn, out_dims=out_dim)(x)
        torch.testing.assert_close(out, ref)
        assert (out is x) == (ref is x)
        assert (out._base is _root(x)) == (ref._base is _root(x))
        assert out is x or out._base is _root(x) or name == "real"  # (.to() copies)
        v = out._version
        with torch.no_grad():
            x.add_(0)
        assert (out._version > v) == (ref._version > v)  # one version counter


def test_nested_vmap_output_is_a_view_of_the_input():
    x = torch.randn(4, 2, 5, 3)
    out = ftrans.vmap(ftrans.vmap(lambda t: t.t(), in_dims=1))(x)
    torch.testing.assert_close(out, tf.vmap(tf.vmap(lambda t: t.t(), in_dims=1))(x))
    assert out._base is x
    out = ftrans.vmap(ftrans.vmap(torch.view_as_complex, in_dims=1))(
        torch.randn(4, 2, 3).movedim(1, 2).contiguous().movedim(2, 1))
    assert out._is_view()


def test_transpose_of_a_logical_scalar_is_the_input():
    x = torch.randn(5)
    assert ftrans.vmap(lambda t: t.transpose(0, -1))(x) is x


@pytest.mark.parametrize("name, fn, out_dim", OUT_VIEWS[:-1], ids=[v[0] for v in OUT_VIEWS[:-1]])
def test_inplace_on_output_view_gradients(name, fn, out_dim):
    if name == "expand":
        pytest.skip("eager refuses in-place writes into overlapping memory")
    # Writing into vmap's output writes into the input: autograd must see it (CopySlices).
    def run(vmap):
        x = torch.randn(5, 3, 4, dtype=DT, generator=torch.Generator().manual_seed(1),
                        requires_grad=True)
        y = x * 1.5
        out = vmap(fn, out_dims=out_dim)(y)
        out.mul_(out.detach() + 2)
        loss = (y ** 2).sum() + out.sum()
        return torch.autograd.grad(loss, x)[0], out._base is y

    try:
        ref, ref_is_view = run(tf.vmap)
    except RuntimeError as e:  # a view of a multi-output op (unbind): refused, as in eager
        assert "returns multiple views" in str(e)
        with pytest.raises(RuntimeError, match="returns multiple views"):
            run(ftrans.vmap)
        return
    g, is_view = run(ftrans.vmap)
    torch.testing.assert_close(g, ref)
    assert is_view == ref_is_view


# ----------------------------------------------------------------------------------------------
# Inputs written in place inside vmap: history and version counter, as in eager
# ----------------------------------------------------------------------------------------------

WRITES = [
    ("mul_", lambda t: t.mul_(2)),
    ("view_add_", lambda t: t[0].add_(t[1] * 2)),
    ("setitem", lambda t: t.__setitem__(slice(1, 3), t[0].exp())),
    ("copy_", lambda t: t.copy_(t * 2 + 1)),
]


@pytest.mark.parametrize("name, write", WRITES, ids=[w[0] for w in WRITES])
@pytest.mark.parametrize("in_dim", [0, 1])
def test_input_written_in_place_gradients(name, write, in_dim):
    def run(vmap):
        x = torch.randn(5, 3, 4, dtype=DT, generator=torch.Generator().manual_seed(2),
                        requires_grad=True)
        y = (x * 1.5).movedim(0, in_dim)

        def f(t):
            write(t)
            return t.sum()

        vmap(f, in_dims=in_dim)(y)
        loss = (y ** 3).sum()
        return torch.autograd.grad(loss, x)[0], y.detach().clone()

    (g, y), (g_ref, y_ref) = run(ftrans.vmap), run(tf.vmap)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g, g_ref)


def test_input_written_in_place_bumps_its_version():
    # A tensor saved for backward and then written inside vmap: backward must notice.
    for vmap in (tf.vmap, ftrans.vmap):
        w = torch.randn(4, 3, requires_grad=True)
        x = torch.randn(4, 3)
        z = w * x  # saves x
        v = x._version
        vmap(lambda t: t.add_(1))(x)
        assert x._version > v
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.sum().backward()

        x = torch.randn(4, 3, requires_grad=True)
        y = x.exp()  # saves its result
        vmap(lambda t: t[0].mul_(2))(y)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("write", [lambda t: t.mul_(2), lambda t: t[0].mul_(2)],
                         ids=["leaf", "view_of_leaf"])
def test_leaf_written_in_place_raises_before_writing(write):
    for vmap in (tf.vmap, ftrans.vmap):
        x = torch.randn(3, 4, requires_grad=True)
        before = x.detach().clone()
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            vmap(write)(x)
        assert torch.equal(x.detach(), before) and x._version == 0


def test_leaf_written_under_no_grad():
    def f(t):
        with torch.no_grad():
            t.mul_(2)
        return t * 3

    for vmap in (tf.vmap, ftrans.vmap):
        x = torch.randn(3, 4, dtype=DT, requires_grad=True)
        before = x.detach().clone()
        out = vmap(f)(x)
        assert torch.equal(x.detach(), 2 * before) and x._version == 1 and x.grad_fn is None
        torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.full_like(x, 3))


def test_chunked_vmap_input_written_in_place():
    def run(vmap, **kw):
        x = torch.randn(6, 3, dtype=DT, generator=torch.Generator().manual_seed(3),
                        requires_grad=True)
        y = x * 2
        vmap(lambda t: t[1:].mul_(3).add_(t[0].exp()), **kw)(y)
        return torch.autograd.grad((y ** 2).sum(), x)[0]

    torch.testing.assert_close(run(ftrans.vmap, chunk_size=4), run(tf.vmap))


# ----------------------------------------------------------------------------------------------
# .data under vmap, jvp writing into its primals
# ----------------------------------------------------------------------------------------------

def test_data_under_vmap_raises_like_torch_func():
    def get(x):
        return x.data

    def set_(x):
        x.data = torch.ones(3)
        return x

    x = torch.randn(2, 3)
    before = x.clone()
    for fn, msg in ((get, "accessing `data` under vmap transform"),
                    (set_, "mutating directly with `.data` under vmap")):
        with pytest.raises(RuntimeError, match=msg):
            tf.vmap(fn)(x)
        with pytest.raises(RuntimeError, match=msg):
            ftrans.vmap(fn)(x)
    assert torch.equal(x, before)
    y = torch.randn(3)
    y.data = torch.ones(3)  # outside vmap: untouched
    assert torch.equal(y, torch.ones(3))


JVP_FNS = [
    ("copy", lambda x, y: (x.copy_(y.repeat(1, 2)),)),
    ("view_copy", lambda x, y: (x[:, ::2].copy_(y), x)),
    ("base_write_view_read", lambda x, y: (x.copy_(y.repeat(1, 2)), x[0, ::2])),
    ("mul_", lambda x, y: (x.mul_(y.sum()),)),
]


@pytest.mark.parametrize("name, f", JVP_FNS, ids=[j[0] for j in JVP_FNS])
def test_jvp_writing_into_primals(name, f):
    def run(lib):
        g = torch.Generator().manual_seed(4)
        x, xt = torch.randn(4, 2, 6, dtype=DT, generator=g), torch.randn(4, 2, 6, dtype=DT,
                                                                           generator=g)
        y, yt = torch.randn(4, 2, 3, dtype=DT, generator=g), torch.randn(4, 2, 3, dtype=DT,
                                                                           generator=g)
        out = lib.vmap(lambda *a: lib.jvp(f, a[:2], a[2:]))(x, y, xt, yt)
        return out, x

    (out, x), (ref, x_ref) = run(ftrans), run(tf)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x, x_ref)  # the primal itself was written, as in torch.func


def test_output_view_of_another_output():
    def f(t):
        u = t * 2
        return u, u[1:], u.t()

    def run(vmap):
        x = torch.randn(5, 3, 4, dtype=DT, generator=torch.Generator().manual_seed(5),
                        requires_grad=True)
        u, v, ut = vmap(f)(x)
        assert v._base is u and ut._base is u
        v.mul_(3)
        return torch.autograd.grad((u ** 2).sum() + (ut * 1.5).sum(), x)[0], u.detach()

    (g, u), (g_ref, u_ref) = run(ftrans.vmap), run(tf.vmap)
    torch.testing.assert_close(u, u_ref)
    torch.testing.assert_close(g, g_ref)


AS_STRIDED_ERRORS = [
    ("length", lambda x: x.as_strided([1, 1, 1], [1, 1]), (5, 2, 3), "same length"),
    ("past_end", lambda x: x.as_strided([3], [1], 1), (5, 3), "not supported inside of vmap"),
    ("too_big", lambda x: x.as_strided([4, 4], [4, 1], 0), (5, 3, 5),
     "not supported inside of vmap"),
    ("empty", lambda x: x.as_strided([3], [1]), (5, 0, 3), "not supported inside of vmap"),
]


@pytest.mark.parametrize("name, fn, shape, msg", AS_STRIDED_ERRORS,
                         ids=[a[0] for a in AS_STRIDED_ERRORS])
def test_as_strided_outside_the_example_raises(name, fn, shape, msg):
    # Beyond one example's memory lies the next example's: torch.func refuses, and so must we
    # (the loop would read other memory than the batched call).
    x = torch.randn(shape)
    with pytest.raises(RuntimeError, match=msg):
        tf.vmap(fn)(x)
    with pytest.raises(RuntimeError, match=msg):
        ftrans.vmap(fn)(x)
    x = torch.randn(5, 4)
    inside = lambda t: t.as_strided([2], [2])  # noqa: E731
    torch.testing.assert_close(ftrans.vmap(inside)(x), tf.vmap(inside)(x))


def test_sparse_input_returned_as_is():
    x = torch.randn(3, 4).to_sparse()
    out = ftrans.vmap(lambda t: t)(x)
    assert out.layout == torch.sparse_coo
    torch.testing.assert_close(out.to_dense(), x.to_dense())


@pytest.mark.parametrize("fn", [torch.conj, torch._neg_view, lambda t: t.conj().imag],
                         ids=["conj", "neg_view", "conj_imag"])
def test_nested_vmap_conj_and_neg_views_keep_their_bits(fn):
    # An output that aliases the input through a conj/neg bit is not an as_strided view of it:
    # at a nested level the wrapper's own bits say nothing, the physical value's do.
    z = torch.randn(4, 6, 3, dtype=torch.complex128)
    expected = torch.stack([torch.stack([fn(z[i, j]) for j in range(6)]) for i in range(4)])
    torch.testing.assert_close(ftrans.vmap(ftrans.vmap(fn))(z), expected)
    torch.testing.assert_close(ftrans.vmap(ftrans.vmap(fn), in_dims=1)(z.movedim(0, 1)), expected)


def test_conj_and_neg_bits_read_inside_vmap():
    # The wrapper carries no lazy bits of its own: is_conj()/is_neg() read the physical value's.
    seen = []

    def f(t):
        seen.append((t.is_conj(), t.conj().is_conj(), torch._neg_view(t).is_neg()))
        y = t.conj()
        return y.resolve_conj() if y.is_conj() else y

    z = torch.randn(3, 4, dtype=torch.complex128)
    torch.testing.assert_close(ftrans.vmap(f)(z), z.conj())
    torch.testing.assert_close(ftrans.vmap(ftrans.vmap(f))(z), z.conj())
    assert seen == [(False, True, True)] * 2
