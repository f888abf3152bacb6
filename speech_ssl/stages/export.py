"""``speech-ssl export``: a checkpoint in the transformers layout (config.json + weights + processor).

A fine-tuned (CTC) checkpoint becomes a directory that ``transformers.Wav2Vec2ForCTC.from_pretrained``
and ``transformers.Wav2Vec2Processor.from_pretrained`` load (vocab.json, tokenizer and feature-extractor
files included) and that gives the same logits as ours. A pretraining checkpoint becomes a
``Wav2Vec2ForPreTraining`` directory (``Wav2Vec2Model.from_pretrained`` reads its encoder). The
checkpoint's transcript normaliser and lexicon words are copied along, so ``speech-ssl evaluate`` and
``transcribe`` accept the exported directory too. Filterbank models have no transformers counterpart.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Config:
    """
    checkpoint: our checkpoint directory (or a training run's output_dir: its best checkpoint).
    output: the directory to write. format: hf (transformers)."""

    checkpoint: str
    output: str
    format: str = field(default="hf", metadata={"choices": ["hf"]})


def run(cfg: Config) -> dict[str, Any]:
    from speech_ssl.asr.recognizer import LEXICON_WORDS_FILE, TEXT_CONFIG_FILE, resolve_checkpoint
    from speech_ssl.data import Vocabulary
    from speech_ssl.errors import SpeechSSLError
    from speech_ssl.models import Wav2Vec2ForCTC, export_hf, load

    source = resolve_checkpoint(cfg.checkpoint)
    model = load(source)
    directory = source if source.is_dir() else source.parent
    vocab = None
    if isinstance(model, Wav2Vec2ForCTC):
        if not (directory / "vocab.json").is_file():
            raise SpeechSSLError(f"{directory}: a CTC checkpoint without its vocab.json cannot be exported with a "
                                 "processor")
        vocab = Vocabulary.load(directory)
    output = Path(cfg.output).expanduser()
    if output.resolve() == directory.resolve():
        raise SpeechSSLError("output must be a different directory from the checkpoint")
    export_hf(model, output, vocab.index if vocab is not None else None)
    for name in (TEXT_CONFIG_FILE, LEXICON_WORDS_FILE):
        if (directory / name).is_file():
            shutil.copyfile(directory / name, output / name)
    architecture = type(model).__name__
    summary = {"output": str(output), "format": cfg.format, "architecture": architecture,
               "checkpoint": str(source), "vocab_size": len(vocab) if vocab is not None else None,
               "files": sorted(p.name for p in output.iterdir())}
    log.info("exported %s (%s) to %s: load it with transformers.%s.from_pretrained(%r)%s", source, architecture,
             output, architecture, str(output),
             " and Wav2Vec2Processor.from_pretrained" if vocab is not None else "")
    print(json.dumps(summary), flush=True)
    return summary
