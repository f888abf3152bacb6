"""Logs for people: our lines on the console, Ray's own output in <output_dir>/logs/ray.log, plain text in files,
progress lines with an ETA, and ``ray.log_level`` bringing Ray's output back to the console."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from audio_factory import make_corpus
from speech_ssl.logs import ANSI, OURS, RayOutput, _LogFile, strip_ansi
from speech_ssl.progress import Progress, format_duration

ROOT = Path(__file__).resolve().parents[1]

# What a successful run must not print (issue 18): Ray internals, its dumps and notices.
CHATTER = [
    r"may hang forever",
    r"\bE \d+ \d+\] core_worker\.cc",
    r"core_worker\.cc",
    r"PreemptionWatcher",
    r"Reporting training result",
    r"TrainingReport\(",
    r"Progress bars disabled",
    r"Token authentication is enabled",
    r"Failed to query Ray Train Controller",
    r"\((?:RayTrainWorker|TrainController|Feeder|PlacementGroupCleaner|raylet|autoscaler)\b[^)]*\)",
    r"\(pid=\d+",
    r"^\{['\"]",  # a dict dump
    r"Traceback \(most recent call last\)",
]


# --------------------------------------------------------------------------------------------------
# Pieces, without Ray


def test_strip_ansi_and_our_line_pattern():
    coloured = "\x1b[36m(RayTrainWorker pid=1)\x1b[0m 12:00:01 INFO speech_ssl.train: [train] update 1/2"
    assert strip_ansi(coloured) == "(RayTrainWorker pid=1) 12:00:01 INFO speech_ssl.train: [train] update 1/2"
    assert OURS.match("12:00:01 INFO speech_ssl.train: [train] update 1/2 | loss 4.6")
    assert OURS.match("12:00:01 WARNING pipelines.common: x")
    assert not OURS.match("Reporting training result 1: TrainingReport(...)")
    assert not OURS.match("2026-12-05 21:07:27,900\tWARNING authentication_token_setup.py:85 -- Token ...")
    assert not OURS.match("[2026-12-05 21:07:45,452 E 16839 16895] core_worker.cc:2465: Actor ...")


def test_forwarded_worker_lines_ours_to_the_console_the_rest_to_the_file(tmp_path):
    """The driver's router (speech_ssl.logs.RayOutput) on a batch as Ray forwards it."""
    out = RayOutput("quiet", tmp_path / "logs")
    out.sink = _LogFile(out.path)
    printed: list[dict] = []
    out._print = lambda data, ignore_prefix: printed.append(dict(data, ignore_prefix=ignore_prefix))
    out._route({"pid": 17066, "actor_name": "RayTrainWorker", "ip": "10.0.0.1", "localhost": "10.0.0.1",
                "is_err": True, "lines": [
                    "21:08:04 INFO speech_ssl.train: [train] update 25/200 | loss 4.615 | eta 2m27s",
                    "Reporting training result 1: TrainingReport(checkpoint=..., metrics={'updates': 100})",
                    "\x1b[33m[2026-12-05 21:07:45,452 E 1 2] core_worker.cc:2465: Actor ...\x1b[0m",
                    "21:08:07 WARNING speech_ssl.train: train rows set aside: 1 quarantined",
                    "Traceback (most recent call last):",  # continues our warning (logged with exc_info)
                ]})
    out.close()
    assert len(printed) == 1 and printed[0]["ignore_prefix"] is True
    assert printed[0]["lines"] == ["21:08:04 INFO speech_ssl.train: [train] update 25/200 | loss 4.615 | eta 2m27s",
                                   "21:08:07 WARNING speech_ssl.train: train rows set aside: 1 quarantined",
                                   "Traceback (most recent call last):"]
    text = out.path.read_text()
    assert "(RayTrainWorker pid=17066 stderr) Reporting training result 1" in text
    assert "core_worker.cc:2465" in text and not ANSI.search(text)
    assert out.diverted == 2


