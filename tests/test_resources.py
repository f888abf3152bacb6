"""Resource planning that cannot hang: the arithmetic, the documented command on the embedded Ray, and a joined
cluster that cannot hold the run failing fast with one paragraph."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from audio_factory import make_corpus
from speech_ssl.errors import SpeechSSLError
from speech_ssl.train import resources
from speech_ssl.train.resources import ClusterResources, plan_resources


def test_two_workers_on_two_local_cpus_get_half_a_cpu_each_and_decoding_keeps_one():
    plan = plan_resources(ClusterResources(cpus=2, largest_node_cpus=2), num_workers=2, cpus_per_worker=1.0,
                          task_cpus=1.0, may_shrink=True)
    assert (plan.cpus_per_worker, plan.read.task_cpus, plan.decode_cpus) == (0.5, 1.0, 1.0)
    assert plan.read.stream_cpus(2) == 1.0  # each stream may use one task's CPUs, never less
    assert plan.summary_line().startswith("2 CPUs: 2 training workers x 0.5 CPU, 1 CPU for decoding")
    assert "trainer.cpus_per_worker=1 lowered to 0.5" in plan.summary_line()


def test_a_machine_too_small_for_a_whole_decode_task_shares_it():
    plan = plan_resources(ClusterResources(cpus=1), num_workers=1, cpus_per_worker=1.0, task_cpus=1.0,
                          may_shrink=True)
    assert (plan.cpus_per_worker, plan.read.task_cpus) == (0.5, 0.5)


@pytest.mark.parametrize("may_shrink", [False, True])
def test_a_plan_that_fits_is_left_unchanged(may_shrink):
    plan = plan_resources(ClusterResources(cpus=8, gpus=2, largest_node_cpus=8, largest_node_gpus=2), num_workers=2,
                          cpus_per_worker=2.0, task_cpus=1.0, gpus_per_worker=1.0, may_shrink=may_shrink)
    assert (plan.cpus_per_worker, plan.gpus_per_worker, plan.read.task_cpus) == (2.0, 1.0, 1.0)
    assert plan.read.training_cpus == 4.0 and plan.read.stream_cpus(8) == 2.0  # 4 decode CPUs, 2 streams
    assert plan.read.stream_cpus(24) == 10.0  # nodes added later widen the streams' share
    assert "lowered" not in plan.summary_line()


def test_a_cluster_that_cannot_decode_beside_the_workers_is_one_paragraph_with_the_arithmetic():
    with pytest.raises(SpeechSSLError) as err:
        plan_resources(ClusterResources(cpus=2, largest_node_cpus=2), num_workers=2, cpus_per_worker=1.0,
                       task_cpus=1.0, waited_s=30)
    text = str(err.value)
    assert "\n" not in text
    assert "the Ray cluster (2 CPUs, 0 GPUs)" in text and "waited 30 s" in text
    assert "2 training workers x 1 CPU" in text and "leaves 0 CPUs for decoding" in text
    assert "one decode task needs 1 CPU (data.num_cpus_per_reader)" in text
    for key in ("trainer.cpus_per_worker", "trainer.num_workers", "data.num_cpus_per_reader"):
        assert key in text
    assert "0.5 fits" in text and "add nodes" in text


def test_more_gpus_than_the_machine_has_fail_even_where_cpus_may_shrink():
    with pytest.raises(SpeechSSLError) as err:
        plan_resources(ClusterResources(cpus=8, gpus=1, largest_node_cpus=8, largest_node_gpus=1), num_workers=2,
                       cpus_per_worker=1.0, task_cpus=1.0, gpus_per_worker=1.0, may_shrink=True)
    text = str(err.value)
    assert "need 2 GPUs, the cluster has 1" in text
    assert "trainer.gpus_per_worker" in text and "trainer.use_gpu=false" in text
    assert "trainer.cpus_per_worker" not in text  # the CPUs were never the problem


def test_one_worker_larger_than_any_node_cannot_be_placed():
    with pytest.raises(SpeechSSLError, match="one training worker needs 6 CPUs .*the largest node has 4"):
        plan_resources(ClusterResources(cpus=16, largest_node_cpus=4), num_workers=2, cpus_per_worker=6.0,
                       task_cpus=1.0)


def test_a_joined_cluster_is_waited_for_then_the_plan_fails(monkeypatch):
    requests = []
    sizes = iter([2.0] * 1000)
    monkeypatch.setattr(resources, "CLUSTER_WAIT_S", 0.3)
    monkeypatch.setattr(resources, "POLL_S", 0.05)
    monkeypatch.setattr(resources, "cluster_resources", lambda: ClusterResources(next(sizes), largest_node_cpus=2))
    monkeypatch.setattr(resources, "_request_from_autoscaler", requests.append)
    monkeypatch.setattr(resources, "_nodes_launching", lambda: False)
    started = time.monotonic()
    with pytest.raises(SpeechSSLError, match=r"waited \d+ s for more nodes"):
        resources.plan_on_ray(2, 1.0, 1.0, embedded=False)
    assert 0.3 <= time.monotonic() - started < 5
    assert requests == [[{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}], []]  # asked the autoscaler, then withdrew

    # Nodes that join while it waits are used.
    sizes = iter([2.0, 2.0, 4.0])
    monkeypatch.setattr(resources, "cluster_resources", lambda: ClusterResources(next(sizes), largest_node_cpus=2))
    plan = resources.plan_on_ray(2, 1.0, 1.0, embedded=False)
    assert plan.cpus_per_worker == 1.0 and plan.decode_cpus == 2.0


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_the_documented_command_trains_two_workers_on_two_cpus(tmp_path):
    """`speech-ssl pretrain model=tiny trainer.num_workers=2` on 2 CPUs hung forever (issue 16)."""
    manifest = make_corpus(tmp_path / "corpus", n=8, min_seconds=1.2, max_seconds=2.0, split="train")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "speech_ssl", "pretrain", "model=tiny", "trainer.num_workers=2",
               f"data.train={manifest}", f"output_dir={out}", "trainer.max_updates=4", "data.batch_seconds=6",
               "data.crop_duration=1.2", "ray.num_cpus=2", "ray.include_dashboard=false",
               "ray.object_store_memory_mb=300"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 CPUs: 2 training workers x 0.5 CPU, 1 CPU for decoding" in done.stderr
    assert "may hang forever" not in done.stderr  # Ray Data's warning of the issue
    assert (out / "last" / "model.safetensors").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["updates"] == 4 and summary["resources"]["cpus_per_worker"] == 0.5


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_a_cluster_that_cannot_hold_the_run_fails_fast_with_one_paragraph(tmp_path, shared_ray_head):
    """The session's separate 2-CPU head (conftest.shared_ray_head) joined by address (in a fresh process, as a
    user's driver would: this process's Ray keeps the auth mode it read at import), the wait shortened to 3 s."""
    manifest = make_corpus(tmp_path / "corpus", n=4, min_seconds=1.2, max_seconds=2.0, split="train")
    driver = ("import sys; from speech_ssl.train import resources; resources.CLUSTER_WAIT_S = 3.0; "
              "from speech_ssl.cli import main; sys.exit(main(sys.argv[1:]))")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", driver, "pretrain", "model=tiny", "trainer.num_workers=2",
                           f"data.train={manifest}", f"output_dir={tmp_path / 'run'}",
                           f"ray.address={shared_ray_head.address}"], capture_output=True, text=True, timeout=150)
    elapsed = time.monotonic() - started
    err = done.stderr.strip()
    assert done.returncode == 1, err[-3000:]
    assert elapsed < 60
    assert "Traceback" not in err
    paragraph = err.splitlines()[-1]
    assert paragraph.startswith("speech-ssl pretrain: the Ray cluster (2 CPUs, 0 GPUs) cannot run this training")
    assert "waited 3 s" in paragraph and "2 training workers x 1 CPU" in paragraph
    for key in ("trainer.cpus_per_worker", "trainer.num_workers", "data.num_cpus_per_reader"):
        assert key in paragraph
