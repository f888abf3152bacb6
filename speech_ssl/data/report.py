"""Quarantine and the counts every stage prints: read = used + quarantined + filtered.

A bad file never stops a stage. Decoding raises :class:`QuarantineError` with a short reason code
(``missing``, ``empty``, ``not-audio``, ``corrupt``, ``truncated``, ``zero-length``, ``non-finite``,
``too-short``, ``unreadable``) and a detail; the stream or scan records it in an :class:`IngestReport`
and moves on. Rows left out by the duration filters are counted as ``filtered`` with the rule they broke.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from speech_ssl.errors import SpeechSSLError

# Reason codes, in the order a file is checked.
REASONS = ("missing", "empty", "not-audio", "corrupt", "truncated", "zero-length", "non-finite", "too-short",
           "unreadable")


class QuarantineError(Exception):
    """Audio that cannot be used. ``reason`` is one of REASONS; ``detail`` says what was seen."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}; expected one of {REASONS}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class IngestReport:
    """What a stage read and what became of it.

    read == used + quarantined + filtered always holds. ``entries`` lists every quarantined or
    filtered row once (``{"path", "reason", "detail", "id", "kind"}``, kind ``quarantined`` or
    ``filtered``), even when a stream reads the same bad file again in a later epoch (the counts are
    cumulative over everything read, the entries are not repeated). ``audio_seconds`` is the unpadded
    audio handed out, ``padded_seconds`` what the batches held with padding (observed padding waste).
    """

    read: int = 0
    used: int = 0
    quarantined: int = 0
    filtered: int = 0
    entries: list[dict[str, Any]] = field(default_factory=list)
    audio_seconds: float = 0.0
    padded_seconds: float = 0.0
    _seen: set = field(default_factory=set, repr=False, compare=False)

    # -- recording -------------------------------------------------------------------------------------
    def _entry(self, kind: str, path: str, reason: str, detail: str, id: Optional[str]) -> None:
        key = (kind, path, id, reason)
        if key in self._seen:
            return
        self._seen.add(key)
        self.entries.append({"path": path, "reason": reason, "detail": detail, "id": id, "kind": kind})

    def add_used(self, count: int, audio_seconds: float = 0.0, padded_seconds: float = 0.0) -> None:
        self.read += count
        self.used += count
        self.audio_seconds += audio_seconds
        self.padded_seconds += padded_seconds

    def add_quarantined(self, path: str, reason: str, detail: str = "", id: Optional[str] = None) -> None:
        self.read += 1
        self.quarantined += 1
        self._entry("quarantined", path, reason, detail, id)

    def add_filtered(self, path: str, reason: str, detail: str = "", id: Optional[str] = None) -> None:
        self.read += 1
        self.filtered += 1
        self._entry("filtered", path, reason, detail, id)

    def merge(self, other: "IngestReport") -> "IngestReport":
        """Add ``other`` into this report (e.g. the reports of all training workers); returns self."""
        self.read += other.read
        self.used += other.used
        self.quarantined += other.quarantined
        self.filtered += other.filtered
        self.audio_seconds += other.audio_seconds
        self.padded_seconds += other.padded_seconds
        for e in other.entries:
            self._entry(e["kind"], e["path"], e["reason"], e.get("detail", ""), e.get("id"))
        return self

    # -- reading -------------------------------------------------------------------------------------
    @property
    def padding_waste(self) -> float:
        """Fraction of the batches' samples that were padding (0 when nothing was padded)."""
        if self.padded_seconds <= 0:
            return 0.0
        return max(0.0, 1.0 - self.audio_seconds / self.padded_seconds)

    def reasons(self, kind: str = "quarantined") -> dict[str, int]:
        """How many distinct entries per reason code."""
        counts: dict[str, int] = {}
        for e in self.entries:
            if e["kind"] == kind:
                counts[e["reason"]] = counts.get(e["reason"], 0) + 1
        return counts

    def summary_line(self, stage: str = "") -> str:
        """``read N = used U + quarantined Q + filtered F`` with the reasons and audio hours."""
        head = f"{stage}: " if stage else ""
        line = (f"{head}read {self.read} = used {self.used} + quarantined {self.quarantined} "
                f"+ filtered {self.filtered}")
        parts = []
        if self.quarantined:
            parts.append("quarantined: " + ", ".join(f"{k} {v}" for k, v in sorted(self.reasons().items())))
        if self.filtered:
            parts.append("filtered: " + ", ".join(f"{k} {v}" for k, v in sorted(self.reasons("filtered").items())))
        if self.audio_seconds:
            parts.append(f"{self.audio_seconds / 3600:.3f} h of audio")
        if self.padded_seconds:
            parts.append(f"padding {100 * self.padding_waste:.1f}%")
        return line + (f" ({'; '.join(parts)})" if parts else "")

    def write_jsonl(self, path: str | os.PathLike) -> str:
        """Write the entries (quarantined and filtered rows), one JSON object a line."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            for e in self.entries:
                f.write(json.dumps(e) + "\n")
        return path

    def to_dict(self) -> dict[str, Any]:
        """Plain data (to send a worker's report to the driver)."""
        return {"read": self.read, "used": self.used, "quarantined": self.quarantined, "filtered": self.filtered,
                "audio_seconds": self.audio_seconds, "padded_seconds": self.padded_seconds,
                "entries": list(self.entries)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IngestReport":
        report = cls(read=data["read"], used=data["used"], quarantined=data["quarantined"],
                     filtered=data["filtered"], audio_seconds=data.get("audio_seconds", 0.0),
                     padded_seconds=data.get("padded_seconds", 0.0))
        for e in data.get("entries", []):
            report._entry(e["kind"], e["path"], e["reason"], e.get("detail", ""), e.get("id"))
        return report

    def raise_if_nothing_used(self, what: str = "the corpus") -> None:
        """A corpus where every row was quarantined or filtered is an error, not an empty run."""
        if self.read > 0 and self.used == 0:
            raise SpeechSSLError(nothing_used_message(what, self))


def nothing_used_message(what: str, report: IngestReport, examples: Iterable[dict] | None = None) -> str:
    examples = list(examples if examples is not None else report.entries)[:3]
    shown = "; ".join(f"{e['path']}: {e['reason']}" + (f" ({e['detail']})" if e.get("detail") else "")
                      for e in examples)
    return (f"nothing usable in {what}: every one of the {report.read} rows read was quarantined or filtered "
            f"({report.summary_line()}). First problems: {shown}.")
