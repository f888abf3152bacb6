"""``speech-ssl transcribe``: transcripts for new audio with a CTC checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from speech_ssl.data.config import DataConfig
from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import StageNotBuilt
from speech_ssl.stages.evaluate import BeamConfig


@dataclass
class Config:
    """input: audio files, a directory or a manifest. output: JSONL of transcripts (stdout if null)."""

    checkpoint: str
    input: str
    output: Optional[str] = None
    decoder: str = field(default="greedy", metadata={"choices": ["greedy", "beam"]})
    beam: BeamConfig = field(default_factory=BeamConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> None:
    raise StageNotBuilt("transcribe")
