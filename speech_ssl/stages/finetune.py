"""``speech-ssl finetune``: CTC fine-tuning of a pretrained encoder, or the same model from scratch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from speech_ssl.config import ConfigError
from speech_ssl.data.config import DataConfig
from speech_ssl.runtime import RayConfig
from speech_ssl.stages.common import model_field
from speech_ssl.train.config import OptimConfig, TrainerConfig
from speech_ssl.train.tasks.ctc import CTCConfig, FinetuneModelOverrides


log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class FinetuneDataConfig(DataConfig):
    """train / valid: labeled manifests (JSONL with `text`)."""

    train: str
    valid: str


def _finetune_trainer() -> TrainerConfig:
    return TrainerConfig(optim=OptimConfig(lr=5e-5, eps=1e-8, weight_decay=0.0, schedule="tri_stage",
                                           warmup_ratio=0.1, hold_ratio=0.4, decay_ratio=0.5,
                                           final_lr_scale=0.05))


@dataclass
class Config:
    """
    output_dir: the run's folder: checkpoints (best, last, each with vocab.json), metrics.jsonl,
        TensorBoard, curves; a run with an output_dir that holds checkpoints resumes from the latest.
    init: the pretrained model: our checkpoint or run folder, a transformers directory or a fairseq .pt;
        init=none trains the `model` preset from scratch.
    data: the labeled manifests and how audio is read and batched (data.text: the transcript normaliser).
    model: the model preset used with init=none (a checkpoint brings its own architecture).
    model_overrides: model settings changed from the preset or checkpoint, one key each
        (model_overrides.layerdrop=0). Resolved once, before Ray starts: the preset or checkpoint, then
        the fine-tuning defaults of masking and dropouts (fairseq's; skipped over a checkpoint that is
        already a CTC model, whose own settings stay), then these keys, which always win. The result is
        saved in finetune_config.json as `model`.
    ctc: the fine-tuning recipe's training behaviour (freezing, best-checkpoint metric).
    trainer: scale, precision, length and bookkeeping of the run.
    ray: which Ray runs it: an embedded local one, or a cluster (ray.address).
    """

    output_dir: str
    init: str
    data: FinetuneDataConfig
    model: str = model_field("tiny")
    model_overrides: FinetuneModelOverrides = field(default_factory=FinetuneModelOverrides)
    ctc: CTCConfig = field(default_factory=CTCConfig)
    trainer: TrainerConfig = field(default_factory=_finetune_trainer)
    ray: RayConfig = field(default_factory=RayConfig)


def check_texts(normalizer, utterances, key: str) -> None:
    """One SpeechSSLError naming ``key`` and every character its transcripts hold that ``normalizer`` refuses."""
    from speech_ssl.errors import SpeechSSLError

    try:
        normalizer.check(u.text for u in utterances)
    except SpeechSSLError as err:
        raise SpeechSSLError(f"{key}: {err}") from None


def check_vocabulary(vocab, normalizer, utterances, key: str) -> None:
    """One SpeechSSLError naming ``key`` and every character of its transcripts outside ``vocab``."""
    from speech_ssl.errors import SpeechSSLError

    try:
        vocab.check([normalizer(u.text) for u in utterances if u.text is not None])
    except SpeechSSLError as err:
        raise SpeechSSLError(f"{key}: {err}") from None


def run(cfg: Config) -> dict:
    """Fine-tune; resumes when ``output_dir`` already holds checkpoints. Returns the training summary."""
    from speech_ssl.data import TextNormalizer, Vocabulary, read_source
    from speech_ssl.runtime import ray_session
    from speech_ssl.stages.common import (check_input_path, check_output_dir, check_rows_resolve, output_lock,
                                          require_rows, save_resolved_config)
    from speech_ssl.train import checkpoint as ckpt
    from speech_ssl.train.launch import run_training, storage_root
    from speech_ssl.train.tasks.ctc import CTCTask, finetune_model_config, init_model_config

    check_output_dir("output_dir", cfg.output_dir)
    check_input_path("data.train", cfg.data.train)
    check_input_path("data.valid", cfg.data.valid)
    if cfg.init != "none" and not Path(cfg.init).exists() and "://" not in cfg.init:
        raise ConfigError("init", f"no checkpoint at '{cfg.init}' (give a checkpoint directory, a transformers "
                                  "model directory, a fairseq .pt file, or none to train from scratch).")
    # The model that trains, resolved once here (a bad model_overrides value fails before Ray starts).
    if cfg.init == "none":
        model = finetune_model_config(cfg.model, cfg.model_overrides)
    else:
        base, finetuned = init_model_config(cfg.init)
        model = finetune_model_config(base, cfg.model_overrides, base_is_finetuned=finetuned)
    from speech_ssl import storage

    output_dir = storage.normalize(cfg.output_dir)  # a local path, or a URI (s3://, gs://, ...)
    # Everything that can be wrong with the corpora and transcripts fails here, before Ray or any worker starts.
    train = read_source(cfg.data.train, cfg.data.extensions, tsv_sample_rate=cfg.data.tsv_sample_rate)
    valid = read_source(cfg.data.valid, cfg.data.extensions, tsv_sample_rate=cfg.data.tsv_sample_rate)
    for key, spec, rows in (("data.train", cfg.data.train, train), ("data.valid", cfg.data.valid, valid)):
        check_rows_resolve(key, rows, spec)
        require_rows(key, rows, spec)
    normalizer = TextNormalizer(cfg.data.text)
    # Per split: one error listing every character the normaliser refuses, then one listing every
    # character outside the vocabulary (validation characters the training transcripts never show).
    check_texts(normalizer, train, "data.train")
    check_texts(normalizer, valid, "data.valid")
    previous = ckpt.latest_complete(storage_root(output_dir, cfg.trainer))
    if previous is not None:
        # A resumed run keeps the vocabulary its head was built with (read from wherever its checkpoint is).
        vocab = Vocabulary.load(ckpt.download(previous, storage.local_work_dir(output_dir) / ".resume-model",
                                              model_only=True) if storage.is_uri(previous) else previous,
                                unknown=cfg.data.text.unknown)
    else:
        vocab = Vocabulary.build([u.text for u in train], normalizer)
    check_vocabulary(vocab, normalizer, train, "data.train")
    check_vocabulary(vocab, normalizer, valid, "data.valid")
    log.info("fine-tuning %s on %d utterances (%.2f h), %d-token vocabulary, validating on %d",
             cfg.init if cfg.init != "none" else f"{cfg.model} from scratch", len(train),
             sum(u.duration for u in train) / 3600, len(vocab), len(valid))
    task = CTCTask(init=cfg.init, model_config=model, data=cfg.data, train=train, valid=valid, vocab=vocab,
                   ctc=cfg.ctc)
    with output_lock(output_dir, "finetune"):
        save_resolved_config(output_dir, "finetune", cfg, model)
        with ray_session(cfg.ray, log_dir=f"{output_dir}/logs"):
            summary = run_training(task, cfg.trainer, output_dir)
    log.info("fine-tuning done after %d updates: best %s (%s), last %s", summary["updates"], summary["best"],
             ", ".join(f"{k} {v:.4f}" for k, v in summary.get("metrics", {}).items() if k in ("valid_wer", "valid_cer")),
             summary["last"])
    return summary
