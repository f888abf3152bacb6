"""Chained pipelines end to end on generated audio: a run killed mid-pretraining resumes from its checkpoint,
a re-run skips finished stages, a changed stage re-runs with exactly the stages that read it, a failed stage
stops the pipeline and leaves finished stages untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audio_factory import make_corpus, make_toy_asr_corpus, toy_words
from speech_ssl.cli import main
from speech_ssl.pipeline import RECORD, Stage, decide, read_record
from speech_ssl.train import checkpoint as ckpt

pytestmark = pytest.mark.timeout(300)  # the pipeline runs are slow-marked; the checks and decisions are not

STAGES = ["prepare", "pretrain", "finetune", "evaluate", "embed"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = toy_words(8, seed=2)
    return {
        "unlabeled": make_corpus(root, n=10, min_seconds=1.2, max_seconds=2.0, split="unlabeled", seed=3),
        "train": make_toy_asr_corpus(root, n=12, seed=0, split="train", words=words),
        "valid": make_toy_asr_corpus(root, n=4, seed=1, split="valid", words=words),
        "test": make_toy_asr_corpus(root, n=4, seed=2, split="test", words=words),
    }


def _args(corpus, out: Path, *extra: str) -> list[str]:
    """A tiny pretrain_finetune: fbank-tiny, in-process training, a few updates per stage."""
    return [
        "run", "pipeline=pretrain_finetune", f"output_dir={out}",
        *(f"data.{split}={path}" for split, path in corpus.items()),
        "pretrain.model=fbank-tiny", "pretrain.data.batch_seconds=4", "pretrain.data.crop_duration=1.2",
        "pretrain.data.valid=none", "pretrain.trainer.num_workers=0", "pretrain.trainer.max_updates=12", "pretrain.trainer.checkpoint_every=2",
        "pretrain.trainer.log_every=2", "pretrain.trainer.validate_every=0", "pretrain.trainer.optim.warmup_updates=0",
        "finetune.data.batch_seconds=6", "finetune.trainer.num_workers=0", "finetune.trainer.max_updates=2",
        "finetune.trainer.checkpoint_every=2", "finetune.trainer.log_every=1", "finetune.trainer.validate_every=0",
        "embed.shard_seconds=4", "ray.num_cpus=2", "ray.include_dashboard=false", "ray.object_store_memory_mb=200",
        *extra,
    ]


def _records(out: Path) -> dict[str, dict]:
    return {s: read_record(out / s) for s in STAGES}


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.lstat().st_mtime_ns for p in out.rglob("*")
            if p.name not in ("summary.json", "summary.md", ".pipeline.lock")}


def _statuses(out: Path) -> dict[str, str]:
    summary = json.loads((out / "summary.json").read_text())
    return {row["stage"]: row["status"] for row in summary["stages"]}


def _kill_during_pretraining(corpus, out: Path) -> None:
    """`speech-ssl run` in its own process group, killed (SIGKILL) once pretraining wrote a checkpoint."""
    env = {**os.environ, "SPEECH_SSL_LOG_LEVEL": "INFO"}
    env.pop("RAY_ADDRESS", None)
    log = open(out.parent / "killed_run.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "speech_ssl", *_args(corpus, out)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not ckpt.is_complete(out / "pretrain" / "checkpoint_00000002"):
            assert proc.poll() is None, (out.parent / "killed_run.log").read_text()[-3000:]
            assert time.time() < deadline, "pretraining wrote no checkpoint"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started: one process group
        proc.wait(timeout=60)
        log.close()


@pytest.mark.slow
def test_killed_run_resumes_reruns_skip_and_changes_rerun_what_reads_them(ray_local, corpus, tmp_path, capsys):
    out = tmp_path / "run"

    # 1. Killed while pretraining: prepare is finished, pretrain has a checkpoint but no completion record.
    _kill_during_pretraining(corpus, out)
    records = _records(out)
    assert records["prepare"]["status"] == "done"
    assert records["pretrain"]["status"] == "running" and not (out / "pretrain" / "train_summary.json").exists()
    assert records["finetune"] is None
    prepare_record = (out / "prepare" / RECORD).read_text()

    # 2. The same command again: prepare is skipped, pretraining continues from its checkpoint, the rest runs.
    assert main(_args(corpus, out)) == 0
    printed = capsys.readouterr().out
    assert _statuses(out) == {"prepare": "skipped", "pretrain": "resumed", "finetune": "ran", "evaluate": "ran",
                              "embed": "ran"}
    assert (out / "prepare" / RECORD).read_text() == prepare_record
    pretrained = json.loads((out / "pretrain" / "train_summary.json").read_text())
    assert pretrained["updates"] == 12 and pretrained["resumes"] == 1
    assert "resumed from" in (out / "pretrain" / "stage.log").read_text()
    assert json.loads((out / "finetune" / RECORD).read_text())["config"]["init"] == str(out / "pretrain" / "best")

    summary = json.loads((out / "summary.json").read_text())
    results = summary["results"]
    scores = json.loads((out / "evaluate" / "results.json").read_text())
    assert results["test_cer"] == scores["cer"] >= 0 and results["test_utterances"] == 4
    assert results["embedded_utterances"] == 10
    for label in ("pretrained checkpoint", "fine-tuned checkpoint", "test scores"):
        assert Path(summary["outputs"][label]).exists(), label
    for stage in ("pretrain", "finetune"):
        assert (out / stage / "curves.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / stage / "best" / "model.safetensors").exists()
    assert list((out / "embed").glob("part-*.parquet"))
    assert all(row["wall_seconds"] > 0 for row in summary["stages"])
    markdown = (out / "summary.md").read_text()
    assert "CER" in markdown and "CER" in printed and "| pretrain | resumed |" in markdown

    # 3. Once more: every stage is skipped and nothing in the output changes.
    before = _mtimes(out)
    assert main(_args(corpus, out)) == 0
    assert set(_statuses(out).values()) == {"skipped"}
    assert _mtimes(out) == before

    # 4. A changed evaluation setting re-runs evaluate only (embed does not read its outputs).
    assert main(_args(corpus, out, "evaluate.data.max_batch_size=2")) == 0
    assert _statuses(out) == {"prepare": "skipped", "pretrain": "skipped", "finetune": "skipped",
                              "evaluate": "ran", "embed": "skipped"}

    # 5. More pretraining updates: pretraining continues (12 -> 14) and its best checkpoint (the last, without
    # validation) changes, so everything that reads it starts afresh.
    finetune_started = _records(out)["finetune"]["started"]
    assert main(_args(corpus, out, "evaluate.data.max_batch_size=2", "pretrain.trainer.max_updates=14")) == 0
    assert _statuses(out) == {"prepare": "skipped", "pretrain": "resumed", "finetune": "ran", "evaluate": "ran",
                              "embed": "ran"}
    pretrained = json.loads((out / "pretrain" / "train_summary.json").read_text())
    assert pretrained["updates"] == 14 and pretrained["resumes"] == 2
    records = _records(out)
    assert records["finetune"]["attempts"] == 1 and records["finetune"]["started"] >= finetune_started
    assert json.loads((out / "finetune" / "train_summary.json").read_text())["resumes"] == 0


@pytest.mark.slow
def test_failed_stage_stops_the_pipeline_and_the_same_command_continues_after_the_fix(ray_local, corpus, tmp_path,
                                                                                        capsys):
    from speech_ssl.models import build, save_model

    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{not json")  # a broken checkpoint: embedding fails
    out = tmp_path / "embedded"
    args = ["run", "pipeline=embed_corpus", f"output_dir={out}", f"data.unlabeled={corpus['unlabeled']}",
            f"embed.checkpoint={checkpoint}", "embed.shard_seconds=4", "ray.include_dashboard=false"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stage 'embed' failed" in err and str(out / "embed" / "stage.log") in err
    assert "finished stages are kept (prepare)" in err and "Traceback" not in err
    failed = read_record(out / "embed")
    assert failed["status"] == "failed" and failed["error"]
    assert "Traceback" in (out / "embed" / "stage.log").read_text()  # the details are in the stage's log
    assert not (out / "summary.json").exists()
    prepared = _mtimes(out / "prepare")

    save_model(build("fbank-tiny"), checkpoint)  # the fix, at the same path: the same command again
    assert main(args) == 0
    assert _statuses(out) == {"prepare": "skipped", "embed": "resumed"}
    assert _mtimes(out / "prepare") == prepared
    assert read_record(out / "embed")["attempts"] == 2
    assert json.loads((out / "summary.json").read_text())["results"]["embedded_utterances"] == 10


@pytest.mark.parametrize("extra, needle", [
    (["pretrain.output_dir=/tmp/elsewhere"], "'pretrain.output_dir': is set by the pipeline"),
    (["pipeline=nope"], "Valid choices: pretrain_finetune, embed_corpus"),
    (["data.train=/tmp/mine.jsonl"], "mixes the demo corpus"),
    (["pipeline=embed_corpus"], "'embed.checkpoint'"),
])
def test_configuration_errors_name_the_key_before_anything_runs(extra, needle, tmp_path, capsys):
    assert main(["run", f"output_dir={tmp_path / 'o'}", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_outputs_digest_follows_what_a_link_points_to(tmp_path):
    from speech_ssl.pipeline import outputs_digest

    for name in ("checkpoint_1", "checkpoint_2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(name.encode())
    (tmp_path / "best").symlink_to("checkpoint_1")
    first = outputs_digest(tmp_path, ["best"])
    assert outputs_digest(tmp_path, ["best"]) == first
    (tmp_path / "best").unlink()
    (tmp_path / "best").symlink_to("checkpoint_2")
    assert outputs_digest(tmp_path, ["best"]) != first


def test_decisions():
    stage = Stage("s", lambda c: {}, {}, continues=False)
    training = Stage("t", lambda c: {}, {}, continues=True)
    done = {"status": "done", "config_hash": "h", "inputs": {"a": "1"}}
    assert decide(stage, None, {"a": "1"}, "h", force=False) == "resume"      # a folder we never recorded
    assert decide(stage, done, {"a": "1"}, "h", force=False) == "skip"
    assert decide(stage, done, {"a": "1"}, "h", force=True) == "fresh"
    assert decide(stage, done, {"a": "2"}, "h", force=False) == "fresh"       # an input changed
    assert decide(stage, {**done, "status": "running"}, {"a": "1"}, "h", force=False) == "resume"
    assert decide(stage, {**done, "status": "failed"}, {"a": "1"}, "h", force=False) == "resume"
    assert decide(stage, done, {"a": "1"}, "other", force=False) == "fresh"
    assert decide(training, done, {"a": "1"}, "other", force=False) == "resume"  # e.g. more updates


@pytest.mark.slow
def test_cache_stage_feeds_pretraining_and_embedding(ray_local, corpus, tmp_path):
    out = tmp_path / "cached"
    assert main(_args(corpus, out, "cache=true")) == 0
    assert _statuses(out) == {"prepare": "ran", "cache": "ran", "pretrain": "ran", "finetune": "ran",
                              "evaluate": "ran", "embed": "ran"}
    cached = str(out / "cache" / "unlabeled")
    assert json.loads((out / "cache" / "unlabeled" / "cache.json").read_text())["rows"] == 10
    for stage, key in (("pretrain", ("data", "train")), ("embed", ("input",))):
        config = json.loads((out / stage / RECORD).read_text())["config"]
        for part in key:
            config = config[part]
        assert config == cached, stage
    assert json.loads((out / "summary.json").read_text())["results"]["embedded_utterances"] == 10
