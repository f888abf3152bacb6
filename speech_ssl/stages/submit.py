"""``speech-ssl submit``: a pipeline as a Ray job on a cluster (Ray Jobs API)."""

from __future__ import annotations

from dataclasses import dataclass, field

from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import StageNotBuilt


@dataclass
class Config:
    pipeline: str = "pretrain_finetune"
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> None:
    raise StageNotBuilt("submit")
