"""``speech-ssl evaluate``: WER and CER of a CTC checkpoint on a labeled manifest.

References are normalised with the checkpoint's own transcript normaliser (``text_config.json``) and
scored with jiwer against greedy or lexicon beam-search hypotheses. The last line of standard output is
one JSON object: ``wer`` and ``cer`` (fractions), the counts behind them, ``utterances``, ``audio_hours``,
``rtf`` (processing seconds per audio second: data wait + forward + search, after the model is loaded)
and the ingest counts (``read = used + quarantined + filtered``). ``output`` gets the same object;
``hypotheses`` one JSON line per utterance (id, path, ref, hyp and its error counts).

Test sets above ``ray_threshold`` utterances are decoded by Ray Data tasks (an embedded Ray, or
``ray.address``) while the model runs here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from speech_ssl.asr.decoding import BeamConfig
from speech_ssl.data.config import DataConfig
from speech_ssl.precision import precision_field
from speech_ssl.runtime import RayConfig

log = logging.getLogger(__name__)

__all__ = ["BeamConfig", "Config", "EvalDataConfig", "run"]


@dataclass(kw_only=True)
class EvalDataConfig(DataConfig):
    """test: labeled manifest to score (JSONL with `text`, or a fairseq TSV with its .wrd)."""

    test: str


@dataclass
class Config:
    """
    checkpoint: a fine-tuned checkpoint directory (or a fine-tuning run's output_dir: its best).
    decoder: greedy | beam (settings under beam.*).
    output: JSON file for the scores (the same object is the last line printed).
    hypotheses: JSONL of per-utterance hypotheses (default: <output stem>.hyp.jsonl when output is set).
    precision: auto (bf16 autocast on GPUs and on CPUs with native bf16, else fp32) | fp32 | bf16 | fp16 (GPUs).
    ray_threshold: test sets with more utterances than this are decoded by Ray Data tasks."""

    checkpoint: str
    data: EvalDataConfig
    decoder: str = field(default="greedy", metadata={"choices": ["greedy", "beam"]})
    beam: BeamConfig = field(default_factory=BeamConfig)
    output: Optional[str] = None
    hypotheses: Optional[str] = None
    precision: str = precision_field()
    ray_threshold: int = 2000
    ray: RayConfig = field(default_factory=RayConfig)


def _stem(path: str) -> str:
    return path[: -len(".json")] if path.endswith(".json") else path


class Recognition:
    """Every utterance through ``recognizer``, as the results come (``for result in Recognition(...)``), with
    progress lines with an ETA on standard error; afterwards ``report`` (read/used/quarantined) and
    ``elapsed`` (seconds). Ray Data decodes when the input is large or a cluster is named; small inputs stay
    in-process."""

    def __init__(self, recognizer, utterances, data: DataConfig, ray_cfg: RayConfig, ray_threshold: int,
                 stage: str):
        from speech_ssl.runtime import resolve_address

        self.recognizer, self.utterances, self.data, self.ray_cfg = recognizer, utterances, data, ray_cfg
        self.use_ray = len(utterances) > ray_threshold or resolve_address(ray_cfg) is not None
        self.stage = stage
        self.report = None
        self.elapsed = 0.0

    def __iter__(self):
        from speech_ssl.progress import Progress
        from speech_ssl.runtime import ray_session

        with ray_session(self.ray_cfg) if self.use_ray else contextlib.nullcontext():
            stream = self.recognizer.batches(self.utterances, self.data, self.use_ray)
            bar = Progress(self.stage, len(stream.rows), "utterances")
            started = time.perf_counter()
            for result in self.recognizer.recognize(stream):
                bar.update(1)
                yield result
            self.elapsed = time.perf_counter() - started
            bar.close()
        self.report = stream.report


def run(cfg: Config) -> dict[str, Any]:
    """Score the checkpoint on ``data.test``; prints and returns the results object."""
    from speech_ssl.asr.recognizer import Recognizer
    from speech_ssl.asr.scoring import COUNT_KEYS, rates, utterance_errors
    from speech_ssl.data import read_source
    from speech_ssl.errors import SpeechSSLError
    from speech_ssl.stages.common import check_input_path, check_output_file

    check_input_path("checkpoint", cfg.checkpoint)  # before the model loads or Ray starts
    check_input_path("data.test", cfg.data.test)
    check_output_file("output", cfg.output)
    check_output_file("hypotheses", cfg.hypotheses)
    recognizer = Recognizer.load(cfg.checkpoint, cfg.decoder, cfg.beam, fallback_text=cfg.data.text,
                                 precision=cfg.precision)
    utterances = read_source(cfg.data.test, cfg.data.extensions, tsv_sample_rate=cfg.data.tsv_sample_rate)
    unlabeled = [u for u in utterances if u.text is None]
    if unlabeled:
        raise SpeechSSLError(f"data.test: {len(unlabeled)} of {len(utterances)} rows have no transcript ('text'), "
                             f"e.g. {unlabeled[0].source_path}; evaluate needs a labeled manifest (use "
                             "speech-ssl transcribe for unlabeled audio)")
    # One error listing every character the checkpoint's normaliser refuses, before any audio is read.
    recognizer.normalizer.check(u.text for u in utterances)

    durations = {u.id: u.duration for u in utterances}  # manifest or header durations (model frames round down)
    rows: dict[str, dict[str, Any]] = {}
    totals = {k: 0 for k in COUNT_KEYS}
    empty_refs = 0
    audio_seconds = 0.0
    recognition = Recognition(recognizer, utterances, cfg.data, cfg.ray, cfg.ray_threshold, "evaluate")
    for result in recognition:
        errors = utterance_errors(result.reference or "", result.text)
        if errors is None:
            empty_refs += 1
        else:
            for k in COUNT_KEYS:
                totals[k] += errors[k]
        audio_seconds += durations.get(result.id, result.seconds)
        rows[result.id] = {"id": result.id, "path": result.path, "ref": result.reference, "hyp": result.text,
                           **(errors or {k: None for k in COUNT_KEYS})}
    report, elapsed = recognition.report, recognition.elapsed
    report.raise_if_nothing_used(cfg.data.test)

    scored = len(rows) - empty_refs
    results: dict[str, Any] = {
        **rates(totals), **totals,
        "utterances": scored, "empty_references": empty_refs,
        "audio_hours": audio_seconds / 3600,
        "rtf": elapsed / max(audio_seconds, 1e-9),
        "elapsed_seconds": elapsed, **recognizer.timing,
        "read": report.read, "used": report.used, "quarantined": report.quarantined, "filtered": report.filtered,
        "quarantine_reasons": report.reasons("quarantined"), "filter_reasons": report.reasons("filtered"),
        "decoder": cfg.decoder, "checkpoint": recognizer.source, "test": cfg.data.test,
    }
    if cfg.decoder == "beam":
        results["beam"] = {"beam_size": cfg.beam.beam_size, "lexicon": cfg.beam.lexicon or "training transcripts",
                           "kenlm": cfg.beam.kenlm, "lm_weight": cfg.beam.lm_weight if cfg.beam.kenlm else 0.0,
                           "word_score": cfg.beam.word_score}

    hypotheses = cfg.hypotheses or (_stem(cfg.output) + ".hyp.jsonl" if cfg.output else None)
    if hypotheses:
        os.makedirs(os.path.dirname(os.path.abspath(hypotheses)), exist_ok=True)
        with open(hypotheses, "w", encoding="utf-8") as f:
            for utt in utterances:  # manifest order
                if utt.id in rows:
                    f.write(json.dumps(rows[utt.id], ensure_ascii=False) + "\n")
        results["hypotheses"] = hypotheses
    if report.entries:
        where = _stem(cfg.output) + ".quarantine.jsonl" if cfg.output else None
        if where:
            results["quarantine_report"] = report.write_jsonl(where)
        for e in report.entries[:20]:
            log.warning("%s %s: %s %s", e["kind"], e["path"], e["reason"], e.get("detail", ""))
    if cfg.output:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        with open(cfg.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    log.info("evaluate (%s) on %s: WER %.4f, CER %.4f over %d utterances (%.3f h), RTF %.4f",
             cfg.decoder, cfg.data.test, results["wer"], results["cer"], scored, results["audio_hours"],
             results["rtf"])
    print(report.summary_line("evaluate"))
    from speech_ssl.pipeline import in_stage

    if not in_stage():  # the results object for scripts; in a pipeline it is in results.json and the summary
        print(json.dumps(results), flush=True)
    return results
