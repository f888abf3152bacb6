"""``speech-ssl prepare``: scan audio into a JSONL manifest (durations from headers, bad files reported).

Every file named by the input (a directory scanned recursively, a JSONL or fairseq TSV manifest, a list
of paths; local or URIs) is opened and its header read (no full decode unless ``decode=true``). Good
files become manifest lines ``{"path", "duration", "sample_rate", "channels", "text"?, "speaker"?}``
with paths relative to the output's folder (URIs stay absolute); transcripts and speakers of an input
manifest are carried over. Unreadable files go to the quarantine report (JSONL: path, reason, detail)
beside the output. Large inputs are probed by Ray Data tasks (an embedded Ray, or ``ray.address``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

from speech_ssl.data.config import AUDIO_EXTENSIONS
from speech_ssl.runtime import RayConfig


@dataclass
class Config:
    """
    input: a directory, a JSONL or fairseq TSV manifest, or a list of paths.
    output: the JSONL manifest to write (paths relative to its folder where possible).
    extensions: audio file suffixes picked up when a directory or a list is scanned.
    quarantine: the quarantine report (default: <output>.quarantine.jsonl beside the output).
    decode: decode every file fully (finds NaN/inf samples and damaged compressed streams; slower).
    ray_threshold: inputs with more files than this are probed by Ray Data tasks, fewer by threads here.
    tsv_sample_rate: rate of the num_samples column of a fairseq TSV input.
    """

    input: str
    output: str
    extensions: list[str] = field(default_factory=lambda: list(AUDIO_EXTENSIONS))
    quarantine: Optional[str] = None
    decode: bool = False
    ray_threshold: int = 5000
    tsv_sample_rate: int = 16000
    ray: RayConfig = field(default_factory=RayConfig)


def quarantine_path(output: str) -> str:
    stem = output[: -len(".jsonl")] if output.endswith(".jsonl") else output
    return stem + ".quarantine.jsonl"


def _manifest_path(resolved: str, out_dir: str) -> str:
    if "://" in resolved:
        return resolved
    return os.path.relpath(resolved, out_dir)


def run(cfg: Config) -> None:
    from speech_ssl.data.report import IngestReport
    from speech_ssl.data.scan import probe_many
    from speech_ssl.data.sources import list_source, unique_ids
    from speech_ssl.errors import SpeechSSLError
    from speech_ssl.progress import Progress
    from speech_ssl.runtime import ray_session

    from speech_ssl.stages.common import check_input_path, check_output_file

    check_input_path("input", cfg.input)
    check_output_file("output", cfg.output)
    extensions = [e if e.startswith(".") else "." + e for e in cfg.extensions]
    rows = list_source(cfg.input, extensions, tsv_sample_rate=cfg.tsv_sample_rate)
    unique_ids(rows)
    if not rows:
        raise SpeechSSLError(f"no audio files ({', '.join(extensions)}) found in {cfg.input}")
    use_ray = len(rows) > cfg.ray_threshold
    bar = Progress("prepare", len(rows), "files")  # a line with an ETA every few seconds
    args = dict(decode=cfg.decode, starts=[r.start for r in rows], ends=[r.end for r in rows], progress=bar.update)
    if use_ray:
        with ray_session(cfg.ray):
            probes = probe_many([r.path for r in rows], use_ray=True, **args)
    else:
        probes = probe_many([r.path for r in rows], use_ray=False, **args)
    bar.close()

    output = os.path.abspath(os.path.expanduser(cfg.output))
    out_dir = os.path.dirname(output)
    os.makedirs(out_dir, exist_ok=True)
    report = IngestReport()
    seconds = 0.0
    tmp = output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row, probe in zip(rows, probes):
            if not probe.ok:
                report.add_quarantined(row.path, probe.reason, probe.detail, row.id)
                continue
            duration = probe.duration
            line = {"path": _manifest_path(row.path, out_dir)}
            if row.end is not None or row.start:
                end = min(row.end if row.end is not None else duration, duration)
                line.update(start=row.start, end=end)
                duration = end - row.start
            line.update(duration=round(duration, 6), sample_rate=probe.sample_rate, channels=probe.channels)
            if row.text is not None:
                line["text"] = row.text
            if row.speaker is not None:
                line["speaker"] = row.speaker
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            report.add_used(1, duration)
            seconds += duration
    qpath = report.write_jsonl(cfg.quarantine or quarantine_path(output))
    if report.used == 0:
        os.remove(tmp)
        report.raise_if_nothing_used(cfg.input)
    os.replace(tmp, output)
    # One line per manifest: the counts, where it went, and where the quarantine report is.
    print(f"{report.summary_line('prepare')} -> {output} (quarantine report {os.path.basename(qpath)})")
