"""The probe during pretraining: the same probe of the model being trained, every few updates."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from speech_ssl.data import DataConfig
from speech_ssl.probe.settings import ProbeSettings
from speech_ssl.probe.splits import ProbeData
from speech_ssl.probe.tasks import run_probe

log = logging.getLogger("speech_ssl.probe")


class ProbeMonitor:
    """A probe of the model being trained, every ``every_updates`` updates (rank 0 only; see the training loop).

    Built on the driver (splits checked there, so a bad manifest fails before training starts), shipped to
    the training worker with the task; the decoded audio is cached on first use, so each later probe costs
    one forward pass over the probe's utterances plus the linear layer. Returns ``probe_accuracy`` (speaker)
    or ``probe_cer`` (ctc) and friends, which the loop writes to metrics.jsonl / TensorBoard (split ``probe``);
    an all-layer probe adds its layer weights (``probe_layer_weight_<i>``).
    """

    def __init__(self, splits: ProbeData, settings: ProbeSettings, data: DataConfig, every_updates: int):
        if settings.task not in ("speaker", "ctc"):
            from speech_ssl.config import ConfigError

            raise ConfigError("probe.task", f"the probe during pretraining is speaker or ctc, not {settings.task!r} "
                                            "(run `speech-ssl probe task=classify` on a checkpoint).", ["speaker", "ctc"])
        self.splits = splits
        self.settings = settings
        self.data = data
        self.every_updates = every_updates
        self._batches: dict[str, Any] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_batches"] = {}  # decoded audio stays where it was decoded
        return state

    def __call__(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        started = time.perf_counter()
        result = run_probe(model, self.splits, self.settings, self.data, device, batches=self._batches)
        if self.settings.task == "speaker":
            metrics = {"probe_accuracy": result["accuracy"], "probe_train_accuracy": result["train_accuracy"],
                       "probe_chance_accuracy": result["chance_accuracy"]}
        else:
            metrics = {"probe_cer": result["cer"], "probe_wer": result["wer"]}
        if result["layer"] == "all":
            metrics.update({f"probe_layer_weight_{i}": w for i, w in enumerate(result["layer_weights"])})
        else:
            metrics["probe_layer"] = float(result["layer"])
        metrics["probe_seconds"] = time.perf_counter() - started
        if not all(math.isfinite(v) for v in metrics.values()):
            log.warning("probe gave non-finite values: %s", metrics)
        return metrics
