"""``speech-ssl prepare``: scan audio into a JSONL manifest (durations from headers, bad files reported)."""

from __future__ import annotations

from dataclasses import dataclass, field

from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import StageNotBuilt


@dataclass
class Config:
    """input: a directory, a JSONL or fairseq TSV manifest, or a list of paths.
    output: the JSONL manifest to write (paths relative to its folder where possible)."""

    input: str
    output: str
    extensions: list[str] = field(default_factory=lambda: [".wav", ".flac", ".ogg", ".opus", ".mp3"])
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> None:
    raise StageNotBuilt("prepare")
