"""Separate local Ray heads for tests that join or submit to a cluster, and the listening-socket check that
proves what is reachable from outside. A head runs ``ray start --head --block`` in its own process group
and is torn down by signalling that group only, so other Ray instances on the machine are left alone."""

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
import urllib.error
import urllib.request
from typing import Iterator, NamedTuple, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
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


class RayHead(NamedTuple):
    address: str                      # GCS address, for ray.address=
    dashboard_url: Optional[str]      # the job server (dashboard), for submit; None without a dashboard
    dashboard_port: Optional[int]


def _job_server_answers(port: int) -> bool:
    try:  # any HTTP answer means it is up (401 without a token: heads use token auth when a token exists)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@contextlib.contextmanager
def ray_head(num_cpus: int = 1, dashboard: bool = False, object_store_bytes: int = 100_000_000) -> Iterator[RayHead]:
    """A head on free ports; with ``dashboard`` its dashboard (the job server) listens on 127.0.0.1 only."""
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           # A job's entrypoint runs `python`: this venv's.
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    args = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", f"--port={port}",
            f"--num-cpus={num_cpus}", f"--object-store-memory={object_store_bytes}", f"--temp-dir={temp_dir}"]
    dashboard_port = free_port() if dashboard else None
    if dashboard:
        args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 # Fixed default ports (52365 for the agent's job API) collide with any other Ray on this
                 # machine: the agent would then run without its HTTP server and no job could be submitted.
                 f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    else:
        args.append("--include-dashboard=false")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (listening_addresses(port) and (not dashboard or _job_server_answers(dashboard_port))):
            assert proc.poll() is None, "ray start --head exited early"
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(0.5)
        yield RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}" if dashboard else None,
                      dashboard_port)
    finally:
        stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _live_members(pgid: int, leader: int) -> list[int]:
    """Processes of group ``pgid`` other than ``leader`` that are still running (not zombies)."""
    live = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == leader:
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            live.append(int(name))
    return live


def stop_group(proc: subprocess.Popen, grace_s: float = 5) -> None:
    """SIGTERM to the head's process group, then SIGKILL to it once the rest of the group has exited or after
    ``grace_s``. ``ray start --block`` itself never exits after a SIGTERM, and with a dashboard the GCS and the
    dashboard outlive it by 20 s and more: waiting for them cost each head half a minute (the old 30 s
    timeout, every time). Nothing of a test head needs a clean shutdown: its whole process tree is this
    group, and its temp dir is deleted next."""
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and proc.poll() is None and _live_members(proc.pid, proc.pid):
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
