"""Distributed pretraining on Ray Train with real workers and generated audio: the loss falls.

Elsewhere, so that each run is paid for once: a resumed run equals a straight one bit for bit
(tests/test_faults.py, after a SIGINT), a worker lost with its node is replaced and the run completes from
its checkpoint (tests/test_pipeline_cluster.py; a killed worker alone: tests/test_chaos.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audio_factory import make_corpus
from speech_ssl.models import load
from speech_ssl.runtime import RayConfig
from speech_ssl.stages import pretrain
from speech_ssl.train.config import OptimConfig, TrainerConfig

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    train = make_corpus(root, n=16, min_seconds=1.2, max_seconds=2.0, split="train", seed=1)
    valid = make_corpus(root, n=4, min_seconds=1.2, max_seconds=2.0, split="valid", seed=2)
    return str(train), str(valid)


def _config(corpus, out: Path, max_updates: int, **trainer) -> pretrain.Config:
    train, valid = corpus
    optim = OptimConfig(lr=1e-3, schedule="constant", warmup_updates=0)
    base = dict(num_workers=2, cpus_per_worker=0.5, max_updates=max_updates, log_every=4, validate_every=0,
                checkpoint_every=4, keep_last=3, optim=optim, seed=5)
    base.update(trainer)
    return pretrain.Config(
        output_dir=str(out),
        data=pretrain.PretrainDataConfig(train=train, valid=valid, batch_seconds=4.0, crop_duration=1.2,
                                         num_cpus_per_reader=0.5),
        model="tiny",
        model_overrides={"layerdrop": 0.0},
        trainer=TrainerConfig(**base),
        ray=RayConfig(),
    )


def _train_losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["split"] == "train"]


def test_two_workers_loss_falls_and_the_best_checkpoint_is_kept(ray_local, corpus, tmp_path):
    straight = pretrain.run(_config(corpus, tmp_path / "straight", max_updates=16))
    assert straight["updates"] == 16
    assert len(set(straight["worker_nodes"])) == 1 and len(straight["worker_nodes"]) == 2
    losses = _train_losses(tmp_path / "straight")
    assert losses[-1] < losses[0] - 0.1, losses
    # The temperature is part of the model's state and follows the update count.
    model = load(str(tmp_path / "straight" / "last"))
    q = model.quantizer
    assert float(q.temperature) == pytest.approx(max(q.max_temperature * q.temperature_decay ** 16, q.min_temperature))
    best = (tmp_path / "straight" / "best")
    assert best.is_dir() and (best / "model.safetensors").exists()
