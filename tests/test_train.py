"""Distributed pretraining on Ray Train with real workers and generated audio: the loss falls, a resumed
run equals a straight one, a killed worker is replaced and the run completes from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audio_factory import make_corpus
from speech_ssl.data.config import DataConfig
from speech_ssl.models import load
from speech_ssl.runtime import RayConfig
from speech_ssl.stages import pretrain
from speech_ssl.train import checkpoint as ckpt
from speech_ssl.train.config import OptimConfig, TrainerConfig

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_with_dashboard():
    """Ray for this module, with a dashboard: the worker-kill test finds workers through the state API."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, object_store_memory=300 << 20, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=_free_port(), log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


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


def test_two_workers_loss_falls_and_resume_equals_a_straight_run(ray_with_dashboard, corpus, tmp_path):
    straight = pretrain.run(_config(corpus, tmp_path / "straight", max_updates=16))
    assert straight["updates"] == 16
    assert len(set(straight["worker_nodes"])) == 1 and len(straight["worker_nodes"]) == 2
    losses = _train_losses(tmp_path / "straight")
    assert losses[-1] < losses[0] - 0.1, losses

    first = pretrain.run(_config(corpus, tmp_path / "resumed", max_updates=8))
    assert first["updates"] == 8
    second = pretrain.run(_config(corpus, tmp_path / "resumed", max_updates=16))
    assert second["updates"] == 16 and second["resumes"] == 1
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
    # The temperature is part of the model's state and follows the update count.
    model = load(str(tmp_path / "resumed" / "last"))
    fresh = load(str(tmp_path / "straight" / "last"))
    assert float(model.quantizer.temperature) == pytest.approx(float(fresh.quantizer.temperature))
    best = (tmp_path / "straight" / "best")
    assert best.is_dir() and (best / "model.safetensors").exists()


def _train_worker_pids() -> list[int]:
    import ray
    from ray.util.state import list_actors

    # This module's Ray by its address: without one the state API autodetects, and fails when another Ray
    # runs on the machine.
    actors = list_actors(address=ray.get_runtime_context().gcs_address,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True)
    return [a.pid for a in actors if a.pid]


def test_a_killed_worker_is_replaced_and_the_run_completes(ray_with_dashboard, corpus, tmp_path):
    out = tmp_path / "killed"
    cfg = _config(corpus, out, max_updates=16, checkpoint_every=4, max_failures=2)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(pretrain.run(cfg)), daemon=True)
    thread.start()
    deadline = time.time() + 300
    while not ckpt.is_complete(out / "checkpoint_00000004"):  # every worker's part is in storage
        assert thread.is_alive() and time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    pids = _train_worker_pids()
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=360)
    assert not thread.is_alive()
    assert result["updates"] == 16
    assert result["resumes"] >= 1, "the replacement workers should have resumed from a checkpoint"
    assert (out / "last").resolve().name == "checkpoint_00000016"
