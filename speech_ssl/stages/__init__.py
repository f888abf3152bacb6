"""One module per command: its typed configuration (``Config``) and ``run(cfg)``.

Stages are library code: they take dataclasses, never Hydra objects, so pipelines and tests call them
directly. ``speech_ssl.cli`` turns command lines into these dataclasses.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    summary: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command("prepare", "speech_ssl.stages.prepare", "scan audio (dir, manifest, list) into a JSONL manifest"),
        Command("cache", "speech_ssl.stages.cache", "decode a corpus once into a cache every stage reads at memory speed"),
        Command("pretrain", "speech_ssl.stages.pretrain", "self-supervised wav2vec 2.0 pretraining on Ray Train"),
        Command("finetune", "speech_ssl.stages.finetune", "CTC fine-tuning of a pretrained encoder (or from scratch)"),
        Command("evaluate", "speech_ssl.stages.evaluate", "WER/CER of a CTC checkpoint on a labeled manifest"),
        Command("transcribe", "speech_ssl.stages.transcribe", "transcripts for new audio with a CTC checkpoint"),
        Command("embed", "speech_ssl.stages.embed", "batch-embed a corpus into Parquet shards with Ray Data"),
        Command("export", "speech_ssl.stages.export", "export a checkpoint (transformers layout for conv models, or ours)"),
        Command("probe", "speech_ssl.stages.probe", "linear probes (speaker, CTC characters) on frozen features"),
        Command("run", "speech_ssl.stages.run", "run a chained pipeline locally (pipelines/)"),
        Command("submit", "speech_ssl.stages.submit", "submit a pipeline to a Ray cluster as a Ray job"),
    ]
}
