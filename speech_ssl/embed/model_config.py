"""What a checkpoint's model is, without loading its weights where the checkpoint allows, and how its
padded batches give each utterance its own embedding (the embed summary says it). The numbers derived from
a model's inputs (features, frame rate, receptive field) are the data layer's:
:mod:`speech_ssl.data.model_inputs`."""

from __future__ import annotations

from speech_ssl.models.checkpoint import read_model_config  # noqa: F401  (re-exported)


def padding_exact_by(model_cfg) -> str:
    """How padded batches give every utterance its own embedding (the summary says it)."""
    return "layer-norm front end" if model_cfg.conv_norm == "layer" else "masked group-norm statistics"
