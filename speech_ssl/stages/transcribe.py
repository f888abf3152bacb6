"""``speech-ssl transcribe``: transcripts for new audio with a fine-tuned CTC checkpoint.

``input`` is anything the data layer reads: an audio file, a directory (scanned recursively), a JSONL or
TSV manifest or a text file of paths, local or URIs, or a list of those (``input=[a.wav,more/]``). Audio
is batched by length (padded batches of ``data.batch_seconds``); recordings longer than
``data.segment_duration`` are cut into equal segments whose transcripts are joined again. Inputs above
``ray_threshold`` files are decoded by Ray Data tasks (an embedded Ray, or ``ray.address``) while the
model runs here.

Writes one JSON line per file (``id``, ``path``, ``text``, ``duration``) to ``output``, or to standard
output when ``output`` is null; unreadable files are quarantined and listed, never fatal.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from speech_ssl.asr.decoding import BeamConfig
from speech_ssl.data.config import DataConfig
from speech_ssl.precision import precision_field
from speech_ssl.runtime import RayConfig

log = logging.getLogger(__name__)


@dataclass
class Config:
    """
    checkpoint: a fine-tuned checkpoint directory (or a fine-tuning run's output_dir: its best).
    input: an audio file, a directory, a manifest or a list of paths; several as input=[a.wav,b_dir].
    output: JSONL of transcripts (standard output if null).
    decoder: greedy | beam (settings under beam.*).
    precision: auto (bf16 autocast on GPUs and on CPUs with native bf16, else fp32) | fp32 | bf16 | fp16 (GPUs).
    ray_threshold: inputs with more files than this are decoded by Ray Data tasks."""

    checkpoint: str
    input: Union[str, list[str]]
    output: Optional[str] = None
    decoder: str = field(default="greedy", metadata={"choices": ["greedy", "beam"]})
    beam: BeamConfig = field(default_factory=BeamConfig)
    precision: str = precision_field()
    ray_threshold: int = 2000
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def _segment_of(row_id: str, ids: set[str]) -> tuple[str, int]:
    """(original id, segment number) of a row the batch plan may have cut into ``<id>@<k>`` segments."""
    if row_id in ids:
        return row_id, 0
    base, _, k = row_id.rpartition("@")
    return base, int(k)


def run(cfg: Config) -> dict[str, Any]:
    """Transcribe ``input``; returns a summary (counts, audio hours, RTF, output path)."""
    from speech_ssl.asr.recognizer import Recognizer
    from speech_ssl.data import read_source
    from speech_ssl.stages.common import check_input_path, check_output_file
    from speech_ssl.stages.evaluate import Recognition

    check_input_path("checkpoint", cfg.checkpoint)  # before the model loads or Ray starts
    check_output_file("output", cfg.output)
    recognizer = Recognizer.load(cfg.checkpoint, cfg.decoder, cfg.beam, fallback_text=cfg.data.text,
                                 precision=cfg.precision)
    utterances = read_source(cfg.input, cfg.data.extensions, tsv_sample_rate=cfg.data.tsv_sample_rate)
    # Transcripts of a manifest are not needed here, and without them long recordings can be segmented.
    unlabeled = utterances.with_rows(dataclasses.replace(u, text=None) for u in utterances)
    ids = {u.id for u in utterances}

    pieces: dict[str, list[tuple[int, str, float]]] = {}
    recognition = Recognition(recognizer, unlabeled, cfg.data, cfg.ray, cfg.ray_threshold, "transcribe")
    for result in recognition:
        base, k = _segment_of(result.id, ids)
        pieces.setdefault(base, []).append((k, result.text, result.seconds))
    report, elapsed = recognition.report, recognition.elapsed
    report.raise_if_nothing_used(cfg.input)

    if cfg.output:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
    out = open(cfg.output, "w", encoding="utf-8") if cfg.output else sys.stdout
    audio_seconds = 0.0
    written = 0
    try:
        for utt in utterances:  # input order
            parts = sorted(pieces.get(utt.id, []))
            if not parts:
                continue  # quarantined or filtered: in the report
            seconds = utt.duration if utt.duration else sum(p[2] for p in parts)
            text = " ".join(p[1] for p in parts if p[1])
            out.write(json.dumps({"id": utt.id, "path": utt.source_path, "text": text,
                                  "duration": round(seconds, 3)}, ensure_ascii=False) + "\n")
            audio_seconds += seconds
            written += 1
    finally:
        if cfg.output:
            out.close()
    summary = {"files": written, "audio_hours": audio_seconds / 3600, "rtf": elapsed / max(audio_seconds, 1e-9),
               "elapsed_seconds": elapsed, **recognizer.timing, "read": report.read, "used": report.used,
               "quarantined": report.quarantined, "filtered": report.filtered, "decoder": cfg.decoder,
               "checkpoint": recognizer.source, "output": cfg.output}
    if report.entries:
        if cfg.output:
            stem = cfg.output[: -len(".jsonl")] if cfg.output.endswith(".jsonl") else cfg.output
            summary["quarantine_report"] = report.write_jsonl(stem + ".quarantine.jsonl")
        for e in report.entries[:20]:
            log.warning("%s %s: %s %s", e["kind"], e["path"], e["reason"], e.get("detail", ""))
    # With the transcripts on standard output, the counts go to standard error.
    info = sys.stderr if not cfg.output else sys.stdout
    print(report.summary_line("transcribe"), file=info)
    print(json.dumps(summary), file=info, flush=True)
    return summary
