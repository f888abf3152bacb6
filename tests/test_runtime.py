"""The embedded local Ray: private to this machine, and joining a given cluster instead."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from speech_ssl.runtime import RayConfig, dashboard_url, ray_session


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a socket listening on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for name, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(name):
            continue
        with open(name) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                addr_hex, port_hex = local.split(":")
                if state != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                    continue
                if width == 8:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr_hex)[::-1]))
                else:
                    words = [bytes.fromhex(addr_hex[i:i + 8])[::-1] for i in range(0, 32, 8)]
                    found.add(socket.inet_ntop(socket.AF_INET6, b"".join(words)))
    return found


@pytest.mark.timeout(120)
def test_embedded_ray_dashboard_is_bound_to_localhost_only():
    import ray

    assert not ray.is_initialized()
    port = _free_port()
    with ray_session(RayConfig(num_cpus=1, include_dashboard=True, dashboard_port=port, object_store_memory_mb=128)):
        assert ray.is_initialized()
        url = dashboard_url()
        assert url == f"127.0.0.1:{port}"
        listening = _listening_addresses(port)
        assert listening == {"127.0.0.1"}, listening
        assert ray.cluster_resources()["CPU"] == 1
    assert not ray.is_initialized(), "the embedded Ray must be shut down when the command ends"


@contextlib.contextmanager
def ray_head(num_cpus: int = 1):
    """A separate local Ray head (``ray start --head --block``) in its own process group, torn down
    by signalling that group only, so that other Ray instances on the machine are left alone."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}",
         "--include-dashboard=false", "--object-store-memory=100000000", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 90
        while not _listening_addresses(port):
            assert proc.poll() is None, "ray start --head exited early"
            assert time.time() < deadline, "ray head did not come up"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(180)
def test_ray_address_joins_an_existing_cluster_and_leaves_it_running():
    import ray

    with ray_head() as address:
        with ray_session(RayConfig(address=address)):
            assert ray.get_runtime_context().gcs_address.endswith(address.split(":")[1])
        assert not ray.is_initialized()
        # The cluster is still up: joining again (through RAY_ADDRESS this time) works.
        os.environ["RAY_ADDRESS"] = address
        try:
            with ray_session(RayConfig()):
                assert ray.cluster_resources()["CPU"] == 1
        finally:
            del os.environ["RAY_ADDRESS"]
