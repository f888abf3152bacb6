"""What a probe is asked to do: the task, the layers it reads, the few-shot draws and the linear head's schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from speech_ssl.config import ConfigError

TASKS = ("speaker", "ctc", "classify")
# Defaults of the training schedule per task: (epochs, batch size in utterances (0: full batch), lr).
_DEFAULTS = {"speaker": (200, 0, 1e-2), "ctc": (40, 16, 5e-3), "classify": (200, 0, 1e-2)}
ALL_LAYERS = "all"


@dataclass
class ProbeSettings:
    """task: speaker (utterance-level, mean-pooled; accuracy) | ctc (frame-level; CER of greedy decoding) |
        classify (utterance-level labels from the manifest column label_key, with k labeled examples per class).
    layer: all (SUPERB-style: a learned softmax-weighted sum of every hidden state, the weights reported) or
        one layer in transformers' hidden_states numbering (0: the Transformer's input, i: layer i; -1 the last).
    label_key: the manifest column that holds the class of task=classify (e.g. label).
    shots: task=classify: labeled examples per class to train on, one probe per value (e.g. [1,5,20]).
    draws: task=classify: random draws of the labeled subset per value of shots (mean and sd reported).
    baselines: task=classify: also probe, on the same draws, the same architecture with random initial weights
        and mean-pooled 80-bin log-mel filterbanks.
    valid_fraction: with valid=none, this fraction of the training manifest is held out (per speaker for
        the speaker task, per class for classify), deterministically from seed.
    max_utterances: use at most this many utterances of each split (a seeded sample; null: all).
    epochs / batch_size / lr: AdamW on the linear layer (and the layer weights); null picks the task's default
        (speaker and classify: 200 epochs, full batch, lr 1e-2; ctc: 40 epochs, 16 utterances per step, lr 5e-3).
        batch_size 0: full batch.
    weight_decay: AdamW's decoupled weight decay of the linear layer. seed: split, sample, draws,
        initialisation, batch order."""

    task: str = field(default="speaker", metadata={"choices": list(TASKS)})
    layer: str = ALL_LAYERS
    label_key: str = "label"
    shots: list[int] = field(default_factory=lambda: [1, 5, 20])
    draws: int = 5
    baselines: bool = True
    valid_fraction: float = 0.2
    max_utterances: Optional[int] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: float = 0.01
    seed: int = 0

    def schedule(self) -> tuple[int, int, float]:
        epochs, batch, lr = _DEFAULTS[self.task]
        return (epochs if self.epochs is None else self.epochs,
                batch if self.batch_size is None else self.batch_size,
                lr if self.lr is None else self.lr)

    @property
    def all_layers(self) -> bool:
        return str(self.layer).strip().lower() == ALL_LAYERS


def layer_index(layer: str, num_layers: int, key: str = "layer") -> Optional[int]:
    """None for ``all``; otherwise the layer as 0..num_layers (negative counts from the last).

    ConfigError naming ``key`` for anything else."""
    text = str(layer).strip().lower()
    if text == ALL_LAYERS:
        return None
    valid = f"'all', or an integer from 0 (the Transformer's input) to {num_layers} (-1: the last, down to " \
            f"-{num_layers + 1})"
    try:
        index = int(text)
    except ValueError:
        raise ConfigError(key, f"{layer!r} is not a layer: give {valid}.") from None
    if not -num_layers - 1 <= index <= num_layers:
        raise ConfigError(key, f"layer {index} does not exist: the model has {num_layers} Transformer layers, so "
                               f"give {valid}.")
    return index if index >= 0 else index + num_layers + 1


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def check_settings(settings: ProbeSettings, prefix: str = "") -> None:
    """ConfigError naming the key of a setting out of range (the layer is checked against the model later)."""
    if settings.task not in TASKS:
        raise ConfigError(_key(prefix, "task"), f"unknown probe task {settings.task!r}.", TASKS)
    if not settings.all_layers:
        try:
            int(str(settings.layer).strip())
        except ValueError:
            raise ConfigError(_key(prefix, "layer"), f"{settings.layer!r} is not a layer: give 'all' or an "
                                                     "integer (-1: the last).") from None
    if not 0.0 < settings.valid_fraction < 1.0:
        raise ConfigError(_key(prefix, "valid_fraction"), f"must be between 0 and 1, got {settings.valid_fraction}.")
    epochs, batch, lr = settings.schedule()
    if epochs < 1:
        raise ConfigError(_key(prefix, "epochs"), f"must be at least 1, got {epochs}.")
    if batch < 0:
        raise ConfigError(_key(prefix, "batch_size"), f"must be 0 (full batch) or more, got {batch}.")
    if not lr > 0:
        raise ConfigError(_key(prefix, "lr"), f"must be positive, got {lr}.")
    if settings.max_utterances is not None and settings.max_utterances < 2:
        raise ConfigError(_key(prefix, "max_utterances"), f"must be at least 2 (or null), got {settings.max_utterances}.")
    if settings.task == "classify":
        if not settings.shots or any(k < 1 for k in settings.shots):
            raise ConfigError(_key(prefix, "shots"), f"needs one or more counts of at least 1, got {settings.shots}.")
        if settings.draws < 1:
            raise ConfigError(_key(prefix, "draws"), f"must be at least 1, got {settings.draws}.")


def is_none(value: Optional[str]) -> bool:
    return value is None or str(value).strip().lower() in ("none", "null", "")
