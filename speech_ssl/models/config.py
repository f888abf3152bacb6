"""The one configuration of the wav2vec 2.0 model family, and the one way settings become it.

Field names follow the paper's pieces; each description below says its fairseq / transformers counterpart
where the name differs, so imported checkpoints map onto it one to one. Every field has a default (the
BASE model of the paper), and ``dataclasses.asdict`` gives JSON-ready data that ``from_dict`` turns back
(our checkpoints store it in ``config.json``).

Settings reach a model in layers, resolved by one function, :func:`resolve_config`: a base (a preset
from :mod:`speech_ssl.models.presets`, or the config a checkpoint brings) and then layers of
:class:`ModelOverrides` applied in order, a later layer winning and ``None`` meaning "not set here". The
stages carry the preset (``model``) and the user's layer (``model_overrides``); fine-tuning puts its own
defaults as a layer below the user's (``speech_ssl.train.tasks.ctc.FINETUNE_MODEL_DEFAULTS``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union

from speech_ssl.config import ConfigError, from_dict

BASE_CONV_CHANNELS = [512] * 7
BASE_CONV_KERNELS = [10, 3, 3, 3, 3, 2, 2]
BASE_CONV_STRIDES = [5, 2, 2, 2, 2, 2, 2]

# The descriptions of the fields, in the ``name: description`` form that ``speech-ssl <command> --help``
# reads (ModelConfig's docstring and ModelOverrides' share them).
FIELD_DOCS = """
    frontend: conv: a convolutional front end on the waveform; fbank: log-mel filterbanks ([B, frames,
        n_mels], computed by the data pipeline) subsampled by the convolutions.
    conv_channels / conv_kernels / conv_strides: output channels, kernel widths and strides of the front end's
        convolutions, one entry per layer (transformers conv_dim, conv_kernel, conv_stride).
    conv_bias: the front end's convolutions have a bias (fairseq conv_bias).
    conv_norm: group: GroupNorm after the first convolution only (BASE); layer: LayerNorm in every block
        (LARGE LV-60k; padded batches are then exact).
    n_mels: mel bins read by the fbank front end.
    sample_rate: audio samples per second the model reads.
    normalize_waveform: zero mean and unit variance per utterance, applied by the data pipeline.
    feature_grad_scale: the gradient into the front end is scaled by this (fairseq feature_grad_mult).
    embed_dim: width of the Transformer (transformers hidden_size, fairseq encoder_embed_dim).
    num_layers: Transformer layers.
    num_heads: attention heads per layer (embed_dim must be a multiple).
    ffn_dim: inner width of the feed-forward blocks.
    layer_norm_first: pre-LN Transformer (LARGE LV-60k; transformers do_stable_layer_norm).
    layer_norm_eps: epsilon of the Transformer's layer norms.
    pos_conv_kernel / pos_conv_groups: kernel width and groups of the convolutional position embedding
        (fairseq conv_pos, conv_pos_groups).
    dropout: Transformer residual dropout (transformers hidden_dropout).
    attention_dropout: dropout on the attention weights.
    activation_dropout: dropout after the feed-forward activation.
    dropout_input: dropout after the feature projection (transformers feat_proj_dropout).
    dropout_features: dropout on the quantizer's input (transformers feat_quantizer_dropout).
    layerdrop: probability of skipping each Transformer layer in training (LayerDrop).
    final_dropout: dropout before the CTC head.
    mask_prob: time masking: the share of frames that start a masked span (fairseq compute_mask_indices;
        transformers mask_time_prob).
    mask_length: frames per masked time span.
    mask_min_masks: at least this many masked time spans per utterance.
    require_same_masks: every row of a batch ends with the same number of masked frames.
    mask_channel_prob: channel masking: the share of feature channels that start a masked span
        (transformers mask_feature_prob).
    mask_channel_length: channels per masked channel span.
    num_negatives: distractors sampled per masked frame for the contrastive loss.
    logit_temp: temperature kappa of the contrastive logits.
    codebook_groups / codebook_entries: the quantizer's codebooks (G) and entries per codebook (V).
    codebook_dim: total codevector size, G x the size per group (fairseq latent_dim / vq_dim).
    final_dim: the shared space of the context and target projections (transformers proj_codevector_dim).
    temperature_max / temperature_min / temperature_decay: Gumbel softmax temperature: starts at max, is
        multiplied by decay every update, and stays at min once there.
    diversity_weight: weight of the codebook diversity loss (alpha).
    feature_penalty_weight: weight of the L2 penalty on the front end's features.
