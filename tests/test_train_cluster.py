"""Pretraining across two simulated Ray nodes (``ray.cluster_utils.Cluster``) on one machine."""

from __future__ import annotations

import pytest

from audio_factory import make_corpus
from speech_ssl.runtime import RayConfig
from speech_ssl.stages import pretrain
from speech_ssl.train.config import OptimConfig, TrainerConfig

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 << 20})
    cluster.add_node(num_cpus=1, object_store_memory=150 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_nodes_train_together(two_nodes, tmp_path):
    train = make_corpus(tmp_path / "corpus", n=10, min_seconds=1.2, max_seconds=2.0, split="train")
    cfg = pretrain.Config(
        output_dir=str(tmp_path / "run"),
        data=pretrain.PretrainDataConfig(train=str(train), batch_seconds=4.0, crop_duration=1.2,
                                         num_cpus_per_reader=0.5),
        model="tiny",
        trainer=TrainerConfig(num_workers=2, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD", max_updates=6,
                              log_every=2, checkpoint_every=3, validate_every=0,
                              optim=OptimConfig(lr=5e-4, schedule="constant")),
        ray=RayConfig(),
    )
    summary = pretrain.run(cfg)
    assert summary["updates"] == 6
    assert len(set(summary["worker_nodes"])) == 2, summary["worker_nodes"]
    assert (tmp_path / "run" / "last" / "model.safetensors").exists()
