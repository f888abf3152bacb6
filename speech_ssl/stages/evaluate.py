"""``speech-ssl evaluate``: WER and CER of a CTC checkpoint on a labeled manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from speech_ssl.data.config import DataConfig
from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import StageNotBuilt


@dataclass(kw_only=True)
class EvalDataConfig(DataConfig):
    """test: labeled manifest to score."""

    test: str


@dataclass
class BeamConfig:
    """Lexicon beam search (torchaudio's flashlight CTC decoder).

    lexicon: a lexicon file, or null to build one from the checkpoint's training transcripts.
    kenlm: optional KenLM binary/ARPA model; lm_weight and word_score apply only with it.
    """

    beam_size: int = 50
    lexicon: Optional[str] = None
    kenlm: Optional[str] = None
    lm_weight: float = 2.0
    word_score: float = 0.0
    beam_threshold: float = 25.0


@dataclass
class Config:
    checkpoint: str
    data: EvalDataConfig
    decoder: str = field(default="greedy", metadata={"choices": ["greedy", "beam"]})
    beam: BeamConfig = field(default_factory=BeamConfig)
    output: Optional[str] = None
    hypotheses: Optional[str] = None
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> None:
    raise StageNotBuilt("evaluate")
