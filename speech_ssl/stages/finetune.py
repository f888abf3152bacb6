"""``speech-ssl finetune``: CTC fine-tuning of a pretrained encoder, or the same model from scratch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from speech_ssl.data.config import DataConfig
from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import StageNotBuilt, model_field, model_overrides_field
from speech_ssl.train.config import OptimConfig, TrainerConfig


@dataclass(kw_only=True)
class FinetuneDataConfig(DataConfig):
    """train / valid: labeled manifests (JSONL with `text`)."""

    train: str
    valid: str


@dataclass
class CTCConfig:
    """The fairseq fine-tuning recipe's model-side behaviour.

    freeze_feature_encoder: keep the conv front end frozen throughout.
    freeze_updates: train only the CTC head for this many updates, then the whole encoder.
    mask_*: time and channel masking applied during fine-tuning (spans of frames / channels).
    """

    freeze_feature_encoder: bool = True
    freeze_updates: int = 0
    mask_prob: float = 0.65
    mask_length: int = 10
    mask_channel_prob: float = 0.25
    mask_channel_length: int = 64
    layerdrop: float = 0.1
    final_dropout: float = 0.0


def _finetune_trainer() -> TrainerConfig:
    return TrainerConfig(optim=OptimConfig(lr=5e-5, eps=1e-8, weight_decay=0.0, schedule="tri_stage",
                                           warmup_ratio=0.1, hold_ratio=0.4, decay_ratio=0.5,
                                           final_lr_scale=0.05))


@dataclass
class Config:
    output_dir: str
    init: str
    data: FinetuneDataConfig
    model: str = model_field("tiny")
    model_overrides: dict[str, Any] = model_overrides_field()
    ctc: CTCConfig = field(default_factory=CTCConfig)
    trainer: TrainerConfig = field(default_factory=_finetune_trainer)
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> None:
    raise StageNotBuilt("finetune")
