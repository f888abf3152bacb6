"""The batch plan: from durations alone, which rows form which batch, in which order, on which rank.

1. ``expand_rows``: unlabeled recordings longer than ``segment_duration`` become equal segments of at
   most that length (a transcribed utterance is never cut: its text would no longer match); then rows
   outside [min_duration, max_duration] are filtered (counted, with the rule).
2. ``plan_epoch``: rows are shuffled from ``(seed, epoch)`` and grouped into length buckets whose
   longest row is at most ``1 + bucket_width`` times the shortest; each bucket is cut greedily into
   batches under the audio-seconds budget (``batch_seconds`` of padded or cropped audio, at most
   ``max_batch_size`` rows); then the batches are shuffled. So every batch wastes at most
   ``bucket_width / (1 + bucket_width)`` of its samples to padding (``pad``) or cropping (``crop``).
   ``exact`` groups rows of identical length (in samples) only.
3. ``deal``: batch ``i`` of the epoch goes to rank ``i % world_size``: ranks are disjoint, cover the
   epoch, and their batch counts differ by at most one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from speech_ssl.data.config import DataConfig
from speech_ssl.data.sources import Utterance

MODES = ("crop", "pad", "exact")


def expand_rows(utterances: Sequence[Utterance], cfg: DataConfig) -> tuple[list[Utterance], list[dict]]:
    """Segment long unlabeled recordings, then apply the duration filters.

    Returns the rows to plan with and the filtered ones as ``{"path", "reason", "detail", "id"}``.
    """
    rows: list[Utterance] = []
    filtered: list[dict] = []
    seg = cfg.segment_duration
    for utt in utterances:
        pieces = [utt]
        if seg and seg > 0 and utt.text is None and utt.duration > seg:
            count = math.ceil(utt.duration / seg - 1e-9)
            length = utt.duration / count
            pieces = [replace(utt, id=f"{utt.id}@{k:04d}", start=utt.start + k * length,
                              end=utt.start + (k + 1) * length, duration=length) for k in range(count)]
        for row in pieces:
            if row.duration < cfg.min_duration:
                filtered.append({"path": row.path, "reason": "too-short", "id": row.id,
                                 "detail": f"{row.duration:.3f} s < min_duration {cfg.min_duration} s"})
            elif row.duration > cfg.max_duration:
                filtered.append({"path": row.path, "reason": "too-long", "id": row.id,
                                 "detail": f"{row.duration:.3f} s > max_duration {cfg.max_duration} s"})
            else:
                rows.append(row)
    return rows, filtered


def batch_cost(durations: Sequence[float], mode: str, crop_duration: Optional[float]) -> float:
    """Seconds of audio a batch of rows with these durations occupies (padded, or cropped)."""
    n = len(durations)
    if n == 0:
        return 0.0
    if mode == "crop":
        shortest = min(durations)
        return n * (min(shortest, crop_duration) if crop_duration else shortest)
    return n * max(durations)


def _bucket_keys(durations: np.ndarray, mode: str, width: Optional[float], sample_rate: int) -> np.ndarray:
    if mode == "exact":
        return np.ceil(durations * sample_rate - 1e-6).astype(np.int64)
    if not width or width <= 0:
        return np.zeros(len(durations), dtype=np.int64)
    floor = max(float(durations.min()), 1e-3)
    return np.floor(np.log(np.maximum(durations, floor) / floor) / math.log1p(width)).astype(np.int64)


def plan_epoch(durations: Sequence[float], cfg: DataConfig, mode: str, seed: int, epoch: int) -> list[list[int]]:
    """The whole epoch's batches (row indices), in the order they are dealt to ranks."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    d = np.asarray(durations, dtype=np.float64)
    if len(d) == 0:
        return []
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED])
    order = rng.permutation(len(d)) if cfg.shuffle else np.argsort(d, kind="stable")
    keys = _bucket_keys(d, mode, cfg.bucket_width, cfg.sample_rate)
    # Stable sort by bucket key keeps the shuffled (or length) order inside each bucket.
    order = order[np.argsort(keys[order], kind="stable")]
    crop = cfg.crop_duration if mode == "crop" else None
    batches: list[list[int]] = []
    current: list[int] = []
    current_key = None
    shortest = longest = 0.0
    for i in order:
        i = int(i)
        di = float(d[i])
        if current and keys[i] == current_key:
            lo, hi = min(shortest, di), max(longest, di)
            n = len(current) + 1
            cost = n * (min(lo, crop) if crop else lo) if mode == "crop" else n * hi
            if cost <= cfg.batch_seconds and n <= cfg.max_batch_size:
                current.append(i)
                shortest, longest = lo, hi
                continue
        if current:
            batches.append(current)
        current, current_key, shortest, longest = [i], keys[i], di, di
    if current:
        batches.append(current)
    if cfg.shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[j] for j in perm]
    return batches


def deal(num_batches: int, rank: int, world_size: int) -> list[int]:
    """Indices of the epoch's batches that belong to ``rank``."""
    return list(range(rank, num_batches, world_size))


@dataclass
class PlanStats:
    """Plan-level figures of one rank's epoch (before any file is opened)."""

    batches: int
    rows: int
    audio_seconds: float  # sum of the rows' durations
    batch_seconds: float  # padded (pad, exact) or cropped (crop) seconds the batches will hold

    @property
    def padding_waste(self) -> float:
        """Share of the batches' seconds that is padding (pad/exact modes)."""
        return max(0.0, 1.0 - self.audio_seconds / self.batch_seconds) if self.batch_seconds else 0.0

    @property
    def crop_discard(self) -> float:
        """Share of the rows' audio cut away by cropping (crop mode)."""
        return max(0.0, 1.0 - self.batch_seconds / self.audio_seconds) if self.audio_seconds else 0.0


def plan_stats(batches: Sequence[Sequence[int]], durations: Sequence[float], mode: str,
               crop_duration: Optional[float]) -> PlanStats:
    audio = sum(float(durations[i]) for b in batches for i in b)
    held = sum(batch_cost([durations[i] for i in b], mode, crop_duration) for b in batches)
    return PlanStats(len(batches), sum(len(b) for b in batches), float(audio), float(held))
