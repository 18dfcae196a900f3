"""Recurrent layers written with out-of-place ops, for use under transforms.

torch's fused RNN functions (``_VF.gru``, ``_VF.lstm``, ``_VF.gru_cell``, ...) are
CompositeImplicitAutograd kernels in C++ that update gate buffers *in place*
(``hgates.add_(igates).sigmoid_()``).  Under vmap the hidden state often starts unbatched (a
``zeros`` initial state) while the input is batched, and an in-place write of batched values into
an unbatched buffer cannot be done.  torch.func gives up there; ftrans instead swaps these
functions, at the torch-function layer (above autograd), for the equivalent out-of-place
formulas below, which every other transform then handles like any other ops.

Gate layouts are torch's: GRU ``r, z, n`` with ``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``,
LSTM ``i, f, g, o`` with an optional projection ``h = (o * tanh(c)) @ W_hr^T``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["OVERRIDES"]


def _linear(x, w, b):
    return F.linear(x, w, b)


def rnn_tanh_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.tanh(_linear(input, w_ih, b_ih) + _linear(hx, w_hh, b_hh))


def rnn_relu_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return torch.relu(_linear(input, w_ih, b_ih) + _linear(hx, w_hh, b_hh))


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    gi = _linear(input, w_ih, b_ih).chunk(3, -1)
    gh = _linear(hx, w_hh, b_hh).chunk(3, -1)
    r = torch.sigmoid(gi[0] + gh[0])
    z = torch.sigmoid(gi[1] + gh[1])
    n = torch.tanh(gi[2] + r * gh[2])
    return (1 - z) * n + z * hx


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None):
    h, c = hx
    gates = _linear(input, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if w_hr is not None:
        h = h @ w_hr.t()
    return h, c


def _layer_params(params, has_biases, num_layers, bidirectional, proj):
    per = 2 + 2 * has_biases + proj
    dirs = 2 if bidirectional else 1
    params = list(params)
    out = []
    for layer in range(num_layers):
        row = []
        for d in range(dirs):
            p = params[(layer * dirs + d) * per:(layer * dirs + d + 1) * per]
            w_ih, w_hh = p[0], p[1]
            b_ih, b_hh = (p[2], p[3]) if has_biases else (None, None)
            w_hr = p[-1] if proj else None
            row.append((w_ih, w_hh, b_ih, b_hh, w_hr))
        out.append(row)
    return out


def _run_stack(cell, input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
               batch_first, is_lstm):
    # input: [T, N, C] or [N, T, C] (or unbatched [T, C]); hx: [L*D, N, H] (or [L*D, H])
    unbatched = input.dim() == 2
    if unbatched:
        input = input.unsqueeze(1)
        hx = tuple(h.unsqueeze(1) for h in hx) if is_lstm else hx.unsqueeze(1)
    elif batch_first:
        input = input.transpose(0, 1)
    proj = is_lstm and hx[0].shape[-1] != hx[1].shape[-1]
    layers = _layer_params(params, has_biases, num_layers, bidirectional, proj)
    dirs = 2 if bidirectional else 1
    h_n, c_n = [], []
    x = input
    T = x.shape[0]
    for li, row in enumerate(layers):
        outs = []
        for d, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(row):
            idx = li * dirs + d
            if is_lstm:
                state = (hx[0][idx], hx[1][idx])
            else:
                state = hx[idx]
            steps = range(T - 1, -1, -1) if d == 1 else range(T)
            seq = [None] * T
            for t in steps:
                if is_lstm:
                    state = cell(x[t], state, w_ih, w_hh, b_ih, b_hh, w_hr)
                    seq[t] = state[0]
                else:
                    state = cell(x[t], state, w_ih, w_hh, b_ih, b_hh)
                    seq[t] = state
            outs.append(torch.stack(seq))
            if is_lstm:
                h_n.append(state[0])
                c_n.append(state[1])
            else:
                h_n.append(state)
        x = outs[0] if dirs == 1 else torch.cat(outs, -1)
        if dropout and train and li < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
    out = x
    if unbatched:
        out = out.squeeze(1)
    elif batch_first:
        out = out.transpose(0, 1)
    h_n = torch.stack(h_n)
    if unbatched:
        h_n = h_n.squeeze(1)
    if is_lstm:
        c_n = torch.stack(c_n)
        if unbatched:
            c_n = c_n.squeeze(1)
        return out, h_n, c_n
    return out, h_n


def _rnn_fn(cell):
    def fn(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
           batch_first=False, *rest):
        if not isinstance(batch_first, bool):  # packed-sequence overload: leave it to torch
            raise NotImplementedError
        return _run_stack(cell, input, hx, params, has_biases, num_layers, dropout, train,
                          bidirectional, batch_first, False)

    return fn


def lstm(input, hx, params, has_biases, num_layers, dropout, train, bidirectional,
         batch_first=False, *rest):
    if not isinstance(batch_first, bool):
        raise NotImplementedError
    return _run_stack(lstm_cell, input, tuple(hx), params, has_biases, num_layers, dropout,
                      train, bidirectional, batch_first, True)


def _lstm_cell_fn(input, hx, w_ih, w_hh, b_ih=None, b_hh=None):
    return lstm_cell(input, tuple(hx), w_ih, w_hh, b_ih, b_hh)


def _overrides():
    from torch import _VF

    table = {}
    for name, fn in (
        ("rnn_tanh_cell", rnn_tanh_cell), ("rnn_relu_cell", rnn_relu_cell),
        ("gru_cell", gru_cell), ("lstm_cell", _lstm_cell_fn),
        ("gru", _rnn_fn(gru_cell)), ("rnn_tanh", _rnn_fn(rnn_tanh_cell)),
        ("rnn_relu", _rnn_fn(rnn_relu_cell)), ("lstm", lstm),
    ):
        for owner in (_VF, torch):
            f = getattr(owner, name, None)
            if f is not None:
                table[f] = fn
    return table


OVERRIDES = _overrides()
