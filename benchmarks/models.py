"""The models the benchmarks (and the no-fallback tests) use."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, sizes=(784, 256, 256, 10)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = x.flatten(-1 if x.dim() == 1 else 1) if x.dim() > 2 else x
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class CNN(nn.Module):
    """conv16-conv32-fc64-fc10 on 1x28x28."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, d=64, heads=4, classes=10):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 4 * d)
        self.ff2 = nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)
        self.heads = heads

    def forward(self, x):  # x: [N, T, d]
        N, T, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q, k, v = (t.reshape(N, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(N, T, d))
        x = x + self.ff2(F.gelu(self.ff1(self.ln2(x))))
        return self.head(x.mean(1))


class GRUClassifier(nn.Module):
    def __init__(self, d_in=16, hidden=32, classes=10):
        super().__init__()
        self.gru = nn.GRU(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):  # x: [N, T, d_in]
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def make(name: str, device="cpu"):
    """(model, example input shape without batch, number of classes)."""
    torch.manual_seed(0)
    if name == "mlp":
        return MLP().to(device), (784,), 10
    if name == "cnn":
        return CNN().to(device), (1, 28, 28), 10
    if name == "transformer":
        return TransformerBlock().to(device), (32, 64), 10
    if name == "gru":
        return GRUClassifier().to(device), (20, 16), 10
    raise KeyError(name)
