"""Dropout whose mask is cheap to draw on the CPU (torch's own dropout is used on other devices).

``torch.nn.Dropout`` on the CPU draws one Bernoulli sample per element, about half of the cost of
dropout on the attention probabilities of a BASE model. Here one 64-bit draw from torch's global
generator (``Tensor.random_``) yields four 16-bit lanes, each compared with one threshold: the drop
probability is ``p`` rounded to a multiple of 2^-15 (|error| <= 1.6e-5), and kept values are scaled by
``1 / (1 - p)`` exactly as ``nn.Dropout`` does. The randomness still comes only from torch's global RNG,
so saving and restoring ``torch.get_rng_state()`` reproduces it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech_ssl.models.fastpath import cpu_kernels


def drop_mask(shape: torch.Size, p: float) -> Tensor:
    """A BoolTensor of ``shape``, True (dropped) with probability p rounded to a multiple of 2^-15 (CPU)."""
    count = 1
    for size in shape:
        count *= size
    # Tensor.random_() on int64 gives 63 random bits; shifted left by one, its four 16-bit lanes are
    # uniform (the lowest lane over even values only, hence a threshold that is a multiple of 2).
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_().bitwise_left_shift_(1)
    threshold = -32768 + 2 * round(p * 32768)
    return (words.view(torch.int16)[:count] < threshold).view(shape)


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype) -> Tensor:
    """A float mask of ``shape``: 1 / (1 - p) with probability 1 - p, else 0 (CPU)."""
    return torch.where(drop_mask(shape, p), 0.0, 1.0 / (1.0 - p)).to(dtype)


class _MaskedScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    if not training or p == 0.0:
        return x
    if not cpu_kernels(x) or p >= 1.0:
        return F.dropout(x, p, True)
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.dtype))


class Dropout(nn.Module):
    """Drop-in for ``nn.Dropout`` (identity in eval mode or when p == 0)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
