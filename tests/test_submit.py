"""`speech-ssl submit`: a pipeline as a Ray job on a separate local Ray head (its dashboard and job server on
127.0.0.1 only): the job succeeds and writes its outputs; a failing job makes the command exit non-zero."""

from __future__ import annotations

import contextlib
import json
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

import pytest

from audio_factory import make_corpus
from speech_ssl.cli import main
from speech_ssl.stages.submit import entrypoint, forwarded_overrides

pytestmark = pytest.mark.timeout(300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> set[str]:
    """IPv4 addresses listening on ``port`` (/proc/net/tcp; IPv6 listeners show as '::')."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        with open(name) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                addr, port_hex = local.split(":")
                if state == "0A" and int(port_hex, 16) == port:
                    found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]) if len(addr) == 8 else "::")
    return found


@contextlib.contextmanager
def ray_head_with_job_server():
    """``ray start --head --block`` with its dashboard (the job server) on 127.0.0.1, in its own process
    group; torn down by signalling that group only (other Ray instances on this machine are left alone)."""
    port, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayj", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           # The job's entrypoint runs `python`: this venv's.
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--object-store-memory=150000000", f"--temp-dir={temp_dir}",
         # Fixed default ports (52365 for the agent's job API) collide with any other Ray on this machine:
         # the agent would then run without its HTTP server and no job could be submitted.
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:  # the job API answers once the dashboard is fully up
            assert proc.poll() is None, "ray start --head exited early"
            assert time.time() < deadline, "the Ray head's job server did not come up"
            try:  # any HTTP answer means it is up (401 without a token: heads use token auth by default)
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                pass
            time.sleep(0.5)
        yield f"http://127.0.0.1:{dashboard}", dashboard
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_forwarded_overrides_leave_out_the_submission_keys():
    args = ["ray.address=http://h:8265", "pipeline=embed_corpus", "job.wait=false", "++pretrain.model_overrides.dropout=0.0",
            "output_dir=/x y", "forward=[a]"]
    assert forwarded_overrides(args) == ["pipeline=embed_corpus", "++pretrain.model_overrides.dropout=0.0", "output_dir=/x y"]
    assert entrypoint(args) == ("python -m speech_ssl run pipeline=embed_corpus "
                                "++pretrain.model_overrides.dropout=0.0 'output_dir=/x y'")


def test_relative_output_dir_is_refused_before_submitting(capsys):
    assert main(["submit", "ray.address=http://127.0.0.1:9", "output_dir=outputs/x"]) == 2
    assert "temporary working directory" in capsys.readouterr().err


def test_submitted_pipeline_job_succeeds_and_a_failing_one_exits_nonzero(tmp_path, capsys):
    from speech_ssl.models import build, save_model

    corpus = make_corpus(tmp_path / "corpus", n=6, min_seconds=1.0, max_seconds=1.6, split="unlabeled")
    checkpoint = tmp_path / "model"
    save_model(build("fbank-tiny"), checkpoint)
    out = tmp_path / "job_out"
    common = ["pipeline=embed_corpus", f"data.unlabeled={corpus}", "embed.shard_seconds=4"]
    with ray_head_with_job_server() as (address, port):
        assert _listening(port) == {"127.0.0.1"}, "the job server must listen on localhost only"
        assert main(["submit", f"ray.address={address}", *common, f"embed.checkpoint={checkpoint}",
                     f"output_dir={out}"]) == 0
        printed = capsys.readouterr().out
        assert "submitted job raysubmit_" in printed and "succeeded" in printed
        assert "embedded 6 utterances" in printed  # the pipeline's summary, streamed from the job's log
        summary = json.loads((out / "summary.json").read_text())
        assert summary["results"]["embedded_utterances"] == 6
        assert list((out / "embed").glob("part-*.parquet"))

        code = main(["submit", f"ray.address={address}", *common, f"embed.checkpoint={tmp_path / 'missing'}",
                     f"output_dir={tmp_path / 'failing'}"])
        captured = capsys.readouterr()
        assert code == 1
        assert "stage 'embed' failed" in captured.out  # the job's own message, streamed
        assert "failed" in captured.err and "raysubmit_" in captured.err
