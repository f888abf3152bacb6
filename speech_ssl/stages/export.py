"""``speech-ssl export``: a checkpoint as a self-contained model folder, for transformers or for speech-ssl.

`format=hf`: the transformers layout. A fine-tuned (CTC) checkpoint becomes a directory that
``transformers.Wav2Vec2ForCTC.from_pretrained`` and ``transformers.Wav2Vec2Processor.from_pretrained``
load (vocab.json, tokenizer and feature-extractor files included), with the same logits as ours and a
tokenizer that reads the same transcripts out of them as our greedy decoder. A pretraining checkpoint
becomes a ``Wav2Vec2ForPreTraining`` directory (``Wav2Vec2Model.from_pretrained`` reads its encoder). Only
conv front ends (tiny, base, large...): transformers has no filterbank wav2vec 2.0, so fbank models (the
demo's fbank-tiny) are refused before anything is written.

`format=speech-ssl`: our own layout (config.json + model.safetensors + vocab.json), any front end, without
the training state; `speech-ssl evaluate`, `transcribe`, `embed` and `speech_ssl.models.load` read it.

Both carry the checkpoint's transcript normaliser and lexicon words, so `speech-ssl evaluate` and
`transcribe` accept either export. The folder is written beside `output` under a temporary name and
renamed into place when complete: a failed export leaves nothing at `output`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

FORMATS = ["hf", "speech-ssl"]


@dataclass
class Config:
    """
    checkpoint: our checkpoint directory (or a training run's output_dir: its best checkpoint).
    output: the folder to write (it must not exist, be empty, or overwrite=true replaces it).
    format: hf (transformers; conv front ends only) | speech-ssl (ours; any front end, e.g. fbank-tiny).
    overwrite: replace an existing, non-empty output folder (only once the new export is complete)."""

    checkpoint: str
    output: str
    format: str = field(default="hf", metadata={"choices": FORMATS})
    overwrite: bool = False


def _refusal(model: Any, fmt: str) -> Optional[str]:
    """Why ``model`` cannot be exported in ``fmt`` (None when it can); asked before anything is written."""
    from speech_ssl.models import convert

    if fmt == "hf":
        problem = convert.hf_export_problem(model.config)
        if problem is not None:
            return f"{problem}; format=speech-ssl exports it in our own layout instead"
    return None


def _check_output(output: Path, source_dir: Path, overwrite: bool) -> None:
    """ConfigError naming ``output`` when writing there would destroy something the user did not offer."""
    from speech_ssl.config import ConfigError

    if output.resolve() == source_dir.resolve() or source_dir.resolve() in output.resolve().parents:
        raise ConfigError("output", f"'{output}' is the checkpoint's own folder (or inside it); choose another.")
    if output.exists() and not output.is_dir():
        raise ConfigError("output", f"'{output}' is a file; the export is a folder.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConfigError("output", f"'{output}' already holds files; choose another folder or set "
                                    "overwrite=true to replace it.")


def _write(model: Any, directory: Path, fmt: str, vocab: Any, source_dir: Path) -> None:
    from speech_ssl.asr.recognizer import LEXICON_WORDS_FILE, TEXT_CONFIG_FILE
    from speech_ssl.models import export_hf, save_model

    index = vocab.index if vocab is not None else None
    if fmt == "hf":
        export_hf(model, directory, index)
    else:
        save_model(model, directory, vocab=index)
    for name in (TEXT_CONFIG_FILE, LEXICON_WORDS_FILE):
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, directory / name)


def _folder_mode() -> int:
    from speech_ssl.models.checkpoint import _umask

    return 0o777 & ~_umask()


def _publish(staged: Path, output: Path) -> None:
    """Move the complete export ``staged`` to ``output``; an existing ``output`` is set aside first and
    removed only after the rename, so a crash leaves the old export or the new one, never a mix."""
    os.chmod(staged, _folder_mode())  # mkdtemp makes 0700 folders
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, old / output.name)
    os.replace(staged, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run(cfg: Config) -> dict[str, Any]:
    """Export ``cfg.checkpoint`` to ``cfg.output``; prints and returns a summary (files, architecture)."""
    from speech_ssl.asr.recognizer import resolve_checkpoint
    from speech_ssl.config import ConfigError
    from speech_ssl.data import Vocabulary
    from speech_ssl.errors import SpeechSSLError
    from speech_ssl.models import Wav2Vec2ForCTC, load

    if cfg.format not in FORMATS:
        raise ConfigError("format", f"unknown export format '{cfg.format}'.", FORMATS)
    source = resolve_checkpoint(cfg.checkpoint)
    source_dir = source if source.is_dir() else source.parent
    output = Path(cfg.output).expanduser()
    _check_output(output, source_dir, cfg.overwrite)
    model = load(source)
    refusal = _refusal(model, cfg.format)
    if refusal is not None:
        raise SpeechSSLError(f"{source}: {refusal}. Nothing was written.")
    vocab = None
    if isinstance(model, Wav2Vec2ForCTC):
        if not (source_dir / "vocab.json").is_file():
            raise SpeechSSLError(f"{source_dir}: a CTC checkpoint without its vocab.json cannot be exported with "
                                 "its tokenizer. Nothing was written.")
        vocab = Vocabulary.load(source_dir)

    output.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        _write(model, staged, cfg.format, vocab, source_dir)
        _publish(staged, output)
    finally:
        shutil.rmtree(staged, ignore_errors=True)

    architecture = type(model).__name__
    summary = {"output": str(output), "format": cfg.format, "architecture": architecture,
               "checkpoint": str(source), "vocab_size": len(vocab) if vocab is not None else None,
               "files": sorted(p.name for p in output.iterdir())}
    if cfg.format == "hf":
        log.info("exported %s (%s) to %s: load it with transformers.%s.from_pretrained(%r)%s", source,
                 architecture, output, architecture, str(output),
                 " and Wav2Vec2Processor.from_pretrained" if vocab is not None else "")
    else:
        log.info("exported %s (%s) to %s: speech-ssl evaluate/transcribe/embed checkpoint=%s, or "
                 "speech_ssl.models.load(%r)", source, architecture, output, output, str(output))
    print(json.dumps(summary), flush=True)
    return summary
