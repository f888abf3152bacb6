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
    lr: the peak learning rate (reached after the warmup).
    betas / eps: AdamW's moment decay rates and its denominator's epsilon.
    weight_decay: AdamW's decoupled weight decay (0: none).
    warmup_updates / warmup_ratio: linear warmup from 0 to lr over this many updates, or this fraction of
        max_updates (the ratio wins when set).
    hold_ratio / decay_ratio: tri_stage's hold and decay phases as fractions of max_updates.
    final_lr_scale: the learning rate at the end of the decay, as a fraction of lr.
    power: the decay power of the polynomial schedule (1: linear).
    clip_norm: 0 disables clipping (the published pretraining recipe does not clip).
    """

    lr: float = field(default=5e-4, metadata={"min": 0.0})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = field(default=1e-6, metadata={"min": 0.0})
    weight_decay: float = field(default=0.01, metadata={"min": 0.0})
    schedule: str = field(default="linear", metadata={"choices": ["linear", "polynomial", "tri_stage", "constant"]})
    warmup_updates: int = field(default=0, metadata={"min": 0})
    warmup_ratio: Optional[float] = field(default=None, metadata={"min": 0.0, "max": 1.0})
    hold_ratio: float = field(default=0.4, metadata={"min": 0.0, "max": 1.0})
    decay_ratio: float = field(default=0.5, metadata={"min": 0.0, "max": 1.0})
    final_lr_scale: float = field(default=0.0, metadata={"min": 0.0})
    power: float = 1.0
    clip_norm: float = field(default=0.0, metadata={"min": 0.0})


@dataclass
class TrainerConfig:
    """Scale, precision, length and bookkeeping of a training run.

    num_workers: Ray Train workers (0 runs the loop in this process, without Ray Train).
    use_gpu: train on GPUs (NCCL between workers); false: CPUs (gloo).
    gpus_per_worker: GPUs each worker holds when use_gpu is true (fractions share a GPU).
    cpus_per_worker: fractional values keep CPUs free for Ray Data on small machines.
    placement_strategy: how Ray places the workers on nodes (PACK fills a node first; SPREAD uses many).
    precision: auto (bf16 autocast on GPUs that support it, else fp16 with a grad scaler; on CPUs bf16
        where the CPU has native bf16 dot products, else fp32; see speech_ssl.precision) | fp32 | bf16 |
        fp16 (GPUs only).
    compile: torch.compile the model, region by region (speech_ssl.models.compile); the first batches
        take longer while it compiles.
    update_freq: batches accumulated per optimizer update on each worker.
    max_updates: optimizer updates in the whole run (across resumes).
    seed: initial weights, data order, masking and dropout (the same seed gives the same run).
    optim: the optimizer and its learning-rate schedule.
    log_every / validate_every / checkpoint_every: how often to log, validate and checkpoint, in optimizer
        updates (0: never).
    keep_last: checkpoints kept besides the best.
    max_nonfinite: consecutive skipped (non-finite) updates before the run aborts.
    max_failures: automatic restarts from the latest checkpoint after a worker or node failure.
    deterministic: torch's deterministic algorithms where they exist (slower; warns where none exists).
    storage_path: where Ray Train keeps checkpoints on multi-node clusters (s3://, gs://, NFS);
        null: beside output_dir.
    """

    num_workers: int = field(default=1, metadata={"min": 0})
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata={"min": 0.0})
    gpus_per_worker: float = field(default=1.0, metadata={"min": 0.0})
    placement_strategy: str = field(default="PACK", metadata={"choices": ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]})
    precision: str = precision_field()
    compile: bool = False
    max_updates: int = field(default=1000, metadata={"min": 1})
    update_freq: int = field(default=1, metadata={"min": 1})
    seed: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = field(default=10, metadata={"min": 0})
    validate_every: int = field(default=500, metadata={"min": 0})
    checkpoint_every: int = field(default=500, metadata={"min": 0})
    keep_last: int = field(default=2, metadata={"min": 1})
    max_nonfinite: int = field(default=10, metadata={"min": 1})
    max_failures: int = field(default=3, metadata={"min": -1})
    deterministic: bool = False
    storage_path: Optional[str] = None
