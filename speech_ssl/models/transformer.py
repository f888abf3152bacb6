"""The context network g: Z -> C (paper section 2): a Transformer with a convolutional positional embedding.

* ``ConvPositionalEmbedding``: a grouped Conv1d (kernel 128, 16 groups) with weight normalisation over
  the kernel axis, output trimmed to the input length, GELU; added to the input (relative positions).
* ``TransformerLayer``: self-attention + feed-forward, post-LN (BASE, fairseq default) or pre-LN
  (``layer_norm_first``, LV-60k LARGE). Attention runs through ``scaled_dot_product_attention``.
* ``ContextNetwork``: positional embedding, (post-LN) LayerNorm, dropout, the layers with LayerDrop,
  (pre-LN) a final LayerNorm. LayerDrop skips whole layers; under DDP this leaves their parameters
  unused in that step, so wrap with ``find_unused_parameters=True`` when ``layerdrop > 0``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speech_ssl.models.config import ModelConfig
from speech_ssl.models.dropout import Dropout, drop_mask, keep_mask
from speech_ssl.models.fastpath import cpu_kernels


class ConvPositionalEmbedding(nn.Module):
    """Relative positional embedding. [B, T, D] -> [B, T, D] (to be added to the input).

    The weight is ``weight_g * weight_v / ||weight_v||`` with the norm over all axes but the kernel
    axis (``torch.nn.utils.weight_norm(conv, dim=2)``), kept as two parameters so checkpoints of
    fairseq, transformers and torchaudio map onto it directly.
    """

    def __init__(self, dim: int, kernel: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.kernel = kernel
        self.groups = groups
        weight = torch.empty(dim, dim // groups, kernel)
        nn.init.normal_(weight, mean=0.0, std=math.sqrt(4.0 * (1.0 - dropout) / (kernel * dim)))
        self.weight_v = nn.Parameter(weight)
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(weight, dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(dim))

    def weight(self) -> Tensor:
        return torch._weight_norm(self.weight_v, self.weight_g, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = F.conv1d(x.transpose(1, 2), self.weight(), self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:
            y = y[:, :, :-1]  # an even kernel with padding k/2 yields one extra frame
        return F.gelu(y).transpose(1, 2)


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


class SelfAttention(nn.Module):
    """Multi-head self-attention. [B, T, D] -> [B, T, D]; q, k, v from one fused projection.

    Without attention dropout (eval, or p = 0) this is ``scaled_dot_product_attention``. With it on the
    CPU it is ``_DropoutAttention`` (SDPA's math path, written out with cheaper dropout masks).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        batch, time, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        qkv = self.qkv_proj(x).view(batch, time, 3, heads, head_dim)
        dropout_on = self.training and self.dropout > 0
        if dropout_on and cpu_kernels(x) and self.dropout < 1.0:
            qkv = qkv.permute(2, 0, 3, 1, 4).reshape(3, batch * heads, time, head_dim)  # one copy
            key_mask = None
            if attn_mask is not None:  # [B, 1, 1, T] True = attend -> [B*H, 1, T] True = padding
                key_mask = (~attn_mask).expand(batch, heads, 1, time).reshape(batch * heads, 1, time)
            y = _DropoutAttention.apply(qkv, key_mask, self.dropout).view(batch, heads, time, head_dim)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, head_dim]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                               dropout_p=self.dropout if dropout_on else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(batch, time, dim))


class FeedForward(nn.Module):
    """fc1 -> GELU -> dropout -> fc2. [B, T, D] -> [B, T, D]."""

    def __init__(self, dim: int, hidden: int, activation_dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.activation_dropout = Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(F.gelu(self.fc1(x))))


class TransformerLayer(nn.Module):
    """One Transformer block. [B, T, D] -> [B, T, D].

    post-LN: x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x)))
    pre-LN:  x = x + drop(attn(LN(x)));  x = x + drop(ffn(LN(x)))
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.layer_norm_first = cfg.layer_norm_first
        self.attention = SelfAttention(dim, cfg.num_heads, cfg.attention_dropout)
        self.attention_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(dim, cfg.ffn_dim, cfg.activation_dropout)
        self.ffn_norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def residual(self, x: Tensor, branch: Tensor) -> Tensor:
        """x + dropout(branch), in one pass on the CPU (addcmul with the scaled keep mask)."""
        p = self.dropout.p
        if self.training and 0 < p < 1.0 and cpu_kernels(x):
            return torch.addcmul(x, branch, keep_mask(branch.shape, p, branch.dtype))
        return x + self.dropout(branch)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        if self.layer_norm_first:
            x = self.residual(x, self.attention(self.attention_norm(x), attn_mask))
            return self.residual(x, self.ffn(self.ffn_norm(x)))
        x = self.attention_norm(self.residual(x, self.attention(x, attn_mask)))
        return self.ffn_norm(self.residual(x, self.ffn(x)))


def init_bert_params(module: nn.Module) -> None:
    """fairseq's init_bert_params for the Transformer's linear layers: N(0, 0.02), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ContextNetwork(nn.Module):
    """Positional embedding + Transformer layers. [B, T, D] -> [B, T, D] (+ per-layer outputs).

    Hidden states follow transformers' numbering: [0] is the input of the first layer, [i] the raw
    output of layer i. The last output gets the final LayerNorm (pre-LN models) only when every layer
    ran (fairseq and transformers agree).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        self.layerdrop = cfg.layerdrop
        self.pos_conv = ConvPositionalEmbedding(cfg.embed_dim, cfg.pos_conv_kernel, cfg.pos_conv_groups)
        self.layer_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.num_layers))
        self.layers.apply(init_bert_params)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, max_layer: Optional[int] = None,
                output_hidden_states: bool = False) -> tuple[Tensor, Optional[tuple[Tensor, ...]]]:
        num_layers = len(self.layers)
        if max_layer is None:
            max_layer = num_layers
        if not 0 <= max_layer <= num_layers:
            raise ValueError(f"max_layer must lie in [0, {num_layers}], got {max_layer}")
        attn_mask = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
            attn_mask = ~padding_mask[:, None, None, :]  # [B, 1, 1, T]: True = attend
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        hidden = [x] if output_hidden_states else None
        for layer in self.layers[:max_layer]:
            # LayerDrop: the draw comes from torch's global CPU generator (no device sync).
            if not (self.training and self.layerdrop > 0 and float(torch.rand(())) < self.layerdrop):
                x = layer(x, attn_mask)
            if hidden is not None:
                hidden.append(x)
        if self.layer_norm_first and max_layer == num_layers:
            x = self.layer_norm(x)
        return x, (tuple(hidden) if hidden is not None else None)
