"""Audio corpora into batches: sources, decoding, features, batching, Ray Data streams, text."""

from speech_ssl.data.config import DataConfig, TextConfig

__all__ = ["DataConfig", "TextConfig"]
