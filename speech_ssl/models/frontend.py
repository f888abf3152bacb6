"""Front ends: raw waveform (or filterbank frames) -> a sequence of conv features [B, T', C].

Paper section 2, "feature encoder" f: X -> Z. The BASE encoder is seven temporal convolutions (512
channels, kernels (10,3,3,3,3,2,2), strides (5,2,2,2,2,2,2): 20 ms frames, 25 ms receptive field), each
block conv -> norm -> GELU. Two norm modes, as in fairseq:

* ``group``: a GroupNorm with one group per channel after the first convolution only (BASE). It
  normalises each channel over *time*, so padding changes the statistics: padded batches are not exact.
* ``layer``: a LayerNorm over channels in every block (LV-60k LARGE). Each output frame depends only on
  its own receptive field, so padded batches give the same valid frames as unpadded ones.

The filterbank front end is the same stack fed ``n_mels`` channels (log-mel frames at 10 ms) instead
of one waveform channel; with kernels (3,3) and strides (1,2) it outputs 20 ms frames.

Padded batches: ``ConvFeatureEncoder(inputs, lengths)`` gives the group norm each row's valid steps only
(what the row gets alone); without lengths it normalises over all steps, padding included, as fairseq and
transformers do (``Wav2Vec2Model.extract_features`` passes them with ``exact_padding=True``).

Layout and arithmetic: activations stay channels-last ([B, T, C]) through the whole stack, on every
device. Each strided convolution is a few large matrix products over strided views of its input, forward
and backward: on CPUs about twice as fast as oneDNN's conv1d backward for these shapes, on GPUs
tensor-core GEMMs (cuBLAS) where cuDNN picks non-tensor-core kernels for these shapes and needs NCW
transposes. The first block of a waveform model computes conv -> norm as one GEMM. Under autocast every
block casts its operands once and keeps the low precision end to end: the norms take their statistics in
fp32 but return the activation's dtype, so the largest activations of the model are never cast or
transposed. All of that arithmetic, and the layout of the convolution weights it needs, lives in
``speech_ssl.models.fastpath`` (``conv_block``); its ``generic_ops`` switches it off (``F.conv1d``,
``nn.GroupNorm`` / ``nn.LayerNorm``) for the parity tests.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from speech_ssl.models import fastpath
from speech_ssl.models.config import ModelConfig


class GradScale(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale`` (fairseq GradMultiply)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def conv_output_lengths(lengths: Tensor, kernels: list[int], strides: list[int]) -> Tensor:
    """Valid output frames of an unpadded conv stack for ``lengths`` valid input steps."""
    for kernel, stride in zip(kernels, strides):
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
        lengths = lengths.clamp(min=0)
    return lengths


class ConvBlock(nn.Module):
    """One front-end block: Conv1d -> (GroupNorm | LayerNorm over channels | nothing) -> GELU.

    Channels-last [B, T, C_in] -> [B, T', C_out] with T' = floor((T - kernel) / stride) + 1. The
    parameters are those of a Conv1d and a norm; the convolution weight is kept in the layout of our
    kernels (``fastpath.conv_weight_from_conv1d``), which also compute the forward (``fastpath.conv_block``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool,
                 norm: Optional[str], eps: float = 1e-5):
        super().__init__()
        self.in_channels = in_channels
        self.stride = stride
        weight = torch.empty(out_channels, in_channels, kernel)
        nn.init.kaiming_normal_(weight)  # fairseq's init, on the Conv1d layout
        self.weight = nn.Parameter(fastpath.conv_weight_from_conv1d(weight))
        if bias:
            bound = 1.0 / math.sqrt(in_channels * kernel)  # nn.Conv1d's default bias init
            self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.norm_kind = norm
        if norm == "group":
            self.norm = nn.GroupNorm(out_channels, out_channels, eps=eps, affine=True)
        elif norm == "layer":
            self.norm = nn.LayerNorm(out_channels, eps=eps, elementwise_affine=True)
        else:
            self.norm = None

    def forward(self, x: Tensor, valid: Optional[Tensor] = None) -> Tensor:
        """``valid`` [B]: valid output steps per row (a group norm's statistics over those only)."""
        return fastpath.conv_block(x, self, valid)


class ConvFeatureEncoder(nn.Module):
    """The conv stack. Waveform [B, S] (or fbank [B, frames, n_mels]) -> features [B, T', C].

    Gradients flowing back into the stack are scaled by ``feature_grad_scale`` (0.1 for BASE), which
    fairseq found stabilises training of the front end.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.frontend = cfg.frontend
        self.kernels = list(cfg.conv_kernels)
        self.strides = list(cfg.conv_strides)
        self.grad_scale = cfg.feature_grad_scale
        in_channels = 1 if cfg.frontend == "conv" else cfg.n_mels
        layers = []
        for i, (channels, kernel, stride) in enumerate(zip(cfg.conv_channels, cfg.conv_kernels, cfg.conv_strides)):
            norm = cfg.conv_norm if (cfg.conv_norm == "layer" or i == 0) else None
            layers.append(ConvBlock(in_channels, channels, kernel, stride, cfg.conv_bias, norm))
            in_channels = channels
        self.layers = nn.ModuleList(layers)

    def output_lengths(self, lengths: Tensor) -> Tensor:
        return conv_output_lengths(lengths, self.kernels, self.strides)

    def forward(self, inputs: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """``lengths`` [B]: valid input steps per row; group norms then normalise each row over its valid
        steps only (what the row gets alone). Without them, over all steps (fairseq, transformers)."""
        if self.frontend == "conv":
            if inputs.dim() != 2:
                raise ValueError(f"the conv front end takes a waveform batch [B, samples]; got shape "
                                 f"{tuple(inputs.shape)}")
            x = inputs.unsqueeze(-1)  # [B, S, 1]
        else:
            if inputs.dim() != 3:
                raise ValueError(f"the fbank front end takes features [B, frames, n_mels]; got shape "
                                 f"{tuple(inputs.shape)}")
            x = inputs
        steps = x.shape[1]
        for kernel, stride in zip(self.kernels, self.strides):  # in Python: no tensor, no device read
            steps = max((steps - kernel) // stride + 1, 0)
        if steps < 1:
            raise ValueError(f"input of {x.shape[1]} steps is shorter than the front end's receptive field")
        for layer, kernel, stride in zip(self.layers, self.kernels, self.strides):
            if lengths is not None:
                lengths = conv_output_lengths(lengths, [kernel], [stride])
            x = layer(x, lengths)
        if self.grad_scale != 1.0 and x.requires_grad:
            x = GradScale.apply(x, self.grad_scale)
        return x
