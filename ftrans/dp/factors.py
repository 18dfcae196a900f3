"""Per-example gradients kept in factored form.

A norm rule does not hand back ``B`` gradients; it hands back a *factor*: an object that knows
what the ``B`` per-example gradients of one parameter are, and answers the only questions a
clipping step asks of them without materialising them unless that is the cheapest way:

- ``norm2()``: ``[B]`` squared L2 norms;
- ``weighted(c)``: ``sum_i c[i] * g_i``, shaped like the parameter (the clipped sum);
- ``dot(v)``: ``[B]`` inner products with a fixed tensor shaped like the parameter;
- ``cross(other)``: ``[B1, B2]`` inner products with the per-example gradients of another batch;
- ``inner(other)``: ``[B]`` inner products ``<g_i, h_i>`` with another factor of the same batch
  (a parameter used by two ops: the norm of the sum needs the cross terms);
- ``materialize()``: ``[B, *param.shape]``, the fallback of every question.

Three shapes cover the parameter-carrying ops:

- :class:`Outer`: ``g_i = sum_t G[i, t]^T A[i, t]`` per group (linear, matmul, convolution
  after unfolding).  Norms by the Gram ("ghost") identity
  ``||G^T A||^2 = sum((A A^T) * (G G^T))`` when ``2 T^2 <= p d`` (BEYOND.md 3.3: the crossover
  fastDP uses), else by instantiating this one layer; the clipped sum is one matmul over all
  ``B * T`` rows with the rows of ``G`` scaled by ``c`` (book-keeping: no second backward).
- :class:`Scatter`: ``g_i`` adds row ``G[i, t]`` into row ``idx[i, t]`` (embedding, embedding
  bags; per column for max-mode bags).  Norms by the ghost identity restricted to equal
  indices for short rows, else by a segment sum over sorted indices.
- :class:`Dense`: ``g_i`` instantiated (normalisation affine parameters, bias adds, and the
  fallback for ops with no norm rule).
"""
from __future__ import annotations

import torch

__all__ = ["Factor", "Dense", "BiasRows", "Outer", "Rows", "Scatter", "Sum", "combine"]


def _sq(t, dims):
    # x * x, not x.square(): the pow kernel is several times slower on CPU.
    return (t * t).sum(dims)


def _rows(t):
    return t.reshape(t.shape[0], -1)


def _into(g, into):
    """``g``, or ``into + g`` written into ``into`` (shaped like the parameter)."""
    if into is None:
        return g
    return into.add_(g.reshape(into.shape))


_ELEMENT_BYTES: dict = {}


def _nbytes(shape, dtype):
    size = _ELEMENT_BYTES.get(dtype)
    if size is None:
        size = _ELEMENT_BYTES[dtype] = torch.finfo(dtype).bits // 8 if dtype.is_floating_point \
            else 8
    return shape.numel() * size


class Factor:
    """Per-example gradients of one parameter; ``shape`` is the parameter's shape."""

    shape: torch.Size

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError

    def norm2(self) -> torch.Tensor:
        return _sq(_rows(self.materialize()), 1)

    def weighted(self, c: torch.Tensor, into: torch.Tensor = None) -> torch.Tensor:
        """``sum_i c_i g_i``; with ``into`` (a tensor of ``shape`` and this dtype), added into
        ``into`` in place, which is returned."""
        if c.dtype != self.dtype:
            c = c.to(self.dtype)
        return _into(torch.tensordot(c, self.materialize(), 1), into)

    def dot(self, v: torch.Tensor) -> torch.Tensor:
        return _rows(self.materialize()) @ v.reshape(-1).to(self.dtype)

    def cross(self, other: "Factor") -> torch.Tensor:
        return _rows(self.materialize()) @ _rows(other.materialize()).mT

    def inner(self, other: "Factor") -> torch.Tensor:
        return (_rows(self.materialize()) * _rows(other.materialize())).sum(1)

    def held_bytes(self) -> int:
        """Bytes of batch tensors this factor keeps alive until its clipped sum is formed
        (orders the clipped sums: the ones that free most go first)."""
        return 0


class Dense(Factor):
    """``g [B, *shape]``: instantiated per-example gradients."""

    def __init__(self, g: torch.Tensor):
        self.g = g
        self.shape = g.shape[1:]
        self.dtype = g.dtype

    def materialize(self):
        return self.g

    def held_bytes(self):
        return _nbytes(self.g.shape, self.g.dtype)


