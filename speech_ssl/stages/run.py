"""``speech-ssl run``: a chained pipeline from ``pipelines/`` on the embedded (or given) Ray."""

from __future__ import annotations

from dataclasses import dataclass, field

from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import StageNotBuilt


@dataclass
class Config:
    pipeline: str = "pretrain_finetune"
    output_dir: str = "outputs/demo"
    force: bool = False
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> None:
    raise StageNotBuilt("run")
