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
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import time
from dataclasses import asdict
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
from speech_ssl.train.metrics import MetricsLogger, plot_curves
from speech_ssl.train.optim import build_optimizer, build_scheduler
from speech_ssl.train.task import StepOutput, Task

log = logging.getLogger("speech_ssl.train")


class NonFiniteError(SpeechSSLError):
    pass


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


def _wrap_ddp(model: torch.nn.Module, ctx, task: Task) -> torch.nn.Module:
    if not ctx.distributed or ctx.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids,
                                   find_unused_parameters=task.find_unused_parameters(model))


def _trainable(model: torch.nn.Module) -> tuple[bool, ...]:
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

    def summary(self) -> dict[str, float]:
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


def _all_reduce(values: list[float], device: torch.device, distributed: bool) -> list[float]:
    if not distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _agree_to_stop(stop_requested: Optional[Callable[[], bool]], device: torch.device, distributed: bool) -> bool:
    """Whether any worker has been asked to stop (every rank gets the same answer: it is all-reduced)."""
    vote = 1.0 if stop_requested is not None and stop_requested() else 0.0
    return _all_reduce([vote], device, distributed)[0] > 0


def train(task: Task, cfg: TrainerConfig, ctx, output_dir: Path,
          stop_requested: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (updates, last/best checkpoint paths, metrics).

    ``stop_requested`` (never blocking) is asked once per update (speech_ssl.train.control): when any worker
    says yes, every worker stops after that update, with a checkpoint of it; the summary says ``stopped``."""
    output_dir = Path(output_dir)
    is_main = ctx.rank == 0
    distributed = ctx.distributed and ctx.world_size > 1
    device = ctx.device
    precision = resolve_precision(cfg.precision, device, "trainer.precision")
    if is_main:
        log.info("precision: %s on %s%s", precision, device, ", compiled" if cfg.compile else "")
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # ---- model, optimizer, schedule -------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the same initial weights on every worker
    model = task.build_model().to(device)
    optimizer = build_optimizer(model.parameters(), cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.max_updates)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    state = TrainingState(world_size=ctx.world_size, task=task.name)
    position = {"epoch": 0, "position": 0}

    # ---- resume ----------------------------------------------------------------------------------
    resume_dir = ctx.latest_checkpoint()
    if resume_dir is not None:
        model_state, optimizer_state, state = ckpt.read_main_files(resume_dir)
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(state.scheduler)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        if state.world_size == ctx.world_size:
            rng, position = ckpt.read_rank_files(resume_dir, ctx.rank)
            ckpt.restore_rng(rng)
        else:  # the data plan is dealt per rank: a new world size starts a fresh epoch
            log.warning("resuming with %d workers from a checkpoint made by %d: data restarts at the next epoch",
                        ctx.world_size, state.world_size)
            rng, old = ckpt.read_rank_files(resume_dir, 0)
            position = {"epoch": old["epoch"] + 1, "position": 0}
            torch.manual_seed(cfg.seed * 7919 + ctx.rank + state.updates)
        state.world_size = ctx.world_size
        state.resumes += 1
        if is_main:
            log.info("resumed from %s at update %d", resume_dir, state.updates)
    else:
        torch.manual_seed(cfg.seed * 7919 + ctx.rank)  # masking/dropout differ between workers

    task.on_update(model, state.updates)
    if cfg.compile:  # in place, region by region: same parameters and state-dict keys, DDP wraps it as usual
        compile_model(model)
    trainable = _trainable(model)
    ddp_model = _wrap_ddp(model, ctx, task)
    params = [p for p in model.parameters()]

    logger = MetricsLogger(output_dir, cfg.max_updates, task.progress_keys) if is_main else None
    if logger is not None:
        logger.truncate_after(state.updates)
    monitor = task.collapse_monitor() if is_main else None
    batches = _endless_batches(task, ctx, cfg.seed, position)
    window = _Window()
    consecutive_nonfinite = 0
    last_valid: dict[str, float] = {}
    last_probe: dict[str, float] = {}
    last_saved: Optional[str] = None
    # A task may carry a monitor (e.g. a linear probe of the representations, speech_ssl.probe.ProbeMonitor):
    # rank 0 runs it on the unwrapped model every ``every_updates`` updates and at the end.
    probe_monitor = getattr(task, "monitor", None)
    probe_every = int(getattr(probe_monitor, "every_updates", 0) or 0)  # no monitor: 0, off

    model.train()
    stopped = _agree_to_stop(stop_requested, device, distributed)  # asked before the first update
    while state.updates < cfg.max_updates and not stopped:
        # ---- one update: update_freq micro-batches -----------------------------------------------
        sample_size, loss_total, audio, nonfinite_loss = 0.0, 0.0, 0.0, 0.0
        sums: dict[str, float] = {}
        means: dict[str, float] = {}
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.update_freq):
            t0 = time.monotonic()
            batch = next(batches)
            t1 = time.monotonic()
            window.data_wait += t1 - t0
            sync_now = micro == cfg.update_freq - 1
            no_sync = ddp_model.no_sync if (distributed and not sync_now) else contextlib.nullcontext
            with no_sync():
                with autocast(device, precision):
                    out: StepOutput = task.step(ddp_model, batch, device)
                loss = out.loss_sum.float()
                # A non-finite loss still runs backward (DDP needs every worker); nothing is read from
                # the device until backward is queued, so the device never waits for the host mid-step.
                nonfinite = ~torch.isfinite(loss)
                loss = loss.nan_to_num(0.0, 0.0, 0.0)
                t_fwd = time.monotonic()
                (scaler.scale(loss) if scaler is not None else loss).backward()
            t_bwd = time.monotonic()
            window.forward += t_fwd - t1
            window.backward += t_bwd - t_fwd  # includes DDP's gradient all-reduce on the last micro-batch
            keys = list(out.logs)
            numbers = _host_numbers([out.sample_size, loss.detach(), nonfinite, *out.logs.values()])
            sample_size += numbers[0]
            loss_total += numbers[1]
            nonfinite_loss = max(nonfinite_loss, numbers[2])
            audio += out.audio_seconds
            for k, v in zip(keys, numbers[3:]):
                if k in task.mean_keys:
                    means[k] = means.get(k, 0.0) + v / cfg.update_freq
                else:
                    sums[k] = sums.get(k, 0.0) + v

        # ---- reduce statistics across workers; normalise gradients ---------------------------------
        t2 = time.monotonic()
        sum_keys, mean_keys = sorted(sums), sorted(means)
        stop_vote = 1.0 if stop_requested is not None and stop_requested() else 0.0
        reduced = _all_reduce([sample_size, loss_total, nonfinite_loss, *[sums[k] for k in sum_keys],
                               *[means[k] for k in mean_keys], stop_vote], device, distributed)
        total_size, total_loss, any_nonfinite = reduced[0], reduced[1], reduced[2] > 0
        reduced_sums = dict(zip(sum_keys, reduced[3:3 + len(sum_keys)]))
        reduced_means = {k: v / ctx.world_size for k, v in zip(mean_keys, reduced[3 + len(sum_keys):-1])}
        stop_after_update = reduced[-1] > 0
        window.sync += time.monotonic() - t2
        if scaler is not None:
            scaler.unscale_(optimizer)
        # DDP averaged the gradients over workers; fairseq's loss is the sum over all workers divided by
        # the total sample size, so multiply by world_size / total_size.
        scale = ctx.world_size / max(total_size, 1.0) if distributed else 1.0 / max(total_size, 1.0)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else math.inf)
        grad_norm = float(grad_norm)
        if any_nonfinite or not math.isfinite(grad_norm) or total_size <= 0:
            # Identical on every worker: gradients were all-reduced and the loss flag too.
            if scaler is not None and not any_nonfinite:
                scaler.update()  # an fp16 overflow: the scaler lowers its scale; not a failure
                continue
            state.nonfinite_skipped += 1
            consecutive_nonfinite += 1
            if is_main:
                log.warning("update %d skipped: non-finite loss or gradient (%d in a row, %d in total)",
                            state.updates + 1, consecutive_nonfinite, state.nonfinite_skipped)
            if consecutive_nonfinite >= cfg.max_nonfinite:
                raise NonFiniteError(
                    f"{consecutive_nonfinite} updates in a row had a non-finite loss or gradient; stopping. "
                    f"The last good checkpoint is {last_saved or (str(resume_dir) if resume_dir else 'none (no checkpoint yet)')}. "
                    "Lower the learning rate, enable clipping (trainer.optim.clip_norm) or use fp32/bf16.")
            continue
        consecutive_nonfinite = 0
        t3 = time.monotonic()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        window.optimizer += time.monotonic() - t3
        state.updates += 1
        task.on_update(model, state.updates)
        if _trainable(model) != trainable:  # e.g. the encoder unfreezes: DDP must see the new set
            trainable = _trainable(model)
            ddp_model = _wrap_ddp(model, ctx, task)
            if is_main:
                log.info("update %d: trainable parameters changed (%d now train)", state.updates,
                         sum(p.numel() for p in model.parameters() if p.requires_grad))

        window.updates += 1
        window.sample_size += total_size
        window.audio_seconds += audio
        window.grad_norm += grad_norm
        for k, v in reduced_sums.items():
            window.sums[k] = window.sums.get(k, 0.0) + v
        for k, v in reduced_means.items():
            window.means.setdefault(k, []).append(v)
        window.sums["loss_sum"] = window.sums.get("loss_sum", 0.0) + total_loss

        # ---- log / validate / checkpoint ----------------------------------------------------------
        done = state.updates >= cfg.max_updates
        if cfg.log_every and (state.updates % cfg.log_every == 0 or done):
            metrics = _train_metrics(task, window, optimizer, state)
            state.metrics = metrics
            if is_main:
                logger.write("train", state.updates, metrics)
                if monitor is not None:
                    monitor.check(state.updates, metrics)
            window.reset()
        want_checkpoint = done or (cfg.checkpoint_every and state.updates % cfg.checkpoint_every == 0)
        want_valid = (cfg.validate_every and state.updates % cfg.validate_every == 0) or want_checkpoint
        if want_valid:
            valid = validate(task, model, ctx, cfg.seed, precision)
            if valid:
                last_valid = valid
                if is_main:
                    logger.write("valid", state.updates, valid)
        if is_main and probe_every and (state.updates % probe_every == 0 or done):
            last_probe = run_monitor(probe_monitor, model, device, state.updates)
            if last_probe:
                logger.write("probe", state.updates, last_probe)
        if want_checkpoint:
            last_saved = save(task, model, optimizer, scheduler, scaler, state, position, ctx, output_dir,
                              cfg, last_valid, logger)
        if stop_after_update:
            if not want_checkpoint:  # the update just made is kept: a re-run resumes exactly here
                last_saved = save(task, model, optimizer, scheduler, scaler, state, position, ctx, output_dir,
                                  cfg, last_valid, logger, judge_best=False)
            stopped = True
            if is_main:
                log.info("stopping after update %d, as asked", state.updates)

    batches.close()
    _report_ingest(task, ctx, output_dir)
    if logger is not None:
        logger.close()
    return {"updates": state.updates, "last": last_saved, "best": state.best_name, "metrics": state.metrics,
            "valid": last_valid, "probe": last_probe, "nonfinite_skipped": state.nonfinite_skipped, "resumes": state.resumes,
            "worker_nodes": _worker_nodes(ctx), "stopped": stopped}


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


def _train_metrics(task: Task, window: _Window, optimizer, state: TrainingState) -> dict[str, float]:
    summary = window.summary()
    sums = {k: window.sums[k] for k in window.sums}
    metrics = task.summarize(sums, window.sample_size)
    metrics.update({k: v for k, v in summary.items() if k not in sums})
    metrics["loss"] = sums.get("loss_sum", 0.0) / max(window.sample_size, 1.0)
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    metrics["nonfinite_skipped"] = state.nonfinite_skipped
    return metrics


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


def save(task: Task, model, optimizer, scheduler, scaler, state: TrainingState, position: dict[str, int], ctx,
         output_dir: Path, cfg: TrainerConfig, valid: dict[str, float], logger: Optional[MetricsLogger],
         judge_best: bool = True) -> str:
    """Write a checkpoint (every worker its part), keep the last K plus the best, point last/best at them.

    ``judge_best=False`` (a checkpoint written because the run was asked to stop, not validated) leaves the
    best checkpoint as it was: ``valid`` then scores an older model. A full disk is a SpeechSSLError (one
    paragraph, no restart: a restart cannot make space); the newest complete checkpoint stays usable."""
    try:
        return _save(task, model, optimizer, scheduler, scaler, state, position, ctx, output_dir, cfg, valid,
                     logger, judge_best)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        latest = ckpt.latest_complete(ctx.storage_root)
        raise SpeechSSLError(
            f"no space left on the device ({err.strerror}) while writing checkpoint "
            f"{ckpt.checkpoint_name(state.updates)} under {ctx.storage_root}; "
            + (f"the newest complete checkpoint is {latest}: free space (or lower trainer.keep_last) and run "
               "the same command again, it resumes from there" if latest else
               "no complete checkpoint exists yet: free space and run the same command again")) from None


def _save(task: Task, model, optimizer, scheduler, scaler, state: TrainingState, position: dict[str, int], ctx,
          output_dir: Path, cfg: TrainerConfig, valid: dict[str, float], logger: Optional[MetricsLogger],
          judge_best: bool) -> str:
    name = ckpt.checkpoint_name(state.updates)
    score = valid.get(task.best_metric) if judge_best else None
    if score is None:
        if not valid:  # no validation set: the best checkpoint is the last one
            state.best_name = name
    elif state.best_score is None or (score < state.best_score if task.best_mode == "min" else score > state.best_score):
        state.best_score, state.best_name = score, name
    state.scheduler = scheduler.state_dict()
    state.scaler = scaler.state_dict() if scaler is not None else None
    state.metrics = {**state.metrics, **valid}
    if ctx.rank == 0 and logger is not None:
        plot_curves(logger.path, output_dir / "curves.png", task.plot_panels, title=f"{task.name}: {output_dir.name}")

    def write(directory: Path) -> None:
        ckpt.write_rank_files(directory, ctx.rank, dict(position))
        if ctx.rank == 0:
            extra = dict(task.extra_files())
            for name_ in ("metrics.jsonl", "curves.png"):
                if (output_dir / name_).exists():
                    (directory / name_).write_bytes((output_dir / name_).read_bytes())
            ckpt.write_main_files(directory, model, optimizer, state, extra)

    metrics = {"updates": state.updates, **{k: v for k, v in state.metrics.items() if isinstance(v, (int, float))}}
    path = ctx.save_checkpoint(name, write, metrics)
    if ctx.rank == 0:
        keep = {state.best_name} if state.best_name else set()
        ckpt.prune(ctx.storage_root, cfg.keep_last, keep)
        if "://" not in ctx.storage_root:
            ckpt.point(output_dir / "last", Path(path))
            if state.best_name:
                ckpt.point(output_dir / "best", Path(ctx.storage_root) / state.best_name)
        log.info("checkpoint %s written%s", path,
                 f" (best {task.best_metric} {state.best_score:.4g} at {state.best_name})" if state.best_score is not None else "")
    ctx.barrier()
    return path
