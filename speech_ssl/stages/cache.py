"""``speech-ssl cache``: decode a corpus once into a decoded-audio cache that every stage reads at memory speed.

The input (a directory, JSONL or fairseq TSV manifest, a list; local or URIs) is decoded, downmixed and
resampled to the model's rate by Ray tasks, one per shard, and written as Arrow IPC shards (16-bit PCM for
waveform models, filterbank frames for fbank models; see :mod:`speech_ssl.data.cache`). Then
``data.train=<cache>``, ``data.valid=``, ``data.test=``, ``input=`` of pretrain, finetune, evaluate,
transcribe, embed and probe accept the cache folder in place of the audio.

Shards are written atomically; a re-run with the same input and output resumes an unfinished cache and
rewrites any shard found damaged (truncated, missing). Undecodable files are quarantined and listed in
``<output>/quarantine.jsonl``; the counts read = cached + quarantined are printed at the end.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from speech_ssl.models.config import ModelOverrides
from speech_ssl.data.config import AUDIO_EXTENSIONS
from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import model_field, model_overrides_field

log = logging.getLogger(__name__)


@dataclass
class Config:
    """
    input: the corpus to cache: a directory, a JSONL or fairseq TSV manifest, or a list of paths (local or URIs).
    output: the cache folder (local, or a URI such as s3://bucket/cache); an unfinished one is resumed.
    model: the preset the cache is for; its front end decides the payload (waveform for conv front ends,
        log-mel filterbanks for fbank-*).
    model_overrides: ModelConfig fields changed from the preset (e.g. model_overrides.n_mels=64), which
        shape the payload likewise.
    dtype: auto (int16 PCM for waveform, float16 for fbank) | int16 | float32 (waveform) | float16 | float32
        (fbank). float32 gives batches identical to decoding the originals, at twice the size.
    sample_rate: the model's rate; everything is resampled to it.
    segment_duration: unlabeled recordings longer than this are cached as segments of at most this length
        (as training cuts them); transcribed utterances are never cut.
    shard_seconds: audio per shard (a shard is the unit of work and of resuming).
    extensions: audio suffixes picked up when a directory or list is scanned. tsv_sample_rate: of TSV inputs.
    """

    input: str
    output: str
    model: str = model_field("tiny")
    model_overrides: ModelOverrides = model_overrides_field()
    dtype: str = field(default="auto", metadata={"choices": ["auto", "int16", "float16", "float32"]})
    sample_rate: int = 16000
    segment_duration: float = 30.0
    shard_seconds: float = 600.0
    extensions: list[str] = field(default_factory=lambda: list(AUDIO_EXTENSIONS))
    tsv_sample_rate: int = 16000
    ray: RayConfig = field(default_factory=RayConfig)


def _check(cfg: Config) -> None:
    from speech_ssl.config import ConfigError

    for key in ("segment_duration", "shard_seconds"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(key, f"must be a positive number of seconds, got {getattr(cfg, key)}.")
    if cfg.sample_rate <= 0:
        raise ConfigError("sample_rate", f"must be positive, got {cfg.sample_rate}.")


def _rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """The rows to cache (long unlabeled recordings cut into segments) and the files quarantined by the scan."""
    import math

    from speech_ssl.data.config import DataConfig
    from speech_ssl.data.plan import expand_rows
    from speech_ssl.data.sources import list_source, probe_rows, unique_ids

    rows = list_source(cfg.input, [e if e.startswith(".") else "." + e for e in cfg.extensions],
                       tsv_sample_rate=cfg.tsv_sample_rate)
    unique_ids(rows)
    rows, bad = probe_rows(rows)
    rows, _ = expand_rows(rows, DataConfig(segment_duration=cfg.segment_duration, max_duration=math.inf))
    scanned = [{"path": b["path"], "reason": b["reason"], "detail": b["detail"], "id": b["id"]} for b in bad]
    return [{"id": r.id, "path": r.path, "source_path": r.source_path, "start": r.start, "end": r.end,
             "duration": r.duration, "text": r.text, "speaker": r.speaker} for r in rows], scanned


def run(cfg: Config) -> dict[str, Any]:
    import ray

    from speech_ssl.data import cache
    from speech_ssl.data.audio import is_uri
    from speech_ssl.data.model_inputs import feature_spec_for
    from speech_ssl.data.report import IngestReport
    from speech_ssl.errors import SpeechSSLError
    from speech_ssl.progress import Progress
    from speech_ssl.runtime import ray_session
    from speech_ssl.stages.common import resolve_model_config

    _check(cfg)
    spec = feature_spec_for(resolve_model_config(cfg.model, cfg.model_overrides), cfg.sample_rate)
    dtype = cache.resolve_dtype(spec.kind, cfg.dtype)
    root = cfg.output if is_uri(cfg.output) else str(cache.filesystem(cfg.output)[1])
    rows, scanned = _rows(cfg)
    if not rows:
        raise SpeechSSLError(f"nothing to cache: no readable audio in {cfg.input} ({len(scanned)} files quarantined "
                             "by the scan)")
    fingerprint = cache.fingerprint(rows, spec, dtype)
    plan = cache.open_plan(root, {"fingerprint": fingerprint, "input": cfg.input, "features": cache.feature_key(spec),
                                  "dtype": dtype, "segment_duration": cfg.segment_duration,
                                  "shards": cache.plan_shards([r["duration"] for r in rows], cfg.shard_seconds)})
    ranges = [tuple(r) for r in plan["shards"]]
    sidecars, damaged = cache.complete_shards(root, len(ranges))
    todo = sorted(damaged)
    for number, why in sorted(damaged.items()):
        if why is not None:
            log.warning("cache shard %05d is damaged (%s): writing it again", number, why)
    seconds = {n: sum(r["duration"] for r in rows[a:b]) for n, (a, b) in enumerate(ranges)}
    total = sum(seconds.values())
    log.info("caching %d rows (%.2f h) of %s as %s %s at %d Hz into %s: %d shards, %d to write", len(rows),
             total / 3600, cfg.input, spec.kind, dtype, spec.sample_rate, root, len(ranges), len(todo))
    started = time.monotonic()
    if todo:
        with ray_session(cfg.ray):
            write = ray.remote(num_cpus=1)(cache.write_shard)
            slots = max(1, int(ray.available_resources().get("CPU", 1)))
            bar = Progress("cache", round(sum(seconds[n] for n in todo)), "audio-s")  # lines with an ETA
            pending: dict[Any, int] = {}
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < 2 * slots:
                    n = queue.pop(0)
                    a, b = ranges[n]
                    pending[write.remote(root, n, rows[a:b], spec, dtype)] = n
                done, _ = ray.wait(list(pending), num_returns=1)
                n = pending.pop(done[0])
                try:
                    sidecars[n] = ray.get(done[0])
                except ray.exceptions.RayTaskError as err:
                    raise SpeechSSLError(f"writing cache shard {n:05d} failed: {err.cause}") from None
                bar.update(round(seconds[n]))
            bar.close()
    meta = cache.finalize(root, {"format": cache.FORMAT, "format_version": cache.FORMAT_VERSION,
                                 "fingerprint": fingerprint, "input": cfg.input, "features": cache.feature_key(spec),
                                 "dtype": dtype, "segment_duration": cfg.segment_duration},
                          [sidecars[n] for n in range(len(ranges))], scanned)
    report = IngestReport()
    for sidecar in sidecars.values():
        report.add_used(len(sidecar["rows"]), sidecar["audio_seconds"])
    for q in scanned + [q for n in sorted(sidecars) for q in sidecars[n]["quarantined"]]:
        report.add_quarantined(q["path"], q["reason"], q["detail"], q["id"])
    elapsed = time.monotonic() - started
    mb_per_hour = meta["bytes"] / 1e6 / max(meta["hours"], 1e-9)
    print(f"cache: {root}: {meta['rows']} rows, {meta['hours']:.3f} h, {meta['bytes'] / 1e6:.1f} MB "
          f"({mb_per_hour:.0f} MB per hour of audio, {spec.kind} {dtype}); {len(todo)} of {len(ranges)} shards "
          f"written in {elapsed:.0f} s")
    print(report.summary_line("cache"))
    report.raise_if_nothing_used(cfg.input)
    return {**meta, "written_shards": len(todo)}
