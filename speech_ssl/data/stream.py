"""Batches for training, fine-tuning, evaluation and embedding, made by Ray Data CPU tasks or in-process.

``BatchStream(utterances, cfg, spec, mode, rank, world_size, seed)`` plans every epoch from durations
alone (see :mod:`speech_ssl.data.plan`), takes this rank's share, and turns each planned batch into a
:class:`Batch`:

* ``use_ray=True``: the planned batches become a Ray Data dataset (``cfg.batches_per_task`` per block);
  a ``map_batches`` task per block decodes, resamples, featurises and collates it on a CPU worker
  (``cfg.num_cpus_per_reader`` CPUs each, at most ``cfg.max_readers`` at once), with
  ``preserve_order`` so batches arrive in plan order, and at most ``cfg.prefetch_batches`` waiting. Ray
  Data's executor runs in a feeder actor started once per stream (:mod:`speech_ssl.data.feeder`); the
  calling process (a Ray Train worker) only fetches blocks and turns bytes into tensors.
* ``use_ray=False``: the same :class:`~speech_ssl.data.collate.Collator` runs in this process.

Resuming: ``iter_epoch(epoch, start=k)`` skips the first ``k`` planned batches of this rank without
opening their files, then yields exactly what an uninterrupted epoch would have yielded from there.

A planned batch whose rows are all quarantined yields nothing (its position is skipped and its rows are
in the report). Ranks' batch counts already differ by up to one, so a DDP loop must tolerate unequal
counts anyway (e.g. stop all ranks when one runs out).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from speech_ssl.data.audio import FeatureSpec
from speech_ssl.data.cache import check_spec
from speech_ssl.data.collate import Collator, collate_arrow_batch, job_row, unpack
from speech_ssl.data.config import DataConfig
from speech_ssl.data.plan import MODES, PlanStats, deal, expand_rows, plan_epoch, plan_stats
from speech_ssl.data.read_plan import ReadPlan
from speech_ssl.data.report import IngestReport, nothing_used_message
from speech_ssl.data.sources import Utterance
from speech_ssl.data.text import TextNormalizer, Vocabulary
from speech_ssl.errors import SpeechSSLError

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One batch of model inputs.

    inputs: [B, T] waveform or [B, T, n_mels] filterbank (float32); zero-padded in ``pad`` mode.
    lengths: [B] valid samples/frames of each row.
    ids / paths (as the user gave them) / texts (normalised when the stream has a normaliser).
    targets: [B, L] vocabulary ids padded with 0, and target_lengths [B]; None without a vocabulary.
    epoch / position: where the batch sits in this rank's plan (resume with ``iter_epoch(epoch, position + 1)``).
    audio_seconds: unpadded audio; padded_seconds: B x T in seconds.
    quarantined: (path, reason) of rows of this planned batch that could not be used.
    """

    inputs: torch.Tensor
    lengths: torch.Tensor
    ids: list[str]
    paths: list[str]
    texts: list[Optional[str]]
    targets: Optional[torch.Tensor]
    target_lengths: Optional[torch.Tensor]
    epoch: int
    position: int
    audio_seconds: float
    padded_seconds: float
    quarantined: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def padding_mask(self) -> torch.Tensor:
        """[B, T] bool, True on padding."""
        steps = torch.arange(self.inputs.shape[1], device=self.lengths.device)
        return steps[None, :] >= self.lengths[:, None]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        def move(t):
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.inputs), move(self.lengths), self.ids, self.paths, self.texts, move(self.targets),
                     move(self.target_lengths), self.epoch, self.position, self.audio_seconds, self.padded_seconds,
                     self.quarantined)


def _to_batch(out: dict, pin_memory: bool = False) -> Batch:
    targets = target_lengths = None
    if out["targets"] is not None:
        seqs = out["targets"]
        target_lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        targets = torch.zeros(len(seqs), max([len(s) for s in seqs] + [1]), dtype=torch.long)
        for k, s in enumerate(seqs):
            targets[k, : len(s)] = torch.tensor(s, dtype=torch.long)
    inputs = out["inputs"]
    if pin_memory:  # one copy, into page-locked memory, from which the device copy runs asynchronously
        inputs = torch.empty(inputs.shape, dtype=torch.float32, pin_memory=True).copy_(torch.from_numpy(inputs))
    elif not inputs.flags.writeable:  # a view of a Ray Data block: copy into memory torch may write
        inputs = torch.from_numpy(inputs.copy())
    else:
        inputs = torch.from_numpy(inputs)
    return Batch(
        inputs=inputs,
        lengths=torch.tensor(out["lengths"], dtype=torch.long),
        ids=list(out["ids"]), paths=list(out["paths"]), texts=list(out["texts"]),
        targets=targets, target_lengths=target_lengths,
        epoch=int(out["epoch"]), position=int(out["position"]),
        audio_seconds=float(out["audio_seconds"]), padded_seconds=float(out["padded_seconds"]),
        quarantined=[(q["path"], q["reason"]) for q in out["quarantined"]],
    )


