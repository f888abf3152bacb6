"""Audio corpora into batches: sources, decoding, features, batching, Ray Data streams, text.

The path of data: ``read_source`` (manifest rows, durations) -> ``BatchStream`` (plan: filter, segment,
bucket, shuffle, shard) -> Ray Data CPU tasks (decode, downmix, resample, normalise, fbank, crop/pad,
quarantine) -> ``Batch`` tensors on the training worker. ``IngestReport`` keeps the counts
read = used + quarantined + filtered. ``Vocabulary`` and ``TextNormalizer`` are the CTC text side.
"""

from speech_ssl.data.audio import FeatureSpec, decode_utterance
from speech_ssl.data.config import DataConfig, TextConfig
from speech_ssl.data.report import IngestReport, QuarantineError
from speech_ssl.data.sources import AUDIO_EXTENSIONS, Utterance, UtteranceList, read_source
from speech_ssl.data.stream import Batch, BatchStream
from speech_ssl.data.text import TextNormalizer, Vocabulary

__all__ = [
    "AUDIO_EXTENSIONS", "Batch", "BatchStream", "DataConfig", "FeatureSpec", "IngestReport", "QuarantineError",
    "TextConfig", "TextNormalizer", "Utterance", "UtteranceList", "Vocabulary", "decode_utterance", "read_source",
]
