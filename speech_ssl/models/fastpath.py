"""The switch for our CPU kernels (GEMM convolutions, cheap dropout masks, hand-written attention backward).

They compute the same functions as the generic torch ops they replace (``F.conv1d``, ``F.dropout``,
``scaled_dot_product_attention``), only faster on the CPU; the generic ops run on other devices, or
everywhere inside ``with generic_ops():`` (used by the tests to check that both paths agree).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor

_enabled = True


def cpu_kernels(x: Tensor) -> bool:
    """Whether ``x`` should go through our CPU kernels."""
    return _enabled and x.device.type == "cpu"


@contextlib.contextmanager
def generic_ops() -> Iterator[None]:
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous
