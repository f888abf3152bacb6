"""What a checkpoint's model is, without loading its weights where the checkpoint allows, and the numbers
the embed driver derives from it (receptive field, frame rate, how padding is made exact)."""

from __future__ import annotations

import json

from speech_ssl.data.audio import FeatureSpec
from speech_ssl.errors import SpeechSSLError


def read_model_config(checkpoint: str):
    """(ModelConfig, architecture) of a checkpoint: from config.json for our and transformers
    directories (no weights read), else by loading the file. Raises SpeechSSLError."""
    from pathlib import Path

    from speech_ssl.config import ConfigError, from_dict
    from speech_ssl.models import load
    from speech_ssl.models.checkpoint import FORMAT
    from speech_ssl.models.config import ModelConfig

    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise SpeechSSLError(f"no checkpoint at {checkpoint} (give one of our checkpoint directories, a "
                             "transformers model directory, or a fairseq .pt file)")
    config_json = path / "config.json"
    if path.is_dir() and config_json.is_file():
        try:
            meta = json.loads(config_json.read_text())
        except json.JSONDecodeError as err:
            raise SpeechSSLError(f"{config_json}: not valid JSON ({err})") from None
        if meta.get("format") == FORMAT:
            try:
                return from_dict(ModelConfig, meta.get("model") or {}, "model"), meta.get("architecture", "?")
            except ConfigError as err:
                raise SpeechSSLError(f"{config_json}: {err.paragraph()}") from None
        if meta.get("model_type") is not None:
            from speech_ssl.models import convert

            return convert.config_from_hf(meta), "transformers:" + ",".join(meta.get("architectures") or ["?"])
    model = load(path)
    return model.config, type(model).__name__



def receptive_field_seconds(model_cfg, spec: FeatureSpec) -> float:
    """Shortest input that yields one output frame."""
    steps = 1
    for kernel, stride in zip(reversed(model_cfg.conv_kernels), reversed(model_cfg.conv_strides)):
        steps = (steps - 1) * stride + kernel
    if spec.kind == "fbank":
        return ((steps - 1) * spec.frame_shift + spec.frame_length) / spec.sample_rate
    return steps / spec.sample_rate


def frame_rate(model_cfg) -> float:
    """Output frames per second of audio."""
    unit = model_cfg.sample_rate if model_cfg.frontend == "conv" else 100.0
    return unit / model_cfg.frame_stride


def padding_exact_by(model_cfg) -> str:
    """How padded batches give every utterance its own embedding (the summary says it)."""
    return "layer-norm front end" if model_cfg.conv_norm == "layer" else "masked group-norm statistics"
