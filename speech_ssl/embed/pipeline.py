"""``speech-ssl embed`` on Ray Data: the driver (``embed_corpus``), from a configuration to ``_summary.json``.

The path of a corpus, and the module that holds each part:

1. Driver (here): ``read_source`` lists the utterances (durations from the manifest or file headers); long
   recordings are cut into segments and the duration filters applied (``data.plan.expand_rows``);
   utterances already in finished shards of the output are skipped (``shards.scan_output``). The model's
   configuration comes from the checkpoint without its weights where it allows (``model_config``).
2. Planning (``planning``): the rest goes into length-bucketed batches under the audio-seconds budget
   (``data.plan.plan_epoch``, in length order), and consecutive batches are grouped into shards of about
   ``shard_seconds`` of audio.
3. Ray Data CPU tasks (``decode``; one task per shard): the data layer's ``Collator`` decodes, downmixes,
   resamples and normalises every row and pads each batch (``pad``), or splits it into rows of one length
   (``exact``); bad files are quarantined, never raised. A shard travels as one row.
4. A pool of actors (``actor``; sized by ``placement``: one GPU per actor on GPU nodes, CPUs otherwise) each
   hold one :class:`~speech_ssl.embed.embedder.Embedder`, embed a shard's batches and write the shard
   themselves (temporary name, then rename), returning only counts to the driver. ``dataflow`` wires
   stages 3 and 4 into one Ray Data graph.
5. Driver: progress lines, the quarantine report and ``_summary.json``.

A crash loses the shards in flight only; a re-run with the same configuration finds the finished shards
and embeds only the utterances they lack.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

from speech_ssl import storage
from speech_ssl.data.audio import FeatureSpec
from speech_ssl.data.model_inputs import feature_spec_for, frame_rate, receptive_field_seconds
from speech_ssl.data.report import IngestReport
from speech_ssl.embed import shards as shard_io
from speech_ssl.embed.actor import ActorSpec, ShardEmbedder, release_freed_memory
from speech_ssl.embed.decode import DECODE_WORKER_BYTES, decode_shards, unpack_shard
from speech_ssl.embed.model_config import padding_exact_by, read_model_config
from speech_ssl.embed.placement import MAX_CPU_ACTORS_PER_NODE, Placement, place
from speech_ssl.embed.planning import MIN_SHARD_SECONDS, ShardPlan, plan_shards, shard_job
from speech_ssl.errors import SpeechSSLError
from speech_ssl.progress import Progress as _Progress

log = logging.getLogger("speech_ssl.embed")

BATCHING_MODES = ("pad", "exact")

# Names of the parts, importable from here as before the split.
__all__ = ["embed_corpus", "fingerprint_of", "Progress", "BATCHING_MODES", "read_model_config", "ShardPlan",
           "plan_shards", "shard_job", "MIN_SHARD_SECONDS", "decode_shards", "unpack_shard", "DECODE_WORKER_BYTES",
           "ActorSpec", "ShardEmbedder", "release_freed_memory", "Placement", "place", "MAX_CPU_ACTORS_PER_NODE"]


class Progress(_Progress):
    """Periodic lines: utterances and audio hours done (of the total), real-time factor, shards, ETA
    (``speech_ssl.progress``)."""

    def __init__(self, total_utterances: int, total_seconds: float, every: float):
        super().__init__("embed", total_utterances, "utterances", every, audio_total=total_seconds, emit=log.info)
        self.shards = 0

    def update(self, utterances: int, seconds: float) -> None:  # type: ignore[override]
        self.shards += 1
        self.extra = f"{self.shards} shards"
        super().update(utterances, seconds)


def fingerprint_of(checkpoint: str, layers: list[int], pooling: str, dtype: str, precision: str,
                   spec: FeatureSpec, segment_duration: float) -> dict[str, Any]:
    """What must match for a re-run to add to an output (compared against every finished shard)."""
    return {"checkpoint": storage.normalize(checkpoint), "layers": list(layers),
            "pooling": pooling, "dtype": dtype, "precision": precision, "feature": asdict(spec),
            "segment_duration": segment_duration}


@dataclass
class _Work:
    """What the driver knows before Ray starts."""

    cfg: Any  # speech_ssl.stages.embed.Config
    model_cfg: Any  # ModelConfig
    architecture: str
    layers: list[int]
    spec: FeatureSpec
    fingerprint: dict[str, Any]
    out: shard_io.OutputDir
    existing: shard_io.ExistingOutput
    report: IngestReport  # everything read, this run's embedding not yet merged
    earlier: list  # rows embedded by earlier runs
    todo: list  # rows to embed now
    data: Any = None  # DataConfig with the receptive field as the shortest duration

    @property
    def run_number(self) -> int:
        return self.existing.last_run + 1


@dataclass
class _Embedded:
    """What the actors did in this run."""

    report: IngestReport = field(default_factory=IngestReport)
    placement: Optional[Placement] = None
    embed_seconds: float = 0.0
    actor_seconds: float = 0.0
    written: list[str] = field(default_factory=list)
    precisions: set[str] = field(default_factory=set)  # what the actors resolved cfg.precision to


def embed_corpus(cfg) -> dict[str, Any]:
    """Run ``speech-ssl embed`` (``cfg``: ``speech_ssl.stages.embed.Config``); returns the summary."""
    wall_start = time.perf_counter()
    work = _prepare(cfg)
    log.info("embed: %d utterances (%.3f h) to embed with %s (%s, layers %s, pooling %s, %s)%s",
             len(work.todo), sum(r.duration for r in work.todo) / 3600, cfg.checkpoint, work.architecture,
             work.layers, cfg.pooling, cfg.dtype,
             f"; {len(work.earlier)} already embedded in {work.out.location}" if work.earlier else "")
    embedded = _embed(work) if work.todo else _Embedded()
    work.report.merge(embedded.report)
    summary = _write_summary(work, embedded, time.perf_counter() - wall_start)
    work.report.raise_if_nothing_used(cfg.input)
    return summary


def _check_choices(cfg) -> None:
    from speech_ssl.config import ConfigError
    from speech_ssl.embed.embedder import OUTPUT_DTYPES, POOLINGS, PRECISIONS

    for key, value, choices in (("pooling", cfg.pooling, POOLINGS), ("dtype", cfg.dtype, list(OUTPUT_DTYPES)),
                                ("precision", cfg.precision, PRECISIONS), ("batching", cfg.batching, BATCHING_MODES),
                                ("device", cfg.device, ("auto", "cpu", "cuda"))):
        if value not in choices:
            raise ConfigError(key, f"unknown value {value!r}.", choices)
    if cfg.shard_seconds <= 0:
        raise ConfigError("shard_seconds", f"must be positive, got {cfg.shard_seconds}.")


def _prepare(cfg) -> _Work:
    """Checks, the model's configuration, the output folder's finished work, and the rows still to embed."""
    from speech_ssl.embed.embedder import resolve_layers

    _check_choices(cfg)
    model_cfg, architecture = read_model_config(storage.fetched(cfg.checkpoint))
    layers = resolve_layers(cfg.layers, model_cfg.num_layers)
    spec = feature_spec_for(model_cfg, cfg.data.sample_rate)
    fingerprint = fingerprint_of(cfg.checkpoint, layers, cfg.pooling, cfg.dtype, cfg.precision, spec,
                                 cfg.data.segment_duration)
    out = shard_io.OutputDir(cfg.output)
    work = _Work(cfg, model_cfg, architecture, layers, spec, fingerprint, out, _scan_output(out, cfg, fingerprint),
                 IngestReport(), [], [])
    _select_rows(work)
    return work


def _scan_output(out: shard_io.OutputDir, cfg, fingerprint: dict[str, Any]) -> shard_io.ExistingOutput:
    """Create the output folder (emptied of our files with ``overwrite``) and read what earlier runs left."""
    out.makedirs()
    if cfg.overwrite:
        for name in out.names():
            if shard_io.SHARD_PATTERN.match(name) or shard_io.TEMP_PATTERN.match(name) or name in (
                    shard_io.SUMMARY, shard_io.QUARANTINE):
                out.remove(out.join(name))
    existing = shard_io.scan_output(out, fingerprint)
    for name in existing.stale_temps:  # left by an interrupted run: never a finished shard
        out.remove(out.join(name))
    if existing.stale_temps:
        log.info("embed: removed %d unfinished temporary file(s) of an interrupted run", len(existing.stale_temps))
    for name in existing.unreadable:
        log.warning("embed: %s does not read as Parquet; its utterances are embedded again", out.uri(name))
    return existing


def _select_rows(work: _Work) -> None:
    """Rows: listed, segmented, filtered; those finished earlier are skipped."""
    from speech_ssl.data import read_source
    from speech_ssl.data.cache import check_spec
    from speech_ssl.data.plan import expand_rows

    cfg, report = work.cfg, work.report
    utterances = read_source(cfg.input, cfg.data.extensions, tsv_sample_rate=cfg.data.tsv_sample_rate)
    for cache in utterances.caches:
        check_spec(cache.meta, work.spec, cache.root, "the checkpoint's model")
    receptive = receptive_field_seconds(work.model_cfg, work.spec)
    work.data = replace(cfg.data, min_duration=max(cfg.data.min_duration, receptive))
    rows, filtered = expand_rows(utterances, work.data)
    for q in utterances.quarantined:
        report.add_quarantined(q["path"], q["reason"], q.get("detail", ""), q.get("id"))
    for f in filtered:
        report.add_filtered(f["path"], f["reason"], f["detail"], f["id"])
    done = shard_io.complete_ids(work.existing, len(work.layers))
    work.earlier = [r for r in rows if r.id in done]
    work.todo = [r for r in rows if r.id not in done]
    report.add_used(len(work.earlier), sum(r.duration for r in work.earlier))
    if report.read == 0 and not work.todo:
        raise SpeechSSLError(f"no audio found in {cfg.input}")


def _embed(work: _Work) -> _Embedded:
    """Plan the shards and run them through Ray Data (``dataflow``), collecting the actors' results."""
    from speech_ssl.data.collate import Collator
    from speech_ssl.embed.dataflow import run_shards
    from speech_ssl.embed.decode import decode_task_memory
    from speech_ssl.embed.planning import shard_seconds_for
    from speech_ssl.precision import resolve_precision
    from speech_ssl.runtime import ray_session

    cfg, out, model_cfg = work.cfg, work.out, work.model_cfg
    embedded = _Embedded()
    todo_seconds = sum(r.duration for r in work.todo)
    # Ray's own output in _logs/ray.log: a leading "_" keeps it out of readers of the Parquet folder.
    with ray_session(cfg.ray, log_dir=None if "://" in out.location else f"{out.location}/_logs"):
        placement = embedded.placement = place(cfg.device, cfg.num_actors, cfg.actor_cpus,
                                               cfg.data.num_cpus_per_reader)
        if placement.device == "cpu" and cfg.precision == "fp16":  # refused here, before any actor starts
            resolve_precision(cfg.precision, "cpu", "precision")
        shard_plans = plan_shards(work.todo, work.data, cfg.batching,
                                  shard_seconds_for(cfg.shard_seconds, todo_seconds, placement.num_actors),
                                  work.run_number)
        actor_spec = ActorSpec(
            checkpoint=storage.normalize(cfg.checkpoint), layers=work.layers, pooling=cfg.pooling,
            dtype=cfg.dtype, precision=cfg.precision, device=placement.device, threads=placement.threads,
            output=out.location, unit_seconds=work.spec.unit_seconds,
            concurrent_shards=cfg.concurrent_shards or (4 if placement.device == "cuda" else 1),
            compile=bool(cfg.compile),
            metadata={"fingerprint": work.fingerprint, "model": {"checkpoint": cfg.checkpoint,
                                                                 "architecture": work.architecture,
                                                                 "config": asdict(model_cfg)},
                      "layers": work.layers, "pooling": cfg.pooling, "dtype": cfg.dtype,
                      "dim": model_cfg.embed_dim, "frame_rate_hz": frame_rate(model_cfg)})
        log.info("embed: %d shards for %d model actor(s) on %s (%g CPU%s each), decode tasks of %g CPU",
                 len(shard_plans), placement.num_actors, placement.device, placement.actor_cpus,
                 ", 1 GPU" if placement.actor_gpus else "", placement.reader_cpus)
        jobs = [shard_job(p, work.todo) for p in shard_plans]
        collator = Collator(work.spec, "exact" if cfg.batching == "exact" else "pad")
        progress = Progress(len(work.todo), todo_seconds, cfg.progress_seconds)
        embed_start = time.perf_counter()
        memory = decode_task_memory(max(p.audio_seconds for p in shard_plans), work.spec)
        for result in run_shards(jobs, collator, actor_spec, placement, cfg.data, memory):
            for q in result["quarantined"]:
                embedded.report.add_quarantined(q["path"], q["reason"], q.get("detail", ""), q.get("id"))
            embedded.report.add_used(result["utterances"], result["audio_seconds"], result["padded_seconds"])
            embedded.actor_seconds += result["seconds"]
            embedded.precisions.add(result["precision"])
            if result["shard"]:
                embedded.written.append(result["shard"])
            progress.update(result["utterances"], result["audio_seconds"])
        embedded.embed_seconds = time.perf_counter() - embed_start  # the last line below says it all
    return embedded