"""


@dataclass
class ModelConfig:
    """Every setting of a wav2vec 2.0 model (defaults: BASE). Build one with resolve_config."""

    # --- front end: waveform -> conv features (fairseq ConvFeatureExtractionModel) ---
    frontend: Literal["conv", "fbank"] = "conv"
    conv_channels: list[int] = field(default_factory=lambda: list(BASE_CONV_CHANNELS))
    conv_kernels: list[int] = field(default_factory=lambda: list(BASE_CONV_KERNELS))
    conv_strides: list[int] = field(default_factory=lambda: list(BASE_CONV_STRIDES))
    conv_bias: bool = False
    conv_norm: Literal["group", "layer"] = "group"
    n_mels: int = 80
    sample_rate: int = 16000
    normalize_waveform: bool = False
    feature_grad_scale: float = 0.1

    # --- context network (Transformer) ---
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    layer_norm_first: bool = False
    layer_norm_eps: float = 1e-5
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16

    # --- regularisation ---
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.1
    dropout_features: float = 0.1
    layerdrop: float = 0.05
    final_dropout: float = 0.0

    # --- masking (fairseq compute_mask_indices semantics) ---
    mask_prob: float = 0.65
    mask_length: int = 10
    mask_min_masks: int = 2
    require_same_masks: bool = True
    mask_channel_prob: float = 0.0
    mask_channel_length: int = 10

    # --- pretraining objective ---
    num_negatives: int = 100
    logit_temp: float = 0.1
    codebook_groups: int = 2
    codebook_entries: int = 320
    codebook_dim: int = 256
    final_dim: int = 256
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
        return resolve_config(self, overrides, key="")


ModelConfig.__doc__ += "\n" + FIELD_DOCS


def make_config(base: dict[str, Any] | None = None, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from plain data plus overrides (unknown keys -> ConfigError naming them)."""
    data = dict(base or {})
    data.update(overrides)
    # from_dict names unknown keys and lists the valid field names.
    return from_dict(ModelConfig, data)


# --------------------------------------------------------------------------------------------------
# Overrides: one optional key per ModelConfig field


def _overrides_class() -> type:
    """ModelOverrides: ModelConfig's fields, each Optional with default None ("not set in this layer"),
    generated from ModelConfig so that the two cannot drift apart."""
    hints = typing.get_type_hints(ModelConfig)
    fields = [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(ModelConfig)]

    def given(self) -> dict[str, Any]:
        """The settings this layer sets (its non-null fields)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    cls = dataclasses.make_dataclass("ModelOverrides", fields, namespace={"given": given})
    cls.__module__ = __name__
    cls.__qualname__ = "ModelOverrides"
    cls.__doc__ = ("""Model settings changed from the preset (or from the init checkpoint): one key per
    ModelConfig field; null leaves a setting to the layers below (the preset or checkpoint, and for
    fine-tuning its defaults). A value given here always wins.
""" + FIELD_DOCS)
    return cls


ModelOverrides = _overrides_class()

Layer = Union[ModelOverrides, Mapping[str, Any], None]


def layer_values(layer: Layer) -> dict[str, Any]:
    """The settings a layer sets: a ModelOverrides' non-null fields, or a mapping's items (null included:
    in a mapping, a key is set by being there)."""
    if layer is None:
        return {}
    if isinstance(layer, ModelOverrides):
        return layer.given()
    if isinstance(layer, Mapping):
        return dict(layer)
    raise TypeError(f"a model settings layer is a ModelOverrides or a mapping, not {type(layer).__name__}")


def resolve_config(base: Union[str, ModelConfig], *layers: Layer, key: str = "model_overrides") -> ModelConfig:
    """The ModelConfig of ``base`` (a preset name, or a ModelConfig such as a checkpoint's) with ``layers``
    applied in order: a later layer wins, and a layer's ``None`` leaves the setting to the ones below.

    This is the one place where model settings are resolved (the stages, the tasks, ``build`` and
    ``ModelConfig.replace`` all come here). Values are type-checked; an unknown setting, a wrong type or an
    invalid combination raises ConfigError naming ``<key>.<setting>`` (an unknown preset: ``model``)."""
    if isinstance(base, str):
        from speech_ssl.models.presets import PRESET_NAMES, PRESETS

        if base not in PRESETS:
            raise ConfigError("model", f"unknown model preset '{base}'.", PRESET_NAMES)
        base = PRESETS[base]
    if not isinstance(base, ModelConfig):
        raise TypeError(f"a model preset name or a ModelConfig, not {type(base).__name__}")
    data = dataclasses.asdict(base)
    for layer in layers:
        data.update(layer_values(layer))
    return from_dict(ModelConfig, data, key)
