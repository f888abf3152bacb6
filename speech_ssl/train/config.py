"""Typed configuration of the shared training loop (pretraining and fine-tuning alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from speech_ssl.precision import precision_field


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay and a learning-rate schedule driven by optimizer updates.

    schedule: linear (warmup then linear decay to final_lr_scale x lr at max_updates) |
        polynomial (same, with decay power `power`) | tri_stage (warmup, hold, exponential decay to
        final_lr_scale x lr; phases from the ratios) | constant (warmup then flat).
    clip_norm: 0 disables clipping (the published pretraining recipe does not clip).
    """

    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    schedule: str = field(default="linear", metadata={"choices": ["linear", "polynomial", "tri_stage", "constant"]})
    warmup_updates: int = 0
    warmup_ratio: Optional[float] = None
    hold_ratio: float = 0.4
    decay_ratio: float = 0.5
    final_lr_scale: float = 0.0
    power: float = 1.0
    clip_norm: float = 0.0


@dataclass
class TrainerConfig:
    """Scale, precision, length and bookkeeping of a training run.

    num_workers: Ray Train workers (0 runs the loop in this process, without Ray Train).
    cpus_per_worker: fractional values keep CPUs free for Ray Data on small machines.
    placement_strategy: how Ray places the workers on nodes (PACK fills a node first; SPREAD uses many).
    precision: auto (bf16 autocast on GPUs that support it, else fp16 with a grad scaler; on CPUs bf16
        where the CPU has native bf16 dot products, else fp32; see speech_ssl.precision) | fp32 | bf16 |
        fp16 (GPUs only).
    compile: torch.compile the model, region by region (speech_ssl.models.compile); the first batches
        take longer while it compiles.
    update_freq: batches accumulated per optimizer update on each worker.
    max_updates: optimizer updates in the whole run (across resumes).
    log_every / validate_every / checkpoint_every: in optimizer updates (0 disables).
    keep_last: checkpoints kept besides the best.
    max_nonfinite: consecutive skipped (non-finite) updates before the run aborts.
    max_failures: automatic restarts from the latest checkpoint after a worker or node failure.
    """

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: str = field(default="PACK", metadata={"choices": ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]})
    precision: str = precision_field()
    compile: bool = False
    max_updates: int = 1000
    update_freq: int = 1
    seed: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = 10
    validate_every: int = 500
    checkpoint_every: int = 500
    keep_last: int = 2
    max_nonfinite: int = 10
    max_failures: int = 3
    deterministic: bool = False
    storage_path: Optional[str] = None
