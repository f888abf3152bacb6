"""What a checkpoint's model is, without loading its weights where the checkpoint allows, and the numbers
the embed driver derives from it (receptive field, frame rate, how padding is made exact)."""

from __future__ import annotations

from speech_ssl.data.audio import FeatureSpec
from speech_ssl.models.checkpoint import read_model_config  # noqa: F401  (re-exported)


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
