"""FFT kernels.  ``_fft_r2c`` / ``_fft_c2r`` / ``_fft_c2c`` take a list of logical dims to
transform; with the batch dim moved to the front every logical dim is shifted by one, and the
normalization (a function of the transformed sizes) is unchanged.  ``torch.fft.*`` are
CompositeImplicit and reach these three kernels plus views, pads and pointwise ops.

Pitfall 8: rules run below the Python key, where torch has *excluded* the Conjugate and
Negative fallbacks that normally materialize lazy ``conj()`` / ``neg()`` view bits before a
kernel that does not understand them.  The fft kernels do not, and autograd's formulas for
``ifft`` / ``hfft*`` hand them conj views, so inputs are resolved here first; skipping this gave
silently wrong gradients."""
from __future__ import annotations

import torch

from ..registry import register_batch_rule
from ._util import to_front, wrap_dim

aten = torch.ops.aten


@register_batch_rule(aten._fft_r2c.default, aten._fft_c2r.default, aten._fft_c2c.default)
def fft_rule(level, func, args, bdims, kwargs):
    x = to_front(args[0], bdims[0]).resolve_conj().resolve_neg()
    rank = x.dim() - 1
    dims = [wrap_dim(d, rank) + 1 for d in args[1]]
    return func(x, dims, *args[2:], **kwargs), 0
