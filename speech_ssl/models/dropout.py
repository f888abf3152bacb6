"""``Dropout``: ``nn.Dropout``'s module, whose masks are cheap to draw on the CPU (``fastpath.dropout``: one
64-bit draw makes four 16-bit lanes, p rounded to a multiple of 2^-15; torch's own dropout on other devices).
"""

from __future__ import annotations

from torch import Tensor, nn

from speech_ssl.models import fastpath


class Dropout(nn.Module):
    """Drop-in for ``nn.Dropout`` (identity in eval mode or when p == 0)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must lie in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return fastpath.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
