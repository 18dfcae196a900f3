"""DP-SGD on top of :func:`ftrans.clipped_grad`: Poisson subsampling, padding to a few batch-size
buckets, Gaussian noise, and privacy accounting by a maintained accountant library.

Poisson subsampling (each example joins a step's batch independently with probability ``q``)
is what the privacy analysis assumes, and it makes every batch a different size.  A traced
function (``ftrans.compile``) would retrace for every size; instead each batch is padded up to a
*bucket* (multiples of the expected batch size ``q * N``: by default ``1x``, ``1.5x``, ``2x``,
then doubling), and the padded slots get a sample weight of 0, so that their clipped
gradient is multiplied by exactly 0 and the sum is that of the real batch.  Padding repeats
real examples (finite values: ``0 * nan`` would not be 0).  Over an epoch of Poisson batches
this is 2-3 traces in all.

The noise is ``N(0, (noise_multiplier * max_norm)^2)`` per coordinate of the clipped sum; the
result is divided by the *expected* batch size (the unbiased scale under Poisson sampling, as
Opacus does).  Drawing it costs about as much as a third of a small model's step on one CPU
core (the A.3 MLP: 0.67 M normals, 1.6 ms against a 4.9 ms step), so on CPU the next step's
noise is drawn ahead, in a worker thread, while the caller computes (``prefetch_noise=True``,
the default), and the next clipped sum is added into it (``clipped_grad``'s ``add_to=``: the
sum has no buffer of its own): the price is memory, one parameter-sized set of noise held from
one step to the next.  With ``prefetch_noise=False`` the noise is drawn into the clipped sums a chunk at a time
and the step holds no noise buffer.  Either way it comes from a generator of the step's own,
seeded once from ``generator`` (or from torch's global generator), drawn by the same calls in
the same order: a seeded run gives the same noise with or without prefetching, whatever the
threads' timing; each draw is used once, and the worker never shares a generator with the
caller.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Sequence

import torch

from .. import _pytree
from .capture import normalize_in_dims
from .transforms import clipped_grad

__all__ = ["DPSGD", "poisson_batches", "bucket_size", "pad_batch", "make_accountant"]


def poisson_batches(num_examples: int, sample_rate: float, steps: Optional[int] = None, *,
                    generator: Optional[torch.Generator] = None):
    """Yield index tensors of Poisson-subsampled batches: each example is in each batch
    independently with probability ``sample_rate``; ``steps`` batches (default: one epoch,
    ``round(1 / sample_rate)``).  Batches may be empty."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"poisson_batches: sample_rate must be in (0, 1], got {sample_rate}")
    steps = round(1 / sample_rate) if steps is None else steps
    for _ in range(steps):
        mask = torch.rand(num_examples, generator=generator) < sample_rate
        yield mask.nonzero().squeeze(1)


def bucket_size(size: int, expected: float, ladder: Sequence[float] = (1.0, 1.5, 2.0)) -> int:
    """The padded batch size for a batch of ``size`` examples: the first ``ceil(m * expected)``
    of the ladder that holds it, doubling past the ladder's end."""
    expected = max(1.0, expected)
    for m in ladder:
        cap = math.ceil(m * expected)
        if size <= cap:
            return cap
    cap = math.ceil(ladder[-1] * expected)
    while cap < size:
        cap *= 2
    return cap


def pad_batch(args, in_dims, size: int):
    """Pad every mapped argument of ``args`` to ``size`` examples along its ``in_dims`` entry by
    repeating real examples; returns ``(padded args, weights)`` with weight 1 for real
    examples and 0 for padding."""
    leaves, spec = _pytree.tree_flatten(args)
    dims = _pytree.tree_leaves(_pytree.tree_broadcast_prefix(tuple(in_dims), tuple(args)))
    n = None
    for x, d in zip(leaves, dims):
        if d is not None:
            n = x.shape[d]
            break
    if n is None or n == 0:
        raise ValueError("pad_batch: need at least one real example to pad with")
    if size < n:
        raise ValueError(f"pad_batch: batch of {n} does not fit in {size}")
    idx = torch.arange(size) % n
    out = []
    for x, d in zip(leaves, dims):
        out.append(x if d is None or size == n else x.index_select(d, idx.to(x.device)))
    weights = (torch.arange(size) < n).to(torch.get_default_dtype())
    return _pytree.tree_unflatten(spec, out), weights


def make_accountant(kind: str = "rdp"):
    """An accountant from Opacus (``"rdp"``, ``"prv"``, ``"gdp"``), or an ImportError saying how
    to install it."""
    try:
        from opacus.accountants import create_accountant
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("privacy accounting needs Opacus's accountants: "
                          "pip install 'ftrans[dp]' (or pip install opacus)") from e
    return create_accountant(kind)


