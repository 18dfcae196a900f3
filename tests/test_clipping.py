"""ftrans.per_sample_grad_norms / clipped_grad against vmap(grad) + per-example clip + sum.

Every model runs in float64 and must match the torch.func oracle (or a per-example loop where
torch.func cannot run the model: RNNs) to 1e-10, with no op falling back to instantiation unless
the test is about the fallback.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ftrans
from _helpers import close, float64_norm_rules  # noqa: F401 (autouse fixture)

DT = torch.float64




def reference(loss, params, args, in_dims=None, loop=False):
    """Per-example gradients: torch.func.vmap(grad) or a loop of torch.func.grad."""
    in_dims = in_dims or (None,) + (0,) * len(args)
    if not loop:
        return torch.func.vmap(torch.func.grad(loss), in_dims=in_dims)(params, *args)
    B = next(a.shape[d] for a, d in zip(args, in_dims[1:]) if d is not None)
    per = [torch.func.grad(loss)(params, *[a if d is None else a.select(d, i)
                                           for a, d in zip(args, in_dims[1:])])
           for i in range(B)]
    return {k: torch.stack([p[k] for p in per]) for k in params}


def flat_norms(per):
    return torch.cat([g.reshape(len(g), -1) for g in per.values()], 1).norm(dim=1)


def clipped_reference(per, C, weights=None):
    c = (C / flat_norms(per)).clamp(max=1)
    if weights is not None:
        c = c * weights
    return {k: torch.einsum("b,b...->...", c, g) for k, g in per.items()}


def check_model(model, args, targets, *, C=0.7, loop=False, prep=None):
    params = {k: v.detach() for k, v in model.named_parameters()}
    prep = prep or (lambda x: x.unsqueeze(0))

    def loss(p, x, y):
        return F.cross_entropy(ftrans.functional_call(model, p, (prep(x),)), y.unsqueeze(0))

    per = reference(loss, params, (args, targets), loop=loop)
    before = {k: v.clone() for k, v in params.items()}
    close(ftrans.per_sample_grad_norms(loss)(params, args, targets), flat_norms(per))
    got = ftrans.clipped_grad(loss, C)(params, args, targets)
    ref = clipped_reference(per, C)
    assert got.keys() == ref.keys()
    for k in ref:
        close(got[k], ref[k])
    for k in params:  # inputs untouched
        assert torch.equal(params[k], before[k])
    check_add_to(ftrans.clipped_grad(loss, C), (params, args, targets), ref)
    assert ftrans.norm_rule_stats() == {}, ftrans.norm_rule_stats()
    return loss, params


def check_add_to(clipped, args, ref):
    """``add_to=``: the clipped sum added into given tensors in place (contiguous ones, and
    transposed views for matrices), which are the result."""
    g = torch.Generator().manual_seed(1)
    for layout in ("contiguous", "transposed"):
        acc = {}
        for k, r in ref.items():
            if layout == "transposed" and r.dim() == 2:
                acc[k] = torch.randn(r.shape[::-1], dtype=r.dtype, generator=g).mT
            else:
                acc[k] = torch.randn(r.shape, dtype=r.dtype, generator=g)
        start = {k: v.clone() for k, v in acc.items()}
        out = clipped(*args, add_to=acc)
        for k in ref:
            assert out[k] is acc[k]
            close(out[k], start[k] + ref[k])


# ------------------------------------------------------------------------------- models

def test_mlp():
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(inplace=True), nn.Linear(16, 16),
                          nn.Tanh(), nn.Linear(16, 3))
    check_model(model, torch.randn(9, 10), torch.randint(0, 3, (9,)))


def test_cnn_groupnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(6 * 3 * 3, 3))
    check_model(model, torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,)))


def test_conv1d_instancenorm_and_conv3d_layernorm():
    m1 = nn.Sequential(nn.Conv1d(3, 4, 3, padding="same", dilation=2),
                       nn.InstanceNorm1d(4, affine=True), nn.Conv1d(4, 2, 2, stride=2, groups=2),
                       nn.Flatten(), nn.Linear(2 * 4, 3))
    check_model(m1, torch.randn(5, 3, 8), torch.randint(0, 3, (5,)))
    m3 = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 1)),
                       nn.LayerNorm([4, 4, 2, 4]), nn.Flatten(), nn.Linear(4 * 4 * 2 * 4, 3))
    check_model(m3, torch.randn(3, 2, 4, 4, 4), torch.randint(0, 3, (3,)))


class Block(nn.Module):
    """Embedding + a transformer encoder block (sequence dims, padding mask) + head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16, padding_idx=0)
        self.blk = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, t):
        h = self.blk(self.emb(t), src_key_padding_mask=(t == 0))
        return self.head(h[:, :1].sum(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # the torch.func oracle
def test_transformer_block_padding_mask():
    t = torch.randint(1, 20, (4, 7))
    t[0, 4:] = 0
    t[2, 2:] = 0
    check_model(Block(), t, torch.randint(0, 3, (4,)))


class Text(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.rnn = rnn(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, t):
        o, _ = self.rnn(self.emb(t))
        return self.head(o[:, -1])


@pytest.mark.parametrize("rnn", [nn.GRU, nn.LSTM])
def test_rnn_text_model(rnn):
    # torch.func cannot vmap the fused RNN kernels: the oracle is a loop of torch.func.grad.
    check_model(Text(rnn), torch.randint(0, 20, (4, 5)), torch.randint(0, 3, (4,)), loop=True)


class Bag(nn.Module):
    """Embedding-heavy: a large table, repeated tokens, a padding index, tied output layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 6, padding_idx=1)
        self.mix = nn.Linear(6, 6)

    def forward(self, t):
        h = torch.tanh(self.mix(self.emb(t))).mean(-2)
        return h @ self.emb.weight.T  # logits over the vocabulary, weight shared


def test_embedding_model_tied_weights():
    t = torch.randint(0, 50, (6, 9))
    t[:, 3] = t[:, 5]  # repeated tokens in every example
    t[1, :4] = 1
    check_model(Bag(), t, torch.randint(0, 50, (6,)))


def test_weight_shared_across_time_steps():
    cell = nn.Linear(5, 5)

    def loss(p, xs):
        h = torch.zeros(5)
        for x in xs:
            h = torch.tanh(F.linear(x + h, p["w"], p["b"]))
        return h.square().sum()

    params = {"w": cell.weight.detach(), "b": cell.bias.detach()}
    xs = torch.randn(4, 6, 5)
    per = reference(loss, params, (xs,))
    close(ftrans.per_sample_grad_norms(loss)(params, xs), flat_norms(per))
    got = ftrans.clipped_grad(loss, 0.3)(params, xs)
    for k, v in clipped_reference(per, 0.3).items():
        close(got[k], v)
    assert ftrans.norm_rule_stats() == {}


def test_matmul_bmm_addmm_parameters():
    p = {"a": torch.randn(4, 3), "b": torch.randn(5, 4), "c": torch.randn(2, 3, 3),
         "d": torch.randn(3), "e": torch.randn(3), "m": torch.randn(3, 3)}

    def loss(p, x):
        h = x @ p["a"]                           # x [T, 4] @ [4, 3]
        h = torch.addmm(p["d"], h, p["m"])    # bias + h @ W
        h = torch.bmm(h.expand(2, -1, -1), p["c"]).sum(0)
        h = h * p["e"] + p["d"] + 0.5 * p["e"] - (p["d"] * 2.0) + 1.0 + p["e"]
        return (p["b"] @ x.T).square().sum() + h.tanh().sum()

    x = torch.randn(6, 7, 4)
    per = reference(loss, p, (x,))
    close(ftrans.per_sample_grad_norms(loss)(p, x), flat_norms(per))
    got = ftrans.clipped_grad(loss, 0.5)(p, x)
    for k, v in clipped_reference(per, 0.5).items():
        close(got[k], v)
    assert ftrans.norm_rule_stats() == {}


@settings(max_examples=15, deadline=None, derandomize=True)
@given(nd=st.integers(1, 3), groups=st.sampled_from([1, 2]), k=st.integers(1, 3),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), pad=st.sampled_from([0, 1, "same"]),
       batched=st.booleans(), seq=st.integers(1, 2))
def test_conv_configs(nd, groups, k, stride, dilation, pad, batched, seq):
    if pad == "same" and stride != 1:
        stride = 1
    conv = getattr(F, f"conv{nd}d")
    w = torch.randn(4, 4 // groups, *(k,) * nd)
    b = torch.randn(4)
    size = (6, 5, 4)[:nd]

    def loss(p, x):
        xin = x if batched else x[0]
        return conv(xin, p["w"], p["b"], stride=stride, padding=pad, dilation=dilation,
                    groups=groups).sin().sum()

    x = torch.randn(3, seq if batched else 1, 4, *size)
    params = {"w": w, "b": b}
    per = reference(loss, params, (x,))
    close(ftrans.per_sample_grad_norms(loss)(params, x), flat_norms(per))
    got = ftrans.clipped_grad(loss, 1.0)(params, x)
    for key, v in clipped_reference(per, 1.0).items():
        close(got[key], v)


# --------------------------------------------------------------------------- the API

def _mlp():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return F.mse_loss(torch.func.functional_call(model, p, (x,)), y)
    return model, params, loss


def test_argnums_tuple_in_dims_and_aux():
    _, params, _ = _mlp()
    x, y = torch.randn(3, 5, 4), torch.randn(5, 2)  # x mapped over dim 1
    scale = torch.tensor(2.0)

    model = _mlp()[0]

    def f(p, s, x, y):
        out = F.mse_loss(torch.func.functional_call(model, p, (x,)).mean(0), y) * s
        return out, {"pred": out.detach() * 0 + x.sum()}

    ref_g = torch.func.vmap(torch.func.grad(f, argnums=(0, 1), has_aux=True),
                            in_dims=(None, None, 1, 0))(params, scale, x, y)[0]
    per = dict(ref_g[0], s=ref_g[1])
    got, aux = ftrans.clipped_grad(f, 0.1, argnums=(0, 1), in_dims=(None, None, 1, 0),
                                   has_aux=True)(params, scale, x, y)
    ref = clipped_reference(per, 0.1)
    for k in params:
        close(got[0][k], ref[k])
    close(got[1], ref["s"])
    close(aux["pred"], x.sum((0, 2)))
    norms, aux2 = ftrans.per_sample_grad_norms(f, argnums=(0, 1), in_dims=(None, None, 1, 0),
                                              has_aux=True)(params, scale, x, y)
    close(norms, flat_norms(per))


def test_sample_weights_zero_removes_examples():
    _, params, loss = _mlp()
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    w = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 2.0])
    per = reference(loss, params, (x, y))
    got = ftrans.clipped_grad(loss, 0.2)(params, x, y, sample_weights=w)
    for k, v in clipped_reference(per, 0.2, w).items():
        close(got[k], v)
    keep = w != 0
    sub = ftrans.clipped_grad(loss, 0.2)(params, x[keep], y[keep], sample_weights=w[keep])
    for k in sub:
        close(got[k], sub[k])


def test_groups_per_layer_and_per_leaf():
    _, params, loss = _mlp()
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    per = reference(loss, params, (x, y))
    layer = lambda name: name.split(".")[0]  # noqa: E731
    norms = ftrans.per_sample_grad_norms(loss, groups=layer)(params, x, y)
    bounds = {"0": 0.05, "2": 0.3}
    got = ftrans.clipped_grad(loss, bounds, groups=layer)(params, x, y)
    for g in ("0", "2"):
        sub = {k: v for k, v in per.items() if k.startswith(g + ".")}
        close(norms[g], flat_norms(sub))
        for k, v in clipped_reference(sub, bounds[g]).items():
            close(got[k], v)
    leaf = ftrans.clipped_grad(loss, 0.1, groups="leaf")(params, x, y)
    for k, v in per.items():
        close(leaf[k], clipped_reference({k: v}, 0.1)[k])


def test_dots_and_cross_batch_attribution():
    model = Bag()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, t, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (t,)).unsqueeze(0),
                               y.unsqueeze(0))

    t1, y1 = torch.randint(0, 50, (5, 4)), torch.randint(0, 50, (5,))
    t2, y2 = torch.randint(0, 50, (3, 4)), torch.randint(0, 50, (3,))
    g1 = torch.cat([v.flatten(1) for v in reference(loss, params, (t1, y1)).values()], 1)
    g2 = torch.cat([v.flatten(1) for v in reference(loss, params, (t2, y2)).values()], 1)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    vflat = torch.cat([v[k].flatten() for k in params])
    close(ftrans.per_sample_grad_dots(loss)(v, params, t1, y1), g1 @ vflat)
    close(ftrans.per_sample_grad_cross(loss)((params, t1, y1), (params, t2, y2)), g1 @ g2.T)
    mlp, mp, mloss = _mlp()
    x1, z1, x2, z2 = torch.randn(4, 4), torch.randn(4, 2), torch.randn(6, 4), torch.randn(6, 2)
    h1 = torch.cat([q.flatten(1) for q in reference(mloss, mp, (x1, z1)).values()], 1)
    h2 = torch.cat([q.flatten(1) for q in reference(mloss, mp, (x2, z2)).values()], 1)
    close(ftrans.per_sample_grad_cross(mloss)((mp, x1, z1), (mp, x2, z2)), h1 @ h2.T)


def test_fallback_is_exact_and_counted():
    p = {"w": torch.randn(3, 4), "s": torch.randn(4)}

    def loss(p, x):  # exp() of a parameter and einsum have no norm rule
        return torch.einsum("ij,j->i", p["w"], x * p["s"].exp()).square().sum()

    x = torch.randn(5, 4)
    per = reference(loss, p, (x,))
    got = ftrans.clipped_grad(loss, 0.4)(p, x)
    for k, v in clipped_reference(per, 0.4).items():
        close(got[k], v)
    stats = ftrans.norm_rule_stats()
    assert stats.get("exp") == 1 and sum(stats.values()) == 2, stats


@pytest.mark.parametrize("rows", [1, 8])
def test_inside_vmap_over_models(rows):
    """Under an outer vmap over models; with 8 rows per example the layers are instantiated in
    the backward (long rows: 2 T^2 > p d) and their factors hold the outer level's values."""
    sizes = (4, 6) if rows == 1 else (3, 2)
    models = [nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], 2))
              for _ in range(3)]
    stacked, _ = torch.func.stack_module_state(models)
    stacked = {k: v.detach() for k, v in stacked.items()}

    def loss(p, x, y):
        return F.mse_loss(ftrans.functional_call(models[0], p, (x,)), y)

    lead = () if rows == 1 else (rows,)
    x, y = torch.randn(5, *lead, sizes[0]), torch.randn(5, *lead, 2)
    got = ftrans.vmap(ftrans.clipped_grad(loss, 0.3), in_dims=(0, None, None))(stacked, x, y)
    norms = ftrans.vmap(ftrans.per_sample_grad_norms(loss), in_dims=(0, None, None))(stacked,
                                                                                     x, y)
    for m in range(3):
        pm = {k: v[m] for k, v in stacked.items()}
        per = reference(loss, pm, (x, y))
        close(norms[m], flat_norms(per))
        for k, v in clipped_reference(per, 0.3).items():
            close(got[k][m], v)


