"""The one switch for our kernels, and which device each of them serves.

* ``gemm_kernels``, every device: the front end's convolutions as GEMMs over strided views, the first
  block's conv + norm as one GEMM, norms that keep the activation's dtype (``models.frontend``).
* ``cpu_kernels``, CPUs only: cheap dropout masks and a hand-written attention backward with dropout
  (``models.dropout``, ``models.transformer``); GPUs have fused kernels for these.

They compute the same functions as the generic torch ops they replace (``F.conv1d``, ``nn.GroupNorm``,
``F.dropout``, ``scaled_dot_product_attention``); inside ``with generic_ops():`` the generic ops run
everywhere (the tests check that both paths agree, on the CPU, for every kernel).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

_enabled = True


def gemm_kernels(x: Tensor) -> bool:
    """Whether ``x`` should go through our front-end kernels (any device)."""
    return _enabled


def cpu_kernels(x: Tensor) -> bool:
    """Whether ``x`` should go through our CPU kernels (not under torch.compile, which fuses its own)."""
    return _enabled and x.device.type == "cpu" and not torch.compiler.is_compiling()


@contextlib.contextmanager
def generic_ops() -> Iterator[None]:
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous
