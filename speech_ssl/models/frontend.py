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

Layout and arithmetic: activations stay channels-last ([B, T, C]) through the whole stack, on every
device. Each strided convolution is a few large matrix products over strided views of its input
(``StridedConv``), forward and backward: on CPUs about twice as fast as oneDNN's conv1d backward for these
shapes, on GPUs tensor-core GEMMs (cuBLAS) where cuDNN picks non-tensor-core kernels for these shapes and
needs NCW transposes. The first block of a waveform model computes conv -> norm as one GEMM
(``normalized_waveform_conv``). Under autocast every block casts its operands once and keeps the low
precision end to end: the norms take their statistics in fp32 but return the activation's dtype, so the
largest activations of the model are never cast or transposed. ``speech_ssl.models.fastpath.generic_ops``
switches all of this off (``F.conv1d``, ``nn.GroupNorm`` / ``nn.LayerNorm``) for the parity tests.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech_ssl.models.config import ModelConfig
from speech_ssl.models.fastpath import bucketed_length, gemm_kernels, low_precision_cpu


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


def _chunks(kernel: int, stride: int, channels: int) -> list[tuple[int, int]]:
    """Split the taps into runs of ``stride`` taps: (offset in the input, width) in flattened [T*C] units.

    Output frame t reads input rows stride*t .. stride*t + kernel - 1. In the flattened input, taps
    c*stride .. c*stride + stride - 1 of frame t are one contiguous run starting at (stride*t + c*stride)*C,
    so with a row stride of stride*C every run is a plain strided matrix: one GEMM per run.
    """
    return [(c * stride * channels, (min(kernel, (c + 1) * stride) - c * stride) * channels)
            for c in range((kernel + stride - 1) // stride)]


def _run_view(x: Tensor, frames: int, stride: int, offset: int, width: int) -> Tensor:
    """[B, frames, width] view of channels-last ``x`` [B, T, C]: row t = x.flat[b, stride*t*C + offset:][:width].

    An ``unfold`` of the flattened rows (a strided view, no copy), which torch.compile traces too.
    """
    batch, time, channels = x.shape
    return x.reshape(batch, time * channels)[:, offset:].unfold(1, width, stride * channels)[:, :frames]


def im2col_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:
    """StridedConv's arithmetic for torch.compile: the taps side by side [B, T', k * C_in], one GEMM.

    x [B, T, C_in]; weight [k, C_in, C_out] (tap-major, like the columns). Every op is functional (the
    compiler derives and fuses the backward; it mis-traces StridedConv's, which writes into views in place)
    and every shape is a plain function of the length: StridedConv's run views are contiguous or not
    depending on the length's parity, which would make the compiler guard on it and recompile.
    """
    kernel, channels, out_channels = weight.shape
    frames = (x.shape[1] - kernel) // stride + 1
    taps = [x[:, tap: tap + stride * (frames - 1) + 1: stride] for tap in range(kernel)]  # [B, T', C_in] each
    y = torch.matmul(torch.cat(taps, dim=-1), weight.reshape(kernel * channels, out_channels))
    return y if bias is None else y + bias


class StridedConv(torch.autograd.Function):
    """conv1d (no padding) over channels-last x [B, T, C_in]; weight [k, C_in, C_out] -> [B, T', C_out]."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        batch, time, channels = x.shape
        kernel, _, out_channels = weight.shape
        frames = (time - kernel) // stride + 1
        w = weight.view(kernel * channels, out_channels)  # rows: (tap, channel)
        y = None
        for offset, width in _chunks(kernel, stride, channels):
            a = _run_view(x, frames, stride, offset, width)
            wk = w[offset:offset + width].expand(batch, width, out_channels)
            y = torch.bmm(a, wk) if y is None else y.baddbmm_(a, wk)
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride = ctx.stride
        grad = grad.contiguous()
        batch, time, channels = x.shape
        kernel, _, out_channels = weight.shape
        frames = grad.shape[1]
        w = weight.view(kernel * channels, out_channels)
        on_cpu = x.device.type == "cpu"
        grad_w = weight.new_empty(kernel * channels, out_channels)
        need_x = ctx.needs_input_grad[0]
        grad_x = x.new_empty(x.shape) if need_x else None
        for index, (offset, width) in enumerate(_chunks(kernel, stride, channels)):
            a = _run_view(x, frames, stride, offset, width)
            rows = grad_w[offset:offset + width]
            if on_cpu:  # dW = sum over utterances of a^T @ grad, accumulated in place (cache-friendly)
                for b in range(batch):
                    if b == 0:
                        torch.mm(a[b].t(), grad[b], out=rows)
                    else:
                        rows.addmm_(a[b].t(), grad[b])
            else:  # one batched GEMM; the per-utterance products are summed in fp32
                rows.copy_(torch.bmm(a.transpose(1, 2), grad).sum(0, dtype=torch.float32))
            if not need_x:
                continue
            w_t = w[offset:offset + width].t()
            if index == 0 and width == stride * channels:
                # The first run tiles rows [0, stride * frames) of dx exactly: write it in place.
                tiled = grad_x[:, :stride * frames].view(batch, frames, width)
                if on_cpu:
                    for b in range(batch):
                        torch.mm(grad[b], w_t, out=tiled[b])
                else:
                    tiled.copy_(torch.bmm(grad, w_t.expand(batch, out_channels, width)))
                grad_x[:, stride * frames:].zero_()
            else:
                if index == 0:
                    grad_x.zero_()
                # later runs overlap earlier rows: a strided view whose rows do not overlap each other
                _run_view(grad_x, frames, stride, offset, width).add_(
                    torch.bmm(grad, w_t.expand(batch, out_channels, width)))
        grad_weight = grad_w.view(kernel, channels, out_channels)
        grad_bias = grad.sum((0, 1), dtype=torch.float32).to(grad.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``x``'s device, or None."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def conv1d_channels_last(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int) -> Tensor:
    """[B, T, C_in] -> [B, T', C_out], no padding; weight [k, C_in, C_out]: our GEMM convolution.

    Under autocast the operands are cast once here (autocast does not reach inside an autograd Function).
    """
    dtype = _autocast_dtype(x) or x.dtype
    with torch.autocast(x.device.type, enabled=False):
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if torch.compiler.is_compiling():
            return im2col_conv(x, weight, bias, stride)
        frames = (x.shape[1] - weight.shape[0]) // stride + 1
        padded = bucketed_length(frames) if low_precision_cpu(x) else frames
        if padded != frames:  # a shape oneDNN has compiled before; the extra frames are cut off
            x = F.pad(x, (0, 0, 0, (padded - frames) * stride))
            return StridedConv.apply(x, weight, bias, stride)[:, :frames]
        return StridedConv.apply(x, weight, bias, stride)


class ChannelNormOverTime(torch.autograd.Function):
    """GroupNorm with one group per channel (each channel normalised over time), channels-last.

    x [B, T, C] -> (x - mean_t) / sqrt(var_t + eps) * weight + bias, in x's dtype. Written out because
    GroupNorm on a channels-last view is slow (a layout copy, or a slow kernel), and under autocast it
    would return fp32 (a cast of this, the model's largest activation, both ways). Here forward and
    backward are a few vectorised passes with per-(utterance, channel) coefficients: the reductions
    accumulate in fp32, the passes over x stay in its dtype.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        # Statistics from two fast reductions (var_mean over a non-inner axis is several times slower);
        # accumulated in fp32 at least, E[x^2] - E[x]^2 is accurate for the near-zero-mean conv outputs.
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean = x.mean(dim=1, keepdim=True, dtype=acc)  # [B, 1, C]
        var = (x * x).mean(dim=1, keepdim=True, dtype=acc) - mean * mean
        rstd = torch.rsqrt(var.clamp(min=0) + eps)
        scale = rstd * weight.to(acc)
        y = torch.addcmul((bias.to(acc) - mean * scale).to(x.dtype), x, scale.to(x.dtype))
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight, mean, rstd = ctx.saved_tensors  # mean, rstd in the accumulation dtype
        time = x.shape[1]
        acc = mean.dtype
        sum_g = grad.sum(dim=1, keepdim=True, dtype=acc)  # [B, 1, C]
        sum_gx = (grad * x).sum(dim=1, keepdim=True, dtype=acc)
        sum_gxhat = rstd * (sum_gx - mean * sum_g)  # sum_t grad * xhat
        grad_weight = sum_gxhat.sum(dim=(0, 1))
        grad_bias = sum_g.sum(dim=(0, 1))
        # dx = rstd * w * (g - mean_t(g) - xhat * mean_t(g * xhat)), as a * g + c * x + d per (b, c)
        a = rstd * weight.to(acc)
        c = -a * rstd * sum_gxhat / time
        d = -a * sum_g / time - c * mean
        grad_x = torch.addcmul(torch.addcmul(d.to(x.dtype), x, c.to(x.dtype)), grad, a.to(x.dtype))
        return grad_x, grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


def layer_norm_keep_dtype(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """``norm(x)`` in x's dtype even under autocast (which would return fp32: a cast both ways of a large
    activation). torch's kernels accumulate the statistics of a bf16 / fp16 input in fp32."""
    if x.dtype == norm.weight.dtype:
        return norm(x)
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)


def normalized_waveform_conv(x: Tensor, block: "ConvBlock") -> Tensor:
    """norm(conv(waveform)) in one matrix product, for the first block ([B, S, 1] -> [B, T', C]).

    A one-channel input has narrow windows (``kernel`` samples), so the statistics of the convolution's
    output follow from those of the windows without computing the output first:

    * group norm (each channel over time): mean_c = mean(w) . w_c + b_c and E[y_c^2] = w_c' S w_c + ...
      from the windows' mean and second-moment matrix S; the normalisation is then a per-utterance scale
      of the weights and a shift: one GEMM writes the normalised output;
    * layer norm (each frame over channels): mean_t and E_t[y^2] are quadratic forms of the window x_t
      with the channel-averaged weights; rstd_t scales the window and three extra columns carry the
      shifts: again one GEMM.

    The same function as conv -> norm (to rounding; statistics in float64), without the passes over
    the [B, T', C] output that a separate norm makes forward and backward.
    """
    batch, samples, _ = x.shape
    kernel, stride = block.weight.shape[0], block.stride
    frames = (samples - kernel) // stride + 1
    windows = x.reshape(batch, samples).unfold(1, kernel, stride)[:, :frames].contiguous()
    weight = block.weight.view(kernel, -1)  # [k, C]
    channels = weight.shape[1]
    bias = block.bias if block.bias is not None else weight.new_zeros(channels)
    gamma, beta, eps = block.norm.weight, block.norm.bias, block.norm.eps
    w64, b64, win64 = weight.double(), bias.double(), windows.double()
    if block.norm_kind == "group":
        mean_window = win64.mean(dim=1)  # [B, k]
        second = torch.bmm(win64.transpose(1, 2), win64) / frames  # [B, k, k]
        mean = mean_window @ w64 + b64  # [B, C]
        # E[y^2] = w' S w + 2 b (mean_window . w) + b^2
        square = (torch.matmul(second, w64) * w64).sum(dim=1) + 2 * b64 * (mean_window @ w64) + b64 * b64
        rstd = torch.rsqrt((square - mean * mean).clamp(min=0) + eps)
        scale = (rstd * gamma.double()).to(x.dtype)  # [B, C]
        shift = (beta.double() + (b64 - mean) * rstd * gamma.double()).to(x.dtype)
        return _bucketed_rows(lambda rows: torch.baddbmm(shift.unsqueeze(1), rows, weight.unsqueeze(0) * scale.unsqueeze(1)),
                              windows)
    # layer norm over the C channels of each frame
    mean_w, mean_b = w64.mean(dim=1), b64.mean()  # [k], []
    gram = w64 @ w64.t() / channels  # [k, k]
    cross = w64 @ b64 / channels  # [k]
    mean = win64 @ mean_w + mean_b  # [B, T']
    square = ((win64 @ gram) * win64).sum(-1) + 2 * (win64 @ cross) + (b64 * b64).mean()
    rstd = torch.rsqrt((square - mean * mean).clamp(min=0) + eps)
    # y = rstd_t * (x_t . w_c + b_c - mean_t) * gamma_c + beta_c, as [rstd*x, rstd, -rstd*mean, 1] @ [w*g; b*g; g; beta]
    columns = torch.cat([windows * rstd.to(x.dtype).unsqueeze(-1), rstd.to(x.dtype).unsqueeze(-1),
                         (-rstd * mean).to(x.dtype).unsqueeze(-1), torch.ones_like(windows[..., :1])], dim=-1)
    rows = torch.cat([weight * gamma, (bias * gamma).unsqueeze(0), gamma.unsqueeze(0), beta.unsqueeze(0)], dim=0)
    return _bucketed_rows(lambda padded: torch.matmul(padded, rows), columns)


def _bucketed_rows(gemm, operand: Tensor) -> Tensor:
    """``gemm(operand)`` for an operand [B, M, K] whose M rows are independent; on CPUs in bf16 / fp16 with
    M padded to a bucketed length (``fastpath.bucketed_length``: a shape oneDNN has compiled before) and
    the extra rows cut off again."""
    if not low_precision_cpu(operand, _autocast_dtype(operand)):
        return gemm(operand)
    frames = operand.shape[1]
    padded = bucketed_length(frames)
    if padded == frames:
        return gemm(operand)
    return gemm(F.pad(operand, (0, 0, 0, padded - frames)))[:, :frames]


class ConvBlock(nn.Module):
    """One front-end block: Conv1d -> (GroupNorm | LayerNorm over channels | nothing) -> GELU.

    Channels-last [B, T, C_in] -> [B, T', C_out] with T' = floor((T - kernel) / stride) + 1. The
    convolution weight is stored tap-major, [kernel, C_in, C_out] (a Conv1d weight permuted (2, 1, 0)),
    so that it is the GEMM operand as it stands; the converters permute it for other layouts.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool,
                 norm: Optional[str], eps: float = 1e-5):
        super().__init__()
        self.stride = stride
        weight = torch.empty(out_channels, in_channels, kernel)
        nn.init.kaiming_normal_(weight)  # fairseq's init, on the Conv1d layout
        self.weight = nn.Parameter(weight.permute(2, 1, 0).contiguous())
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

    def forward(self, x: Tensor) -> Tensor:
        if not gemm_kernels(x):  # the reference path: torch's own conv and norms
            x = F.conv1d(x.transpose(1, 2), self.weight.permute(2, 1, 0), self.bias, stride=self.stride)
            if self.norm_kind == "group":
                x = self.norm(x)
            x = x.transpose(1, 2)
            if self.norm_kind == "layer":
                x = self.norm(x)
            return F.gelu(x)
        if x.shape[-1] == 1 and self.norm is not None:
            return F.gelu(normalized_waveform_conv(x, self))
        x = conv1d_channels_last(x, self.weight, self.bias, self.stride)
        if self.norm_kind == "group":
            with torch.autocast(x.device.type, enabled=False):
                x = ChannelNormOverTime.apply(x, self.norm.weight, self.norm.bias, self.norm.eps)
        elif self.norm_kind == "layer":
            x = layer_norm_keep_dtype(x, self.norm)
        return F.gelu(x)


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

    def forward(self, inputs: Tensor) -> Tensor:
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
        for layer in self.layers:
            x = layer(x)
        if self.grad_scale != 1.0 and x.requires_grad:
            x = GradScale.apply(x, self.grad_scale)
        return x
