"""The one switch for our kernels, and which device each of them serves.

* ``gemm_kernels``, every device: the front end's convolutions as GEMMs over strided views, the first
  block's conv + norm as one GEMM, norms that keep the activation's dtype (``models.frontend``).
* ``cpu_kernels``, CPUs only: cheap dropout masks and a hand-written attention backward with dropout
  (``models.dropout``, ``models.transformer``); GPUs have fused kernels for these.
* ``bucketed_length``, CPUs in bf16 / fp16: oneDNN compiles a kernel for every new shape of a low-precision
  matrix product (a few milliseconds each, longer than the product itself at our sizes) and keeps the
  last ones; utterance lengths make nearly every shape new. Lengths rounded up to a few dozen buckets an
  octave make the shapes repeat (the front end pads the rows it convolves, the embedder the frames it
  gives the Transformer; the padding is cut off or masked, so the results are the same).

They compute the same functions as the generic torch ops they replace (``F.conv1d``, ``nn.GroupNorm``,
``F.dropout``, ``scaled_dot_product_attention``); inside ``with generic_ops():`` the generic ops run
everywhere (the tests check that both paths agree, on the CPU, for every kernel).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

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


def low_precision_cpu(x: Tensor, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether products of ``x`` run in bf16 / fp16 on a CPU (oneDNN: a kernel per shape); ``dtype``: the
    dtype they run in when it is not x's own (autocast's)."""
    return cpu_kernels(x) and (dtype or x.dtype) in (torch.bfloat16, torch.float16)


def bucketed_length(n: int, per_octave: int = 16) -> int:
    """``n`` rounded up to one of ``per_octave`` evenly spaced lengths an octave (at most 1/16 more)."""
    if n <= per_octave:
        return n
    step = 1 << max(n.bit_length() - 1 - per_octave.bit_length() + 1, 0)
    return -(-n // step) * step
