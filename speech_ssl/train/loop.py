"""The one training loop: pretraining and CTC fine-tuning alike. Read it top to bottom.

    setup (device, precision, model, optimizer, schedule) -> resume from the newest complete checkpoint
    -> repeat until max_updates:
         accumulate update_freq micro-batches (forward, backward; DDP syncs on the last one)
         all-reduce the sample size and the statistics of every worker
         scale gradients by world_size / total sample size (fairseq's normalisation)
         skip the update on every worker alike if anything is non-finite
         clip, step, schedule, tell the task the new update count (temperature, freezing)
         log / validate / probe / checkpoint on their intervals
         stop after this update if any worker was asked to (the request rides on the statistics
         all-reduce, so every rank stops after the same update); rank 0 then writes a checkpoint

``train`` tells that story; the functions after it are its steps, in the order it calls them. Saving a
checkpoint and resuming from one live in ``speech_ssl.train.persist``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from speech_ssl.errors import SpeechSSLError
from speech_ssl.models.compile import compile_model
from speech_ssl.precision import autocast, resolve_precision
from speech_ssl.train import checkpoint as ckpt
from speech_ssl.train.checkpoint import TrainingState
from speech_ssl.train.config import TrainerConfig
from speech_ssl.train.metrics import MetricsLogger
from speech_ssl.train.optim import build_optimizer, build_scheduler
from speech_ssl.train.persist import Resumable, resume, save
from speech_ssl.train.task import StepOutput, Task

log = logging.getLogger("speech_ssl.train")


class NonFiniteError(SpeechSSLError):
    """trainer.max_nonfinite updates in a row had a non-finite loss or gradient: the run gives up."""


@dataclass
class _Run(Resumable):
    """The run's moving parts: what a checkpoint holds (``Resumable``: model, optimizer, scheduler, scaler,
    state, data position) plus what only this process needs: the resolved precision, the module the steps
    run on (the model, or its DDP wrapper), which parameters train now (a change re-wraps DDP), and the
    parameter list whose gradients are normalised and clipped."""

    precision: str = "fp32"
    ddp_model: Optional[torch.nn.Module] = None
    trainable: tuple[bool, ...] = ()
    params: list[torch.nn.Parameter] = field(default_factory=list)


def train(task: Task, cfg: TrainerConfig, ctx, output_dir: Path,
          stop_requested: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (updates, last/best checkpoint paths, metrics).

    ``stop_requested`` (never blocking) is asked once per update (speech_ssl.train.control): when any worker
    says yes, every worker stops after that update, with a checkpoint of it; the summary says ``stopped``."""
    output_dir = Path(output_dir)
    is_main = ctx.rank == 0
    distributed = ctx.distributed and ctx.world_size > 1

    # ---- model, optimizer, schedule; resume ------------------------------------------------------
    run = _setup(task, cfg, ctx)
    resume_dir = resume(run, ctx, cfg)
    _ready_model(run, task, cfg, ctx)

    logger = MetricsLogger(output_dir, cfg.max_updates, task.progress_keys) if is_main else None
    if logger is not None:
        logger.truncate_after(run.state.updates)
    monitor = task.collapse_monitor() if is_main else None
    batches = _endless_batches(task, ctx, cfg.seed, run.position)
    window = _Window()
    consecutive_nonfinite = 0
    last_valid: dict[str, float] = {}
    last_probe: dict[str, float] = {}
    last_saved: Optional[str] = None
    # A task may carry a monitor (e.g. a linear probe of the representations, speech_ssl.probe.ProbeMonitor):
    # rank 0 runs it on the unwrapped model every ``every_updates`` updates and at the end.
    probe_monitor = getattr(task, "monitor", None)
    probe_every = int(getattr(probe_monitor, "every_updates", 0) or 0)  # no monitor: 0, off

    run.model.train()
    stopped = _agree_to_stop(stop_requested, ctx.device, distributed)  # asked before the first update
    while run.state.updates < cfg.max_updates and not stopped:
        # ---- one update: update_freq micro-batches, then the statistics of every worker -----------
        local = _accumulate(run, task, cfg, batches, window, distributed, ctx.device)
        reduced = _reduce(local, stop_requested, ctx, distributed, window)
        grad_norm = _normalise_and_clip(run, cfg, ctx, reduced.sample_size, distributed)
        if reduced.any_nonfinite or not math.isfinite(grad_norm) or reduced.sample_size <= 0:
            # Identical on every worker: gradients were all-reduced and the loss flag too.
            if run.scaler is not None and not reduced.any_nonfinite:
                run.scaler.update()  # an fp16 overflow: the scaler lowers its scale; not a failure
                continue
            consecutive_nonfinite += 1
            _skip_nonfinite(run.state, cfg, consecutive_nonfinite, last_saved or resume_dir, is_main)
            continue
        consecutive_nonfinite = 0
        _optimizer_step(run, window)
        run.state.updates += 1
        task.on_update(run.model, run.state.updates)
        _follow_trainable(run, task, ctx)
        window.add(reduced, grad_norm, local.audio_seconds)

        # ---- log / validate / probe / checkpoint ------------------------------------------------
        updates = run.state.updates
        done = updates >= cfg.max_updates
        if cfg.log_every and (updates % cfg.log_every == 0 or done):
            _log_window(task, window, run, logger, monitor)
        want_checkpoint = done or (cfg.checkpoint_every and updates % cfg.checkpoint_every == 0)
        if (cfg.validate_every and updates % cfg.validate_every == 0) or want_checkpoint:
            valid = validate(task, run.model, ctx, cfg.seed, run.precision)
            if valid:
                last_valid = valid
                if is_main:
                    logger.write("valid", updates, valid)
        if is_main and probe_every and (updates % probe_every == 0 or done):
            last_probe = run_monitor(probe_monitor, run.model, ctx.device, updates)
            if last_probe:
                logger.write("probe", updates, last_probe)
        if want_checkpoint:
            last_saved = save(task, run, ctx, output_dir, cfg, last_valid, logger)
        if reduced.stop:
            if not want_checkpoint:  # the update just made is kept: a re-run resumes exactly here
                last_saved = save(task, run, ctx, output_dir, cfg, last_valid, logger, judge_best=False)
            stopped = True
            if is_main:
                log.info("stopping after update %d, as asked", updates)

    batches.close()
    _report_ingest(task, ctx, output_dir)
    if logger is not None:
        logger.close()
    state = run.state
    return {"updates": state.updates, "last": last_saved, "best": state.best_name, "metrics": state.metrics,
            "valid": last_valid, "probe": last_probe, "nonfinite_skipped": state.nonfinite_skipped, "resumes": state.resumes,
            "worker_nodes": _worker_nodes(ctx), "stopped": stopped}


