"""The one configuration of the wav2vec 2.0 model family.

Field names follow the paper's pieces; the comment beside each says its fairseq / transformers
counterpart where the name differs, so imported checkpoints map onto it one to one. Every field has a
default (the BASE model of the paper), and ``dataclasses.asdict`` gives JSON-ready data that
``from_dict`` turns back (our checkpoints store it in ``config.json``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from speech_ssl.config import ConfigError, from_dict

BASE_CONV_CHANNELS = [512] * 7
BASE_CONV_KERNELS = [10, 3, 3, 3, 3, 2, 2]
BASE_CONV_STRIDES = [5, 2, 2, 2, 2, 2, 2]


@dataclass
class ModelConfig:
    # --- front end: waveform -> conv features (fairseq ConvFeatureExtractionModel) ---
    frontend: Literal["conv", "fbank"] = "conv"  # "fbank": [B, frames, n_mels] log-mel input
    conv_channels: list[int] = field(default_factory=lambda: list(BASE_CONV_CHANNELS))  # HF conv_dim
    conv_kernels: list[int] = field(default_factory=lambda: list(BASE_CONV_KERNELS))
    conv_strides: list[int] = field(default_factory=lambda: list(BASE_CONV_STRIDES))
    conv_bias: bool = False
    conv_norm: Literal["group", "layer"] = "group"  # group: GroupNorm after conv 0 (BASE); layer: LN in every block
    n_mels: int = 80  # fbank front end: input channels
    sample_rate: int = 16000
    normalize_waveform: bool = False  # per-utterance zero mean / unit variance, applied by the data pipeline
    feature_grad_scale: float = 0.1  # fairseq feature_grad_mult: gradient into the front end is scaled by this

    # --- context network (Transformer) ---
    embed_dim: int = 768  # HF hidden_size, fairseq encoder_embed_dim
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    layer_norm_first: bool = False  # pre-LN (LV-60k LARGE); HF do_stable_layer_norm
    layer_norm_eps: float = 1e-5
    pos_conv_kernel: int = 128  # fairseq conv_pos
    pos_conv_groups: int = 16  # fairseq conv_pos_groups

    # --- regularisation ---
    dropout: float = 0.1  # Transformer residual dropout (HF hidden_dropout)
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.1  # after the feature projection (HF feat_proj_dropout)
    dropout_features: float = 0.1  # on the quantizer input (HF feat_quantizer_dropout)
    layerdrop: float = 0.05
    final_dropout: float = 0.0  # before the CTC head

    # --- masking (fairseq compute_mask_indices semantics) ---
    mask_prob: float = 0.65
    mask_length: int = 10
    mask_min_masks: int = 2
    require_same_masks: bool = True  # every row of a batch ends with the same number of masked frames
    mask_channel_prob: float = 0.0
    mask_channel_length: int = 10

    # --- pretraining objective ---
    num_negatives: int = 100
    logit_temp: float = 0.1  # kappa
    codebook_groups: int = 2  # G
    codebook_entries: int = 320  # V
    codebook_dim: int = 256  # total codevector size, G * (dim per group); fairseq latent_dim / vq_dim
    final_dim: int = 256  # shared space of context and target projections (HF proj_codevector_dim)
    temperature_max: float = 2.0
    temperature_min: float = 0.5
    temperature_decay: float = 0.999995
    diversity_weight: float = 0.1
    feature_penalty_weight: float = 10.0

    def __post_init__(self) -> None:
        n = len(self.conv_channels)
        if n == 0 or len(self.conv_kernels) != n or len(self.conv_strides) != n:
            raise ConfigError("conv_channels", f"conv_channels, conv_kernels and conv_strides need the same "
                              f"non-zero length; got {n}, {len(self.conv_kernels)}, {len(self.conv_strides)}.")
        if self.embed_dim % self.num_heads:
            raise ConfigError("num_heads", f"embed_dim {self.embed_dim} is not divisible by num_heads "
                              f"{self.num_heads}.")
        if self.embed_dim % self.pos_conv_groups:
            raise ConfigError("pos_conv_groups", f"embed_dim {self.embed_dim} is not divisible by "
                              f"pos_conv_groups {self.pos_conv_groups}.")
        if self.codebook_dim % self.codebook_groups:
            raise ConfigError("codebook_dim", f"codebook_dim {self.codebook_dim} is not divisible by "
                              f"codebook_groups {self.codebook_groups}.")
        for name in ("dropout", "attention_dropout", "activation_dropout", "dropout_input", "dropout_features",
                     "layerdrop", "final_dropout", "mask_prob", "mask_channel_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(name, f"must lie in [0, 1], got {value}.")
        if self.mask_length < 1 or self.mask_channel_length < 1:
            raise ConfigError("mask_length", "mask_length and mask_channel_length must be at least 1.")
        if self.num_negatives < 1:
            raise ConfigError("num_negatives", f"must be at least 1, got {self.num_negatives}.")
        if not 0 < self.temperature_min <= self.temperature_max:
            raise ConfigError("temperature_min", "need 0 < temperature_min <= temperature_max.")

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def conv_dim(self) -> int:
        """Channels of the front end's output (the quantizer's input)."""
        return self.conv_channels[-1]

    @property
    def frame_stride(self) -> int:
        """Input samples (or fbank frames) per output frame."""
        stride = 1
        for s in self.conv_strides:
            stride *= s
        return stride

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with ``overrides`` applied, type-checked; unknown keys raise ConfigError."""
        return make_config(dataclasses.asdict(self), **overrides)


def make_config(base: dict[str, Any] | None = None, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from plain data plus overrides (unknown keys -> ConfigError naming them)."""
    data = dict(base or {})
    data.update(overrides)
    # from_dict names unknown keys and lists the valid field names.
    return from_dict(ModelConfig, data)
