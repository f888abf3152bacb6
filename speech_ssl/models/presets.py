"""Named model presets, all in one place (the names are part of the command-line contract).

* ``base``, ``large``, ``large-lv60k``: the published sizes (Baevski et al. 2020; fairseq
  ``examples/wav2vec/config/pretraining``; the transformers configs of facebook/wav2vec2-base, -large,
  -large-lv60).
* ``tiny``: a few million parameters for CPU tests and demos. The same 7-layer conv front end geometry
  (20 ms frames, 25 ms receptive field) with narrow channels, and a 4-layer 256-d pre-LN Transformer.
  Layer-norm front end, so padded batches are exact.
* ``fbank-tiny``: the same Transformer on 80-bin log-mel filterbanks (10 ms hop, computed by the data
  pipeline), subsampled by two convolutions (the second strided) to 20 ms frames.
"""

from __future__ import annotations

from speech_ssl.models.config import ModelConfig

_TINY_TRANSFORMER = dict(
    embed_dim=256, num_layers=4, num_heads=4, ffn_dim=1024, layer_norm_first=True,
    pos_conv_kernel=128, pos_conv_groups=16,
    codebook_groups=2, codebook_entries=320, codebook_dim=256, final_dim=128,
    feature_grad_scale=1.0, feature_penalty_weight=0.0,
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        frontend="conv", conv_channels=[64, 128, 128, 128, 128, 256, 256], conv_norm="layer", conv_bias=True,
        normalize_waveform=True, **_TINY_TRANSFORMER,
    ),
    "fbank-tiny": ModelConfig(
        frontend="fbank", n_mels=80, conv_channels=[256, 256], conv_kernels=[3, 3], conv_strides=[1, 2],
        conv_norm="layer", conv_bias=True, **_TINY_TRANSFORMER,
    ),
    "base": ModelConfig(),  # the dataclass defaults are BASE (LibriSpeech 960 h recipe)
    "large": ModelConfig(
        # LARGE on LibriSpeech: BASE front end and post-LN, Transformer of LARGE size.
        embed_dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, final_dim=768, codebook_dim=768,
        layerdrop=0.2,
    ),
    "large-lv60k": ModelConfig(
        # fairseq wav2vec2_large_librivox.yaml: layer-norm front end with bias, pre-LN, no dropout,
        # temperature floor 0.1, no feature penalty, normalised waveforms, unscaled front-end gradients.
        conv_norm="layer", conv_bias=True, normalize_waveform=True, feature_grad_scale=1.0,
        embed_dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, layer_norm_first=True,
        final_dim=768, codebook_dim=768, temperature_min=0.1,
        dropout=0.0, attention_dropout=0.0, dropout_input=0.0, dropout_features=0.0, layerdrop=0.0,
        feature_penalty_weight=0.0,
    ),
}

PRESET_NAMES = list(PRESETS)
