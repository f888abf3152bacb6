"""Typed configuration of the data side: where audio comes from and how it becomes batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class TextConfig:
    """Transcript normalisation for CTC, applied identically at training and evaluation time.

    uppercase: fold letters to upper case.
    keep: characters kept besides letters and the space (everything else is an error, see unknown).
    char_map: explicit replacements applied first, e.g. {"-": " "}.
    unknown: what to do with characters outside the vocabulary: error | drop.
    """

    uppercase: bool = True
    keep: str = "'"
    char_map: dict[str, str] = field(default_factory=dict)
    unknown: str = field(default="error", metadata={"choices": ["error", "drop"]})


@dataclass
class DataConfig:
    """How audio is read, cut and batched (shared by every stage).

    sample_rate: rate everything is resampled to.
    min_duration / max_duration: utterances outside [min, max] seconds are filtered (counted, reported).
    segment_duration: recordings longer than this are split into segments of at most this length.
    crop_duration: pretraining crops each utterance to at most this many seconds (random offset).
    batch_seconds: audio seconds per batch per worker (the budget, like fairseq's max_tokens).
    max_batch_size: at most this many utterances per batch.
    num_cpus_per_reader: CPUs a Ray Data decode task asks for.
    """

    sample_rate: int = 16000
    min_duration: float = 0.0
    max_duration: float = 60.0
    segment_duration: float = 30.0
    crop_duration: Optional[float] = None
    batch_seconds: float = 40.0
    max_batch_size: int = 64
    num_cpus_per_reader: float = 1.0
    text: TextConfig = field(default_factory=TextConfig)
