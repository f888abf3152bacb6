"""``speech-ssl pretrain``: self-supervised wav2vec 2.0 pretraining on the shared training loop."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from speech_ssl.data.config import DataConfig
from speech_ssl.models.config import ModelConfig, ModelOverrides
from speech_ssl.probe import ProbeSettings
from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import model_field, model_overrides_field
from speech_ssl.train.config import TrainerConfig


log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PretrainDataConfig(DataConfig):
    """train: unlabeled audio (manifest, directory or list). valid: held-out manifest (optional)."""

    train: str
    valid: Optional[str] = None


@dataclass(kw_only=True)
class PretrainProbeConfig(ProbeSettings):
    """A linear probe of the model while it trains (off by default): every `every_updates` updates (and at the
    end) rank 0 probes the current model on `train` (`valid`, or none: a held-out part of train) and logs
    probe_accuracy (task=speaker) or probe_cer (task=ctc) to metrics.jsonl, TensorBoard and the curves.
    Keep it small: max_utterances caps each split (decoded once, then cached on the worker).

    every_updates: probe every this many updates and at the end (0: no probe).
    train: the probe's manifest (JSONL with `speaker`, or `text` for task=ctc).
    valid: a held-out manifest, or none: hold out valid_fraction of train."""

    every_updates: int = 0
    train: Optional[str] = None
    valid: Optional[str] = "none"
    max_utterances: Optional[int] = 300
    epochs: Optional[int] = 100


@dataclass
class Config:
    """
    output_dir: the run's folder: checkpoints (best, last), metrics.jsonl, TensorBoard, curves; a run
        with an output_dir that holds checkpoints resumes from the latest.
    data: the audio to pretrain on and how it is read and batched.
    model: the model preset (see the list of presets above).
    model_overrides: model settings changed from the preset, one key each (model_overrides.num_layers=2);
        null: the preset's value. Resolved once, before Ray starts, into the model that trains (saved in
        pretrain_config.json as `model`).
    trainer: scale, precision, length and bookkeeping of the run.
    probe: an optional linear probe of the model while it trains (probe.every_updates=N).
    ray: which Ray runs it: an embedded local one, or a cluster (ray.address).
    """

    output_dir: str
    data: PretrainDataConfig
    model: str = model_field("tiny")
    model_overrides: ModelOverrides = model_overrides_field()
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    probe: PretrainProbeConfig = field(default_factory=PretrainProbeConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def build_monitor(cfg: Config):
    """The pretraining probe monitor of ``cfg.probe`` (None when off); bad probe inputs fail here, on the
    driver, with the key named."""
    if not cfg.probe.every_updates:
        return None
    from speech_ssl.config import ConfigError
    from speech_ssl.data import read_source
    from speech_ssl.probe import ProbeMonitor, check_settings, is_none, prepare_splits

    check_settings(cfg.probe, "probe")
    if cfg.probe.every_updates < 0:
        raise ConfigError("probe.every_updates", f"must be 0 (off) or positive, got {cfg.probe.every_updates}.")
    if is_none(cfg.probe.train):
        raise ConfigError("probe.train", "probe.every_updates is set, so a probe manifest is needed (JSONL with a "
                                         "'speaker' field, or 'text' for probe.task=ctc).")
    for key in ("train",) + (() if is_none(cfg.probe.valid) else ("valid",)):
        path = getattr(cfg.probe, key)
        if not Path(path).exists() and "://" not in path:
            raise ConfigError(f"probe.{key}", f"no manifest, directory or list at '{path}'.")
    train = read_source(cfg.probe.train, cfg.data.extensions, tsv_sample_rate=cfg.data.tsv_sample_rate)
    valid = None if is_none(cfg.probe.valid) else read_source(cfg.probe.valid, cfg.data.extensions,
                                                              tsv_sample_rate=cfg.data.tsv_sample_rate)
    splits = prepare_splits(cfg.probe, train, valid, "probe.train", "probe.valid")
    data = dataclasses.replace(cfg.data, crop_duration=None, shuffle=False)
    return ProbeMonitor(splits, cfg.probe, DataConfig(**{f.name: getattr(data, f.name)
                                                         for f in dataclasses.fields(DataConfig)}),
                        cfg.probe.every_updates)


def model_config(cfg: Config) -> ModelConfig:
    """The model this configuration pretrains: the preset with the user's overrides (a bad model_overrides
    value fails here, naming its key)."""
    from speech_ssl.models.config import resolve_config

    return resolve_config(cfg.model, cfg.model_overrides)


def read_corpora(cfg: Config, model: Optional[ModelConfig] = None):
    """The training and validation rows, checked on the driver before Ray starts: every path named exists,
    the rows' files resolve, something is usable, and decoded-audio caches fit the model."""
    from speech_ssl.data import read_source
    from speech_ssl.stages.common import check_caches_fit, check_input_path, check_rows_resolve, require_rows

    model = model or model_config(cfg)
    check_input_path("data.train", cfg.data.train)
    check_input_path("data.valid", cfg.data.valid)
    corpora = {}
    for key, spec in (("data.train", cfg.data.train), ("data.valid", cfg.data.valid)):
        if not spec:
            corpora[key] = None
            continue
        rows = read_source(spec, cfg.data.extensions, tsv_sample_rate=cfg.data.tsv_sample_rate)
        check_rows_resolve(key, rows, spec)
        require_rows(key, rows, spec)
        check_caches_fit(key, rows, model, cfg.data.sample_rate)
        corpora[key] = rows
    return corpora["data.train"], corpora["data.valid"]


def run(cfg: Config) -> dict:
    """Pretrain; resumes when ``output_dir`` already holds checkpoints. Returns the training summary.

    Everything that can be checked is checked before Ray starts and before anything is written."""
    from speech_ssl.runtime import ray_session
    from speech_ssl.stages.common import check_output_dir, output_lock, save_resolved_config
    from speech_ssl.train.launch import run_training
    from speech_ssl.train.tasks.pretrain import PretrainTask

    check_output_dir("output_dir", cfg.output_dir)
    from speech_ssl import storage

    output_dir = storage.normalize(cfg.output_dir)  # a local path, or a URI (s3://, gs://, ...)
    model = model_config(cfg)
    train, valid = read_corpora(cfg, model)
    monitor = build_monitor(cfg)
    with output_lock(output_dir, "pretrain"):
        save_resolved_config(output_dir, "pretrain", cfg, model)
        log.info("pretraining %s on %d utterances (%.2f h)%s", cfg.model, len(train),
                 sum(u.duration for u in train) / 3600,
                 f", validating on {len(valid)}" if valid else "")
        with ray_session(cfg.ray, log_dir=f"{output_dir}/logs"):
            task = PretrainTask(model_config=model, data=cfg.data, train=train, valid=valid,
                                warmup_updates=cfg.trainer.optim.warmup_updates, monitor=monitor)
            summary = run_training(task, cfg.trainer, output_dir)
    log.info("pretraining done after %d updates: last %s, best %s", summary["updates"], summary["last"],
             summary["best"])
    return summary
