"""Checking many files at once: headers (durations, format) or full decodes, in threads or Ray Data tasks.

Used by ``speech-ssl prepare``. A header probe opens each file and reads its header and libsndfile's
parse log (no decode): it finds missing, empty, non-audio, malformed, truncated (WAV, Ogg) and
zero-length files. ``decode=True`` also decodes every file, which finds what only decoding shows
(NaN/inf samples, frames missing from MP3/FLAC streams) at the cost of reading all the audio.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np

from speech_ssl.data.audio import downmix, probe_header, read_audio
from speech_ssl.data.report import QuarantineError

THREADS = 8
RAY_ROWS_PER_TASK = 256


@dataclass
class Probe:
    """What one file turned out to be: a header, or a quarantine reason."""

    frames: int = 0
    sample_rate: int = 0
    channels: int = 0
    reason: Optional[str] = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def probe_file(path: str, decode: bool = False, start: float = 0.0, end: Optional[float] = None) -> Probe:
    try:
        header = probe_header(path)
        if decode:
            samples, _ = read_audio(path, start, end)
            wave = downmix(samples)
            if not np.isfinite(wave).all():
                raise QuarantineError("non-finite", f"{int((~np.isfinite(wave)).sum())} NaN or infinite samples")
        return Probe(header.frames, header.sample_rate, header.channels)
    except QuarantineError as err:
        return Probe(reason=err.reason, detail=err.detail)


def _probe_table(table, decode: bool):
    """``map_batches`` function: rows (i, path, start, end) -> their probes."""
    import pyarrow as pa

    cols = {k: table.column(k).to_pylist() for k in ("i", "path", "start", "end")}
    probes = [probe_file(p, decode, s or 0.0, e) for p, s, e in zip(cols["path"], cols["start"], cols["end"])]
    return pa.table({
        "i": pa.array(cols["i"], pa.int64()),
        "frames": pa.array([p.frames for p in probes], pa.int64()),
        "sample_rate": pa.array([p.sample_rate for p in probes], pa.int64()),
        "channels": pa.array([p.channels for p in probes], pa.int64()),
        "reason": pa.array([p.reason for p in probes], pa.string()),
        "detail": pa.array([p.detail for p in probes], pa.string()),
    })


def probe_many(paths: Sequence[str], decode: bool = False, use_ray: bool = False,
               starts: Optional[Sequence[float]] = None, ends: Optional[Sequence[Optional[float]]] = None,
               progress=None) -> list[Probe]:
    """Probe every path (in this order); ``use_ray`` spreads the work over Ray Data CPU tasks."""
    starts = list(starts) if starts is not None else [0.0] * len(paths)
    ends = list(ends) if ends is not None else [None] * len(paths)
    results: list[Optional[Probe]] = [None] * len(paths)
    for i, probe in _probe_iter(paths, decode, use_ray, starts, ends):
        results[i] = probe
        if progress is not None:
            progress(1)
    return results  # type: ignore[return-value]


def _probe_iter(paths, decode, use_ray, starts, ends) -> Iterator[tuple[int, Probe]]:
    if not use_ray:
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            yield from enumerate(pool.map(lambda a: probe_file(*a), zip(paths, [decode] * len(paths), starts, ends)))
        return
    import ray

    items = [{"i": i, "path": p, "start": float(s or 0.0), "end": e} for i, (p, s, e) in
             enumerate(zip(paths, starts, ends))]
    blocks = max(1, min(len(items) // RAY_ROWS_PER_TASK + 1, 10_000))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(_probe_table, batch_size=None, batch_format="pyarrow", fn_kwargs={"decode": decode},
                        num_cpus=1)
    ds.context.print_on_execution_start = False
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in table.to_pylist():
            yield row["i"], Probe(row["frames"], row["sample_rate"], row["channels"], row["reason"], row["detail"] or "")