# ---- setup ---------------------------------------------------------------------------------------------

def _setup(task: Task, cfg: TrainerConfig, ctx) -> _Run:
    """Resolve the precision, then build the model (the same initial weights on every worker), the optimizer,
    its schedule, an fp16 grad scaler and a fresh state: a run at update 0, before any resume."""
    device = ctx.device
    precision = resolve_precision(cfg.precision, device, "trainer.precision")
    if ctx.rank == 0:
        log.info("precision: %s on %s%s", precision, device, ", compiled" if cfg.compile else "")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    model = task.build_model().to(device)
    optimizer = build_optimizer(model.parameters(), cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.max_updates)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    state = TrainingState(world_size=ctx.world_size, task=task.name)
    return _Run(model, optimizer, scheduler, scaler, state, {"epoch": 0, "position": 0}, precision=precision)


def _ready_model(run: _Run, task: Task, cfg: TrainerConfig, ctx) -> None:
    """Bring the (possibly resumed) model to where training goes on: the task sees the update count (what is
    frozen at this update), the model compiles, DDP wraps it; note the trainable set and the parameters."""
    task.on_update(run.model, run.state.updates)
    if cfg.compile:  # in place, region by region: same parameters and state-dict keys, DDP wraps it as usual
        compile_model(run.model)
    run.trainable = _trainable(run.model)
    run.ddp_model = _wrap_ddp(run.model, ctx, task)
    run.params = [p for p in run.model.parameters()]


