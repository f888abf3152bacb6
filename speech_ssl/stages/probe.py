"""``speech-ssl probe``: linear probes on frozen features (speaker identity, CTC characters, few-shot classes).

The standard diagnostic of representation quality: features of a checkpoint (ours, a transformers directory or
a fairseq .pt file; a training run's output_dir means its best checkpoint) are computed once, in eval mode
without gradients, and a linear layer is trained on them with AdamW for a fixed number of epochs
(deterministic given ``seed``). ``layer=all`` (the default, SUPERB's protocol) feeds it a learned
softmax-weighted sum of every hidden state and reports the weights; ``layer=<i>`` one layer.
``task=speaker``: mean-pooled utterance features -> softmax over the speakers of ``train`` (the manifest's
``speaker`` field); reports train/valid accuracy and the chance level. ``task=ctc``: frame features -> CTC over
the characters of ``train``'s transcripts; reports the validation CER/WER of greedy decoding.
``task=classify``: a manifest column (``label_key``) from k labeled examples per class (``shots``), ``draws``
random draws each, against the random-initial model and mean log-mel filterbanks on the same draws; reports
mean and sd. ``valid=none`` holds out ``valid_fraction`` of ``train`` (per speaker, or per class).
Runs in this process (no Ray): probes are for small corpora. The last line printed is the results JSON,
also written to ``output`` (with a plot beside it, ``<output>.png``, for all-layer and classify probes).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from speech_ssl.data.config import DataConfig
from speech_ssl.probe import ProbeSettings

log = logging.getLogger(__name__)


def _probe_data() -> DataConfig:
    return DataConfig(shuffle=False)


@dataclass(kw_only=True)
class Config(ProbeSettings):
    """checkpoint: ours, a transformers directory, a fairseq .pt file, or a training run's output_dir (its best).
    train / valid: manifests (JSONL with `speaker`, `text` for task=ctc, or the label_key column for
        task=classify); valid=none holds out valid_fraction of train.
    output: JSON file for the results (the same object is the last line printed); a plot beside it
        (<output without .json>.png) for all-layer and classify probes.
    device: auto (a GPU when there is one) | cpu | cuda.
    task / layer / label_key / shots / draws / baselines / valid_fraction / max_utterances / epochs /
        batch_size / lr / weight_decay / seed: see below.
    data: how audio is read and batched (data.text: the transcript normaliser of the ctc probe)."""

    checkpoint: str
    train: str
    valid: Optional[str]
    output: Optional[str] = None
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})
    data: DataConfig = field(default_factory=_probe_data)


def _device(name: str):
    import torch

    from speech_ssl.config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no GPU is visible.", ["auto", "cpu"])
    return torch.device(name)


def run(cfg: Config) -> dict[str, Any]:
    """Train and score the probe; prints a one-line summary and the results JSON, returns the results."""
    from pathlib import Path

    from speech_ssl.asr.recognizer import resolve_checkpoint
    from speech_ssl.config import ConfigError
    from speech_ssl.data import read_source
    from speech_ssl.models import load
    from speech_ssl.probe import check_settings, is_none, prepare_splits, run_probe, summary_line

    check_settings(cfg)
    device = _device(cfg.device)
    if not Path(cfg.checkpoint).exists() and "://" not in cfg.checkpoint:
        raise ConfigError("checkpoint", f"no checkpoint at '{cfg.checkpoint}' (give a checkpoint directory, a "
                                        "training run's output_dir, a transformers model directory or a fairseq .pt).")
    for key in ("train",) + (() if is_none(cfg.valid) else ("valid",)):
        path = getattr(cfg, key)
        if not Path(path).exists() and "://" not in path:
            raise ConfigError(key, f"no manifest, directory or list at '{path}'.")
    train = read_source(cfg.train, cfg.data.extensions, tsv_sample_rate=cfg.data.tsv_sample_rate)
    valid = None if is_none(cfg.valid) else read_source(cfg.valid, cfg.data.extensions,
                                                        tsv_sample_rate=cfg.data.tsv_sample_rate)
    splits = prepare_splits(cfg, train, valid)
    path = resolve_checkpoint(cfg.checkpoint)
    model = load(path)
    log.info("%s probe of %s (layer %s) on %d train / %d valid utterances%s", cfg.task, path, cfg.layer,
             len(splits.train), len(splits.valid), " (held out of train)" if splits.held_out else "")
    from speech_ssl.config import to_dict

    results = run_probe(model, splits, cfg, cfg.data, device)
    results.update({"checkpoint": str(path), "train": cfg.train, "valid": None if is_none(cfg.valid) else cfg.valid,
                    "config": to_dict(cfg)})
    if cfg.output:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        with open(cfg.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        from speech_ssl.probe.plots import plot_probe

        plot = plot_probe(results, Path(cfg.output).with_suffix(".png"))
        if plot is not None:
            log.info("plot: %s", plot)
    print(summary_line(results))
    print(json.dumps(results), flush=True)
    return results