def _write_summary(work: _Work, embedded: _Embedded, wall: float) -> dict[str, Any]:
    """``_quarantine.jsonl`` and ``_summary.json`` (earlier runs' entries kept under ``runs``), and the last
    log lines."""
    from speech_ssl.config import to_dict

    cfg, out, report, this_run, model_cfg = work.cfg, work.out, work.report, embedded.report, work.model_cfg
    out.write_text(shard_io.QUARANTINE, "".join(json.dumps(e) + "\n" for e in report.entries))
    previous = json.loads(out.read_text(shard_io.SUMMARY) or "{}")
    summary = {
        "output": out.location,
        "model": {"checkpoint": cfg.checkpoint, "architecture": work.architecture,
                  "num_layers": model_cfg.num_layers, "dim": model_cfg.embed_dim,
                  "frame_rate_hz": frame_rate(model_cfg), "padding_exact_by": padding_exact_by(model_cfg)},
        "layers": work.layers, "pooling": cfg.pooling, "dtype": cfg.dtype, "precision": cfg.precision,
        "counts": {"read": report.read, "used": report.used, "quarantined": report.quarantined,
                   "filtered": report.filtered, "embedded_this_run": this_run.used,
                   "already_embedded": len(work.earlier)},
        "quarantine_reasons": report.reasons(), "filter_reasons": report.reasons("filtered"),
        "audio_hours": {"total": report.audio_seconds / 3600, "this_run": this_run.audio_seconds / 3600},
        "shards": sorted(set(work.existing.shards) | set(embedded.written)),
        "this_run": {
            "run": work.run_number, "shards_written": len(embedded.written), "wall_seconds": wall,
            "embed_seconds": embedded.embed_seconds,  # Ray Data pipeline, actor start included
            "actor_seconds": embedded.actor_seconds,  # summed over actors: decoded shard in, shard written
            "audio_seconds_per_second": this_run.audio_seconds / wall if wall > 0 else 0.0,  # = x real time
            "utterances_per_second": this_run.used / wall if wall > 0 else 0.0,
            "padding_waste": this_run.padding_waste,
            "placement": asdict(embedded.placement) if embedded.placement else None,
            "resolved_precision": sorted(embedded.precisions),  # per actor device; [] when nothing was embedded
        },
        "config": to_dict(cfg),
    }
    summary["runs"] = list(previous.get("runs", [])) + [dict(summary["this_run"], counts=dict(summary["counts"]))]
    out.write_text(shard_io.SUMMARY, json.dumps(summary, indent=1) + "\n")
    log.info("embed: %s", report.summary_line())
    precision = (f"; precision {cfg.precision} resolved to {', '.join(sorted(embedded.precisions))} on the actors"
                 if embedded.precisions else "")
    log.info("embed: %d shard(s) in %s (%d written now); %.1f s wall, %.1f s of audio per second%s; summary %s",
             len(summary["shards"]), out.location, len(embedded.written), wall,
             summary["this_run"]["audio_seconds_per_second"], precision, out.uri(shard_io.SUMMARY))
    return summary