def reader_cpus(wanted: float, plan: Optional[ReadPlan] = None) -> tuple[float, float]:
    """(CPUs per decode task, CPUs Ray Data may use for this stream).

    With a ``plan`` (training workers: planned on the driver against what *all* workers hold) its task size,
    and its fair share of the cluster's CPUs now (an autoscaler may have added nodes since).
    Without one (in-process training, embedding, recognition) what this cluster can grant next to the caller:
    a Ray Train worker holding CPUs of a small cluster leaves less than a whole CPU free for Ray Data
    (2 CPUs, 2 workers at 0.5 CPU leave 1): asking for more than the cluster has minus what the caller
    holds would leave every decode task pending forever.
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", 0.0))
    if plan is not None:
        return plan.task_cpus, plan.stream_cpus(total)
    try:  # inside a task or actor: what it holds; the driver holds nothing
        held = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except AssertionError:
        held = 0.0
    free = total - held
    if free <= 0:
        raise SpeechSSLError(f"no CPU left for Ray Data decoding: the cluster has {total:g} CPUs and this worker "
                             f"holds {held:g}; give training workers fewer CPUs (trainer.cpus_per_worker)")
    if wanted > free:
        log.warning("data.num_cpus_per_reader=%g is more than the %g CPUs this cluster can give besides this "
                    "worker; decode tasks ask for %g", wanted, free, free)
        return free, free
    return wanted, free


class BatchStream:
    """This rank's batches of a corpus, epoch after epoch (see the module docstring)."""

    def __init__(self, utterances: Sequence[Utterance], cfg: DataConfig, spec: FeatureSpec, mode: str,
                 rank: int = 0, world_size: int = 1, seed: int = 0, use_ray: bool = True,
                 vocab: Optional[Vocabulary] = None, normalizer: Optional[TextNormalizer] = None,
                 read_plan: Optional[ReadPlan] = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if cfg.sample_rate != spec.sample_rate:
            raise ValueError(f"DataConfig.sample_rate {cfg.sample_rate} != FeatureSpec.sample_rate {spec.sample_rate}")
        self.cfg, self.spec, self.mode = cfg, spec, mode
        self.rank, self.world_size, self.seed, self.use_ray = rank, world_size, seed, use_ray
        self.vocab, self.normalizer = vocab, normalizer
        self.read_plan = read_plan  # decode task CPUs planned on the driver (speech_ssl.train.resources), or None
        for cache in getattr(utterances, "caches", []):  # a cache of other features is refused up front
            check_spec(cache.meta, spec, cache.root)
        self.rows, filtered = expand_rows(utterances, cfg)
        # Cached rows are read where they are consumed (threads of this process: a memory-mapped or ranged read
        # and a dtype conversion per row); only rows that need decoding go to Ray Data's CPU workers.
        self.reads_cache_only = bool(self.rows) and all(r.cache_row is not None for r in self.rows)
        self.pin_memory = False  # set by a consumer on a GPU: batches land in page-locked memory for async copies
        self._durations = np.array([r.duration for r in self.rows], dtype=np.float64)
        self._plans: dict[int, list[list[int]]] = {}
        self._feeder = None  # the actor that executes this stream's Ray Data datasets, started on first use

        # Rows dropped before planning are accounted once, by rank 0, so merged reports add up.
        self.report = IngestReport()
        scan_bad = list(getattr(utterances, "quarantined", []) or [])
        if rank == 0:
            for q in scan_bad:
                self.report.add_quarantined(q["path"], q["reason"], q.get("detail", ""), q.get("id"))
            for f in filtered:
                self.report.add_filtered(f["path"], f["reason"], f["detail"], f["id"])
        if not self.rows:
            whole = IngestReport()
            for q in scan_bad:
                whole.add_quarantined(q["path"], q["reason"], q.get("detail", ""), q.get("id"))
            for f in filtered:
                whole.add_filtered(f["path"], f["reason"], f["detail"], f["id"])
            if whole.read == 0:
                raise SpeechSSLError("the corpus is empty: no audio files or manifest rows were found")
            raise SpeechSSLError(nothing_used_message("the corpus", whole))
        if vocab is not None:
            self._check_texts()
        self._collator = Collator(spec, mode, cfg.crop_duration, seed, vocab, normalizer)

    def _check_texts(self) -> None:
        missing = [r for r in self.rows if r.text is None]
        if missing:
            raise SpeechSSLError(f"{len(missing)} of {len(self.rows)} rows have no transcript ('text'), e.g. "
                                 f"{missing[0].source_path}; fine-tuning needs a labeled manifest")
        texts = [r.text for r in self.rows]
        if self.normalizer is not None:
            self.normalizer.check(texts)
            texts = [self.normalizer(t) for t in texts]
        self.vocab.check(texts)

    # -- the plan ----------------------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of ``epoch`` (row indices), in dealing order."""
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self._durations, self.cfg, self.mode, self.seed, epoch)}
        return self._plans[epoch]

    def rank_batches(self, epoch: int, rank: Optional[int] = None) -> list[list[int]]:
        plan = self.epoch_plan(epoch)
        return [plan[i] for i in deal(len(plan), self.rank if rank is None else rank, self.world_size)]

    def num_batches(self, epoch: int) -> int:
        """This rank's planned batches in ``epoch``."""
        return len(deal(len(self.epoch_plan(epoch)), self.rank, self.world_size))

    def num_batches_all_ranks(self, epoch: int) -> list[int]:
        n = len(self.epoch_plan(epoch))
        return [len(deal(n, r, self.world_size)) for r in range(self.world_size)]

    def plan_stats(self, epoch: int) -> PlanStats:
        """Plan-level padding waste (pad/exact) or crop discard (crop) of this rank's epoch."""
        return plan_stats(self.rank_batches(epoch), self._durations, self.mode, self.cfg.crop_duration)

    def _jobs(self, epoch: int, start: int) -> list[dict]:
        plan = self.epoch_plan(epoch)
        indices = deal(len(plan), self.rank, self.world_size)
        jobs = []
        for position in range(start, len(indices)):
            index = indices[position]
            rows = [job_row(self.rows[i]) for i in plan[index]]
            jobs.append({"epoch": epoch, "position": position, "index": index, "rows": rows})
        return jobs

    # -- iteration ----------------------------------------------------------------------------------
    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` from plan position ``start`` on, in plan order."""
        if start < 0:
            raise ValueError("start must be >= 0")
        jobs = self._jobs(epoch, start)
        if self.reads_cache_only:
            outputs = self._iter_threads(jobs)
        elif self.use_ray:
            outputs = self._iter_ray(jobs)
        else:
            outputs = (out for job in jobs for out in self._collator(job))
        epoch_report = IngestReport()
        for out in outputs:
            for q in out["quarantined"]:
                self.report.add_quarantined(q["path"], q["reason"], q["detail"], q["id"])
                epoch_report.add_quarantined(q["path"], q["reason"], q["detail"], q["id"])
            if out["inputs"] is None:
                continue
            self.report.add_used(len(out["ids"]), out["audio_seconds"], out["padded_seconds"])
            epoch_report.add_used(len(out["ids"]), out["audio_seconds"], out["padded_seconds"])
            yield _to_batch(out, self.pin_memory)
        if epoch_report.read > 0 and epoch_report.used == 0:
            raise SpeechSSLError(nothing_used_message(f"epoch {epoch} of rank {self.rank}", epoch_report))

    def _iter_threads(self, jobs: list[dict]) -> Iterator[dict]:
        """The jobs' outputs in plan order, made by ``cfg.read_threads`` threads of this process, a few jobs
        ahead of the consumer (cached rows: a read and a dtype conversion each, cheap but mostly under the GIL,
        so one thread is the default; see DataConfig.read_threads)."""
        threads = max(1, self.cfg.read_threads)
        ahead = 2 * threads + self.cfg.prefetch_batches
        with ThreadPoolExecutor(threads, thread_name_prefix="speech-ssl-read") as pool:
            todo = iter(jobs)
            pending = deque(pool.submit(self._collator, job) for job in itertools.islice(todo, ahead))
            try:
                while pending:
                    outputs = pending.popleft().result()
                    job = next(todo, None)
                    if job is not None:
                        pending.append(pool.submit(self._collator, job))
                    yield from outputs
            finally:
                for future in pending:
                    future.cancel()

    def _iter_ray(self, jobs: list[dict]) -> Iterator[dict]:
        if not jobs:
            return
        import ray

        if not ray.is_initialized():
            raise SpeechSSLError("BatchStream(use_ray=True) needs a running Ray (speech_ssl.runtime.ray_session, "
                                 "or a Ray Train worker); use use_ray=False for single-process use")
        from ray.data import ExecutionResources, TaskPoolStrategy

        from speech_ssl.data.feeder import iter_blocks, start_feeder

        num_cpus, free_cpus = reader_cpus(self.cfg.num_cpus_per_reader, self.read_plan)
        items = [{"job": json.dumps(job)} for job in jobs]
        # Several planned batches per task: each task costs Ray Data scheduling (in the feeder) and leaves its
        # CPU idle while the next is dispatched. But at least two tasks per decode slot, so that a short
        # stream (a validation set) is still decoded in parallel.
        slots = max(1, int(free_cpus // num_cpus))
        if self.cfg.max_readers:
            slots = min(slots, self.cfg.max_readers)
        per_task = max(1, min(self.cfg.batches_per_task, math.ceil(len(items) / (2 * slots))))
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_task)))
        ds = ds.map_batches(
            collate_arrow_batch, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
            fn_kwargs={"collator": self._collator}, num_cpus=num_cpus,
            compute=TaskPoolStrategy(size=self.cfg.max_readers),
        )
        ctx = ds.context
        ctx.execution_options.preserve_order = True
        # Bound what runs ahead of the consumer: CPUs this worker leaves free, and object store memory for
        # decoded batches (the rest waits as cheap job descriptions).
        ctx.execution_options.resource_limits = ExecutionResources(
            cpu=free_cpus, object_store_memory=float(self.cfg.buffer_mb) * (1 << 20))
        ctx.print_on_execution_start = False
        ctx.enable_progress_bars = False  # one bar per epoch per worker is noise; the training loop logs progress
        # Ray Data's scheduling loop would share this process's GIL with a training thread: a feeder actor,
        # started once per stream, executes every epoch's dataset instead (see speech_ssl.data.feeder).
        if self._feeder is None:
            self._feeder = start_feeder()
        for table in iter_blocks(self._feeder, ds, ahead=self.cfg.prefetch_batches,
                                 stall_timeout_s=self.cfg.stall_timeout_s, task_cpus=num_cpus):
            metas = table.column("meta").to_pylist()
            buffers = table.column("inputs")
            for k, meta in enumerate(metas):
                yield unpack(meta, buffers[k].as_buffer())
