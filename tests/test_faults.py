"""Under faults and bad input (issue 18): fail fast, once, clearly; stop politely; one command per folder.

* Bad input is answered before Ray starts, in seconds, as one paragraph with the right exit code, and
  leaves nothing behind.
* A worker's SpeechSSLError (no restart can fix it) is not retried by Ray Train: it reaches the user once.
* SIGINT to the process group and SIGTERM to the driver stop training within seconds with a checkpoint, one
  line and exit code 130 / 143; the resumed run ends bit-identical to an uninterrupted one.
* A second command on a busy output_dir refuses at once, naming the first; a dead holder's lock is taken over.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from audio_factory import make_corpus
from speech_ssl.config import ConfigError, from_dict
from speech_ssl.errors import Interrupted, SpeechSSLError
from speech_ssl.train.config import TrainerConfig

CLI = [sys.executable, "-m", "speech_ssl"]
# Lines that Ray relays from its own processes start with "(ClassName pid=123)" (after a colour code).
RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\((\w+) pid=\d+")
QUIET = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
         "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    train = make_corpus(root, n=12, min_seconds=1.2, max_seconds=2.0, split="train", seed=1)
    valid = make_corpus(root, n=2, min_seconds=1.2, max_seconds=1.6, split="valid", seed=2)
    return str(train), str(valid)


def pretrain_args(corpus, out: Path, *extra: str, workers: int = 2, max_updates: int = 12) -> list[str]:
    """A tiny pretraining run on this 2-core machine: two workers of half a CPU, one CPU for decoding."""
    train, valid = corpus
    return ["pretrain", f"data.train={train}", f"data.valid={valid}", f"output_dir={out}", "model=tiny",
            "model_overrides.layerdrop=0.0", "data.crop_duration=1.2", "data.batch_seconds=4",
            "data.num_cpus_per_reader=0.5", f"trainer.num_workers={workers}", "trainer.cpus_per_worker=0.5",
            f"trainer.max_updates={max_updates}", "trainer.log_every=1", "trainer.checkpoint_every=10",
            "trainer.validate_every=0", "trainer.keep_last=5", "trainer.seed=5", "trainer.precision=fp32",
            "trainer.optim.schedule=constant", "trainer.optim.lr=1e-3", "ray.include_dashboard=false",
            "ray.num_cpus=2", *extra]


def run_cli(args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    out = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **QUIET})
    return out, time.monotonic() - started


def our_lines(text: str) -> list[str]:
    """The lines of a command's output that did not come from Ray's own processes."""
    return [line for line in text.splitlines() if line.strip() and not RAY_PREFIX.match(line)]


def tracebacks(text: str) -> list[str]:
    """Tracebacks printed by the driver or our training workers (Ray's own helper actors may print theirs
    when several Rays share the machine, as while tests run beside each other: not ours to judge here)."""
    return [line for line in text.splitlines() if "Traceback" in line
            and (not RAY_PREFIX.match(line) or RAY_PREFIX.match(line).group(2) == "RayTrainWorker")]


def assert_one_paragraph(out: subprocess.CompletedProcess, command: str = "pretrain") -> str:
    """stderr ends with our message, which is the only line we print about it, and nothing is a traceback."""
    ours = our_lines(out.stderr)
    assert not tracebacks(out.stderr + out.stdout), out.stderr[-3000:]
    messages = [line for line in ours if line.startswith(f"speech-ssl {command}:")]
    assert len(messages) == 1 and ours[-1] == messages[0], out.stderr[-3000:]
    return messages[0]


# --------------------------------------------------------------------------------------------------
# Fail fast: checked before Ray starts, nothing left behind


def _moved_manifest(corpus, tmp_path: Path) -> str:
    """The training manifest copied out of its folder: its relative paths no longer resolve."""
    moved = tmp_path / "elsewhere" / "train.jsonl"
    moved.parent.mkdir()
    moved.write_text(Path(corpus[0]).read_text())
    return str(moved)


BAD_INPUTS = {
    "missing data.train": (lambda c, t: ["data.train=/nonexistent/train.jsonl"], 2, "data.train"),
    "max_updates=-5": (lambda c, t: ["trainer.max_updates=-5"], 2, "trainer.max_updates"),
    "output_dir is a file": (lambda c, t: [f"output_dir={t / 'a_file'}"], 2, "output_dir"),
    "manifest moved away from its audio": (lambda c, t: [f"data.train={_moved_manifest(c, t)}"], 1,
                                           "Relative paths in a manifest"),
}


# Each case is a fresh `python -m speech_ssl` (seconds of imports): test-fast keeps the data check (exit 1, not
# covered in-process); the configuration checks (exit 2) are slow-marked here and proven in-process by
# test_cli.py::test_bad_configuration_exits_2_with_the_key_named.
FAST_CASE = "manifest moved away from its audio"


@pytest.mark.parametrize("case", [c if c == FAST_CASE else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(BAD_INPUTS)])
def test_bad_input_is_one_paragraph_in_seconds_before_ray_and_leaves_nothing(case, corpus, tmp_path):
    make_extra, code, needle = BAD_INPUTS[case]
    (tmp_path / "a_file").write_text("not a folder")
    out_dir = tmp_path / "run"
    before = sorted(p.name for p in tmp_path.iterdir())
    args = pretrain_args(corpus, out_dir, *make_extra(corpus, tmp_path))
    out, seconds = run_cli(args, timeout=60)
    assert out.returncode == code, out.stderr[-3000:]
    assert seconds < 10, seconds
    message = assert_one_paragraph(out)
    assert needle in message
    assert "Ray" not in out.stderr, "Ray must not start for a bad input"
    assert not out_dir.exists(), "a failed check must not create the output folder"
    after = sorted(p.name for p in tmp_path.iterdir() if p.name != "elsewhere")
    assert after == before
    assert (tmp_path / "a_file").read_text() == "not a folder"


@pytest.mark.slow  # a CLI subprocess
def test_finetune_with_a_missing_init_checkpoint_fails_before_anything(corpus, tmp_path):
    args = ["finetune", "init=/nonexistent/ckpt", f"data.train={corpus[0]}", f"data.valid={corpus[1]}",
            f"output_dir={tmp_path / 'ft'}"]
    out, seconds = run_cli(args, timeout=60)
    assert out.returncode == 2 and seconds < 10, out.stderr[-3000:]
    assert "'init'" in assert_one_paragraph(out, "finetune")
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("key, value, valid", [
    ("max_updates", -5, ">= 1"), ("max_updates", 0, ">= 1"), ("update_freq", 0, ">= 1"),
    ("keep_last", 0, ">= 1"), ("checkpoint_every", -1, ">= 0"),
])
def test_numbers_out_of_range_name_the_key_and_the_range(key, value, valid):
    with pytest.raises(ConfigError) as err:
        from_dict(TrainerConfig, {key: value}, "trainer")
    assert err.value.key == f"trainer.{key}"
    assert valid in err.value.paragraph() and repr(value) in err.value.paragraph()
    from_dict(TrainerConfig, {"max_updates": 1, "checkpoint_every": 0})  # the bounds themselves are valid


def test_config_error_survives_pickling_with_its_key():
    """Raised on a Ray worker, it reaches the driver (and the failure policy) as itself."""
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("data.train", "bad.", ["a", "b"])))
    assert isinstance(err, ConfigError) and err.key == "data.train" and err.choices == ["a", "b"]
    stop = pickle.loads(pickle.dumps(Interrupted(signal.SIGTERM, "stopped")))
    assert stop.exit_code == 143 and str(stop) == "stopped"


# --------------------------------------------------------------------------------------------------
# Errors no restart fixes are not retried


def test_failure_policy_raises_user_errors_and_retries_infrastructure_faults():
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from speech_ssl.train.control import ControlledTorchTrainer, NoRetryForUserErrors

    policy = NoRetryForUserErrors(FailureConfig(max_failures=3))
    bad_data = WorkerGroupError("x", {0: RuntimeError("collateral"), 1: SpeechSSLError("bad data")})
    assert policy.make_decision(bad_data) == FailureDecision.RAISE
    assert policy.make_decision(WorkerGroupError("x", {0: ConfigError("k", "bad")})) == FailureDecision.RAISE
    assert policy.make_decision(WorkerGroupError("x", {0: RuntimeError("node lost")})) == FailureDecision.RETRY
    # The private hooks of the pinned Ray that ControlledTorchTrainer overrides are still there.
    for name in ("_initialize_and_run_controller", "_register_sigint_handler"):
        assert callable(getattr(ControlledTorchTrainer.__mro__[1], name, None)), name


def _garbage_manifest(tmp_path: Path) -> str:
    """Files that exist (so the checks before Ray pass) but are not audio: every worker finds nothing usable."""
    rows = []
    for i in range(6):
        (tmp_path / f"noise{i}.wav").write_bytes(os.urandom(30000))
        rows.append(json.dumps({"path": f"noise{i}.wav", "duration": 1.5}))
    (tmp_path / "garbage.jsonl").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "garbage.jsonl")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_an_error_inside_a_training_worker_reaches_the_user_once_without_restarts(corpus, tmp_path):
    args = pretrain_args(corpus, tmp_path / "run", f"data.train={_garbage_manifest(tmp_path)}", "data.valid=null",
                         "trainer.max_failures=3")
    out, _ = run_cli(args, timeout=200)
    assert out.returncode == 1, out.stderr[-3000:]
    message = assert_one_paragraph(out)
    assert "nothing usable" in message and "not-audio" in message
    # Once: not repeated by three restarts (each printed it again, with a traceback per worker).
    assert (out.stdout + out.stderr).count("nothing usable") == 1, out.stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# Stop politely


def start_and_signal(args: list[str], when: str, sig: int, to_group: bool, timeout: float = 240):
    """Run the CLI in its own process group; at the first output line containing ``when``, send ``sig`` to the
    group or the driver alone. Returns (return code, output, seconds from the signal to the exit)."""
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **QUIET})
    lines: list[str] = []
    sent: list[float] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if not sent and when in line:
                sent.append(time.monotonic())
                os.killpg(proc.pid, sig) if to_group else os.kill(proc.pid, sig)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    ended = time.monotonic()
    reader.join(timeout=10)
    assert sent, "the signal was never sent:\n" + "".join(lines)[-3000:]
    return code, "".join(lines), ended - sent[0]


def _assert_stopped(code: int, output: str, seconds: float, expected: int, name: str) -> Path:
    ours = our_lines(output)
    assert code == expected, output[-3000:]
    assert not tracebacks(output), output[-3000:]
    last = ours[-1]
    assert last.startswith(f"speech-ssl pretrain: stopped by {name}; the same command resumes from "), last
    assert len([line for line in ours if line.startswith("speech-ssl pretrain:")]) == 1
    assert seconds < 30, seconds
    checkpoint = Path(re.search(r"resumes from (\S+)", last).group(1))
    from speech_ssl.train import checkpoint as ckpt

    assert ckpt.is_complete(checkpoint), checkpoint
    return checkpoint


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigint_to_the_group_stops_with_a_checkpoint_and_the_resumed_run_equals_a_straight_one(corpus, tmp_path):
    # The uninterrupted run goes on beside the interrupted one (each on its own embedded Ray): most of a run
    # here is waiting for Ray and its workers to start. 8 updates: stopped after update 3 or a little later,
    # the resumed run still has several updates to match bit for bit (checkpoint_every=10: no interval one).
    straight = subprocess.Popen([*CLI, *pretrain_args(corpus, tmp_path / "straight", max_updates=8)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **QUIET})
    resumed = tmp_path / "resumed"
    try:
        code, output, seconds = start_and_signal(pretrain_args(corpus, resumed, max_updates=8), "update 3/8",
                                                 signal.SIGINT, to_group=True)
        _, straight_err = straight.communicate(timeout=300)
    finally:
        straight.kill()
    assert straight.returncode == 0, straight_err[-3000:]
    checkpoint = _assert_stopped(code, output, seconds, 130, "SIGINT")
    stopped_at = int(checkpoint.name.split("_")[1])
    assert 3 <= stopped_at < 8, checkpoint  # the update it stopped after, written then (not the last interval)
    again, _ = run_cli(pretrain_args(corpus, resumed, max_updates=8), timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {checkpoint}" in again.stdout + again.stderr
    a = load_file(str(tmp_path / "straight" / "last" / "model.safetensors"))
    b = load_file(str(resumed / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_to_the_driver_of_an_in_process_run_stops_with_a_checkpoint(corpus, tmp_path):
    """trainer.num_workers=0 (the loop in the driver): the stop request needs no Ray actor there."""
    out = tmp_path / "run"
    code, output, seconds = start_and_signal(pretrain_args(corpus, out, workers=0, max_updates=200), "update 3/200",
                                             signal.SIGTERM, to_group=False)
    checkpoint = _assert_stopped(code, output, seconds, 143, "SIGTERM")
    assert (out / "last").resolve() == checkpoint.resolve()
    assert not (out / "train_summary.json").exists(), "an interrupted run is not a finished one"


# --------------------------------------------------------------------------------------------------
# One command per output folder


HOLDER = """
import sys, time
from speech_ssl.stages.common import output_lock
with output_lock(sys.argv[1], "pretrain"):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold_lock(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.mark.slow  # a CLI subprocess; the lock itself is tested in-process below
def test_a_second_command_on_a_busy_output_dir_refuses_at_once_naming_the_first(corpus, tmp_path):
    folder = tmp_path / "run"
    holder = _hold_lock(folder)
    try:
        out, seconds = run_cli(pretrain_args(corpus, folder), timeout=60)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert out.returncode == 1 and seconds < 10, out.stderr[-3000:]
    message = assert_one_paragraph(out)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "in use" in message
    assert sorted(p.name for p in folder.iterdir()) == [".speech-ssl.lock"], "the refused command wrote nothing"


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    from speech_ssl.stages.common import output_lock

    folder = tmp_path / "run"
    holder = _hold_lock(folder)
    holder.kill()  # dies holding it: the lock file still names it
    holder.wait(timeout=30)
    with caplog.at_level("WARNING", logger="speech_ssl"):
        with output_lock(folder, "pretrain"):
            with output_lock(folder, "finetune"):  # the same process again (a pipeline's stage): allowed
                held = json.loads((folder / ".speech-ssl.lock").read_text())
    assert held["pid"] == os.getpid()
    assert f"pid {holder.pid}" in caplog.text and "stale lock" in caplog.text
    assert (folder / ".speech-ssl.lock").read_text() == "", "released cleanly: an empty lock file"


# ---------------------------------------------------------------------------------------------------
# A lost stop flag is no stop request (a node loss took it: found by benchmarks/chaos.py, where training
# then ended early with exit 0)


@pytest.mark.timeout(120)
def test_a_lost_stop_flag_is_no_stop_request_and_a_live_one_is_heard(ray_local):
    import ray

    from speech_ssl.train.control import StopFlag, StopRequest, StopWatch, start_stop_flag

    flag = start_stop_flag(StopRequest(lambda: "resume point"))
    lost = StopFlag.remote()
    watch = StopWatch(lost)
    assert watch.requested() is False
    ray.kill(lost)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not ray.wait([watch._pending], timeout=0)[0]:
        time.sleep(0.2)
    assert watch.requested() is False and watch.requested() is False

    heard = StopWatch(flag)
    flag.request.remote(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not heard.requested():
        time.sleep(0.2)
    assert heard.requested() is True
