"""Norm rules of F.embedding_bag and the transposed convolutions, against vmap(grad) + clip.

float64, 1e-10; every test also asserts that the rule ran (nothing instantiated per example
in ``ftrans.norm_rule_stats()``) unless it is about a declined call.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ftrans
from _helpers import close, float64_norm_rules  # noqa: F401 (autouse fixture)
from ftrans.dp import Outer, Scatter
from ftrans.dp.capture import run

DT = torch.float64

# torch.func's oracle has no batching rule for the embedding_bag backward (a loop, warned).
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")




def flat_norms(per):
    return torch.cat([g.reshape(len(g), -1) for g in per.values()], 1).norm(dim=1)


def check(loss, params, args, in_dims, C=0.6, stats=None):
    """norms and clipped sum equal torch.func's per-example gradients, clipped and summed."""
    dims = (None,) + tuple(in_dims)
    per = torch.func.vmap(torch.func.grad(loss), in_dims=dims)(params, *args)
    norms = flat_norms(per)
    assert norms.min() > 0  # every example has a gradient: the check can fail
    close(ftrans.per_sample_grad_norms(loss, in_dims=dims)(params, *args), norms)
    got = ftrans.clipped_grad(loss, C, in_dims=dims)(params, *args)
    c = (C / norms).clamp(max=1)
    assert (c < 1).any()  # some example is clipped
    for k, g in per.items():
        close(got[k], torch.einsum("b,b...->...", c, g))
    assert ftrans.norm_rule_stats() == (stats or {}), ftrans.norm_rule_stats()
    return per


def factor_of(loss, params, args, in_dims, key):
    """The factor the capture built for ``params[key]``."""
    cap = run(loss, 0, (None,) + tuple(in_dims), False, (params,) + tuple(args), {}, "test")
    names = sorted(params)
    return cap.factors[names.index(key)]


# ------------------------------------------------------------------------- embedding_bag

