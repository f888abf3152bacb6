"""``speech-ssl prepare`` end to end: manifests with header durations, carried labels, quarantine, Ray path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from audio_factory import BROKEN_EXPECTED, make_broken_zoo, make_format_corpus, make_mixed_manifest
from speech_ssl.cli import main
from speech_ssl.data import DataConfig, FeatureSpec, BatchStream, read_source

pytestmark = pytest.mark.timeout(120)


def _lines(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    manifest, _ = make_mixed_manifest(root, good=6, labeled=True)
    return root, manifest


def test_prepare_a_labeled_manifest_with_bad_files(mixed, tmp_path, capsys):
    root, manifest = mixed
    out = tmp_path / "out" / "train.jsonl"
    assert main(["prepare", f"input={manifest}", f"output={out}"]) == 0
    printed = capsys.readouterr().out
    rows = _lines(out)
    source = {r["path"]: r for r in _lines(manifest)}
    header_bad = {f"broken/{n}": hdr for n, (_, hdr) in BROKEN_EXPECTED.items() if hdr is not None}
    assert len(rows) == len(source) - len(header_bad)
    for row in rows:
        audio = (out.parent / row["path"]).resolve()
        rel = str(audio.relative_to(root))
        assert row["duration"] == pytest.approx(sf.info(str(audio)).duration, abs=1e-6)  # from the header
        assert row["text"] == source[rel]["text"]  # labels carried over
        assert row.get("speaker") == source[rel].get("speaker")
        assert row["sample_rate"] == 16000 and row["channels"] == 1
    quarantine = _lines(tmp_path / "out" / "train.quarantine.jsonl")
    assert {str(Path(q["path"]).relative_to(root)): q["reason"] for q in quarantine} == header_bad
    n = len(source)
    assert f"prepare: read {n} = used {n - len(header_bad)} + quarantined {len(header_bad)} + filtered 0" in printed
    # The manifest it wrote is a valid source for training.
    stream = BatchStream(read_source(str(out)), DataConfig(batch_seconds=10), FeatureSpec("waveform"), "pad",
                         use_ray=False)
    assert sum(len(b) for b in stream.iter_epoch(0)) == 6  # the header-clean broken files fail at decode


def test_prepare_with_full_decode_finds_everything(tmp_path, capsys):
    make_format_corpus(tmp_path)
    zoo = make_broken_zoo(tmp_path / "formats", split="zoo")
    out = tmp_path / "all.jsonl"
    assert main(["prepare", f"input={tmp_path / 'formats'}", f"output={out}", "decode=true"]) == 0
    quarantine = {Path(q["path"]).name: q["reason"] for q in _lines(tmp_path / "all.quarantine.jsonl")}
    assert quarantine == {n: dec for n, (dec, _) in BROKEN_EXPECTED.items() if n in zoo and n != "missing.wav"}
    rows = _lines(out)
    assert len(rows) == 13 and {r["channels"] for r in rows} == {1, 2, 3}
    assert {r["sample_rate"] for r in rows} >= {8000, 16000, 22051, 44100, 48000}


@pytest.mark.slow  # an embedded Ray and a Ray Data scan; the threaded scan's tests above stay in test-fast
def test_prepare_on_ray_data_matches_the_threaded_scan(mixed, tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    root, manifest = mixed
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert main(["prepare", f"input={manifest}", f"output={local}"]) == 0
    assert main(["prepare", f"input={manifest}", f"output={on_ray}", "ray_threshold=0", "ray.num_cpus=2",
                 "ray.include_dashboard=false", "ray.object_store_memory_mb=200"]) == 0
    assert not ray.is_initialized()  # the embedded Ray is shut down after the command
    assert _lines(local) == _lines(on_ray)
    assert _lines(tmp_path / "local.quarantine.jsonl") == _lines(tmp_path / "ray.quarantine.jsonl")


def test_prepare_fairseq_tsv(tmp_path):
    manifest = make_format_corpus(tmp_path, matrix=[("flac", 16000, 1), ("wav", 16000, 1)])
    rows = _lines(manifest)
    tsv = tmp_path / "train.tsv"
    tsv.write_text(f"{tmp_path}\n" + "".join(f"{r['path']}\t{int(r['duration'] * 16000)}\n" for r in rows))
    (tmp_path / "train.wrd").write_text("HELLO\nWORLD\n")
    out = tmp_path / "from_tsv.jsonl"
    assert main(["prepare", f"input={tsv}", f"output={out}"]) == 0
    assert [r["text"] for r in _lines(out)] == ["HELLO", "WORLD"]


def test_prepare_fails_clearly_when_everything_is_bad(tmp_path, capsys):
    make_broken_zoo(tmp_path)
    out = tmp_path / "none.jsonl"
    assert main(["prepare", f"input={tmp_path / 'broken'}", f"output={out}", "decode=true"]) == 1
    err = capsys.readouterr().err
    assert "nothing usable" in err and "Traceback" not in err
    assert not out.exists()
    assert len(_lines(tmp_path / "none.quarantine.jsonl")) == 11  # every file listed all the same
    # A path that does not exist is a usage error, found before anything starts (exit 2, naming the key).
    assert main(["prepare", f"input={tmp_path / 'absent'}", f"output={out}"]) == 2
    err = capsys.readouterr().err
    assert "'input'" in err and "does not exist" in err