def test_under_compile():
    import warnings
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.GroupNorm(1, 3), nn.Flatten(0),
                          nn.Linear(3 * 4 * 4, 2))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(ftrans.functional_call(model, p, (x.unsqueeze(0),)).unsqueeze(0),
                               y.unsqueeze(0))

    f = ftrans.compile(ftrans.clipped_grad(loss, 0.5))
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 2, (4,))
    ref = clipped_reference(reference(loss, params, (x, y)), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ftrans.CompileWarning)
        for _ in range(2):
            got = f(params, x, y)
            for k, v in ref.items():
                close(got[k], v)
    assert len(f.cache) == 1
    # add_to= under compile: the sums are added into new tensors on every call (one trace)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ftrans.CompileWarning)
        for _ in range(2):
            check_add_to(f, (params, x, y), ref)
    assert len(f.cache) == 3  # without add_to, with contiguous and with transposed buffers


def test_add_to_accumulates_micro_batches_and_checks_its_argument():
    """Gradient accumulation over micro-batches: one buffer, each micro-batch's clipped sum
    added into it, equals the clipped sum of the whole batch (per-example clipping does not
    depend on the batch)."""
    _, params, loss = _mlp()
    x, y = torch.randn(12, 4, dtype=DT), torch.randn(12, 2, dtype=DT)
    clip = ftrans.clipped_grad(loss, 0.4)
    acc = {k: torch.zeros_like(v) for k, v in params.items()}
    for lo in range(0, 12, 5):
        assert clip(params, x[lo:lo + 5], y[lo:lo + 5], add_to=acc) is not None
    whole = clip(params, x, y)
    for k in params:
        close(acc[k], whole[k])
    bad = [({k: v for k, v in acc.items() if k != "0.bias"}, "structure"),
           ({**acc, "0.bias": torch.zeros(5, dtype=DT)}, "shape"),
           ({**acc, "0.bias": acc["0.bias"].float()}, "float32"),
           ({**acc, "0.bias": torch.zeros_like(acc["0.bias"], requires_grad=True)},
            "requires grad"),
           ({**acc, "0.bias": 0.0}, "float"),
           ({**acc, "0.bias": params["0.bias"]}, "shares memory with input"),
           ({**acc, "2.bias": acc["0.bias"][:2]}, "shares memory with add_to leaf")]
    for add_to, what in bad:
        before = {k: v.clone() for k, v in acc.items()}
        with pytest.raises(ValueError, match=r"add_to.*" + what if what == "structure"
                           else "add_to leaf.*" + what):
            clip(params, x, y, add_to=add_to)
        for k in acc:  # nothing was added before the refusal
            assert torch.equal(acc[k], before[k])
    # Compiled, the same refusal: inputs sharing memory are a signature of their own, which
    # runs eagerly (with a CompileWarning) when the function writes one of them.
    compiled = ftrans.compile(clip)
    compiled(params, x, y, add_to=acc)
    with pytest.warns(ftrans.CompileWarning, match="share memory"), \
            pytest.raises(ValueError, match="add_to leaf 1 shares memory with input 1"):
        compiled(params, x, y, add_to={**acc, "0.weight": params["0.weight"]})