def _offsets(B, T, nb, last, shared, gen):
    """Sorted offsets starting at 0 with an empty bag; ``[nb(+1)]`` or ``[B, nb(+1)]``."""
    def one():
        cuts = torch.randint(1, T, (nb - 1,), generator=gen).sort().values
        cuts[nb // 2] = cuts[nb // 2 - 1] if nb > 2 else cuts[0]  # an empty bag
        o = torch.cat([torch.zeros(1, dtype=torch.long), cuts])
        return torch.cat([o, torch.tensor([T])]) if last else o
    return one() if shared else torch.stack([one() for _ in range(B)])


BAG_CASES = [
    # mode, layout, padding_idx, per_sample_weights, include_last_offset, shared offsets, T
    ("sum", "2d", None, False, False, None, 6),
    ("sum", "2d", 3, True, False, None, 6),
    ("mean", "2d", None, False, False, None, 5),
    ("mean", "2d", -2, False, False, None, 5),
    ("max", "2d", None, False, False, None, 6),
    ("max", "2d", 0, False, False, None, 6),
    ("sum", "1d", None, True, False, True, 11),
    ("sum", "1d", 2, False, True, False, 11),
    ("mean", "1d", 4, False, False, False, 11),
    ("mean", "1d", None, False, True, True, 11),
    ("max", "1d", None, False, True, False, 11),
    ("max", "1d", 1, False, False, True, 11),
    # long bags: the segment-sum norm (T > Scatter.GHOST_MAX_T), and > 8 max-mode bags
    ("sum", "1d", 5, True, False, False, 150),
    ("mean", "2d", None, False, False, None, 90),
    ("max", "1d", 3, False, True, False, 150),
]


@pytest.mark.parametrize("mode,layout,pad,psw,last,shared,T", BAG_CASES)
def test_embedding_bag_functional(mode, layout, pad, psw, last, shared, T):
    gen = torch.Generator().manual_seed(T * 7 + len(mode))
    B, V, d = 5, 9, 4  # a small table: indices repeat within and across bags
    nb = 12 if T > 100 else 3
    p = {"w": torch.randn(V, d, generator=gen)}
    proj = torch.randn(d, generator=gen)
    if layout == "2d":
        x = torch.randint(0, V, (B, nb, T), generator=gen)
        off, off_dim = None, None
    else:
        x = torch.randint(0, V, (B, T), generator=gen)
        off = _offsets(B, T, nb, last, shared, gen)
        off_dim = None if shared else 0
    if pad is not None:
        x.view(-1)[::4] = pad % V  # padding entries, and a bag made only of padding
        first = T if layout == "2d" else int((off if shared else off[0])[1])
        x[0].view(-1)[:first] = pad % V
    sw = torch.rand(x.shape, generator=gen) + 0.5 if psw else None

    def loss(p, x, off, sw):
        o = F.embedding_bag(x, p["w"], off, mode=mode, per_sample_weights=sw, padding_idx=pad,
                            include_last_offset=last)
        return torch.sin(o @ proj + o.sum(-1)).sum()

    check(loss, p, (x, off, sw), (0, off_dim, 0 if psw else None))
    f = factor_of(loss, p, (x, off, sw), (0, off_dim, 0 if psw else None), "w")
    assert isinstance(f, Scatter) and f.columns == (mode == "max")


def test_embedding_bag_weights_from_a_parameter():
    """per_sample_weights computed from another parameter: both rules, and the backward
    reaches the bag's output through the weights."""
    gen = torch.Generator().manual_seed(3)
    p = {"w": torch.randn(10, 5, generator=gen), "a": torch.randn(1, 3, generator=gen)}
    x = torch.randint(0, 10, (6, 2, 7), generator=gen)
    feat = torch.randn(6, 2, 7, 3, generator=gen)

    def loss(p, x, feat):
        sw = torch.sigmoid(F.linear(feat, p["a"]).squeeze(-1))
        return F.embedding_bag(x, p["w"], mode="sum", per_sample_weights=sw).tanh().sum()

    check(loss, p, (x, feat), (0, 0))


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_int32_indices(mode):
    gen = torch.Generator().manual_seed(12)
    p = {"w": torch.randn(12, 5, generator=gen)}
    x = torch.randint(0, 12, (4, 9), generator=gen).to(torch.int32)
    off = torch.tensor([0, 3, 3, 7], dtype=torch.int32)

    def loss(p, x, off):
        return F.embedding_bag(x, p["w"], off, mode=mode, padding_idx=2).sin().sum()

    check(loss, p, (x, off), (0, None))


class BagModel(nn.Module):
    def __init__(self, mode, padding_idx=None):
        super().__init__()
        self.bag = nn.EmbeddingBag(30, 8, mode=mode, padding_idx=padding_idx)
        self.head = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, t, off=None, sw=None):
        return self.head(self.bag(t, off, per_sample_weights=sw))


@pytest.mark.parametrize("mode,pad,psw", [("mean", 0, False), ("sum", None, True),
                                          ("max", 1, False), ("sum", 2, False)])
def test_embedding_bag_module(mode, pad, psw):
    torch.manual_seed(4)
    model = BagModel(mode, pad)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randint(0, 30, (7, 3, 5))
    if pad is not None:
        x[:, :, 1] = pad
    y = torch.randint(0, 3, (7, 3))
    sw = torch.rand(7, 3, 5) if psw else None

    def loss(p, x, y, sw):
        return F.cross_entropy(ftrans.functional_call(model, p, (x, None, sw)), y)

    check(loss, params, (x, y, sw), (0, 0, 0 if psw else None), C=0.3)


def test_embedding_bag_declined_option_falls_back_exactly():
    # scale_grad_by_freq (per-example frequencies): declined, instantiated by autograd
    gen = torch.Generator().manual_seed(5)
    p = {"w": torch.randn(8, 3, generator=gen)}
    x = torch.randint(0, 8, (4, 2, 5), generator=gen)

    def loss(p, x):
        return F.embedding_bag(x, p["w"], mode="sum", scale_grad_by_freq=True).sin().sum()

    # norms and clipped sum: one fallback each
    check(loss, p, (x,), (0,), stats={"embedding_bag": 2})


@pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus's full-backward-hook notice
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_against_opacus(mode):
    """Opacus's EmbeddingBag grad sampler: one bag per example, 1-D input with offsets (no
    repeated index within a bag: its ``gsm[i][index] += ...`` does not accumulate repeats)."""
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(6)
    model = BagModel(mode)
    B, L = 6, 4
    x = torch.stack([torch.randperm(30)[:L] for _ in range(B)])
    y = torch.randint(0, 3, (B,))
    gsm = opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    F.cross_entropy(gsm(x.reshape(-1), torch.arange(0, B * L, L)), y, reduction="sum").backward()
    per = {n.removeprefix("_module."): p.grad_sample for n, p in gsm.named_parameters()}
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        out = ftrans.functional_call(model, p, (x, torch.tensor([0])))
        return F.cross_entropy(out, y.unsqueeze(0))

    norms = flat_norms(per)
    close(ftrans.per_sample_grad_norms(loss)(params, x, y), norms)
    got = ftrans.clipped_grad(loss, 0.2)(params, x, y)
    c = (0.2 / norms).clamp(max=1)
    for k, g in per.items():
        close(got[k], torch.einsum("b,b...->...", c, g))
    assert ftrans.norm_rule_stats() == {}


def test_scatter_norm_paths_agree():
    """Ghost, segment-sum and instantiated norms of the same Scatter (rows and columns)."""
    gen = torch.Generator().manual_seed(7)
    for T in (3, 40, 200):
        idx = torch.randint(0, 11, (4, T), generator=gen)
        g = torch.randn(4, T, 5, generator=gen)
        s = Scatter(idx, g, 11)
        close(s.norm2(), s.materialize().flatten(1).square().sum(1))
        cols = Scatter(torch.randint(0, 11, (4, T, 5), generator=gen), g, 11)
        close(cols.norm2(), cols.materialize().flatten(1).square().sum(1))
        c = torch.rand(4, generator=gen)
        close(cols.weighted(c), torch.einsum("b,b...->...", c, cols.materialize()))
        v = torch.randn(11, 5, generator=gen)
        close(cols.dot(v), (cols.materialize() * v).sum((1, 2)))


# ------------------------------------------------------------------ transposed convolution

@settings(max_examples=25, deadline=None, derandomize=True)
@given(nd=st.integers(1, 3), groups=st.sampled_from([1, 2]), k=st.integers(1, 3),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), pad=st.integers(0, 2),
       out_pad=st.integers(0, 1), bias=st.booleans(), batched=st.booleans(),
       seq=st.integers(1, 2), torch_fn=st.booleans())
