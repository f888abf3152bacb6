"""Shared test fixtures: one Ray instance per test module, one separate Ray head for the session, a clean
environment."""

from __future__ import annotations

import contextlib
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


# The session's separate Ray head (tests/ray_heads.py) and what stops it.
_SHARED_HEAD: dict = {}


@pytest.fixture(scope="session")
def shared_ray_head():
    """One separate local Ray head (``ray start --head``: 2 CPUs, its dashboard and job server on 127.0.0.1) for
    the tests that join or submit to an existing cluster and leave it as they found it (test_runtime,
    test_resources, test_submit): started at the first request, stopped after the last test that uses it
    (pytest_runtest_teardown below) or at the end of the session. Tests that kill, add or reconfigure nodes
    keep a cluster of their own."""
    if "head" not in _SHARED_HEAD:
        from ray_heads import ray_head

        stack = contextlib.ExitStack()
        _SHARED_HEAD["head"] = stack.enter_context(ray_head(num_cpus=2, dashboard=True,
                                                            object_store_bytes=150_000_000))
        _SHARED_HEAD["stack"] = stack
    yield _SHARED_HEAD["head"]
    _stop_shared_head()


def _stop_shared_head() -> None:
    _SHARED_HEAD.pop("head", None)
    stack = _SHARED_HEAD.pop("stack", None)
    if stack is not None:
        stack.close()


_LAST_HEAD_USER = pytest.StashKey[object]()


def pytest_collection_finish(session):
    users = [item.nodeid for item in session.items if "shared_ray_head" in getattr(item, "fixturenames", ())]
    session.config.stash[_LAST_HEAD_USER] = users[-1] if users else None


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """The head idles no longer than needed: stopped once its last user is done (it would otherwise hold a
    gigabyte and wake every few seconds through the modules that follow)."""
    if item.nodeid == item.config.stash.get(_LAST_HEAD_USER, None):
        _stop_shared_head()
