"""Typed configuration of the data side: where audio comes from and how it becomes batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# The files a directory or listing is read for, unless a stage's ``extensions`` says otherwise.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".opus", ".mp3")


@dataclass
class TextConfig:
    """Transcript normalisation for CTC, applied identically at training and evaluation time.

    Order: Unicode NFKC, char_map replacements, removal of `remove`, upper-casing, whitespace collapsed.
    uppercase: fold letters to upper case.
    keep: characters kept besides letters and the space (everything else is an error, see unknown).
    char_map: explicit replacements applied first, e.g. {"-": " "}.
    remove: characters deleted outright (e.g. ",.?!"), after char_map.
    unknown: what to do with characters outside the vocabulary: error (one message listing them all) | drop.
    """

    uppercase: bool = True
    keep: str = "'"
    char_map: dict[str, str] = field(default_factory=dict)
    remove: str = ""
    unknown: str = field(default="error", metadata={"choices": ["error", "drop"]})


@dataclass
class DataConfig:
    """How audio is read, cut and batched (shared by every stage).

    sample_rate: rate everything is resampled to.
    min_duration / max_duration: rows outside [min, max] seconds are filtered (counted, reported); applied
        after long unlabeled recordings are split into segments.
    segment_duration: unlabeled recordings longer than this are split into equal segments of at most this
        length (transcribed utterances are never split; use max_duration to bound them).
    crop_duration: pretraining crops each utterance to at most this many seconds (random offset).
    batch_seconds: audio seconds per batch per worker (the budget, like fairseq's max_tokens), counting
        padding (fine-tuning) or the cropped length (pretraining).
    max_batch_size: at most this many utterances per batch.
    bucket_width: rows of one batch differ in length by at most this fraction of the shortest, which bounds
        the padding (or crop) waste of a batch by bucket_width / (1 + bucket_width); null disables bucketing.
    shuffle: reshuffle rows and batches every epoch (from the seed); false: batches in length order.
    num_cpus_per_reader: CPUs a Ray Data decode task asks for (fractions allowed).
    max_readers: at most this many decode tasks at once (null: as many as Ray Data's CPUs allow).
    batches_per_task: planned batches one Ray Data task decodes at most (fewer, larger tasks cost less
        scheduling CPU and idle time between tasks; smaller ones make the first batch arrive sooner); a
        stream too short for two tasks per decode slot gets smaller tasks.
    prefetch_batches: Ray Data blocks (of batches_per_task batches) the consumer keeps requested ahead.
    read_threads: threads of the consuming process that read a decoded-audio cache (`speech-ssl cache`);
        streams of cached rows need no Ray Data decode tasks. One thread reads a local cache far faster than
        a step consumes it (benchmarks/README.md); more threads contend for the GIL and help only where reads
        wait on a remote store (s3://, gs://).
    buffer_mb: object store memory one stream's decoded batches may take ahead of its consumer (Ray Data's
        budget for the stream; a few batches of batch_seconds audio need a few MB each).
    stall_timeout_s: a consumer that waits this many seconds for its next Ray Data block fails with an error
        naming what is pending (decode tasks the cluster cannot schedule) instead of waiting forever.
    extensions: audio file suffixes picked up when a directory or a list is scanned.
    tsv_sample_rate: rate of the num_samples column of fairseq TSV manifests.
    """

    sample_rate: int = 16000
    min_duration: float = 0.0
    max_duration: float = 60.0
    segment_duration: float = 30.0
    crop_duration: Optional[float] = None
    batch_seconds: float = 40.0
    max_batch_size: int = 64
    bucket_width: Optional[float] = 0.1
    shuffle: bool = True
    num_cpus_per_reader: float = 1.0
    max_readers: Optional[int] = None
    batches_per_task: int = 8
    prefetch_batches: int = 2
    read_threads: int = 1
    buffer_mb: int = 256
    stall_timeout_s: float = 300.0
    extensions: list[str] = field(default_factory=lambda: list(AUDIO_EXTENSIONS))
    tsv_sample_rate: int = 16000
    text: TextConfig = field(default_factory=TextConfig)
