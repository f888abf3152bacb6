"""The wav2vec 2.0 model family (pure PyTorch: no Ray, no Hydra).

    model = build("tiny")                          # Wav2Vec2ForPreTraining
    out = model(waveforms, lengths)                # PretrainingOutput: loss_sum, sample_size, logs
    ctc = build_ctc("tiny", vocab_size=32)         # or Wav2Vec2ForCTC.from_pretrained_encoder(model.encoder, 32)
    save_model(ctc, "ckpt/"); ctc = load("ckpt/")  # also loads transformers dirs and fairseq .pt files
    export_hf(ctc, "hf/", vocab)                   # transformers layout + processor files
"""

from __future__ import annotations

from typing import Any, Union

from speech_ssl.models.checkpoint import (export_hf, from_torchaudio, load, save_model,
                                          to_torchaudio_state_dict)
from speech_ssl.models.config import ModelConfig, ModelOverrides, make_config, resolve_config
from speech_ssl.models.ctc import CTCOutput, Wav2Vec2ForCTC
from speech_ssl.models.presets import PRESET_NAMES, PRESETS
from speech_ssl.models.wav2vec2 import (EncoderOutput, PretrainingOutput, Wav2Vec2ForPreTraining, Wav2Vec2Model,
                                        padding_is_exact)

__all__ = [
    "ModelConfig", "ModelOverrides", "resolve_config", "PRESETS", "PRESET_NAMES", "build", "build_ctc",
    "build_config", "load", "save_model",
    "export_hf", "from_torchaudio", "to_torchaudio_state_dict", "Wav2Vec2Model", "Wav2Vec2ForPreTraining",
    "Wav2Vec2ForCTC", "EncoderOutput", "PretrainingOutput", "CTCOutput", "padding_is_exact",
]


def build_config(preset: Union[str, ModelConfig], **overrides: Any) -> ModelConfig:
    """A preset's (or a given) config with overrides (:func:`resolve_config`); unknown names raise ConfigError
    listing the valid ones."""
    return resolve_config(preset, overrides, key="")


def build(preset: Union[str, ModelConfig], **overrides: Any) -> Wav2Vec2ForPreTraining:
    """A freshly initialised pretraining model from a preset name (or a ModelConfig) plus overrides."""
    return Wav2Vec2ForPreTraining(build_config(preset, **overrides))


def build_ctc(preset_or_config: Union[str, ModelConfig], vocab_size: int, **overrides: Any) -> Wav2Vec2ForCTC:
    """A freshly initialised CTC model (for training from scratch; see Wav2Vec2ForCTC.from_pretrained_encoder)."""
    return Wav2Vec2ForCTC(build_config(preset_or_config, **overrides), vocab_size)
