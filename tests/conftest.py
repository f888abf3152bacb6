"""Shared test fixtures: one Ray instance per test module, generated audio, a clean environment."""

from __future__ import annotations

import os

import pytest

# Quiet, private Ray for tests; set before Ray is imported anywhere.
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def ray_local():
    """A small local Ray shared by the tests of one module (2 CPUs, no dashboard), shut down after."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, object_store_memory=300 << 20, include_dashboard=False, namespace="speech-ssl-tests",
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules running the in-process training loop (num_workers=0) beside Ray Data's decode tasks on
    2 cores: with one intra-op thread it neither waits on nor spins against them (two threads ran up to
    20x slower here when the cores were busy)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
