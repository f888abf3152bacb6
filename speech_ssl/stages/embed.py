"""``speech-ssl embed``: batch-embed a corpus into Parquet shards with a Ray Data actor pool."""

from __future__ import annotations

from dataclasses import dataclass, field

from speech_ssl.data.config import DataConfig
from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import StageNotBuilt


@dataclass
class Config:
    """layers: transformers' hidden_states numbering (0: the context network's input, i: layer i's output).
    pooling: none (frame-level [frames, dim]) | mean ([dim])."""

    checkpoint: str
    input: str
    output: str
    layers: list[int] = field(default_factory=lambda: [-1])
    pooling: str = field(default="mean", metadata={"choices": ["none", "mean"]})
    dtype: str = field(default="float32", metadata={"choices": ["float32", "float16"]})
    num_actors: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> None:
    raise StageNotBuilt("embed")