def _wrap_ddp(model: torch.nn.Module, ctx, task: Task) -> torch.nn.Module:
    """The module the steps run on: with several workers, the model in DistributedDataParallel."""
    if not ctx.distributed or ctx.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=task.find_unused_parameters(model))


def _trainable(model: torch.nn.Module) -> tuple[bool, ...]:
    """Which parameters train now: DDP must be rebuilt when this changes."""
    return tuple(p.requires_grad for p in model.parameters())


def _endless_batches(task: Task, ctx, seed: int, position: dict[str, int]) -> Iterator[Any]:
    """This worker's batches, epoch after epoch, starting at ``position`` (updated as batches are used)."""
    stream = task.train_batches(ctx.rank, ctx.world_size, seed)
    # On a GPU, batches are assembled in page-locked memory, so the task's non_blocking copy to the device
    # returns at once and runs beside the host's work on the step.
    stream.pin_memory = ctx.device.type == "cuda"
    while True:
        produced = 0
        for batch in stream.iter_epoch(position["epoch"], start=position["position"]):
            produced += 1
            position["position"] = batch.position + 1
            yield batch
        if produced == 0 and position["position"] == 0:
            raise SpeechSSLError(f"epoch {position['epoch']} of worker {ctx.rank} produced no usable batch: "
                                 "is all of the training audio filtered out or quarantined?")
        position["epoch"] += 1
        position["position"] = 0


# ---- one update ----------------------------------------------------------------------------------------

@dataclass
class _Local:
    """This worker's statistics over one update's micro-batches, read from the device."""

    sample_size: float = 0.0
    loss: float = 0.0
    nonfinite: float = 0.0  # 1.0 if any micro-batch's loss was non-finite
    audio_seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)  # the task's logs, summed over micro-batches
    means: dict[str, float] = field(default_factory=dict)  # the task's mean_keys, averaged over them


