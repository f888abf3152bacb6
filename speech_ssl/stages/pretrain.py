"""``speech-ssl pretrain``: self-supervised wav2vec 2.0 pretraining on the shared training loop."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from speech_ssl.data.config import DataConfig
from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import model_field, model_overrides_field
from speech_ssl.train.config import TrainerConfig


log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class PretrainDataConfig(DataConfig):
    """train: unlabeled audio (manifest, directory or list). valid: held-out manifest (optional)."""

    train: str
    valid: Optional[str] = None


@dataclass
class Config:
    output_dir: str
    data: PretrainDataConfig
    model: str = model_field("tiny")
    model_overrides: dict[str, Any] = model_overrides_field()
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> dict:
    """Pretrain; resumes when ``output_dir`` already holds checkpoints. Returns the training summary."""
    from speech_ssl.data import read_source
    from speech_ssl.runtime import ray_session
    from speech_ssl.stages.common import resolve_model_config, save_resolved_config
    from speech_ssl.train.launch import run_training
    from speech_ssl.train.tasks.pretrain import PretrainTask

    resolve_model_config(cfg.model, cfg.model_overrides)  # fail fast on a bad model_overrides key
    output_dir = Path(cfg.output_dir).resolve()
    save_resolved_config(output_dir, "pretrain", cfg)
    with ray_session(cfg.ray):
        train = read_source(cfg.data.train)
        valid = read_source(cfg.data.valid) if cfg.data.valid else None
        log.info("pretraining %s on %d utterances (%.2f h)%s", cfg.model, len(train),
                 sum(u.duration for u in train) / 3600,
                 f", validating on {len(valid)}" if valid else "")
        task = PretrainTask(model=cfg.model, model_overrides=dict(cfg.model_overrides), data=cfg.data,
                            train=train, valid=valid, warmup_updates=cfg.trainer.optim.warmup_updates)
        summary = run_training(task, cfg.trainer, output_dir)
    log.info("pretraining done after %d updates: last %s, best %s", summary["updates"], summary["last"],
             summary["best"])
    return summary