def test_progress_lines_have_a_pace_and_an_eta():
    lines: list[str] = []
    bar = Progress("prepare", 10, "files", every=0, emit=lines.append)
    bar.update(4)
    bar.close()
    assert re.fullmatch(r"prepare: 4/10 files \(40%\) \| [\d.]+ files/s \| 0m00s elapsed \| eta \dm\d\ds", lines[0])
    assert len(lines) == 1, "close() repeats nothing already printed"
    quiet: list[str] = []
    short = Progress("evaluate", 3, "utterances", every=60, emit=quiet.append)
    short.update(3)
    short.close()
    assert quiet == [], "a run shorter than one interval prints nothing"
    audio: list[str] = []
    emb = Progress("embed", 100, "utterances", every=0, audio_total=3600.0, emit=audio.append)
    emb.update(50, 1800.0)
    assert "50/100 utterances (50%), 0.500/1.000 h of audio" in audio[0] and "x real time" in audio[0]
    assert "| eta " in audio[0]
    assert format_duration(3725) == "1h02m" and format_duration(61) == "1m01s"


def test_training_progress_line_has_an_eta_from_the_first_line(tmp_path, caplog):
    from speech_ssl.train.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, max_updates=100, progress_keys=["loss"], tensorboard=False)
    logger.truncate_after(0)
    with caplog.at_level(logging.INFO, logger="speech_ssl.train"):
        logger.write("train", 25, {"loss": 4.6})
        logger.write("train", 50, {"loss": 4.5})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[train]")]
    assert len(lines) == 2 and all(re.search(r"\| eta \dm\d\ds$", line) for line in lines), lines


def test_stage_log_is_plain_text(tmp_path):
    """Whatever reaches the console in colour (Ray's prefixes), a stage.log holds it without ANSI codes."""
    from speech_ssl.pipeline import stage_log

    path = tmp_path / "stage.log"
    with stage_log(path, "demo: running"):
        print("\x1b[36m(RayTrainWorker pid=1)\x1b[0m hello", file=sys.stderr)
        print("\x1b[1m\x1b[32mhttp://127.0.0.1:8265\x1b[39m\x1b[22m")
        logging.getLogger("speech_ssl.test").warning("\x1b[31mred\x1b[0m")
    text = path.read_text()
    assert "(RayTrainWorker pid=1) hello" in text and "http://127.0.0.1:8265" in text
    assert not ANSI.search(text) and "\x1b" not in text


