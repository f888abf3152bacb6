"""What the shared training loop needs from a task (pretraining, CTC fine-tuning).

The loop (``speech_ssl.train.loop``) owns the mechanics: devices, precision, DDP, gradient accumulation,
loss normalisation across workers, non-finite skips, schedules, checkpoints, resume, metrics. A task
owns the meaning: which model, which data, what the loss is, what validation measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Protocol, Sequence, Union

import torch

from speech_ssl.train.metrics import CollapseMonitor


@dataclass
class StepOutput:
    """One micro-batch's contribution to an update.

    loss_sum: the unnormalised loss that backward() runs on.
    sample_size: what the loss is normalised by; summed over micro-batches and workers first, so the
        update's gradient is d(sum of losses)/d(theta) / (total sample size), as fairseq does.
    logs: additive statistics (sums), reduced the same way; ``Task.mean_keys`` are averaged instead.
    sample_size and logs may be 0-d device tensors: the loop reads them all at once after backward.
    audio_seconds: unpadded audio in the batch (for throughput).
    """

    loss_sum: torch.Tensor
    sample_size: Union[float, torch.Tensor]
    logs: dict[str, Union[float, torch.Tensor]] = field(default_factory=dict)
    audio_seconds: float = 0.0


class Task(Protocol):
    name: str
    best_metric: str  # a validation metric name, e.g. "valid_loss" or "valid_wer"
    best_mode: str  # "min" | "max"
    progress_keys: Sequence[str]
    plot_panels: Sequence[tuple[str, Sequence[str]]]
    mean_keys: Sequence[str]

    def build_model(self) -> torch.nn.Module: ...

    def train_batches(self, rank: int, world_size: int, seed: int): ...

    def valid_batches(self, rank: int, world_size: int, seed: int): ...

    def step(self, model: torch.nn.Module, batch: Any, device: torch.device) -> StepOutput: ...

    def valid_step(self, model: torch.nn.Module, batch: Any, device: torch.device) -> dict[str, float]: ...

    def summarize(self, sums: dict[str, float], sample_size: float) -> dict[str, float]: ...

    def valid_keys(self) -> Sequence[str]: ...

    def summarize_valid(self, sums: dict[str, float]) -> dict[str, float]: ...

    def on_update(self, model: torch.nn.Module, updates: int) -> None: ...

    def extra_files(self) -> dict[str, Any]: ...

    def find_unused_parameters(self, model: torch.nn.Module) -> bool: ...

    def collapse_monitor(self) -> Optional[CollapseMonitor]: ...

    def ingest_reports(self) -> Iterable[Any]: ...

    # Optional: ``monitor``, a callable ``(model, device) -> dict[str, float]`` with an ``every_updates``
    # attribute (0: off), run by rank 0 on the unwrapped model and logged as split ``probe``
    # (speech_ssl.probe.ProbeMonitor). Tasks without it are not monitored.
    # Optional: ``read_plan``, set by the launcher before the workers start (a speech_ssl.data.read_plan.ReadPlan
    # for the task's BatchStreams: decode task CPUs planned against what all training workers hold).
