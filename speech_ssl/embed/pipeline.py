"""``speech-ssl embed`` on Ray Data: planned shards -> CPU decode tasks -> a pool of model actors -> Parquet.

The path of a corpus:

1. Driver: ``read_source`` lists the utterances (durations from the manifest or file headers); long
   recordings are cut into segments and the duration filters applied (``data.plan.expand_rows``);
   utterances already in finished shards of the output are skipped. The rest are planned into
   length-bucketed batches under the audio-seconds budget (``data.plan.plan_epoch``, in length order),
   and consecutive batches are grouped into shards of about ``shard_seconds`` of audio.
2. Ray Data CPU tasks (``map_batches``, one task per shard): the data layer's ``Collator`` decodes,
   downmixes, resamples and normalises every row and pads each batch (``pad``), or splits it into rows of
   one length (``exact``); bad files are quarantined, never raised. A shard travels as one row: JSON
   metadata and the raw float32 bytes of its batches.
3. A pool of actors (``ActorPoolStrategy``; one GPU per actor on GPU nodes, CPUs otherwise) each hold
   one :class:`~speech_ssl.embed.embedder.Embedder`, embed a shard's batches and write the shard
   themselves (temporary name, then rename), returning only counts to the driver.
4. Driver: progress lines, the quarantine report and ``_summary.json``.

A crash loses the shards in flight only; a re-run with the same configuration finds the finished shards
and embeds only the utterances they lack.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa

from speech_ssl.data.audio import FeatureSpec
from speech_ssl.data.cache import check_spec
from speech_ssl.data.collate import Collator, job_row, pack, unpack
from speech_ssl.data.config import DataConfig
from speech_ssl.data.plan import expand_rows, plan_epoch
from speech_ssl.data.report import IngestReport
from speech_ssl.data.sources import Utterance
from speech_ssl.embed import shards as shard_io
from speech_ssl.errors import SpeechSSLError
from speech_ssl.progress import Progress as _Progress

log = logging.getLogger("speech_ssl.embed")

BATCHING_MODES = ("pad", "exact")
MIN_SHARD_SECONDS = 30.0
DECODE_WORKER_BYTES = 512 << 20  # a Ray worker with torch, soundfile and torchaudio loaded


# ---------------------------------------------------------------------------------------------------
# The model's configuration, without loading its weights where the checkpoint allows
# ---------------------------------------------------------------------------------------------------

def read_model_config(checkpoint: str):
    """(ModelConfig, architecture) of a checkpoint: from config.json for our and transformers
    directories (no weights read), else by loading the file. Raises SpeechSSLError."""
    from pathlib import Path

    from speech_ssl.config import ConfigError, from_dict
    from speech_ssl.models import load
    from speech_ssl.models.checkpoint import FORMAT
    from speech_ssl.models.config import ModelConfig

    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise SpeechSSLError(f"no checkpoint at {checkpoint} (give one of our checkpoint directories, a "
                             "transformers model directory, or a fairseq .pt file)")
    config_json = path / "config.json"
    if path.is_dir() and config_json.is_file():
        try:
            meta = json.loads(config_json.read_text())
        except json.JSONDecodeError as err:
            raise SpeechSSLError(f"{config_json}: not valid JSON ({err})") from None
        if meta.get("format") == FORMAT:
            try:
                return from_dict(ModelConfig, meta.get("model") or {}, "model"), meta.get("architecture", "?")
            except ConfigError as err:
                raise SpeechSSLError(f"{config_json}: {err.paragraph()}") from None
        if meta.get("model_type") is not None:
            from speech_ssl.models import convert

            return convert.config_from_hf(meta), "transformers:" + ",".join(meta.get("architectures") or ["?"])
    model = load(path)
    return model.config, type(model).__name__


# ---------------------------------------------------------------------------------------------------
# Planning: rows -> batches -> shards
# ---------------------------------------------------------------------------------------------------

@dataclass
class ShardPlan:
    name: str
    batches: list[list[int]]  # row indices per planned batch
    audio_seconds: float


def plan_shards(rows: list[Utterance], data: DataConfig, mode: str, shard_seconds: float, run: int) -> list[ShardPlan]:
    """Length-bucketed batches (the data layer's plan, in length order), grouped into shards of
    consecutive batches holding about ``shard_seconds`` of audio each."""
    durations = [r.duration for r in rows]
    batches = plan_epoch(durations, data, "exact" if mode == "exact" else "pad", seed=0, epoch=0)
    shard_list: list[ShardPlan] = []
    current: list[list[int]] = []
    seconds = 0.0
    for batch in batches:
        current.append(batch)
        seconds += sum(durations[i] for i in batch)
        if seconds >= shard_seconds:
            shard_list.append(ShardPlan(shard_io.shard_name(run, len(shard_list)), current, seconds))
            current, seconds = [], 0.0
    if current:
        shard_list.append(ShardPlan(shard_io.shard_name(run, len(shard_list)), current, seconds))
    return shard_list


def shard_job(plan: ShardPlan, rows: list[Utterance]) -> dict[str, Any]:
    """What a decode task needs for one shard (plain JSON)."""
    batches = []
    for k, batch in enumerate(plan.batches):
        batch_rows = [{**job_row(rows[i]), "text": None} for i in batch]
        batches.append({"epoch": 0, "position": k, "index": k, "rows": batch_rows})
    starts = {rows[i].id: rows[i].start for batch in plan.batches for i in batch}
    return {"shard": plan.name, "batches": batches, "starts": starts}


# ---------------------------------------------------------------------------------------------------
# Ray Data stage 1 (CPU tasks): decode a shard's batches
# ---------------------------------------------------------------------------------------------------

def decode_shards(table: pa.Table, collator: Collator) -> pa.Table:
    """``map_batches`` function: shard jobs (column ``job``) -> one row per shard: ``meta`` JSON and
    ``inputs``, the float32 bytes of its batches back to back."""
    metas, blobs = [], []
    for job_json in table.column("job").to_pylist():
        job = json.loads(job_json)
        batch_metas, buffers = [], []
        for batch_job in job["batches"]:
            for out in collator(batch_job):
                meta, buffer = pack(out)
                batch_metas.append(meta)
                buffers.append(buffer)
        metas.append(json.dumps({"shard": job["shard"], "starts": job["starts"], "batches": batch_metas,
                                 "sizes": [len(b) for b in buffers]}))
        blobs.append(b"".join(buffers))
    return pa.table({"meta": pa.array(metas, pa.string()), "inputs": pa.array(blobs, pa.large_binary())})


def unpack_shard(meta_json: str, blob) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """The shard's metadata and its batches (Collator outputs with ``inputs`` as numpy arrays)."""
    meta = json.loads(meta_json)
    view = memoryview(blob)

    def batches():
        offset = 0
        for batch_meta, size in zip(meta["batches"], meta["sizes"]):
            yield unpack(batch_meta, view[offset:offset + size])
            offset += size

    return meta, batches()


# ---------------------------------------------------------------------------------------------------
# Ray Data stage 2 (actor pool): embed a shard and write it
# ---------------------------------------------------------------------------------------------------

@dataclass
class ActorSpec:
    """What every model actor is built from (plain data, shipped to the actors)."""

    checkpoint: str
    layers: list[int]
    pooling: str
    dtype: str
    precision: str
    device: str  # cpu | cuda
    threads: int  # torch intra-op threads (CPU actors)
    output: str
    unit_seconds: float  # seconds per input step
    metadata: dict[str, Any]
    concurrent_shards: int = 1  # shards in one actor at once: one computes, the others are written
    compile: bool = False  # torch.compile of the encoder


class ShardEmbedder:
    """Ray Data actor: loads the model once, then embeds and writes one shard per call.

    With ``concurrent_shards > 1`` Ray Data runs that many calls in threads of the actor; the Embedder
    runs one batch at a time on the device (its own lock), and the Parquet encoding and writing of
    finished shards, which release the GIL, overlap the next shard's compute. On a GPU a frame-level shard
    takes far longer to write than to compute. A shard's batches go through ``Embedder.embed_batches``: on
    a GPU the copy of a batch's embeddings to (pinned) host memory overlaps the next batch's compute.
    """

    def __init__(self, spec: ActorSpec):
        import torch

        from speech_ssl.embed.embedder import Embedder

        if spec.device == "cpu" and spec.threads > 0:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        self.embedder = Embedder.from_checkpoint(spec.checkpoint, layers=spec.layers, pooling=spec.pooling,
                                                 device=spec.device, precision=spec.precision, dtype=spec.dtype,
                                                 compile=spec.compile)
        # What precision=auto became on this actor's device, in every shard it writes.
        self.metadata = dict(spec.metadata, resolved_precision=self.embedder.precision)
        self.out = shard_io.OutputDir(spec.output)

    def __call__(self, table: pa.Table) -> pa.Table:
        results = []
        blobs = table.column("inputs")
        for k, meta_json in enumerate(table.column("meta").to_pylist()):
            results.append(json.dumps(self.embed_shard(meta_json, blobs[k].as_buffer())))
        return pa.table({"result": pa.array(results, pa.string())})

    def embed_shard(self, meta_json: str, blob) -> dict[str, Any]:
        import torch

        started = time.perf_counter()
        meta, batches = unpack_shard(meta_json, blob)
        spec, embedder = self.spec, self.embedder
        builder = shard_io.ShardBuilder(embedder.dim, spec.pooling, spec.dtype, dict(self.metadata))
        quarantined: list[dict] = []
        utterances = 0
        audio_seconds = padded_seconds = 0.0
        launched: list[tuple[list[str], list[str], Any, Any]] = []  # (ids, paths, lengths, frames) per batch

        def model_batches() -> Iterator[tuple[Any, Any]]:
            """The shard's batches as the model takes them; read one batch ahead by embed_batches."""
            for batch in batches:
                quarantined.extend(batch["quarantined"])
                if batch["inputs"] is None:
                    continue
                inputs = torch.from_numpy(np.array(batch["inputs"]))  # a private, writable copy
                lengths = torch.tensor(batch["lengths"], dtype=torch.long)
                frames = embedder.output_lengths(lengths)
                keep = frames > 0
                for k in (~keep).nonzero().flatten().tolist():  # shorter than the front end's receptive field
                    quarantined.append({"path": batch["paths"][k], "reason": "too-short", "id": batch["ids"][k],
                                        "detail": f"{int(lengths[k])} input steps give no output frame"})
                if not bool(keep.any()):
                    continue
                if not bool(keep.all()):
                    index = keep.nonzero().flatten()
                    inputs, lengths, frames = inputs[index], lengths[index], frames[index]
                ids = [i for i, ok in zip(batch["ids"], keep.tolist()) if ok]
                paths = [p for p, ok in zip(batch["paths"], keep.tolist()) if ok]
                width = int(lengths.max())
                inputs = inputs[:, :width]
                single = bool((lengths == width).all())
                launched.append((ids, paths, lengths, frames))
                yield inputs, None if single else lengths

        for k, embeddings in enumerate(embedder.embed_batches(model_batches())):
            ids, paths, lengths, frames = launched[k]
            launched[k] = None  # type: ignore[call-overload]
            if spec.device == "cpu":
                release_freed_memory()
            for b, utt_id in enumerate(ids):
                builder.add(utt_id, paths[b], meta["starts"].get(utt_id, 0.0),
                            float(lengths[b]) * spec.unit_seconds, int(frames[b]), embeddings[b])
            utterances += len(ids)
            audio_seconds += float(lengths.sum()) * spec.unit_seconds
            padded_seconds += float(len(ids) * int(lengths.max())) * spec.unit_seconds
        written, rows = None, len(builder)
        if rows:
            self.out.write_table(meta["shard"], builder.table())
            written = meta["shard"]
        del builder
        release_freed_memory()
        return {"shard": written, "planned": meta["shard"], "utterances": utterances, "rows": rows,
                "audio_seconds": audio_seconds, "padded_seconds": padded_seconds, "quarantined": quarantined,
                "seconds": time.perf_counter() - started, "precision": embedder.precision}


def release_freed_memory() -> None:
    """Hand memory that torch freed back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Utterances of every length make tensors of every size; glibc keeps the freed blocks in its heaps, and
    an actor's resident memory grew to over 5 GB for a 0.1 h corpus with BASE (1.2 GB with a trim after
    each batch, at no measurable cost).
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - probe: musl and macOS have none
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


# ---------------------------------------------------------------------------------------------------
# Resources: how many actors, with what, and what is left for decoding
# ---------------------------------------------------------------------------------------------------

# Memory, not CPUs, bounds CPU actors on big nodes: each holds the model and a batch's activations (base:
# ~1.5-2 GB), and past a few threads per actor intra-op parallelism loses little.
MAX_CPU_ACTORS_PER_NODE = 8


@dataclass
class Placement:
    device: str
    num_actors: int
    actor_cpus: float
    actor_gpus: float
    threads: int
    reader_cpus: float
    cluster_cpus: float
    cluster_gpus: float


def place(device: str, num_actors: Optional[int], actor_cpus: Optional[float], reader_cpus: float) -> Placement:
    """Actor pool and decode task sizes that fit the running Ray cluster (never a pending forever)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    node_cpus = [c for c in (float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")) if c > 0]
    node_cpus = node_cpus or [cpus]
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    if device == "cuda":
        if gpus < 1:
            raise SpeechSSLError("device=cuda but the Ray cluster has no GPU; use device=cpu (or auto)")
        n = num_actors or int(gpus)
        if n > gpus:
            raise SpeechSSLError(f"num_actors={n} GPU actors, but the cluster has {gpus:g} GPUs")
        a_cpus = actor_cpus if actor_cpus is not None else 1.0
        a_gpus = 1.0
    else:
        # One actor per CPU of a node (up to MAX_CPU_ACTORS_PER_NODE), each with one intra-op thread: on CPUs
        # independent single-thread actors beat one multi-thread actor (2 cores, base: two 1-thread actors
        # 1.2x one 2-thread actor, benchmarks/README.md), at a model's memory per actor.
        n = num_actors or len(node_cpus) * min(MAX_CPU_ACTORS_PER_NODE, max(1, int(min(node_cpus))))
        # CPU actors share a node with the decode tasks: leave each node a little for them.
        per_node = math.ceil(n / max(1, len(node_cpus)))
        a_cpus = actor_cpus if actor_cpus is not None else max(0.5, (min(node_cpus) - 0.5) / per_node)
        a_gpus = 0.0
    free = cpus - n * a_cpus
    if free <= 0:
        raise SpeechSSLError(f"{n} model actors of {a_cpus:g} CPUs take all {cpus:g} CPUs of the cluster and leave "
                             "none for decoding; lower num_actors or actor_cpus")
    decode = min(reader_cpus, free)
    if device == "cpu":
        # A decode task runs on one node: what the smallest node keeps once its share of actors is placed
        # (2 nodes of 1 CPU, an actor of 0.5 CPU on each: a decode task of 1 CPU would never be scheduled).
        node_left = min(node_cpus) - per_node * a_cpus
        if node_left > 0:
            decode = min(decode, node_left)
    return Placement(device, n, a_cpus, a_gpus, max(1, math.ceil(a_cpus)), decode, cpus, gpus)


# ---------------------------------------------------------------------------------------------------
# Progress lines
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------

def fingerprint_of(checkpoint: str, layers: list[int], pooling: str, dtype: str, precision: str,
                   spec: FeatureSpec, segment_duration: float) -> dict[str, Any]:
    """What must match for a re-run to add to an output (compared against every finished shard)."""
    return {"checkpoint": os.path.abspath(os.path.expanduser(checkpoint)), "layers": list(layers),
            "pooling": pooling, "dtype": dtype, "precision": precision, "feature": asdict(spec),
            "segment_duration": segment_duration}


def embed_corpus(cfg) -> dict[str, Any]:
    """Run ``speech-ssl embed`` (``cfg``: ``speech_ssl.stages.embed.Config``); returns the summary."""
    from speech_ssl.config import ConfigError, to_dict
    from speech_ssl.data import read_source
    from speech_ssl.embed.embedder import OUTPUT_DTYPES, POOLINGS, PRECISIONS, resolve_layers
    from speech_ssl.precision import resolve_precision
    from speech_ssl.runtime import ray_session
    from speech_ssl.train.tasks.pretrain import feature_spec_for

    wall_start = time.perf_counter()
    for key, value, choices in (("pooling", cfg.pooling, POOLINGS), ("dtype", cfg.dtype, list(OUTPUT_DTYPES)),
                                ("precision", cfg.precision, PRECISIONS), ("batching", cfg.batching, BATCHING_MODES),
                                ("device", cfg.device, ("auto", "cpu", "cuda"))):
        if value not in choices:
            raise ConfigError(key, f"unknown value {value!r}.", choices)
    if cfg.shard_seconds <= 0:
        raise ConfigError("shard_seconds", f"must be positive, got {cfg.shard_seconds}.")
    model_cfg, architecture = read_model_config(cfg.checkpoint)
    layers = resolve_layers(cfg.layers, model_cfg.num_layers)
    spec = feature_spec_for(model_cfg, cfg.data.sample_rate)
    fingerprint = fingerprint_of(cfg.checkpoint, layers, cfg.pooling, cfg.dtype, cfg.precision, spec,
                                 cfg.data.segment_duration)

    out = shard_io.OutputDir(cfg.output)
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
    run_number = existing.last_run + 1

    # Rows: listed, segmented, filtered; those finished earlier are skipped.
    utterances = read_source(cfg.input, cfg.data.extensions, tsv_sample_rate=cfg.data.tsv_sample_rate)
    for cache in utterances.caches:
        check_spec(cache.meta, spec, cache.root, "the checkpoint's model")
    receptive = _receptive_field_seconds(model_cfg, spec)
    data = replace(cfg.data, min_duration=max(cfg.data.min_duration, receptive))
    rows, filtered = expand_rows(utterances, data)
    report = IngestReport()
    for q in utterances.quarantined:
        report.add_quarantined(q["path"], q["reason"], q.get("detail", ""), q.get("id"))
    for f in filtered:
        report.add_filtered(f["path"], f["reason"], f["detail"], f["id"])
    done = shard_io.complete_ids(existing, len(layers))
    earlier = [r for r in rows if r.id in done]
    todo = [r for r in rows if r.id not in done]
    report.add_used(len(earlier), sum(r.duration for r in earlier))
    if report.read == 0 and not todo:
        raise SpeechSSLError(f"no audio found in {cfg.input}")
    todo_seconds = sum(r.duration for r in todo)
    log.info("embed: %d utterances (%.3f h) to embed with %s (%s, layers %s, pooling %s, %s)%s",
             len(todo), todo_seconds / 3600, cfg.checkpoint, architecture, layers, cfg.pooling, cfg.dtype,
             f"; {len(earlier)} already embedded in {out.location}" if earlier else "")

    this_run = IngestReport()
    placement = None
    embed_seconds = actor_seconds = 0.0
    written: list[str] = []
    resolved_precisions: set[str] = set()  # what the actors resolved cfg.precision to
    if todo:
        # Ray's own output in _logs/ray.log: a leading "_" keeps it out of readers of the Parquet folder.
        with ray_session(cfg.ray, log_dir=None if "://" in out.location else f"{out.location}/_logs"):
            placement = place(cfg.device, cfg.num_actors, cfg.actor_cpus, cfg.data.num_cpus_per_reader)
            if placement.device == "cpu" and cfg.precision == "fp16":  # refused here, before any actor starts
                resolve_precision(cfg.precision, "cpu", "precision")
            # Small jobs get smaller shards, so that decoding overlaps compute and every actor has work.
            shard_seconds = min(cfg.shard_seconds, max(MIN_SHARD_SECONDS, todo_seconds / (4 * placement.num_actors)))
            shard_plans = plan_shards(todo, data, cfg.batching, shard_seconds, run_number)
            actor_spec = ActorSpec(
                checkpoint=os.path.abspath(os.path.expanduser(cfg.checkpoint)), layers=layers, pooling=cfg.pooling,
                dtype=cfg.dtype, precision=cfg.precision, device=placement.device, threads=placement.threads,
                output=out.location, unit_seconds=spec.unit_seconds,
                concurrent_shards=cfg.concurrent_shards or (4 if placement.device == "cuda" else 1),
                compile=bool(cfg.compile),
                metadata={"fingerprint": fingerprint, "model": {"checkpoint": cfg.checkpoint,
                                                                "architecture": architecture,
                                                                "config": asdict(model_cfg)},
                          "layers": layers, "pooling": cfg.pooling, "dtype": cfg.dtype,
                          "dim": model_cfg.embed_dim, "frame_rate_hz": _frame_rate(model_cfg)})
            log.info("embed: %d shards for %d model actor(s) on %s (%g CPU%s each), decode tasks of %g CPU",
                     len(shard_plans), placement.num_actors, placement.device, placement.actor_cpus,
                     ", 1 GPU" if placement.actor_gpus else "", placement.reader_cpus)
            jobs = [shard_job(p, todo) for p in shard_plans]
            collator = Collator(spec, "exact" if cfg.batching == "exact" else "pad")
            progress = Progress(len(todo), todo_seconds, cfg.progress_seconds)
            embed_start = time.perf_counter()
            largest = max(p.audio_seconds for p in shard_plans)
            shard_bytes = 2 * largest * (spec.sample_rate if spec.kind == "waveform" else 100 * spec.n_mels) * 4
            for result in _run_ray_pipeline(jobs, collator, actor_spec, placement, cfg.data,
                                            DECODE_WORKER_BYTES + shard_bytes):
                for q in result["quarantined"]:
                    this_run.add_quarantined(q["path"], q["reason"], q.get("detail", ""), q.get("id"))
                this_run.add_used(result["utterances"], result["audio_seconds"], result["padded_seconds"])
                actor_seconds += result["seconds"]
                resolved_precisions.add(result["precision"])
                if result["shard"]:
                    written.append(result["shard"])
                progress.update(result["utterances"], result["audio_seconds"])
            embed_seconds = time.perf_counter() - embed_start  # the last line below says it all
    report.merge(this_run)
    wall = time.perf_counter() - wall_start

    out.write_text(shard_io.QUARANTINE, "".join(json.dumps(e) + "\n" for e in report.entries))
    previous = json.loads(out.read_text(shard_io.SUMMARY) or "{}")
    summary = {
        "output": out.location,
        "model": {"checkpoint": cfg.checkpoint, "architecture": architecture, "num_layers": model_cfg.num_layers,
                  "dim": model_cfg.embed_dim, "frame_rate_hz": _frame_rate(model_cfg),
                  "padding_exact_by": "masked group-norm statistics" if not _layer_norm_frontend(model_cfg)
                  else "layer-norm front end"},
        "layers": layers, "pooling": cfg.pooling, "dtype": cfg.dtype, "precision": cfg.precision,
        "counts": {"read": report.read, "used": report.used, "quarantined": report.quarantined,
                   "filtered": report.filtered, "embedded_this_run": this_run.used,
                   "already_embedded": len(earlier)},
        "quarantine_reasons": report.reasons(), "filter_reasons": report.reasons("filtered"),
        "audio_hours": {"total": report.audio_seconds / 3600, "this_run": this_run.audio_seconds / 3600},
        "shards": sorted(set(existing.shards) | set(written)),
        "this_run": {
            "run": run_number, "shards_written": len(written), "wall_seconds": wall,
            "embed_seconds": embed_seconds,  # Ray Data pipeline, actor start included
            "actor_seconds": actor_seconds,  # summed over actors: decoded shard in, shard written
            "audio_seconds_per_second": this_run.audio_seconds / wall if wall > 0 else 0.0,  # = x real time
            "utterances_per_second": this_run.used / wall if wall > 0 else 0.0,
            "padding_waste": this_run.padding_waste,
            "placement": asdict(placement) if placement else None,
            "resolved_precision": sorted(resolved_precisions),  # per actor device; [] when nothing was embedded
        },
        "config": to_dict(cfg),
    }
    summary["runs"] = list(previous.get("runs", [])) + [dict(summary["this_run"], counts=dict(summary["counts"]))]
    out.write_text(shard_io.SUMMARY, json.dumps(summary, indent=1) + "\n")
    log.info("embed: %s", report.summary_line())
    precision = (f"; precision {cfg.precision} resolved to {', '.join(sorted(resolved_precisions))} on the actors"
                 if resolved_precisions else "")
    log.info("embed: %d shard(s) in %s (%d written now); %.1f s wall, %.1f s of audio per second%s; summary %s",
             len(summary["shards"]), out.location, len(written), wall, summary["this_run"]["audio_seconds_per_second"],
             precision, out.uri(shard_io.SUMMARY))
    report.raise_if_nothing_used(cfg.input)
    return summary


def _run_ray_pipeline(jobs: list[dict], collator: Collator, actor_spec: ActorSpec, placement: Placement,
                      data: DataConfig, shard_memory_bytes: float) -> Iterator[dict[str, Any]]:
    import ray
    from ray.data import ActorPoolStrategy, ExecutionResources, TaskPoolStrategy

    ds = ray.data.from_items([{"job": json.dumps(job)} for job in jobs], override_num_blocks=len(jobs))
    ds = ds.map_batches(
        decode_shards, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        fn_kwargs={"collator": collator}, num_cpus=placement.reader_cpus,
        compute=TaskPoolStrategy(size=data.max_readers),
        # A decode task: a worker with torch loaded (~0.4 GB) holding its shard's audio twice (decoded rows,
        # then the packed batches). Saying so also keeps Ray Data from fusing decoding into the model actors, which it does to consecutive
        # maps asking for the same resources (1 CPU each, say): decoding would then run on their thread.
        memory=shard_memory_bytes,
    )
    ds = ds.map_batches(
        ShardEmbedder, fn_constructor_kwargs={"spec": actor_spec}, batch_size=1, batch_format="pyarrow",
        zero_copy_batch=True, compute=ActorPoolStrategy(size=placement.num_actors),
        num_cpus=placement.actor_cpus, num_gpus=placement.actor_gpus,
        # Ray Data restarts an actor that dies and retries its shard (the rename makes a retry safe).
    )
    ctx = ds.context
    ctx.print_on_execution_start = False
    ctx.enable_progress_bars = False
    # Decoded shards waiting for an actor are bounded by buffer_mb of object store memory.
    ctx.execution_options.resource_limits = ExecutionResources(
        cpu=placement.cluster_cpus, gpu=placement.cluster_gpus,
        object_store_memory=float(max(data.buffer_mb, 64)) * (1 << 20))
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for result in table.column("result").to_pylist():
                yield json.loads(result)
    except ray.exceptions.RayError as err:
        raise SpeechSSLError(f"embedding failed (finished shards are kept; a re-run continues from them): "
                             f"{_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    """The user-code exception inside Ray's wrappers (``ValueError: ...``), else the last line."""
    import re

    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for line in lines:
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*: ", line) and not line.startswith(("ray.", "Ray")):
            return line
    return lines[-1] if lines else type(err).__name__


def _receptive_field_seconds(model_cfg, spec: FeatureSpec) -> float:
    """Shortest input that yields one output frame."""
    steps = 1
    for kernel, stride in zip(reversed(model_cfg.conv_kernels), reversed(model_cfg.conv_strides)):
        steps = (steps - 1) * stride + kernel
    if spec.kind == "fbank":
        return ((steps - 1) * spec.frame_shift + spec.frame_length) / spec.sample_rate
    return steps / spec.sample_rate


def _frame_rate(model_cfg) -> float:
    unit = model_cfg.sample_rate if model_cfg.frontend == "conv" else 100.0
    return unit / model_cfg.frame_stride


def _layer_norm_frontend(model_cfg) -> bool:
    return model_cfg.conv_norm == "layer"
