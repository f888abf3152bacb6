"""Progress lines for people: plain log lines at a steady pace, each with an ETA.

    prepare: 1200/5000 files (24%) | 40.1 files/s | 0m30s elapsed | eta 1m35s

A drop-in for the tqdm bars the stages used (``update(n)`` / ``close()``), but one log line every
``every`` seconds (default 30 s, ``SPEECH_SSL_PROGRESS_SECONDS``) instead of carriage returns, so that
consoles, ``stage.log`` files and job logs all read the same. Runs shorter than one interval print nothing.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Optional

log = logging.getLogger("speech_ssl.progress")


def progress_seconds(default: float = 30.0) -> float:
    try:
        return float(os.environ.get("SPEECH_SSL_PROGRESS_SECONDS", default))
    except ValueError:
        return default


def format_duration(seconds: float) -> str:
    """``1h05m``, ``3m07s``, ``0m09s``."""
    seconds = int(max(0.0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def eta(done: float, total: float, elapsed: float) -> Optional[float]:
    """Seconds left at the pace so far (None before there is a pace)."""
    if done <= 0 or elapsed <= 0 or total <= 0:
        return None
    return max(0.0, (total - done) * elapsed / done)


class Progress:
    """``label: done/total unit (pct) | rate | elapsed | eta`` every ``every`` seconds.

    ``audio_total``: total seconds of audio, when ``update`` is also given the audio done (the line then shows
    hours and the real-time factor, and the ETA follows the audio). ``emit``: where lines go (our logger)."""

    def __init__(self, label: str, total: int, unit: str = "items", every: Optional[float] = None,
                 audio_total: Optional[float] = None, emit: Optional[Callable[[str], None]] = None):
        self.label, self.total, self.unit = label, total, unit
        self.every = progress_seconds() if every is None else every
        self.audio_total = audio_total
        self.done = 0
        self.audio = 0.0
        self.extra = ""
        self.started = time.monotonic()
        self.last = self.started
        self.lines = 0
        self._emitted_at = -1
        self._emit = emit or log.info

    def update(self, n: int = 1, audio_seconds: float = 0.0) -> None:
        self.done += n
        self.audio += audio_seconds
        now = time.monotonic()
        if self.every >= 0 and now - self.last >= self.every:
            self.last = now
            self.emit()

    def emit(self) -> None:
        self.lines += 1
        self._emitted_at = self.done
        self._emit(self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit}"
                 + (f" ({100.0 * self.done / self.total:.0f}%)" if self.total else "")]
        if self.audio_total:
            parts[0] += f", {self.audio / 3600:.3f}/{self.audio_total / 3600:.3f} h of audio"
            parts.append(f"{self.audio / elapsed:.1f}x real time, {self.done / elapsed:.1f} {self.unit}/s")
            left = eta(self.audio, self.audio_total, elapsed)
        else:
            parts.append(f"{self.done / elapsed:.1f} {self.unit}/s")
            left = eta(self.done, self.total, elapsed)
        if self.extra:
            parts.append(self.extra)
        parts.append(f"{format_duration(elapsed)} elapsed")
        parts.append(f"eta {format_duration(left)}" if left is not None else "eta -")
        return " | ".join(parts)

    def close(self) -> None:
        """A last line when earlier ones were printed (a short run stays silent)."""
        if self.lines and self.done != self._emitted_at:
            self.emit()