class BiasRows(Dense):
    """The per-example gradient of a bias added to the output of an :class:`Outer` with one row
    per example (``linear`` on a vector): the rows of its ``G``, whose squared norms the weight's
    Gram norm computes too; whichever of the two asks first computes them once."""

    def __init__(self, g: torch.Tensor, partner: "Outer"):
        super().__init__(g)
        self.partner = partner

    def norm2(self):
        partner = self.partner
        if partner._g_norm2 is None:
            partner._g_norm2 = _sq(_rows(self.g), 1)
        return partner._g_norm2


class Rows:
    """The ``A`` operand of an :class:`Outer`, built per span of examples on demand:
    ``fn(lo, hi)`` returns rows ``[hi - lo, n, T, d]`` for examples ``lo:hi`` (a convolution's
    unfolded input, ``prod(k)`` times the input's size, is never formed for the whole batch
    at once)."""

    def __init__(self, fn, shape, dtype):
        self.fn, self.shape, self.dtype = fn, torch.Size(shape), dtype

    def __call__(self, lo, hi):
        return self.fn(lo, hi)


def spans(B, nbytes, budget, most=8):
    """Spans ``(lo, hi)`` of the ``B`` examples with ``nbytes * (hi - lo) / B <= budget``, at
    most ``most`` of them (each span is one more kernel call)."""
    if B <= 1:
        return [(0, B)]
    k = max(1, min(B, most, -(-int(nbytes) // max(int(budget), 1))))
    step = -(-B // k)
    return [(lo, min(B, lo + step)) for lo in range(0, B, step)]


class Outer(Factor):
    """``g_i = post(sum_t G[i, n, t]^T A[i, n, t])`` with ``A [B, n, T, d]``, ``G [B, n, T, p]``.

    ``n`` is the group count (1 except for grouped convolutions); ``post`` reshapes the
    ``[n, p, d]`` block to the parameter's shape, transposing first when ``transpose`` (the
    parameter is the right operand of a matmul: ``[d, p]``).  ``A`` may be a :class:`Rows`
    (built per span of examples).

    Memory (the clipped step should cost what the non-private step does): a :class:`Rows`
    operand is built per span of examples no larger than ``G`` (which is held anyway), and the
    row-scaled copy of the clipped sum is formed per span no larger than the result,
    accumulated in place; at most 8 spans.  Once instantiated (``_raw``), ``A`` and ``G`` are
    dropped.
    """

    MIN_SPAN_BYTES = 1 << 16

    def __init__(self, a, g, shape, transpose=False):
        self._a, self.g = a, g
        self._dims = tuple(a.shape) + (g.shape[-1],)
        self.shape = torch.Size(shape)
        self.transpose = transpose
        self.dtype = g.dtype
        self._raw = None
        self._g_norm2 = None  # [B] ||G_i||^2 when T == n == 1, once computed

    @property
    def a(self):
        a = self._a
        return a(0, a.shape[0]) if isinstance(a, Rows) else a

    def _rows(self, lo, hi):
        a = self._a
        if isinstance(a, Rows):
            return a(lo, hi)
        return a if (lo, hi) == (0, a.shape[0]) else a[lo:hi]

    def _spans(self, per_example_bytes, budget):
        B = self._dims[0]
        return spans(B, per_example_bytes * B, max(self.MIN_SPAN_BYTES, budget))

    @property
    def dims(self):
        return self._dims

    def raw_bytes(self) -> int:
        """Bytes of the instantiated per-example gradients ``[B, n, p, d]``."""
        B, n, _, d, p = self.dims
        return B * n * p * d * self.g.element_size()

    def held_bytes(self) -> int:
        """Bytes this factor keeps alive until its clipped sum is formed."""
        if self._raw is not None:
            return _nbytes(self._raw.shape, self.dtype)
        a = 0 if isinstance(self._a, Rows) else _nbytes(self._a.shape, self._a.dtype)
        return a + _nbytes(self.g.shape, self.dtype)

    def _post(self, raw):  # [..., n, p, d] -> [..., *shape]
        lead = raw.shape[:-3]
        if self.transpose:
            raw = raw.mT
        return raw.reshape(lead + self.shape)

    def _pre(self, v):  # [*shape] -> [n, p, d]
        _, n, _, d, p = self.dims
        if self.transpose:
            return v.reshape(n, d, p).mT
        return v.reshape(n, p, d)

    def _instantiated(self):
        if self._raw is None:
            B, n, T, d, p = self.dims
            lazy = isinstance(self._a, Rows)
            size = self.g.element_size()
            parts = [self.g[lo:hi].mT @ self._rows(lo, hi) for lo, hi in
                     (self._spans(n * T * d * size, B * n * T * p * size) if lazy
                      else [(0, B)])]
            self._raw = parts[0] if len(parts) == 1 else torch.cat(parts)  # [B, n, p, d]
            self._a = self.g = None  # every later question is answered from the blocks
        return self._raw

    def use_ghost(self) -> bool:
        _, _, T, d, p = self.dims
        return 2 * T * T <= p * d

    def materialize(self):
        return self._post(self._instantiated())

    def norm2(self):
        # (One row per example is the ghost case too: ``(a a^T)(g g^T)``, two batched dots,
        # with no ``a * a`` temporary.)
        if self._raw is None and self.use_ghost():
            B, n, T, d, p = self.dims
            g = self.g
            out = []
            size = g.element_size()
            for lo, hi in self._spans(n * T * T * size, B * n * T * (p + d) * size):
                a = self._rows(lo, hi)
                gg = g if (lo, hi) == (0, B) else g[lo:hi]
                if (lo, hi) == (0, B) and T == 1 and n == 1:
                    # ||g_i||^2, shared with a bias on the same output (see BiasRows)
                    if self._g_norm2 is None:
                        self._g_norm2 = (gg @ gg.mT).reshape(B)
                    out.append((a @ a.mT).reshape(B) * self._g_norm2)
                    continue
                out.append(((a @ a.mT) * (gg @ gg.mT)).sum((1, 2, 3)))
            if len(out) == 1:
                self._a = a  # built in one piece: the clipped sum reuses it
                return out[0]
            return torch.cat(out)
        return _sq(self._instantiated(), (1, 2, 3))

    def weighted(self, c, into=None):
        if c.dtype != self.dtype:
            c = c.to(self.dtype)
        if self._raw is not None:
            return _into(self._post(torch.tensordot(c, self._raw, 1)), into)
        if into is not None and not into.is_contiguous():
            return _into(self.weighted(c), into)
        B, n, T, d, p = self.dims
        # Scale the narrower side; one (batched) matmul over the rows of a span of examples,
        # the row operand transposed as a view (no copy when n == 1), accumulated in place.
        size = self.g.element_size()
        # With ``into``, the matmuls accumulate into its [n, p, d] view (a transposed view for
        # a transposed layout: BLAS takes either), so the sum has no buffer of its own.
        out = None if into is None else (self._pre(into) if n > 1 else self._pre(into)[0])
        # Split only when the scaled copy would outgrow the result itself: each span is one
        # more matmul call over fewer rows (the A.3 MLP's first layer took 3 spans and 1.3x
        # the time of one, with no lower peak: the step's peak is elsewhere).
        for lo, hi in self._spans(n * T * min(p, d) * size, n * p * d * size):
            m = hi - lo
            if m == B:  # (one span: no slices)
                a, g, cm = self._rows(0, B), self.g, c
            else:
                a, g, cm = self._rows(lo, hi), self.g[lo:hi], c[lo:hi]
            if p <= d:
                g = g * cm.view(m, 1, 1, 1)
            else:
                a = a * cm.view(m, 1, 1, 1)
            flat_g = g.transpose(0, 1).reshape(n, m * T, p)
            flat_a = a.transpose(0, 1).reshape(n, m * T, d)
            if n == 1:
                fg, fa = flat_g[0].mT, flat_a[0]
                out = fg @ fa if out is None else out.addmm_(fg, fa)
            else:
                fg = flat_g.mT
                out = fg @ flat_a if out is None else out.baddbmm_(fg, flat_a)
        if into is not None:
            return into
        return self._post(out if n > 1 else out.unsqueeze(0))

    def dot(self, v):
        if self._raw is not None:
            return super().dot(v)
        V = self._pre(v.to(self.dtype))  # [n, p, d]
        return ((self.g @ V) * self.a).sum((1, 2, 3))

    def cross(self, other):
        if isinstance(other, Outer) and self._raw is None and other._raw is None \
                and self.dims[1:] == other.dims[1:] \
                and self.transpose == other.transpose and self.dims[2] == 1:
            # One row per example: <g_i, h_j> = (a_i . a'_j)(g_i . g'_j), summed over groups.
            a1, a2 = self.a[:, :, 0], other.a[:, :, 0]
            g1, g2 = self.g[:, :, 0], other.g[:, :, 0]
            return torch.einsum("bnd,cnd,bnp,cnp->bc", a1, a2, g1, g2)
        return super().cross(other)

    def inner(self, other):
        if isinstance(other, Outer) and other.shape == self.shape and self._raw is None \
                and other._raw is None:
            o = other.oriented(self.transpose)
            if o is not None and self.dims[1] == o.dims[1]:
                a1, g1, a2, g2 = self.a, self.g, o.a, o.g
                return ((a1 @ a2.mT) * (g1 @ g2.mT)).sum((1, 2, 3))
        return super().inner(other)

    def oriented(self, transpose: bool):
        """The same gradients as an Outer with the given orientation (swap A and G), if the
        block shapes allow."""
        if transpose == self.transpose:
            return self
        if self._raw is not None:
            return None
        return Outer(self.g, self.a, self.shape, transpose)


class Scatter(Factor):
    """Row scatter: ``g_i[v] = sum_{t: idx[i, t] = v} G[i, t]``; ``idx [B, T]``, ``G [B, T, d]``.

    With ``idx [B, T, d]`` (``columns``), each column has its own indices:
    ``g_i[v, c] = sum_{t: idx[i, t, c] = v} G[i, t, c]`` (the winners of a max-mode embedding
    bag).  Rows at the padding index (or masked entries) must already be zero in ``G``.

    Norms: the ghost identity restricted to equal indices (``O(T^2)`` per example) for short
    rows, else a segment sum over each example's sorted indices (``O(T log T + T d)``, never the
    ``[V, d]`` table).
    """

    GHOST_MAX_T = 64  # rows per example up to which the T x T ghost product is used

    def __init__(self, idx, g, num_rows):
        self.idx, self.g = idx, g
        self.columns = idx.dim() == 3
        self.shape = torch.Size((num_rows, g.shape[-1]))
        self.dtype = g.dtype

    def held_bytes(self):
        return _nbytes(self.g.shape, self.g.dtype) + _nbytes(self.idx.shape, self.idx.dtype)

    def materialize(self):
        B, T, d = self.g.shape
        V = self.shape[0]
        if self.columns:
            return self.g.new_zeros(B, V, d).scatter_add(1, self.idx, self.g)
        offs = torch.arange(B, device=self.idx.device).unsqueeze(1) * V
        out = self.g.new_zeros(B * V, d)
        out = out.index_add(0, (self.idx + offs).reshape(-1), self.g.reshape(-1, d))
        return out.view(B, V, d)

    def norm2(self):
        g, idx = self.g, self.idx
        B, T, d = g.shape
        if T == 1:
            return _sq(g, (1, 2))
        if self.columns:
            if T <= 8:  # few bags per example: per-column ghost over [T, T, d]
                same = idx.unsqueeze(2) == idx.unsqueeze(1)
                return (g.unsqueeze(2) * g.unsqueeze(1) * same).sum((1, 2, 3))
            col = torch.arange(d, device=idx.device)
            keys = (idx * d + col).reshape(B, T * d)
            return _segment_norm2(keys, g.reshape(B, T * d, 1))
        if T <= self.GHOST_MAX_T:
            same = idx.unsqueeze(2) == idx.unsqueeze(1)
            return ((g @ g.mT) * same).sum((1, 2))
        return _segment_norm2(idx, g)

    def weighted(self, c, into=None):
        B, T, d = self.g.shape
        gc = self.g * c.to(self.dtype).view(B, 1, 1)
        out = self.g.new_zeros(self.shape) if into is None else into
        if self.columns:
            out.scatter_add_(0, self.idx.reshape(B * T, d), gc.reshape(B * T, d))
        else:
            out.index_add_(0, self.idx.reshape(-1), gc.reshape(-1, d))
        return out if into is None else into

    def dot(self, v):
        v = v.to(self.dtype)
        if self.columns:
            B, T, d = self.g.shape
            picked = torch.gather(v, 0, self.idx.reshape(B * T, d)).view(B, T, d)
            return (self.g * picked).sum((1, 2))
        return (self.g * v[self.idx]).sum((1, 2))

    def cross(self, other):
        if isinstance(other, Scatter) and not (self.columns or other.columns):
            same = self.idx[:, None, :, None] == other.idx[None, :, None, :]
            dots = torch.einsum("btd,csd->bcts", self.g, other.g)
            return (dots * same).sum((2, 3))
        return super().cross(other)

    def inner(self, other):
        if self.columns:
            return super().inner(other)
        if isinstance(other, Scatter) and not other.columns:
            same = self.idx.unsqueeze(2) == other.idx.unsqueeze(1)
            return ((self.g @ other.g.mT) * same).sum((1, 2))
        if isinstance(other, Outer) and other._raw is None and other.dims[1] == 1:
            # Tied embedding and output layer: row idx_t of the Outer gradient, dotted with G_t.
            o = other.oriented(False)
            a, g = o.a[:, 0], o.g[:, 0]  # [B, S, d], [B, S, V]: rows of W are indexed by p
            rows = torch.gather(g, 2, self.idx.unsqueeze(1).expand(-1, g.shape[1], -1))
            return ((a @ self.g.mT) * rows).sum((1, 2))
        return super().inner(other)


def _segment_norm2(keys, vals):
    """``[B]``: ``sum_k ||sum_{t: keys[i, t] = k} vals[i, t]||^2`` per example, by sorting each
    example's keys and summing equal runs (fixed shapes: at most T segments per example)."""
    B, T = keys.shape
    w = vals.shape[-1]
    sk, perm = keys.sort(1)
    new = torch.cat([torch.ones_like(sk[:, :1], dtype=torch.bool), sk[:, 1:] != sk[:, :-1]], 1)
    seg = new.cumsum(1) - 1 + torch.arange(B, device=keys.device).unsqueeze(1) * T
    v = torch.gather(vals, 1, perm.unsqueeze(-1).expand(B, T, w))
    rows = vals.new_zeros(B * T, w).index_add(0, seg.reshape(-1), v.reshape(B * T, w))
    return _sq(rows, 1).view(B, T).sum(1)


class Sum(Factor):
    """The per-example gradient of a parameter used by several ops: the sum of their factors."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.shape = self.parts[0].shape
        self.dtype = self.parts[0].dtype

    def materialize(self):
        return sum(p.materialize() for p in self.parts)

    def held_bytes(self):
        return sum(p.held_bytes() for p in self.parts)

    def norm2(self):
        out = sum(p.norm2() for p in self.parts)
        for i, p in enumerate(self.parts):
            for q in self.parts[i + 1:]:
                out = out + 2 * _inner(p, q)
        return out

    def weighted(self, c, into=None):
        if into is not None:
            for p in self.parts:
                p.weighted(c, into)
            return into
        return sum(p.weighted(c) for p in self.parts)

    def dot(self, v):
        return sum(p.dot(v) for p in self.parts)

    def cross(self, other):
        others = other.parts if isinstance(other, Sum) else [other]
        return sum(p.cross(q) for p in self.parts for q in others)

    def inner(self, other):
        others = other.parts if isinstance(other, Sum) else [other]
        return sum(_inner(p, q) for p in self.parts for q in others)


def _inner(p, q):
    # Scatter knows its cross terms with an Outer (tied embeddings); the reverse does not.
    if isinstance(q, Scatter) and not isinstance(p, Scatter):
        p, q = q, p
    return p.inner(q)


def combine(parts):
    """One factor for the sum of ``parts`` (a parameter's uses).  Outer blocks of the same
    parameter stack along ``T`` (a weight shared across time steps stays one Gram problem)."""
    if len(parts) == 1:
        return parts[0]
    outers = [p for p in parts if isinstance(p, Outer)]
    rest = [p for p in parts if not isinstance(p, Outer)]
    if len(outers) > 1:
        first = outers[0]
        merged, left = [], []
        for o in outers[1:]:
            o2 = o.oriented(first.transpose)
            if o2.dims[1:2] == first.dims[1:2] and o2.dims[3:] == first.dims[3:]:
                merged.append(o2)
            else:
                left.append(o)
        if merged:
            first = Outer(torch.cat([first.a] + [m.a for m in merged], 2),
                          torch.cat([first.g] + [m.g for m in merged], 2),
                          first.shape, first.transpose)
        outers = [first] + left
    parts = outers + rest
    return parts[0] if len(parts) == 1 else Sum(parts)
