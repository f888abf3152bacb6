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
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    [B, C_in, T] -> [B, C_out, T'] with T' = floor((T - kernel) / stride) + 1.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool,
                 norm: Optional[str], eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=bias)
        self.norm_kind = norm
        if norm == "group":
            self.norm = nn.GroupNorm(out_channels, out_channels, eps=eps, affine=True)
        elif norm == "layer":
            self.norm = nn.LayerNorm(out_channels, eps=eps, elementwise_affine=True)
        else:
            self.norm = None
        nn.init.kaiming_normal_(self.conv.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.norm_kind == "group":
            x = self.norm(x)
        elif self.norm_kind == "layer":
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


class ConvFeatureEncoder(nn.Module):
    """The conv stack. Waveform [B, S] (or fbank [B, frames, n_mels]) -> features [B, T', C], lengths.

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

    def forward(self, inputs: Tensor) -> Tensor:
        if self.frontend == "conv":
            if inputs.dim() != 2:
                raise ValueError(f"the conv front end takes a waveform batch [B, samples]; got shape "
                                 f"{tuple(inputs.shape)}")
            x = inputs.unsqueeze(1)
        else:
            if inputs.dim() != 3:
                raise ValueError(f"the fbank front end takes features [B, frames, n_mels]; got shape "
                                 f"{tuple(inputs.shape)}")
            x = inputs.transpose(1, 2)
        for layer in self.layers:
            x = layer(x)
        x = x.transpose(1, 2)  # [B, T', C]
        if self.grad_scale != 1.0 and x.requires_grad:
            x = GradScale.apply(x, self.grad_scale)
        return x
