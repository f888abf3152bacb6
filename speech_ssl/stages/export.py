"""``speech-ssl export``: a checkpoint in the transformers layout (config.json + weights + processor)."""

from __future__ import annotations

from dataclasses import dataclass, field

from speech_ssl.stages.common import StageNotBuilt


@dataclass
class Config:
    checkpoint: str
    output: str
    format: str = field(default="hf", metadata={"choices": ["hf"]})


def run(cfg: Config) -> None:
    raise StageNotBuilt("export")
