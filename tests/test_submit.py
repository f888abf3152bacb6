"""`speech-ssl submit`: a pipeline as a Ray job on a separate local Ray head (its dashboard and job server on
127.0.0.1 only): the job succeeds and writes its outputs; a failing job makes the command exit non-zero."""

from __future__ import annotations

import json

import pytest

from audio_factory import make_corpus
from ray_heads import listening_addresses
from speech_ssl.cli import main
from speech_ssl.stages.submit import entrypoint, forwarded_overrides

pytestmark = pytest.mark.timeout(300)  # the job test is slow-marked; the two checks before submitting are not


def test_forwarded_overrides_leave_out_the_submission_keys():
    args = ["ray.address=http://h:8265", "pipeline=embed_corpus", "job.wait=false", "++pretrain.model_overrides.dropout=0.0",
            "output_dir=/x y", "forward=[a]"]
    assert forwarded_overrides(args) == ["pipeline=embed_corpus", "++pretrain.model_overrides.dropout=0.0", "output_dir=/x y"]
    assert entrypoint(args) == ("python -m speech_ssl run pipeline=embed_corpus "
                                "++pretrain.model_overrides.dropout=0.0 'output_dir=/x y'")


def test_relative_output_dir_is_refused_before_submitting(capsys):
    assert main(["submit", "ray.address=http://127.0.0.1:9", "output_dir=outputs/x"]) == 2
    assert "temporary working directory" in capsys.readouterr().err


@pytest.mark.slow
def test_submitted_pipeline_job_succeeds_and_a_failing_one_exits_nonzero(tmp_path, capsys, shared_ray_head):
    from speech_ssl.models import build, save_model

    corpus = make_corpus(tmp_path / "corpus", n=6, min_seconds=1.0, max_seconds=1.6, split="unlabeled")
    checkpoint = tmp_path / "model"
    save_model(build("fbank-tiny"), checkpoint)
    out = tmp_path / "job_out"
    common = ["pipeline=embed_corpus", f"data.unlabeled={corpus}", "embed.shard_seconds=4"]
    head = shared_ray_head  # the session's separate head (conftest.shared_ray_head): 2 CPUs, a job server
    address = head.dashboard_url
    assert listening_addresses(head.dashboard_port) == {"127.0.0.1"}, "the job server must listen on localhost only"
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
