"""``speech-ssl probe``: linear probes on frozen features (speaker identity, CTC characters)."""

from __future__ import annotations

from dataclasses import dataclass, field

from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import StageNotBuilt


@dataclass
class Config:
    checkpoint: str
    train: str
    valid: str
    task: str = field(default="speaker", metadata={"choices": ["speaker", "ctc"]})
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> None:
    raise StageNotBuilt("probe")
