"""AdamW and the learning-rate schedules of the wav2vec 2.0 recipes, driven by optimizer updates."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from speech_ssl.config import ConfigError
from speech_ssl.train.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig,
                    device: torch.device | str = "cpu") -> torch.optim.AdamW:
    """AdamW with decoupled weight decay over every parameter (fairseq applies decay to all of them).

    Frozen parameters stay in the optimizer: with no gradient AdamW leaves them (and their decay) alone,
    and unfreezing later needs no new optimizer. On GPUs the fused implementation updates every
    parameter in a few kernels (the unfused one launches several per parameter); elsewhere torch picks
    its default (the multi-tensor ``foreach`` path on CPUs).
    """
    if len(cfg.betas) != 2:
        raise ConfigError("trainer.optim.betas", f"expected two numbers, got {cfg.betas}.")
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(list(params), lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_multiplier(cfg: OptimConfig, max_updates: int) -> Callable[[int], float]:
    """The schedule as a pure function of the update count: lr(update) = cfg.lr * f(update).

    linear / polynomial: warmup from 0, then decay to ``final_lr_scale`` at ``max_updates``.
    tri_stage: warmup, hold at peak, exponential decay to ``final_lr_scale`` (fairseq's tri-stage,
        phases as fractions of ``max_updates``), then flat.
    constant: warmup, then flat.
    """
    if cfg.warmup_ratio is not None:
        warmup = int(round(cfg.warmup_ratio * max_updates))
    else:
        warmup = cfg.warmup_updates
    final = cfg.final_lr_scale

    def warm(update: int) -> float | None:
        if warmup > 0 and update < warmup:
            return (update + 1) / warmup
        return None

    if cfg.schedule in ("linear", "polynomial"):
        power = 1.0 if cfg.schedule == "linear" else cfg.power

        def f(update: int) -> float:
            w = warm(update)
            if w is not None:
                return w
            span = max(1, max_updates - warmup)
            progress = min(1.0, (update - warmup) / span)
            return final + (1.0 - final) * (1.0 - progress) ** power

        return f
    if cfg.schedule == "tri_stage":
        hold = int(round(cfg.hold_ratio * max_updates))
        decay = max(1, int(round(cfg.decay_ratio * max_updates)))
        # fairseq: lr = peak * exp(-decay_factor * t), reaching final_lr_scale x peak after `decay` updates.
        decay_factor = -math.log(max(final, 1e-12)) / decay

        def f(update: int) -> float:
            w = warm(update)
            if w is not None:
                return w
            t = update - warmup
            if t < hold:
                return 1.0
            t -= hold
            if t < decay:
                return math.exp(-decay_factor * t)
            return final

        return f
    if cfg.schedule == "constant":
        return lambda update: warm(update) or 1.0
    raise ConfigError("trainer.optim.schedule", f"unknown schedule '{cfg.schedule}'.",
                      ["linear", "polynomial", "tri_stage", "constant"])


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_updates: int):
    """A LambdaLR over ``lr_multiplier``; its step count equals the number of optimizer updates."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, max_updates))
