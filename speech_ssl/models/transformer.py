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

from speech_ssl.models import fastpath
from speech_ssl.models.config import ModelConfig
from speech_ssl.models.dropout import Dropout


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


class SelfAttention(nn.Module):
    """Multi-head self-attention. [B, T, D] -> [B, T, D]; q, k, v from one fused projection.

    ``scaled_dot_product_attention``, or on the CPU with attention dropout our kernel (``fastpath.attention``).
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
        y = fastpath.attention(qkv, attn_mask, self.dropout if self.training else 0.0)  # [B, H, T, head_dim]
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
        return fastpath.residual_dropout(x, branch, self.dropout.p, self.training)

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
