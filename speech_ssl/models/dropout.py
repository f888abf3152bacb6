"""Dropout whose mask is cheap to draw on the CPU (torch's own dropout is used on other devices).

``torch.nn.Dropout`` on the CPU draws one Bernoulli sample per element, about half of the cost of
dropout on the attention probabilities of a BASE model. Here one 64-bit draw from torch's global
generator (``Tensor.random_``) yields four lanes (three of 16 bits, one of 15), each compared with a
threshold: the keep probability is ``1 - p`` rounded to a multiple of 2^-16 (2^-15 for every fourth
element; |error| < 2e-5), and kept values are scaled by
``1 / (1 - p)`` exactly as ``nn.Dropout`` does. The randomness still comes only from torch's global RNG,
so saving and restoring ``torch.get_rng_state()`` reproduces it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def drop_mask(shape: torch.Size, p: float) -> Tensor:
    """A BoolTensor of ``shape``, True (dropped) with probability p (CPU)."""
    count = 1
    for size in shape:
        count *= size
    # Tensor.random_() on int64 gives 63 random bits: lanes 0-2 are uniform 16-bit, lane 3 uniform 15-bit.
    lanes = torch.empty((count + 3) // 4, dtype=torch.int64).random_().view(torch.int16).view(-1, 4)
    low = -32768 + round(p * 65536)
    thresholds = torch.tensor([low, low, low, round(p * 32768)], dtype=torch.int16)
    return (lanes < thresholds).view(-1)[:count].view(shape)


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
    if x.device.type != "cpu" or p >= 1.0:
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