def _accumulate(run: _Run, task: Task, cfg: TrainerConfig, batches: Iterator[Any], window: _Window,
                distributed: bool, device: torch.device) -> _Local:
    """Zero the gradients, then forward and backward ``update_freq`` micro-batches, summing their
    gradients (DDP all-reduces them on the last one only) and this worker's statistics."""
    local = _Local()
    run.optimizer.zero_grad(set_to_none=True)
    for micro in range(cfg.update_freq):
        t0 = time.monotonic()
        batch = next(batches)
        t1 = time.monotonic()
        window.data_wait += t1 - t0
        sync_now = micro == cfg.update_freq - 1
        no_sync = run.ddp_model.no_sync if (distributed and not sync_now) else contextlib.nullcontext
        with no_sync():
            with autocast(device, run.precision):
                out: StepOutput = task.step(run.ddp_model, batch, device)
            loss = out.loss_sum.float()
            # A non-finite loss still runs backward (DDP needs every worker); nothing is read from
            # the device until backward is queued, so the device never waits for the host mid-step.
            nonfinite = ~torch.isfinite(loss)
            loss = loss.nan_to_num(0.0, 0.0, 0.0)
            t_fwd = time.monotonic()
            (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
        t_bwd = time.monotonic()
        window.forward += t_fwd - t1
        window.backward += t_bwd - t_fwd  # includes DDP's gradient all-reduce on the last micro-batch
        keys = list(out.logs)
        numbers = _host_numbers([out.sample_size, loss.detach(), nonfinite, *out.logs.values()])
        local.sample_size += numbers[0]
        local.loss += numbers[1]
        local.nonfinite = max(local.nonfinite, numbers[2])
        local.audio_seconds += out.audio_seconds
        for k, v in zip(keys, numbers[3:]):
            if k in task.mean_keys:
                local.means[k] = local.means.get(k, 0.0) + v / cfg.update_freq
            else:
                local.sums[k] = local.sums.get(k, 0.0) + v
    return local


def _host_numbers(values: list) -> list[float]:
    """Numbers and device tensors -> floats, reading each device once for all of its tensors."""
    out = [v if not isinstance(v, torch.Tensor) else None for v in values]
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
    for indices in by_device.values():
        read = torch.stack([values[i].detach().reshape(()).to(torch.float64) for i in indices]).tolist()
        for i, number in zip(indices, read):
            out[i] = number
    return [float(v) for v in out]


@dataclass
class _Reduced:
    """One update's statistics over every worker (all-reduced: the same on each), and the stop vote."""

    sample_size: float
    loss: float
    any_nonfinite: bool
    sums: dict[str, float]
    means: dict[str, float]
    stop: bool  # some worker was asked to stop: all stop after this update


def _reduce(local: _Local, stop_requested: Optional[Callable[[], bool]], ctx, distributed: bool,
            window: _Window) -> _Reduced:
    """All-reduce this worker's statistics with the others' in one call; this worker's stop request rides
    along, so every rank learns the same answer after the same update."""
    t2 = time.monotonic()
    sum_keys, mean_keys = sorted(local.sums), sorted(local.means)
    stop_vote = 1.0 if stop_requested is not None and stop_requested() else 0.0
    numbers = _all_reduce([local.sample_size, local.loss, local.nonfinite, *[local.sums[k] for k in sum_keys],
                           *[local.means[k] for k in mean_keys], stop_vote], ctx.device, distributed)
    reduced = _Reduced(sample_size=numbers[0], loss=numbers[1], any_nonfinite=numbers[2] > 0,
                       sums=dict(zip(sum_keys, numbers[3:3 + len(sum_keys)])),
                       means={k: v / ctx.world_size for k, v in zip(mean_keys, numbers[3 + len(sum_keys):-1])},
                       stop=numbers[-1] > 0)
    window.sync += time.monotonic() - t2
    return reduced


def _all_reduce(values: list[float], device: torch.device, distributed: bool) -> list[float]:
    """Sum ``values`` over every worker (as they are, with a single worker)."""
    if not distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _agree_to_stop(stop_requested: Optional[Callable[[], bool]], device: torch.device, distributed: bool) -> bool:
    """Whether any worker has been asked to stop (every rank gets the same answer: it is all-reduced)."""
    vote = 1.0 if stop_requested is not None and stop_requested() else 0.0
    return _all_reduce([vote], device, distributed)[0] > 0


def _normalise_and_clip(run: _Run, cfg: TrainerConfig, ctx, total_size: float, distributed: bool) -> float:
    """Unscale (fp16), normalise the gradients to fairseq's loss and clip them; returns the gradient norm
    before clipping (non-finite when a gradient is)."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    # DDP averaged the gradients over workers; fairseq's loss is the sum over all workers divided by
    # the total sample size, so multiply by world_size / total_size.
    scale = ctx.world_size / max(total_size, 1.0) if distributed else 1.0 / max(total_size, 1.0)
    for p in run.params:
        if p.grad is not None:
            p.grad.mul_(scale)
    clip_norm = cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else math.inf
    return float(torch.nn.utils.clip_grad_norm_(run.params, clip_norm))


def _skip_nonfinite(state: TrainingState, cfg: TrainerConfig, in_a_row: int, last_good: Optional[str | Path],
                    is_main: bool) -> None:
    """Count an update skipped for a non-finite loss or gradient; after ``max_nonfinite`` in a row, give up
    with a NonFiniteError naming the last good checkpoint (``last_good``: None before the first)."""
    state.nonfinite_skipped += 1
    if is_main:
        log.warning("update %d skipped: non-finite loss or gradient (%d in a row, %d in total)",
                    state.updates + 1, in_a_row, state.nonfinite_skipped)
    if in_a_row >= cfg.max_nonfinite:
        raise NonFiniteError(
            f"{in_a_row} updates in a row had a non-finite loss or gradient; stopping. "
            f"The last good checkpoint is {last_good or 'none (no checkpoint yet)'}. "
            "Lower the learning rate, enable clipping (trainer.optim.clip_norm) or use fp32/bf16.")


def _optimizer_step(run: _Run, window: _Window) -> None:
    """Step the optimizer (through the fp16 scaler, which then adjusts its scale) and the schedule."""
    t3 = time.monotonic()
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    window.optimizer += time.monotonic() - t3


def _follow_trainable(run: _Run, task: Task, ctx) -> None:
    """After the task's on_update: if the set of trainable parameters changed, wrap DDP anew."""
    if _trainable(run.model) != run.trainable:  # e.g. the encoder unfreezes: DDP must see the new set
        run.trainable = _trainable(run.model)
        run.ddp_model = _wrap_ddp(run.model, ctx, task)
        if ctx.rank == 0:
            log.info("update %d: trainable parameters changed (%d now train)", run.state.updates,
                     sum(p.numel() for p in run.model.parameters() if p.requires_grad))


# ---- log / validate / probe ----------------------------------------------------------------------------

class _Window:
    """Sums over the updates since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.means: dict[str, list[float]] = {}
        self.sample_size = 0.0
        self.updates = 0
        self.audio_seconds = 0.0
        self.data_wait = 0.0
        self.forward = 0.0
        self.backward = 0.0
        self.sync = 0.0
        self.optimizer = 0.0
        self.grad_norm = 0.0
        self.started = time.monotonic()

    def add(self, reduced: _Reduced, grad_norm: float, audio_seconds: float) -> None:
        """Count one update made: its statistics over every worker, and this worker's audio."""
        self.updates += 1
        self.sample_size += reduced.sample_size
        self.audio_seconds += audio_seconds
        self.grad_norm += grad_norm
        for k, v in reduced.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        for k, v in reduced.means.items():
            self.means.setdefault(k, []).append(v)
        self.sums["loss_sum"] = self.sums.get("loss_sum", 0.0) + reduced.loss

    def summary(self) -> dict[str, float]:
        """The window's sums and means, the mean gradient norm, and rates and timings per update."""
        wall = max(1e-9, time.monotonic() - self.started)
        out = {f"{k}": v for k, v in self.sums.items()}
        out.update({k: sum(v) / len(v) for k, v in self.means.items() if v})
        out["grad_norm"] = self.grad_norm / max(1, self.updates)
        out["audio_seconds_per_second"] = self.audio_seconds / wall
        n = max(1, self.updates)
        out["data_wait_fraction"] = self.data_wait / wall
        out["seconds_per_update"] = wall / n
        # Where an update's time goes (seconds per update): waiting for data, forward, backward (with DDP's
        # overlapped gradient all-reduce), the statistics all-reduce, and the optimizer step.
        out["data_wait_s"] = self.data_wait / n
        out["forward_s"] = self.forward / n
        out["backward_s"] = self.backward / n
        out["sync_s"] = self.sync / n
        out["optimizer_s"] = self.optimizer / n
        return out


def _log_window(task: Task, window: _Window, run: _Run, logger: Optional[MetricsLogger], monitor) -> None:
    """Close the log window: its metrics become the state's (every worker) and a train line plus the
    collapse monitor's check (rank 0: ``logger`` and ``monitor`` are None elsewhere)."""
    metrics = _train_metrics(task, window, run.optimizer, run.state)
    run.state.metrics = metrics
    if logger is not None:
        logger.write("train", run.state.updates, metrics)
        if monitor is not None:
            monitor.check(run.state.updates, metrics)
    window.reset()


def _train_metrics(task: Task, window: _Window, optimizer, state: TrainingState) -> dict[str, float]:
    """The window's train metrics: the task's summary of its sums, the timings, loss, lr, skips."""
    summary = window.summary()
    sums = {k: window.sums[k] for k in window.sums}
    metrics = task.summarize(sums, window.sample_size)
    metrics.update({k: v for k, v in summary.items() if k not in sums})
    metrics["loss"] = sums.get("loss_sum", 0.0) / max(window.sample_size, 1.0)
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    metrics["nonfinite_skipped"] = state.nonfinite_skipped
    return metrics


@torch.no_grad()
def validate(task: Task, model: torch.nn.Module, ctx, seed: int, precision: str = "fp32") -> dict[str, float]:
    """Each worker scores its share of the validation set, in the training's resolved precision; sums are
    all-reduced; ``valid_*`` metrics."""
    stream = task.valid_batches(ctx.rank, ctx.world_size, seed)
    if stream is None:
        return {}
    was_training = model.training
    model.eval()
    # Validation must not disturb the training RNG stream (masks/negatives use torch's global RNG),
    # and should score the same masks every time.
    rng = ckpt.capture_rng()
    torch.manual_seed(seed)
    sums: dict[str, float] = {}
    try:
        for batch in stream.iter_epoch(0):
            with autocast(ctx.device, precision):
                scores = task.valid_step(model, batch, ctx.device)
            for k, v in scores.items():
                sums[k] = sums.get(k, 0.0) + v
    finally:
        ckpt.restore_rng(rng)
        model.train(was_training)
    keys = sorted(task.valid_keys())
    reduced = _all_reduce([sums.get(k, 0.0) for k in keys], ctx.device, ctx.distributed and ctx.world_size > 1)
    return task.summarize_valid(dict(zip(keys, reduced)))


def run_monitor(monitor, model: torch.nn.Module, device: torch.device, updates: int) -> dict[str, float]:
    """The task's monitor on the model as it is now; it must leave the model (mode, gradient flags) and the
    training RNG streams as it found them. A failing monitor is logged, never fatal to the run."""
    rng = ckpt.capture_rng()
    try:
        metrics = monitor(model, device)
    except SpeechSSLError:
        raise
    except Exception as err:  # noqa: BLE001 - a diagnostic must not kill hours of training
        log.warning("update %d: the probe failed (%s: %s); training goes on", updates, type(err).__name__, err)
        return {}
    finally:
        ckpt.restore_rng(rng)
    return metrics


# ---- the end of the run --------------------------------------------------------------------------------

def _report_ingest(task: Task, ctx, output_dir: Path) -> None:
    """Gather every worker's ingest report on rank 0: print the counts, write the quarantine list."""
    reports = task.ingest_reports()
    if ctx.distributed and ctx.world_size > 1:
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, reports)
    else:
        gathered = [reports]
    if ctx.rank != 0:
        return
    for split in sorted({s for r in gathered for s in r}):
        parts = [r[split] for r in gathered if split in r]
        merged = parts[0]
        for other in parts[1:]:
            merged = merged.merge(other)
        log.info("%s data: %s", split, merged.summary_line())
        if merged.entries:
            path = output_dir / f"quarantine_{split}.jsonl"
            merged.write_jsonl(path)
            kinds = [e.get("kind", "quarantined") for e in merged.entries]
            log.warning("%s rows set aside: %d quarantined, %d filtered; see %s", split, kinds.count("quarantined"),
                        kinds.count("filtered"), path)


def _worker_nodes(ctx) -> list[str]:
    """The Ray node of every worker (empty without Ray), to show where a run actually ran."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - purely informative
        node = ""
    if ctx.distributed and ctx.world_size > 1:
        nodes: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(nodes, node)
        return nodes
    return [node]
