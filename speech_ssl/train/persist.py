"""A training run and its checkpoints: resume from the newest complete one, save one, keep the right ones.

The two halves of one promise: a run resumed from its newest complete checkpoint continues exactly as the
straight run would have (the same weights, optimizer, schedule, grad scaler, RNG streams and data position).
``save`` also decides which checkpoints stay (the last ``keep_last`` plus the best), points ``last`` and
``best`` at them, and turns a full disk into one error naming the checkpoint that is still intact. The
format of one checkpoint's files is ``speech_ssl.train.checkpoint``'s.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from speech_ssl.errors import SpeechSSLError
from speech_ssl.train import checkpoint as ckpt
from speech_ssl.train.checkpoint import TrainingState
from speech_ssl.train.config import TrainerConfig
from speech_ssl.train.metrics import MetricsLogger, plot_curves
from speech_ssl.train.task import Task

log = logging.getLogger("speech_ssl.train")


@dataclass
class Resumable:
    """What a checkpoint holds of a run and a resume restores: the model, the optimizer and its schedule,
    the fp16 grad scaler (None otherwise), the training state (updates, best, metrics, ...) and this
    worker's data position (``{"epoch", "position"}``, advanced in place as batches are used)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]
    state: TrainingState
    position: dict[str, int]


def resume(run: Resumable, ctx, cfg: TrainerConfig) -> Optional[Path]:
    """Restore ``run`` from the newest complete checkpoint (None: there is none, a fresh start) and seed
    this worker's RNG stream; returns the checkpoint's folder.

    A fresh run seeds every worker differently, so masking and dropout differ between them. A resume with
    the world size of the checkpoint restores each worker's RNG streams and data position exactly; with
    another world size the per-rank data plan no longer fits, so the data restarts at the next epoch."""
    resume_dir = ctx.latest_checkpoint()
    if resume_dir is None:
        torch.manual_seed(cfg.seed * 7919 + ctx.rank)  # masking/dropout differ between workers
        return None
    model_state, optimizer_state, state = ckpt.read_main_files(resume_dir)
    run.model.load_state_dict(model_state)
    run.optimizer.load_state_dict(optimizer_state)
    run.scheduler.load_state_dict(state.scheduler)
    if run.scaler is not None and state.scaler:
        run.scaler.load_state_dict(state.scaler)
    if state.world_size == ctx.world_size:
        rng, run.position = ckpt.read_rank_files(resume_dir, ctx.rank)
        ckpt.restore_rng(rng)
    else:  # the data plan is dealt per rank: a new world size starts a fresh epoch
        log.warning("resuming with %d workers from a checkpoint made by %d: data restarts at the next epoch",
                    ctx.world_size, state.world_size)
        rng, old = ckpt.read_rank_files(resume_dir, 0)
        run.position = {"epoch": old["epoch"] + 1, "position": 0}
        torch.manual_seed(cfg.seed * 7919 + ctx.rank + state.updates)
    state.world_size = ctx.world_size
    state.resumes += 1
    run.state = state
    if ctx.rank == 0:
        log.info("resumed from %s at update %d", resume_dir, state.updates)
    return resume_dir


def save(task: Task, run: Resumable, ctx, output_dir: Path, cfg: TrainerConfig, valid: dict[str, float],
         logger: Optional[MetricsLogger], judge_best: bool = True) -> str:
    """Write a checkpoint (every worker its part), keep the last K plus the best, point last/best at them.

    ``judge_best=False`` (a checkpoint written because the run was asked to stop, not validated) leaves the
    best checkpoint as it was: ``valid`` then scores an older model. A full disk is a SpeechSSLError (one
    paragraph, no restart: a restart cannot make space); the newest complete checkpoint stays usable."""
    try:
        return _save(task, run, ctx, output_dir, cfg, valid, logger, judge_best)
    except Exception as err:  # noqa: BLE001 - a full disk reaches us as OSError or as a writer's own error
        if not _is_full_disk(err):
            raise
        latest = ckpt.latest_complete(ctx.storage_root)
        raise SpeechSSLError(
            f"no space left on the device ({getattr(err, 'strerror', None) or err}) while writing checkpoint "
            f"{ckpt.checkpoint_name(run.state.updates)} under {ctx.storage_root}; "
            + (f"the newest complete checkpoint is {latest}: free space (or lower trainer.keep_last) and run "
               "the same command again, it resumes from there" if latest else
               "no complete checkpoint exists yet: free space and run the same command again")) from None


def _is_full_disk(err: BaseException) -> bool:
    """ENOSPC/EDQUOT as an OSError, or inside another writer's error: safetensors raises its own
    SafetensorError ("... No space left on device (os error 28)"), pyarrow an OSError with errno unset."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "Disk quota exceeded" in text


def _judge_best(task: Task, state: TrainingState, name: str, valid: dict[str, float], judge_best: bool) -> None:
    """Make checkpoint ``name`` the best one if its validation score beats the best so far (without a
    validation set, the best checkpoint is simply the last one)."""
    score = valid.get(task.best_metric) if judge_best else None
    if score is None:
        if not valid:  # no validation set: the best checkpoint is the last one
            state.best_name = name
    elif state.best_score is None or (score < state.best_score if task.best_mode == "min" else score > state.best_score):
        state.best_score, state.best_name = score, name


def _save(task: Task, run: Resumable, ctx, output_dir: Path, cfg: TrainerConfig, valid: dict[str, float],
          logger: Optional[MetricsLogger], judge_best: bool) -> str:
    """``save`` without the full-disk error: judge the best, fold the scheduler, scaler and validation
    into the state, redraw the curves, write (through the context: atomically, or via Ray Train), then
    prune and point ``last``/``best`` (rank 0) and wait for every worker."""
    state = run.state
    name = ckpt.checkpoint_name(state.updates)
    _judge_best(task, state, name, valid, judge_best)
    state.scheduler = run.scheduler.state_dict()
    state.scaler = run.scaler.state_dict() if run.scaler is not None else None
    state.metrics = {**state.metrics, **valid}
    if ctx.rank == 0 and logger is not None:
        plot_curves(logger.path, output_dir / "curves.png", task.plot_panels, title=f"{task.name}: {output_dir.name}")

    def write(directory: Path) -> None:
        ckpt.write_rank_files(directory, ctx.rank, dict(run.position))
        if ctx.rank == 0:
            extra = dict(task.extra_files())
            for name_ in ("metrics.jsonl", "curves.png"):
                if (output_dir / name_).exists():
                    (directory / name_).write_bytes((output_dir / name_).read_bytes())
            ckpt.write_main_files(directory, run.model, run.optimizer, state, extra)

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