class DPSGD:
    """Noisy clipped gradients of a one-example loss, step by step, with accounting.

    Args:
        func: the loss of ONE example, as for :func:`ftrans.clipped_grad`.
        max_norm: clipping bound (a number, or ``{group: bound}`` with ``groups``).
        noise_multiplier: noise standard deviation in units of the (total) clipping bound.
        sample_rate: Poisson sampling probability ``q`` (expected batch ``q * N``).
        num_examples: dataset size ``N`` (sets the expected batch size).
        argnums, in_dims, groups, batch_norm: as for :func:`ftrans.clipped_grad`;
            ``batch_norm='batch'`` is refused (an example's contribution depends on the others).
        compile: run the clipped sum through :func:`ftrans.compile` (one trace per bucket).
        ladder: bucket multiples of the expected batch size (see the module docstring).
        accountant: ``"rdp"`` (default), ``"prv"``, ``"gdp"`` or None (no accounting).
        generator: a ``torch.Generator`` seeding the noise (seeded runs).
        prefetch_noise: draw the next step's noise in a worker thread while the caller
            computes (CPU tensors only; holds one parameter-sized noise set between steps);
            False draws it into the sums in chunks (no buffer; see the module docstring).

    ``step(*args)`` takes the real (variable-size) batch and returns the noisy gradient,
    shaped like the ``argnums`` inputs; ``epsilon(delta)`` the privacy spent so far.

    Example:
        >>> import torch, ftrans
        >>> w = torch.zeros(3)
        >>> loss = lambda w, x, y: (x @ w - y) ** 2
        >>> dp = ftrans.dp.DPSGD(loss, max_norm=1.0, noise_multiplier=1.0, sample_rate=0.1,
        ...                      num_examples=100, accountant=None)
        >>> x, y = torch.randn(100, 3), torch.randn(100)
        >>> for idx in ftrans.dp.poisson_batches(100, 0.1, steps=2):
        ...     g = dp.step(w, x[idx], y[idx])
        >>> g.shape
        torch.Size([3])
    """

    def __init__(self, func: Callable, *, max_norm: Any, noise_multiplier: float,
                 sample_rate: float, num_examples: int, argnums: Any = 0, in_dims: Any = 0,
                 groups: Any = None, batch_norm: str = "error", compile: bool = False,
                 ladder: Sequence[float] = (1.0, 1.5, 2.0), accountant: Optional[str] = "rdp",
                 generator: Optional[torch.Generator] = None, prefetch_noise: bool = True):
        if batch_norm == "batch":
            raise ValueError("DPSGD: batch_norm='batch' is not differentially private (each "
                             "example's contribution depends on the others); use 'eval' or "
                             "'per_sample'")
        if noise_multiplier < 0:
            raise ValueError(f"DPSGD: noise_multiplier must be >= 0, got {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"DPSGD: sample_rate must be in (0, 1], got {sample_rate}")
        self.func, self.argnums, self.in_dims = func, argnums, in_dims
        self.max_norm, self.noise_multiplier = max_norm, noise_multiplier
        self.sample_rate, self.expected = sample_rate, sample_rate * num_examples
        self.ladder, self.generator = tuple(ladder), generator
        # The noise's own generator, seeded once, on ``generator``'s device (a CUDA generator
        # draws on the GPU): draws in a worker thread never race with the caller's use of
        # ``generator`` or of the global generator (dropout, sampling).
        dev = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator, device=dev))
        self._noise_gen = torch.Generator(device=dev).manual_seed(seed)
        self.prefetch_noise = prefetch_noise
        self._pending = None  # (key, future) of the next step's noise
        self._pool = self._pool_pid = None
        bounds = max_norm.values() if isinstance(max_norm, dict) else [max_norm]
        self.sensitivity = math.sqrt(sum(float(b) ** 2 for b in bounds))
        fn = clipped_grad(func, max_norm, argnums, in_dims=in_dims, groups=groups,
                          batch_norm=batch_norm)
        if compile:
            from ..compiler import compile as _compile
            fn = _compile(fn)
        self._clipped = fn
        self.accountant = make_accountant(accountant) if accountant else None
        self.steps = 0

    def step(self, *args):
        """The noisy gradient for one (Poisson) batch ``args``; an empty batch gives noise only."""
        from .._autodiff_common import check_argnums, select_argnums
        form = "DPSGD.step(*args)"
        argnums = check_argnums(self.argnums, len(args), form)
        dims = normalize_in_dims(self.in_dims, argnums, len(args), form)
        diff = select_argnums(args, argnums)
        n = _batch_of(args, dims)
        std = self.noise_multiplier * self.sensitivity
        scale = 1.0 / max(self.expected, 1.0)
        inputs, in_spec = _pytree.tree_flatten(diff)
        # The noise, scale * std * N(0, 1): drawn ahead (a worker thread drew it during the
        # previous step) or now, into buffers the clipped sum is then added into (add_to=: the
        # step's sum has no buffer of its own); or, when not drawing ahead, drawn into the sums
        # a chunk at a time after they are formed (no parameter-sized noise buffer at all).
        key = (float(std * scale),) + tuple((tuple(x.shape), x.dtype) for x in inputs)
        noise = self._noise(key, inputs) if std > 0 else None
        if n == 0:
            leaves = noise if noise is not None else [torch.zeros_like(x) for x in inputs]
        else:
            padded, weights = pad_batch(args, dims, bucket_size(n, self.expected, self.ladder))
            weights = weights.to(device=inputs[0].device, dtype=inputs[0].dtype)
            # The 1 / expected-batch scale rides on the per-example weights (B numbers), not
            # on a pass over the summed gradient.
            extra = {} if noise is None else {"add_to": _pytree.tree_unflatten(in_spec, noise)}
            summed = self._clipped(*padded, sample_weights=weights * scale, **extra)
            leaves = _pytree.tree_leaves(summed)
        if std > 0 and noise is None:
            leaves = [_add_normal(g, std * scale, self._noise_gen) for g in leaves]
        if std > 0:
            self._draw_ahead(key, inputs)
        out = _pytree.tree_unflatten(in_spec, leaves)
        self.steps += 1
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier,
                                 sample_rate=self.sample_rate)
        return out

    def _ahead(self, inputs) -> bool:
        return self.prefetch_noise and self._noise_gen.device.type == "cpu" and all(
            x.device.type == "cpu" for x in inputs)

    def _noise(self, key, inputs):
        """This step's noise buffers: the draw made ahead for it, or drawn now; None when the
        noise is to be drawn into the sums instead (``prefetch_noise=False``, or not on CPU)."""
        if self._pool is not None and self._pool_pid != os.getpid():
            # A forked child: the worker thread did not come along, and the draw made ahead
            # for the parent's next step was copied with the memory (used here too, the same
            # noise would be added by two processes). Start afresh, with a generator seeded
            # from the child's global generator.
            self._pool = self._pending = None
            seed = int(torch.randint(0, 2 ** 62, ()))
            self._noise_gen = torch.Generator(device=self._noise_gen.device).manual_seed(seed)
        pending, self._pending = self._pending, None
        if pending is not None:
            made = pending[1].result()  # (waits: one thread at a time uses the generator)
            if pending[0] == key:
                return made  # (a draw that does not fit is dropped, never reused)
        if not self._ahead(inputs):
            return None
        return _draw(key, self._noise_gen)

    def _draw_ahead(self, key, inputs):
        """Start drawing the next step's noise (same shapes and scale) in the worker."""
        if not self._ahead(inputs):
            return
        if self._pool is None:
            import concurrent.futures
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="ftrans-dp-noise")
            self._pool_pid = os.getpid()
        self._pending = (key, self._pool.submit(_draw, key, self._noise_gen))

    def close(self):
        """Stop the noise worker (it also stops when the object is collected)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def epsilon(self, delta: float) -> float:
        """Privacy spent so far (``(epsilon, delta)``-DP) by the accountant."""
        if self.accountant is None:
            raise RuntimeError("DPSGD: created with accountant=None")
        return float(self.accountant.get_epsilon(delta=delta))

    @property
    def traces(self) -> int:
        """How many signatures ``compile`` traced (0 when not compiled)."""
        return len(getattr(self._clipped, "cache", {}))


_CHUNK = 1 << 16  # normals per draw call: the same calls whether drawn ahead or in place


def _draw(key, generator):
    std, shapes = key[0], key[1:]
    out = []
    for shape, dtype in shapes:
        t = torch.empty(shape, dtype=dtype, device=generator.device)
        flat = t.view(-1)
        for i in range(0, flat.numel(), _CHUNK):
            flat[i:i + _CHUNK].normal_(0.0, std, generator=generator)
        out.append(t)
    return out


def _add_normal(g, std, generator):
    """``g + N(0, std^2)``, written into ``g`` (a fresh sum of the step) a chunk at a time when
    it is contiguous and on the generator's device: the same numbers as :func:`_draw`, no
    buffer of ``g``'s size."""
    if not (g.device == generator.device and g.is_contiguous()):
        return g + _draw((std, (tuple(g.shape), g.dtype)), generator)[0].to(g.device)
    flat = g.view(-1)
    buf = torch.empty(min(_CHUNK, flat.numel()), dtype=g.dtype, device=g.device)
    for i in range(0, flat.numel(), _CHUNK):
        part = flat[i:i + _CHUNK]
        z = buf[:part.numel()].normal_(0.0, std, generator=generator)
        part.add_(z)  # (z + g elementwise: the same sums as the drawn-ahead path's z.add_(g))
    return g


def _batch_of(args, dims) -> int:
    leaves = _pytree.tree_leaves(args)
    flat_dims = _pytree.tree_leaves(_pytree.tree_broadcast_prefix(tuple(dims), tuple(args)))
    for x, d in zip(leaves, flat_dims):
        if d is not None:
            return x.shape[d]
    raise ValueError("DPSGD.step: no argument is mapped over examples (in_dims)")