def test_the_driver_cxx_error_lines_leave_the_console_and_the_rest_passes(tmp_path):
    """Descriptor 2 while a quiet session lasts: Ray's C++ core lines go to the file, everything else
    (and Python's own stderr) reaches the console."""
    code = f"""
import os, sys
from speech_ssl.logs import _LogFile, _StderrFilter
from pathlib import Path
sink = _LogFile(Path({str(tmp_path)!r}) / "ray.log")
f = _StderrFilter(sink)
assert f.start()
os.write(2, b"[2026-12-05 21:10:59,244 E 16082 16082] core_worker.cc:2465: Actor with class name: 'X'\\n")
os.write(2, b"a C library says hello\\n")
print("python stderr line", file=sys.stderr)
f.stop()
print("after", file=sys.stderr)
sink.close()
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "core_worker.cc" not in done.stderr
    assert "a C library says hello" in done.stderr and "python stderr line" in done.stderr
    assert "after" in done.stderr
    assert "core_worker.cc:2465" in (tmp_path / "ray.log").read_text()


# --------------------------------------------------------------------------------------------------
# A real short pretraining on Ray, from the command line


def _pretrain(corpus: tuple[str, str], out: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    train, valid = corpus
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    args = [sys.executable, "-m", "speech_ssl", "pretrain", "model=tiny", f"data.train={train}",
            f"data.valid={valid}", f"output_dir={out}", "trainer.max_updates=8", "trainer.log_every=2",
            "trainer.validate_every=4", "trainer.checkpoint_every=4", "trainer.num_workers=1",
            "trainer.cpus_per_worker=0.5", "data.batch_seconds=4.0", "data.crop_duration=1.2",
            "data.num_cpus_per_reader=0.5", "ray.num_cpus=2", "ray.object_store_memory_mb=200", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    train = make_corpus(root, n=8, min_seconds=1.2, max_seconds=2.0, split="train", seed=1)
    valid = make_corpus(root, n=2, min_seconds=1.2, max_seconds=2.0, split="valid", seed=2)
    return str(train), str(valid)


@pytest.fixture(scope="module")
def two_runs(corpus, tmp_path_factory):
    """Two pretraining commands at once (two embedded Rays on one machine: the second must find its own
    dashboard port): one quiet (the default), one with ray.log_level=INFO."""
    root = tmp_path_factory.mktemp("runs")
    results: dict[str, subprocess.CompletedProcess] = {}

    def go(name, *extra):
        results[name] = done = _pretrain(corpus, root / name, *extra)
        (root / f"{name}.console.txt").write_text(done.stdout + done.stderr)  # to read when a test fails

    threads = [threading.Thread(target=go, args=("quiet",)),
               threading.Thread(target=go, args=("verbose", "ray.log_level=INFO"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return root, results


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_pretrain_console_has_our_lines_only_and_files_are_plain(two_runs):
    root, results = two_runs
    run = results["quiet"]
    assert run.returncode == 0, run.stdout + run.stderr
    console = run.stdout + run.stderr
    lines = [line for line in console.splitlines() if line.strip()]
    for pattern in CHATTER:
        hits = [line for line in lines if re.search(pattern, line)]
        assert not hits, f"Ray chatter on the console ({pattern}): {hits[:3]}"
    assert not ANSI.search(console), "ANSI codes on the console"
    # Our lines are there: progress with an ETA on every train line, the read = used + ... counts.
    train_lines = [line for line in lines if "[train] update" in line]
    assert len(train_lines) == 4, lines
    assert all(re.search(r"\| eta \dm\d\ds$", line) for line in train_lines), train_lines
    assert any("[valid] update 8/8" in line for line in lines)
    assert any(re.search(r"read \d+ = used \d+ \+ quarantined \d+ \+ filtered \d+", line) for line in lines)
    assert len(lines) < 40, "\n".join(lines)
    # Ray's own output is in the file, plain.
    out = root / "quiet"
    ray_log = out / "logs" / "ray.log"
    text = ray_log.read_text()
    assert "Reporting training result" in text and "RayTrainWorker pid=" in text
    assert any(str(ray_log) in line for line in lines), "the console says where Ray's output went"
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".txt", ".jsonl", ".json", ".md"):
            assert "\x1b" not in path.read_text(errors="replace"), f"ANSI codes in {path}"
    assert json.loads((out / "train_summary.json").read_text())["updates"] == 8


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_ray_log_level_brings_rays_output_back_and_two_rays_run_side_by_side(two_runs):
    root, results = two_runs
    run = results["verbose"]
    assert run.returncode == 0, run.stdout + run.stderr
    console = run.stdout + run.stderr
    assert re.search(r"\((?:RayTrainWorker|TrainController)[^)]*pid=\d+\)", console), console[-3000:]
    assert "Reporting training result" in console
    prefixed = [line for line in console.splitlines() if re.search(r"pid=\d+", line)]
    assert prefixed and not any(ANSI.search(line) for line in prefixed), "Ray's prefixes come without colour codes"
    assert not (root / "verbose" / "logs" / "ray.log").exists()
    # Both commands ran at once with their own embedded Ray: one of them found 8265 taken, or both had it
    # in turn; either way both finished.
    assert results["quiet"].returncode == 0
