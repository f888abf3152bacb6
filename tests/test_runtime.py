"""The embedded local Ray: private to this machine, and joining a given cluster instead."""

from __future__ import annotations

import os

import pytest

from ray_heads import free_port, listening_addresses
from speech_ssl.runtime import RayConfig, dashboard_url, ray_session


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_embedded_ray_dashboard_is_bound_to_localhost_only():
    import ray

    assert not ray.is_initialized()
    port = free_port()
    with ray_session(RayConfig(num_cpus=1, include_dashboard=True, dashboard_port=port, object_store_memory_mb=128)):
        assert ray.is_initialized()
        url = dashboard_url()
        assert url == f"127.0.0.1:{port}"
        listening = listening_addresses(port)
        assert listening == {"127.0.0.1"}, listening
        assert ray.cluster_resources()["CPU"] == 1
    assert not ray.is_initialized(), "the embedded Ray must be shut down when the command ends"


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_ray_address_joins_an_existing_cluster_and_leaves_it_running(shared_ray_head):
    """The session's separate head (2 CPUs, conftest.shared_ray_head); the port shows which Ray was joined."""
    import ray

    address = shared_ray_head.address
    with ray_session(RayConfig(address=address)):
        assert ray.get_runtime_context().gcs_address.endswith(address.split(":")[1])
    assert not ray.is_initialized()
    # The cluster is still up: joining again (through RAY_ADDRESS this time) works.
    os.environ["RAY_ADDRESS"] = address
    try:
        with ray_session(RayConfig()):
            assert ray.get_runtime_context().gcs_address.endswith(address.split(":")[1])
            assert ray.cluster_resources()["CPU"] == 2
    finally:
        del os.environ["RAY_ADDRESS"]