def test_conv_transpose_configs(nd, groups, k, stride, dilation, pad, out_pad, bias, batched,
                                seq, torch_fn):
    if out_pad >= max(stride, dilation):
        out_pad = 0
    pad = min(pad, dilation * (k - 1))  # output size stays positive
    conv = getattr(torch if torch_fn else F, f"conv_transpose{nd}d")
    gen = torch.Generator().manual_seed(nd * 100 + k * 10 + stride)
    p = {"w": torch.randn(4, 6 // groups, *(k,) * nd, generator=gen)}
    if bias:
        p["b"] = torch.randn(6, generator=gen)
    size = (5, 4, 3)[:nd]

    def loss(p, x):
        xin = x if batched else x[0]
        return conv(xin, p["w"], p.get("b"), stride, pad, out_pad, groups,
                    dilation).sin().sum()

    x = torch.randn(3, seq if batched else 1, 4, *size, generator=gen)
    ftrans.reset_norm_rule_stats()
    check(loss, p, (x,), (0,), C=1.0)


@pytest.mark.parametrize("nd,stride,pad,out_pad,dilation,groups", [
    (1, 1, 0, 1, 2, 1),  # output_padding >= stride (allowed by the dilation): trimmed high side
    (2, 1, 2, 1, 2, 2),
    (2, (2, 1), (1, 0), (1, 0), (1, 2), 1),  # per-dim tuples
    (3, 2, 1, 1, 1, 2),
    (2, 3, 0, 2, 1, 1),
])
def test_conv_transpose_output_padding(nd, stride, pad, out_pad, dilation, groups):
    gen = torch.Generator().manual_seed(11)
    conv = getattr(F, f"conv_transpose{nd}d")
    p = {"w": torch.randn(4, 4 // groups, *(3,) * nd, generator=gen),
         "b": torch.randn(4, generator=gen)}

    def loss(p, x):
        return conv(x, p["w"], p["b"], stride, pad, out_pad, groups, dilation).sin().sum()

    check(loss, p, (torch.randn(3, 2, 4, *(4,) * nd, generator=gen),), (0,))


@pytest.mark.parametrize("spatial,cin,ghost", [(2, 16, True), (9, 2, False)])
def test_conv_transpose_ghost_or_instantiated_by_cost(spatial, cin, ghost):
    """Few input positions and wide blocks: Gram norms; many positions: this layer's
    per-example gradient instantiated.  Both exact."""
    gen = torch.Generator().manual_seed(8)
    p = {"w": torch.randn(cin, 8, 3, 3, generator=gen)}

    def loss(p, x):
        return F.conv_transpose2d(x, p["w"], stride=2, padding=1, output_padding=1).tanh().sum()

    x = torch.randn(4, 1, cin, spatial, spatial, generator=gen)
    check(loss, p, (x,), (0,))
    f = factor_of(loss, p, (x,), (0,), "w")
    assert isinstance(f, Outer) and f.use_ghost() == ghost


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4 * 3 * 3)
        self.up1 = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.norm = nn.GroupNorm(2, 4)
        self.up2 = nn.ConvTranspose2d(4, 2, 2, stride=1, dilation=2, bias=False)
        self.head = nn.Conv2d(2, 3, 3)

    def forward(self, z):
        h = self.fc(z).view(-1, 4, 3, 3)
        h = torch.relu(self.norm(self.up1(h)))
        h = torch.tanh(self.up2(h, output_size=[8, 8]))
        return self.head(h).mean((2, 3))


def test_conv_transpose_modules():
    torch.manual_seed(9)
    model = Decoder()
    params = {k: v.detach() for k, v in model.named_parameters()}
    z, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def loss(p, z, y):
        return F.cross_entropy(ftrans.functional_call(model, p, (z.unsqueeze(0),)),
                               y.unsqueeze(0))

    check(loss, params, (z, y), (0, 0), C=0.2)

    m1 = nn.Sequential(nn.ConvTranspose1d(3, 4, 4, stride=3, padding=2, output_padding=2),
                       nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))
    m1(torch.randn(1, 3, 5))
    p1 = {k: v.detach() for k, v in m1.named_parameters()}
    x1 = torch.randn(4, 3, 5)

    def loss1(p, x):
        return ftrans.functional_call(m1, p, (x.unsqueeze(0),)).sin().sum()

    check(loss1, p1, (x1,), (0,), C=0.2)


def test_bag_and_conv_transpose_under_compile():
    torch.manual_seed(10)
    bag, up = nn.EmbeddingBag(20, 4, mode="max"), nn.ConvTranspose1d(4, 2, 3, stride=2)
    params = {"bag": bag.weight.detach(), "up": up.weight.detach(), "b": up.bias.detach()}

    def loss(p, t, off):
        h = F.embedding_bag(t, p["bag"], off, mode="max")  # [12 bags, 4]
        return F.conv_transpose1d(h.T.unsqueeze(0), p["up"], p["b"], 2).sin().sum()

    t = torch.randint(0, 20, (4, 100))
    off = torch.arange(0, 100, 8)[:12]
    f = ftrans.compile(ftrans.clipped_grad(loss, 0.5, in_dims=(None, 0, None)))
    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, None))(params, t, off)
    c = (0.5 / flat_norms(per)).clamp(max=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ftrans.CompileWarning)
        for _ in range(2):
            got = f(params, t, off)
            for k, g in per.items():
                close(got[k], torch.einsum("b,b...->...", c, g))
    assert len(f.cache) == 1 and ftrans.norm_rule_stats() == {}