# --------------------------------------------------------------------------- errors

def test_errors():
    _, params, loss = _mlp()
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    with pytest.raises(ValueError, match="argument 0 is differentiated"):
        ftrans.clipped_grad(loss, 1.0, in_dims=(0, 0, 0))(params, x, y)
    with pytest.raises(RuntimeError, match="scalar"):
        ftrans.per_sample_grad_norms(lambda p, x, y: x * 2)(params, x, y)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        ftrans.clipped_grad(loss, 0.0)(params, x, y)
    with pytest.raises(ValueError, match="no bound for groups"):
        ftrans.clipped_grad(loss, {"0": 1.0}, groups=lambda n: n[0])(params, x, y)
    with pytest.raises(TypeError, match="callable"):
        ftrans.clipped_grad(3, 1.0)
    with pytest.raises(RuntimeError, match="argnum"):
        ftrans.clipped_grad(loss, 1.0, argnums=5)(params, x, y)
    with pytest.raises(ValueError, match="sample_weights"):
        ftrans.clipped_grad(loss, 1.0)(params, x, y, sample_weights=[1.0])


def test_unused_output():
    p = {"w1": torch.randn(5, 4), "w2": torch.randn(3, 5), "w3": torch.randn(2, 5)}

    def loss(p, x):
        h = F.linear(x, p["w1"]) * 1.0
        F.linear(h, p["w3"])                 # output unused: zero gradient for w3
        out = F.linear(h, p["w2"])
        return out.sin().sum() + h.square().sum()

    x = torch.randn(6, 4)
    per = reference(loss, p, (x,))
    close(ftrans.per_sample_grad_norms(loss)(p, x), flat_norms(per))
    got = ftrans.clipped_grad(loss, 0.3)(p, x)
    for k, v in clipped_reference(per, 0.3).items():
        close(got[k], v)
    assert torch.equal(got["w3"], torch.zeros_like(got["w3"]))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus's full-backward-hook notice
