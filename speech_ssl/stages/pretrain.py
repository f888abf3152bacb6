"""``speech-ssl pretrain``: self-supervised wav2vec 2.0 pretraining on the shared training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from speech_ssl.data.config import DataConfig
from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import StageNotBuilt, model_field, model_overrides_field
from speech_ssl.train.config import TrainerConfig


@dataclass(kw_only=True)
class PretrainDataConfig(DataConfig):
    """train: unlabeled audio (manifest, directory or list). valid: held-out manifest (optional)."""

    train: str
    valid: Optional[str] = None


@dataclass
class Config:
    output_dir: str
    data: PretrainDataConfig
    model: str = model_field("tiny")
    model_overrides: dict[str, Any] = model_overrides_field()
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> None:
    raise StageNotBuilt("pretrain")
