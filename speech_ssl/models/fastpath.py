"""Our kernels, all in this one module, behind one switch (``generic_ops``).

What runs where (each entry point decides for itself; callers never ask):

* ``conv_block``, every device: a front-end block (conv -> norm -> GELU) channels-last, its convolution as
  GEMMs over strided views (``StridedConv``; ``im2col_conv`` under torch.compile), the first block of a
  waveform model as one GEMM with its norm folded in (``normalized_waveform_conv``), norms that keep the
  activation's dtype (``ChannelNormOverTime``, ``layer_norm_keep_dtype``). With ``valid`` steps per row a
  group norm takes its statistics over each row's valid steps only (``masked_channel_norm``): what the row
  gets alone, for padded batches (the embedder).
* ``attention``, ``dropout``, ``residual_dropout``, CPUs only (not under torch.compile, which fuses its own):
  cheap dropout masks (one 64-bit draw makes four 16-bit lanes) and a hand-written attention backward with
  dropout (``_DropoutAttention``); GPUs have fused kernels for these.
* ``padded_length`` (``bucketed_length``), CPUs in bf16 / fp16: oneDNN compiles a kernel for every new shape
  of a low-precision matrix product (a few milliseconds each, longer than the product itself at our sizes)
  and keeps the last ones; utterance lengths make nearly every shape new. Lengths rounded up to a few dozen
  buckets an octave make the shapes repeat (the front end pads the rows it convolves, the embedder the
  frames it gives the Transformer; the padding is cut off or masked, so the results are the same).
* The convolution weights' layout: tap-major, [kernel, C_in, C_out], so that a weight is the GEMM operand
  as it stands. ``conv_weight_from_conv1d`` / ``conv_weight_to_conv1d`` are the only places that know it.

They compute the same functions as the generic torch ops they replace (``F.conv1d``, ``nn.GroupNorm``,
``nn.LayerNorm``, ``F.dropout``, ``scaled_dot_product_attention``); inside ``with generic_ops():`` the
generic ops run everywhere (the tests check that both paths agree, on the CPU, for every kernel).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from speech_ssl.models.frontend import ConvBlock

_enabled = True


# ---------------------------------------------------------------------------------------------------
# The switch
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def generic_ops() -> Iterator[None]:
    """Inside: torch's generic ops everywhere, none of our kernels (the reference for the tests)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def _cpu_kernels(x: Tensor) -> bool:
    """Whether ``x`` goes through our CPU-only kernels (not under torch.compile, which fuses its own)."""
    return _enabled and x.device.type == "cpu" and not torch.compiler.is_compiling()


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``x``'s device, or None."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def bucketed_length(n: int, per_octave: int = 16) -> int:
    """``n`` rounded up to one of ``per_octave`` evenly spaced lengths an octave (at most 1/16 more)."""
    if n <= per_octave:
        return n
    step = 1 << max(n.bit_length() - 1 - per_octave.bit_length() + 1, 0)
    return -(-n // step) * step


def padded_length(n: int, x: Tensor) -> int:
    """``n`` rows of products of ``x``, padded to a bucketed length where they run in bf16 / fp16 on a CPU
    (x's dtype, or autocast's), so that oneDNN meets a shape it has compiled before; else ``n``."""
    dtype = _autocast_dtype(x) or x.dtype
    if _cpu_kernels(x) and dtype in (torch.bfloat16, torch.float16):
        return bucketed_length(n)
    return n


# ---------------------------------------------------------------------------------------------------
# The convolution weights' layout
# ---------------------------------------------------------------------------------------------------

def conv_weight_from_conv1d(weight: Tensor) -> Tensor:
    """A Conv1d weight [C_out, C_in, k] in our layout, tap-major [k, C_in, C_out] (a contiguous copy)."""
    return weight.permute(2, 1, 0).contiguous()


def conv_weight_to_conv1d(weight: Tensor, contiguous: bool = True) -> Tensor:
    """Our tap-major [k, C_in, C_out] weight as a Conv1d weight [C_out, C_in, k] (a view unless contiguous)."""
    weight = weight.permute(2, 1, 0)
    return weight.contiguous() if contiguous else weight


# ---------------------------------------------------------------------------------------------------
# Front end: strided convolutions as GEMMs, norms in the activation's dtype
# ---------------------------------------------------------------------------------------------------

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
        padded = padded_length(frames, x)
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


def normalized_waveform_conv(x: Tensor, block: "ConvBlock", valid: Optional[Tensor] = None) -> Tensor:
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
    the [B, T', C] output that a separate norm makes forward and backward. ``valid`` [B]: a group norm's
    statistics over each row's first ``valid[b]`` frames only (``masked_channel_norm``'s function).
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
        if valid is None:
            mean_window = win64.mean(dim=1)  # [B, k]
            second = torch.bmm(win64.transpose(1, 2), win64) / frames  # [B, k, k]
        else:  # the valid frames' windows only
            count = valid.clamp(min=1).to(torch.float64)[:, None]  # [B, 1]
            kept = win64 * _valid_steps(valid, frames)
            mean_window = kept.sum(dim=1) / count
            second = torch.bmm(kept.transpose(1, 2), win64) / count.unsqueeze(-1)
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
    M padded to a bucketed length (``padded_length``: a shape oneDNN has compiled before) and the extra
    rows cut off again."""
    frames = operand.shape[1]
    padded = padded_length(frames, operand)
    if padded == frames:
        return gemm(operand)
    return gemm(F.pad(operand, (0, 0, 0, padded - frames)))[:, :frames]




def masked_channel_norm(x: Tensor, lengths: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """GroupNorm with one group per channel over the valid steps of each row. x [B, T, C] channels-last.

    Mean and (biased) variance over ``lengths[b]`` steps of row ``b``, accumulated in fp32: a padded row
    gets the statistics it has alone. Padded steps get normalised too (their values are never read by a
    valid output frame of the convolutions that follow). Three passes over x (masked copy, squares,
    output) and no fp32 copy of a bf16 input: this tensor is the largest of the whole model (512
    channels at 3.2 kHz for BASE). E[x^2] - E[x]^2 is accurate here: conv outputs have near-zero mean.
    Plain torch ops (no generic op computes this): the reference and the kernel at once.
    """
    count = lengths.clamp(min=1).to(torch.float32)[:, None, None]
    masked = x * _valid_steps(lengths, x.shape[1]).to(x.dtype)
    mean = masked.sum(dim=1, keepdim=True, dtype=torch.float32) / count
    var = (masked * masked).sum(dim=1, keepdim=True, dtype=torch.float32) / count - mean * mean
    scale = torch.rsqrt(var.clamp(min=0) + eps) * weight.float()
    shift = bias.float() - mean * scale
    return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))


def _valid_steps(lengths: Tensor, time: int) -> Tensor:
    """[B, T, 1] bool: True at the first ``lengths[b]`` steps of row b."""
    return (torch.arange(time, device=lengths.device)[None, :] < lengths[:, None]).unsqueeze(-1)


def conv_block(x: Tensor, block: "ConvBlock", valid: Optional[Tensor] = None) -> Tensor:
    """A front-end block's forward ([B, T, C_in] -> [B, T', C_out]): conv -> norm -> GELU, with
    ``block``'s parameters. ``valid`` [B]: valid output steps per row; a group norm then takes its
    statistics over those only (``masked_channel_norm``), else over all steps as ``nn.GroupNorm`` does."""
    group = block.norm_kind == "group"
    if not _enabled:  # the reference path: torch's own conv and norms
        x = F.conv1d(x.transpose(1, 2), conv_weight_to_conv1d(block.weight, contiguous=False), block.bias,
                     stride=block.stride)
        if group and valid is None:
            x = block.norm(x)
        x = x.transpose(1, 2)
        if group and valid is not None:
            x = masked_channel_norm(x, valid, block.norm.weight, block.norm.bias, block.norm.eps)
        elif block.norm_kind == "layer":
            x = block.norm(x)
        return F.gelu(x)
    if x.shape[-1] == 1 and block.norm is not None:
        return F.gelu(normalized_waveform_conv(x, block, valid))
    x = conv1d_channels_last(x, block.weight, block.bias, block.stride)
    if group:
        with torch.autocast(x.device.type, enabled=False):
            if valid is None:
                x = ChannelNormOverTime.apply(x, block.norm.weight, block.norm.bias, block.norm.eps)
            else:
                x = masked_channel_norm(x, valid, block.norm.weight, block.norm.bias, block.norm.eps)
    elif block.norm_kind == "layer":
        x = layer_norm_keep_dtype(x, block.norm)
    return F.gelu(x)


# ---------------------------------------------------------------------------------------------------
# CPUs: dropout with cheap masks, attention with dropout
# ---------------------------------------------------------------------------------------------------
# ``torch.nn.Dropout`` on the CPU draws one Bernoulli sample per element, about half of the cost of dropout
# on the attention probabilities of a BASE model. Here one 64-bit draw from torch's global generator
# (``Tensor.random_``) yields four 16-bit lanes, each compared with one threshold: the drop probability is
# ``p`` rounded to a multiple of 2^-15 (|error| <= 1.6e-5), and kept values are scaled by ``1 / (1 - p)``
# exactly as ``nn.Dropout`` does. The randomness still comes only from torch's global RNG, so saving and
# restoring ``torch.get_rng_state()`` reproduces it.

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
    """``F.dropout(x, p, training)``; on CPUs with our masks."""
    if not training or p == 0.0:
        return x
    if not _cpu_kernels(x) or p >= 1.0:
        return F.dropout(x, p, True)
    return _MaskedScale.apply(x, keep_mask(x.shape, p, x.dtype))


def residual_dropout(x: Tensor, branch: Tensor, p: float, training: bool) -> Tensor:
    """``x + dropout(branch)``; on CPUs in one pass (addcmul with the scaled keep mask)."""
    if training and 0 < p < 1.0 and _cpu_kernels(x):
        return torch.addcmul(x, branch, keep_mask(branch.shape, p, branch.dtype))
    return x + dropout(branch, p, training)


class _DropoutAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask) with dropout, times v, for CPU training. qkv [3, B*H, T, hd] -> [B*H, T, hd].

    The same arithmetic as SDPA's math path (which torch takes on the CPU whenever dropout is on), with
    a hand-written backward that makes fewer passes over the [B*H, T, T] probabilities, keeps only the
    probabilities and a boolean drop mask for backward, and writes dq, dk, dv into one buffer.
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, key_mask: Optional[Tensor], p: float) -> Tensor:  # type: ignore[override]
        q, k, v = qkv.unbind(0)
        scale = q.shape[-1] ** -0.5
        scores = torch.baddbmm(q.new_empty(()), q, k.transpose(1, 2), beta=0.0, alpha=scale)
        if key_mask is not None:  # [B*H, 1, T] True = padding
            scores.masked_fill_(key_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        del scores
        drop = drop_mask(probs.shape, p)
        out = torch.bmm(torch.where(drop, 0.0, probs), v).mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(qkv, probs, drop)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        qkv, probs, drop = ctx.saved_tensors
        q, k, v = qkv.unbind(0)
        scale = q.shape[-1] ** -0.5
        grad = grad.mul(1.0 / (1.0 - ctx.p))
        kept = torch.where(drop, 0.0, probs)
        grad_qkv = torch.empty_like(qkv)
        torch.bmm(kept.transpose(1, 2), grad, out=grad_qkv[2])  # dv
        grad_probs = torch.where(drop, 0.0, torch.bmm(grad, v.transpose(1, 2)))  # through the dropout
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        torch.bmm(grad_scores, k, out=grad_qkv[0]).mul_(scale)  # dq
        torch.bmm(grad_scores.transpose(1, 2), q, out=grad_qkv[1]).mul_(scale)  # dk
        return grad_qkv, None, None


def attention(qkv: Tensor, attn_mask: Optional[Tensor], dropout_p: float) -> Tensor:
    """Multi-head attention of fused projections qkv [B, T, 3, H, hd] -> [B, H, T, hd].

    ``attn_mask`` [B, 1, 1, T]: True = attend. ``dropout_p``: on the attention probabilities (0 in eval).
    ``scaled_dot_product_attention``, except with dropout on the CPU: ``_DropoutAttention`` (SDPA's math
    path, written out with cheaper dropout masks).
    """
    batch, time, _, heads, head_dim = qkv.shape
    if 0 < dropout_p < 1.0 and _cpu_kernels(qkv):
        qkv = qkv.permute(2, 0, 3, 1, 4).reshape(3, batch * heads, time, head_dim)  # one copy
        key_mask = None
        if attn_mask is not None:  # [B, 1, 1, T] True = attend -> [B*H, 1, T] True = padding
            key_mask = (~attn_mask).expand(batch, heads, 1, time).reshape(batch * heads, 1, time)
        return _DropoutAttention.apply(qkv, key_mask, dropout_p).view(batch, heads, time, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, head_dim]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
