"""The wav2vec 2.0 pretraining task: contrastive + diversity loss on cropped, unpadded batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from speech_ssl.data import BatchStream, DataConfig, Utterance
from speech_ssl.data.model_inputs import model_batch_stream
from speech_ssl.data.read_plan import ReadPlan
from speech_ssl.models.config import ModelConfig
from speech_ssl.train.metrics import CollapseMonitor
from speech_ssl.train.task import StepOutput


@dataclass
class PretrainTask:
    """Pretraining the model of ``model_config`` (resolved by the stage: preset < model_overrides) on
    ``train`` utterances."""

    model_config: ModelConfig
    data: DataConfig
    train: list[Utterance]
    valid: Optional[list[Utterance]] = None
    warmup_updates: int = 0
    monitor: Optional[Any] = None  # a speech_ssl.probe.ProbeMonitor run every monitor.every_updates updates
    read_plan: Optional[ReadPlan] = None  # decode task sizes planned on the driver (speech_ssl.train.launch)

    name = "pretrain"
    best_metric = "valid_loss"
    best_mode = "min"
    progress_keys = ("loss", "accuracy", "code_perplexity", "temperature", "lr", "grad_norm",
                     "audio_seconds_per_second", "data_wait_fraction")
    mean_keys = ("diversity", "feature_penalty", "code_perplexity", "prob_perplexity", "temperature")
    plot_panels = (
        ("loss (nats per masked frame)", ("loss", "valid_loss")),
        ("contrastive accuracy", ("accuracy", "valid_accuracy")),
        ("codebook perplexity", ("code_perplexity", "prob_perplexity")),
        ("Gumbel temperature", ("temperature",)),
        ("learning rate", ("lr",)),
        ("audio s / s / worker", ("audio_seconds_per_second",)),
    )
    probe_panel = ("linear probe (valid)", ("probe_accuracy", "probe_chance_accuracy", "probe_cer"))

    def __post_init__(self):
        self._streams: dict[str, BatchStream] = {}
        if self.monitor is not None and getattr(self.monitor, "every_updates", 0):
            self.plot_panels = (*type(self).plot_panels, self.probe_panel)

    # -- model ---------------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        from speech_ssl.models import Wav2Vec2ForPreTraining

        return Wav2Vec2ForPreTraining(self.model_config)

    def on_update(self, model: torch.nn.Module, updates: int) -> None:
        model.set_num_updates(updates)

    def find_unused_parameters(self, model: torch.nn.Module) -> bool:
        return model.config.layerdrop > 0

    def collapse_monitor(self) -> CollapseMonitor:
        return CollapseMonitor(self.model_config.num_negatives, after_updates=max(1000, 2 * self.warmup_updates),
                               groups=self.model_config.codebook_groups)

    def extra_files(self) -> dict[str, Any]:
        return {}

    # -- data ----------------------------------------------------------------------------------------
    def _stream(self, split: str, utterances, rank: int, world_size: int, seed: int) -> BatchStream:
        if split not in self._streams:
            self._streams[split] = model_batch_stream(utterances, self.data, self.model_config, "crop", rank=rank,
                                                      world_size=world_size, seed=seed, read_plan=self.read_plan)
        return self._streams[split]

    def train_batches(self, rank: int, world_size: int, seed: int) -> BatchStream:
        return self._stream("train", self.train, rank, world_size, seed)

    def valid_batches(self, rank: int, world_size: int, seed: int) -> Optional[BatchStream]:
        if not self.valid:
            return None
        return self._stream("valid", self.valid, rank, world_size, seed)

    def ingest_reports(self):
        return {split: stream.report for split, stream in self._streams.items()}

    # -- loss ----------------------------------------------------------------------------------------
    @staticmethod
    def _forward(model, batch, device):
        lengths = batch.lengths
        if lengths is not None and bool((lengths == batch.inputs.shape[1]).all()):  # on the host: no device read
            lengths = None  # nothing padded: the faster path
        if lengths is not None:
            lengths = lengths.to(device, non_blocking=True)
        return model(batch.inputs.to(device, non_blocking=True), lengths)

    def step(self, model, batch, device) -> StepOutput:
        out = self._forward(model, batch, device)
        # Device tensors: the loop reads them once, after backward is queued.
        return StepOutput(out.loss_sum, out.num_masked, {**out.stats, "temperature": out.temperature},
                          batch.audio_seconds)

    def summarize(self, sums: dict[str, float], sample_size: float) -> dict[str, float]:
        metrics = {k: v for k, v in sums.items() if k not in ("loss_sum",)}
        metrics["accuracy"] = sums.get("correct", 0.0) / max(sums.get("count", 0.0), 1.0)
        metrics["contrastive_per_frame"] = sums.get("contrastive", 0.0) / max(sample_size, 1.0)
        return metrics

    def valid_keys(self):
        return ("loss_sum", "sample_size", "contrastive", "correct", "count")

    def valid_step(self, model, batch, device) -> dict[str, float]:
        out = self._forward(model, batch, device)
        return {"loss_sum": float(out.loss_sum), "sample_size": float(out.sample_size),
                "contrastive": out.logs["contrastive"], "correct": out.logs["correct"], "count": out.logs["count"]}

    def summarize_valid(self, sums: dict[str, float]) -> dict[str, float]:
        if sums.get("sample_size", 0.0) <= 0:
            return {}
        return {"valid_loss": sums["loss_sum"] / sums["sample_size"],
                "valid_accuracy": sums["correct"] / max(sums["count"], 1.0),
                "valid_contrastive_per_frame": sums["contrastive"] / sums["sample_size"]}
