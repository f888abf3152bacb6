"""Audio corpora into batches: sources, decoding, features, batching, Ray Data streams, text.

The path of data: ``read_source`` (manifest rows, durations) -> ``BatchStream`` (plan: filter, segment,
bucket, shuffle, shard) -> Ray Data CPU tasks (decode, downmix, resample, normalise, fbank, crop/pad,
quarantine) -> ``Batch`` tensors on the training worker. ``IngestReport`` keeps the counts
read = used + quarantined + filtered. ``Vocabulary`` and ``TextNormalizer`` are the CTC text side.
``model_inputs`` is the seam to the models: a model's features, frame rate, receptive field and batches.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), so that ``from speech_ssl.data import DataConfig`` or
# ``speech_ssl.data.plan`` does not pull in soundfile, pyarrow or Ray: the GPU benchmark and embedding
# paths run on machines with torch only.
_EXPORTS = {
    "FeatureSpec": "audio", "decode_utterance": "audio",
    "DataConfig": "config", "TextConfig": "config",
    "IngestReport": "report", "QuarantineError": "report",
    "feature_spec_for": "model_inputs", "frame_rate": "model_inputs", "inference_data": "model_inputs",
    "input_steps": "model_inputs", "model_batch_stream": "model_inputs", "receptive_field_seconds": "model_inputs",
    "AUDIO_EXTENSIONS": "sources", "Utterance": "sources", "UtteranceList": "sources", "read_source": "sources",
    "Batch": "stream", "BatchStream": "stream",
    "TextNormalizer": "text", "Vocabulary": "text",
}

if TYPE_CHECKING:
    from speech_ssl.data.audio import FeatureSpec, decode_utterance
    from speech_ssl.data.config import DataConfig, TextConfig
    from speech_ssl.data.model_inputs import (feature_spec_for, frame_rate, inference_data, input_steps,
                                              model_batch_stream, receptive_field_seconds)
    from speech_ssl.data.report import IngestReport, QuarantineError
    from speech_ssl.data.sources import AUDIO_EXTENSIONS, Utterance, UtteranceList, read_source
    from speech_ssl.data.stream import Batch, BatchStream
    from speech_ssl.data.text import TextNormalizer, Vocabulary


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AUDIO_EXTENSIONS", "Batch", "BatchStream", "DataConfig", "FeatureSpec", "IngestReport", "QuarantineError",
    "TextConfig", "TextNormalizer", "Utterance", "UtteranceList", "Vocabulary", "decode_utterance", "feature_spec_for",
    "frame_rate", "inference_data", "input_steps", "model_batch_stream", "read_source", "receptive_field_seconds",
]
