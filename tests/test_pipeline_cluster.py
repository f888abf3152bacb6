"""A pipeline on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``) loses a node in the middle
of pretraining; Ray Train restarts the workers from the newest checkpoint and the pipeline completes.

The cluster: a head with no CPUs (the driver and Ray Train's controller, as on a real cluster where work
stays off the head) and two 1-CPU worker nodes. Pretraining runs two workers with STRICT_SPREAD, one on
each worker node, at 0.5 CPU each, so each node keeps 0.5 CPU for Ray Data's decode tasks. Once the first
complete checkpoint exists, a worker node is removed (killed, not drained): one training worker dies with
it, whichever node was chosen. A replacement node then joins, as an autoscaler would bring one up, and the
restarted worker group resumes from the checkpoint.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from speech_ssl.cli import main
from speech_ssl.pipeline import read_record
from speech_ssl.train import checkpoint as ckpt
from test_pipeline import _args, corpus  # noqa: F401  (the tiny pipeline on generated audio, and its corpus)

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

NODE = {"num_cpus": 1, "object_store_memory": 150 << 20}
MAX_UPDATES = 6

# Two Ray Train workers spread over the worker nodes, fractional CPUs so that Ray Data keeps half of each
# node; a checkpoint every 2 updates, restarts allowed after a node failure.
PRETRAIN_ON_RAY = {
    "pretrain.trainer.num_workers": "2",
    "pretrain.trainer.cpus_per_worker": "0.5",
    "pretrain.trainer.placement_strategy": "STRICT_SPREAD",
    "pretrain.trainer.max_updates": str(MAX_UPDATES),
    "pretrain.trainer.checkpoint_every": "2",
    "pretrain.trainer.max_failures": "3",
    "pretrain.data.num_cpus_per_reader": "0.5",
}


@pytest.fixture(scope="module")
def cluster():
    """A CPU-less head and two 1-CPU worker nodes; the driver is connected to the head. Shut down after."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "object_store_memory": 150 << 20, "include_dashboard": False})
    try:
        # Connected while the head is the only node: Ray attaches a driver to any node on its machine.
        ray.init(address=cluster.address, namespace="speech-ssl-tests", log_to_driver=False,
                 configure_logging=False)
        for _ in range(2):
            cluster.add_node(**NODE)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _pipeline_args(corpus, out: Path) -> list[str]:
    """test_pipeline's tiny pipeline, with pretraining on Ray Train workers instead of in-process."""
    args = [a for a in _args(corpus, out) if a.split("=", 1)[0] not in PRETRAIN_ON_RAY]
    return args + [f"{key}={value}" for key, value in PRETRAIN_ON_RAY.items()]


def _alive_cpu_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def test_a_node_lost_mid_pretraining_the_pipeline_completes_from_the_checkpoint(cluster, corpus, tmp_path, capsys):
    import ray

    out = tmp_path / "run"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["code"] = main(_pipeline_args(corpus, out))
        except BaseException as err:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    # Wait for the first complete pretraining checkpoint (every worker's part written, COMPLETE.json last).
    pretrain_dir = out / "pretrain"
    deadline = time.time() + 240
    while not (pretrain_dir.is_dir() and ckpt.latest_complete(pretrain_dir)):
        assert thread.is_alive(), f"the pipeline ended before pretraining wrote a checkpoint: {outcome}"
        assert time.time() < deadline, "pretraining wrote no checkpoint"
        time.sleep(0.2)

    # Remove a worker node: with STRICT_SPREAD each worker node holds one training worker.
    assert ray.get_runtime_context().get_node_id() == cluster.head_node.node_id
    victim = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
    cluster.remove_node(victim, allow_graceful=False)
    at_removal = ckpt.updates_of(Path(ckpt.latest_complete(pretrain_dir)).name)
    record_at_removal = read_record(pretrain_dir)
    summary_at_removal = (pretrain_dir / "train_summary.json").exists()
    replacement = cluster.add_node(**NODE)  # as an autoscaler would
    cluster.wait_for_nodes()

    thread.join(timeout=360)
    assert not thread.is_alive(), "the pipeline did not finish after the node was lost"
    assert "error" not in outcome, outcome
    assert outcome["code"] == 0, capsys.readouterr().err[-3000:]

    # The node went away while pretraining was still running.
    assert at_removal is not None and at_removal < MAX_UPDATES, at_removal
    assert record_at_removal["status"] == "running" and not summary_at_removal

    # Pretraining restarted from a checkpoint and reached its length, on the nodes that were left.
    pretrained = json.loads((pretrain_dir / "train_summary.json").read_text())
    assert pretrained["updates"] == MAX_UPDATES
    assert pretrained["resumes"] >= 1, "the restarted workers should have resumed from a checkpoint"
    assert victim.node_id not in pretrained["worker_nodes"] and len(set(pretrained["worker_nodes"])) == 2
    assert set(pretrained["worker_nodes"]) <= set(_alive_cpu_nodes())
    assert replacement.node_id in pretrained["worker_nodes"]
    assert (pretrain_dir / "last").resolve().name == ckpt.checkpoint_name(MAX_UPDATES)

    # The rest of the pipeline ran on the pretrained checkpoint.
    summary = json.loads((out / "summary.json").read_text())
    assert {row["stage"]: row["status"] for row in summary["stages"]} == {
        "prepare": "ran", "pretrain": "ran", "finetune": "ran", "evaluate": "ran", "embed": "ran"}
    scores = json.loads((out / "evaluate" / "results.json").read_text())
    assert summary["results"]["test_cer"] == scores["cer"] >= 0 and summary["results"]["pretrain_updates"] == MAX_UPDATES
    assert summary["results"]["embedded_utterances"] == 10
    assert json.loads((out / "finetune" / "stage.json").read_text())["config"]["init"] == str(pretrain_dir / "best")


def test_embedding_decode_tasks_fit_on_a_node_beside_the_model_actors(monkeypatch):
    """Two 1-CPU nodes, a 0.5-CPU model actor on each: a decode task may ask for 0.5 CPU, not 1 (the cluster
    has 1 CPU free in all, but no node has it, and such a task would wait forever)."""
    import ray

    from speech_ssl.embed.pipeline import place

    head = {"Alive": True, "Resources": {"memory": 1.0}}
    one_cpu = {"Alive": True, "Resources": {"CPU": 1.0}}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "nodes", lambda: [head, one_cpu, dict(one_cpu)])
    placed = place("cpu", None, None, 1.0)
    assert (placed.num_actors, placed.actor_cpus, placed.reader_cpus) == (2, 0.5, 0.5)
    # One 2-CPU node: two one-thread actors sharing 1.5 CPUs.
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    placed = place("cpu", None, None, 1.0)
    assert (placed.num_actors, placed.actor_cpus, placed.threads, placed.reader_cpus) == (2, 0.75, 1, 0.5)
    # Two 32-CPU nodes: at most 8 actors a node, 3.94 CPUs and four threads each.
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 32.0}}] * 2)
    placed = place("cpu", None, None, 1.0)
    assert (placed.num_actors, placed.actor_cpus, placed.threads, placed.reader_cpus) == (16, 3.9375, 4, 0.5)