def test_against_opacus_per_sample_gradients():
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.LayerNorm(6),
                          nn.Linear(6, 3))
    x, y = torch.randn(7, 2, 5, 5), torch.randint(0, 3, (7,))
    import copy
    gsm = opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="sum")  # hooks off `model`
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    per = {n.removeprefix("_module."): p.grad_sample for n, p in gsm.named_parameters()}
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        out = torch.func.functional_call(model, p, (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    close(ftrans.per_sample_grad_norms(loss)(params, x, y), flat_norms(per))
    got = ftrans.clipped_grad(loss, 0.2)(params, x, y)
    for k, v in clipped_reference(per, 0.2).items():
        close(got[k], v)


@pytest.mark.parametrize("bias_first", [False, True])
@pytest.mark.parametrize("groups", [None, "leaf"])
def test_bias_shares_the_weight_row_norms_in_either_order(bias_first, groups):
    """A bias on one row per example reuses its weight's ||G_i||^2 (factors.BiasRows): whichever
    of the two is asked first computes it; per leaf and together, against vmap(grad).  (Dict
    leaves flatten in sorted key order: the names pick which comes first.)"""
    gen = torch.Generator().manual_seed(4)
    wk, bk = ("z_w", "a_b") if bias_first else ("a_w", "z_b")
    params = {wk: torch.randn(5, 7, dtype=torch.float64, generator=gen),
              bk: torch.randn(5, dtype=torch.float64, generator=gen)}
    x = torch.randn(6, 7, dtype=torch.float64, generator=gen)

    def loss(p, x):
        return torch.nn.functional.linear(x.unsqueeze(0), p[wk], p[bk]).tanh().sum()

    per = ftrans.vmap(ftrans.grad(loss), in_dims=(None, 0))(params, x)
    w_norm, b_norm = per[wk].flatten(1).norm(dim=1), per[bk].norm(dim=1)
    got = ftrans.per_sample_grad_norms(loss, groups=groups)(params, x)
    if groups is None:
        torch.testing.assert_close(got, (w_norm ** 2 + b_norm ** 2).sqrt(), rtol=1e-10,
                                   atol=1e-10)
    else:
        order = sorted(params)
        torch.testing.assert_close(got[order.index(wk)], w_norm, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got[order.index(bk)], b_norm, rtol=1e-10, atol=1e-10)
    clipped = ftrans.clipped_grad(loss, 0.5, groups=groups)(params, x)
    if groups is None:
        c = (0.5 / (w_norm ** 2 + b_norm ** 2).sqrt()).clamp(max=1)
        cw = cb = c
    else:
        cw, cb = (0.5 / w_norm).clamp(max=1), (0.5 / b_norm).clamp(max=1)
    torch.testing.assert_close(clipped[wk], torch.einsum("b,bij->ij", cw, per[wk]))
    torch.testing.assert_close(clipped[bk], torch.einsum("b,bi->i", cb, per[bk]))


# ------------------------------------------------------------------------------- generated

class _Gen(nn.Module):
    """A stack drawn by hypothesis: linears (with or without bias, on vectors or sequences of
    rows), a parameter as the right operand of ``@``, LayerNorms, activations and an
    elementwise parameter scale (no norm rule: instantiated, counted)."""

    def __init__(self, layers, d):
        super().__init__()
        self.kinds, mods, self.extra = [], nn.ModuleList(), nn.ParameterList()
        for kind, width in layers:
            if kind in ("linear", "linear_nobias"):
                mods.append(nn.Linear(d, width, bias=kind == "linear"))
                d = width
            elif kind == "matmul":
                self.extra.append(nn.Parameter(torch.randn(d, width) / d ** 0.5))
                mods.append(nn.Identity())
                d = width
            elif kind == "layernorm":
                mods.append(nn.LayerNorm(d))
            elif kind == "scale":
                self.extra.append(nn.Parameter(torch.rand(d) + 0.5))
                mods.append(nn.Identity())
            else:
                mods.append(nn.Tanh() if kind == "tanh" else nn.ReLU())
            self.kinds.append(kind)
        self.mods, self.out = mods, nn.Linear(d, 3)

    def forward(self, x):
        extra = iter(self.extra)
        for kind, m in zip(self.kinds, self.mods):
            if kind == "matmul":
                x = x @ next(extra)
            elif kind == "scale":
                x = x * next(extra)
            else:
                x = m(x)
        return self.out(x).sum(-2) if x.dim() == 3 else self.out(x)


_LAYER = st.tuples(st.sampled_from(["linear", "linear_nobias", "matmul", "layernorm", "tanh",
                                    "relu", "scale"]), st.integers(1, 6))


@settings(max_examples=25, deadline=None)
@given(layers=st.lists(_LAYER, min_size=1, max_size=5), d=st.integers(1, 5),
       rows=st.sampled_from([0, 1, 4]), groups=st.sampled_from([None, "leaf"]),
       weighted=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_generated_models_eager_and_compiled(layers, d, rows, groups, weighted, seed):
    """Clipped sums and norms of generated models, eager and through ``ftrans.compile`` (two
    calls: the trace and a replay), equal vmap(grad) + per-example clip + sum in float64."""
    torch.manual_seed(seed)
    model = _Gen(layers, d).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    B = 5
    x = torch.randn(B, *((rows,) if rows else ()), d, dtype=DT)
    y = torch.randint(0, 3, (B,))
    w = torch.rand(B, dtype=DT) if weighted else None

    def loss(p, x, y):
        return F.cross_entropy(ftrans.functional_call(model, p, (x.unsqueeze(0),)),
                               y.unsqueeze(0))

    per = reference(loss, params, (x, y))
    C = 0.5
    if groups is None:
        ref = clipped_reference(per, C, w)
        norms = flat_norms(per)
    else:
        ref = {k: torch.einsum("b,b...->...", (C / g.flatten(1).norm(dim=1)).clamp(max=1)
                               * (1 if w is None else w), g) for k, g in per.items()}
    kw = {} if w is None else {"sample_weights": w}
    clipped = ftrans.clipped_grad(loss, C, groups=groups)
    compiled = ftrans.compile(clipped)
    for got in (clipped(params, x, y, **kw), compiled(params, x, y, **kw),
                compiled(params, x, y, **kw)):
        for k in ref:
            close(got[k], ref[k], 1e-9)
    if groups is None:
        close(ftrans.per_sample_grad_norms(loss)(params, x, y), norms, 1e-9)
    ftrans.reset_norm_rule_stats()  # (the elementwise scale is a counted fallback)
