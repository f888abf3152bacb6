"""read_source: directories, JSONL and fairseq TSV manifests, path lists, file:// URIs; ids and durations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from audio_factory import make_broken_zoo, make_corpus, write_manifest
from speech_ssl.data import DataConfig, FeatureSpec, BatchStream, read_source
from speech_ssl.errors import SpeechSSLError

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest = make_corpus(root, n=6, fmt="flac", speakers=2)
    return root, manifest, [json.loads(line) for line in open(manifest)]


def test_directory_is_scanned_recursively_with_header_durations(corpus, tmp_path):
    root, _, rows = corpus
    (root / "audio" / "notes.txt").write_text("not audio, and not picked up")
    utts = read_source(str(root / "audio"))
    assert [u.id for u in utts] == sorted(r["path"][len("audio/"):-len(".flac")] for r in rows)
    by_id = {u.id: u for u in utts}
    for r in rows:
        u = by_id[r["path"][len("audio/"):-len(".flac")]]
        assert u.duration == pytest.approx(sf.info(str(root / r["path"])).duration)
        assert Path(u.path).is_absolute() and Path(u.path).exists()
    # Only the extensions asked for.
    assert read_source(str(root / "audio"), extensions=[".wav"]) == []


def test_jsonl_manifest_paths_relative_to_it(corpus):
    root, manifest, rows = corpus
    utts = read_source(str(manifest))
    assert [u.source_path for u in utts] == [r["path"] for r in rows]
    assert [u.path for u in utts] == [str(root / r["path"]) for r in rows]
    assert [u.duration for u in utts] == [r["duration"] for r in rows]
    assert [u.speaker for u in utts] == [r["speaker"] for r in rows]
    assert all(u.text is None for u in utts)


def test_fairseq_tsv_with_word_transcripts(corpus, tmp_path):
    root, _, rows = corpus
    tsv = tmp_path / "train.tsv"
    lines = [str(root)] + [f"{r['path']}\t{sf.info(str(root / r['path'])).frames}" for r in rows]
    tsv.write_text("\n".join(lines) + "\n")
    (tmp_path / "train.wrd").write_text("\n".join(f"WORD {i}" for i in range(len(rows))) + "\n")
    utts = read_source(str(tsv))
    assert [u.path for u in utts] == [str(root / r["path"]) for r in rows]
    assert [round(u.duration, 3) for u in utts] == [r["duration"] for r in rows]
    assert [u.text for u in utts] == [f"WORD {i}" for i in range(len(rows))]


def test_path_lists_and_lists_of_sources(corpus, tmp_path):
    root, manifest, rows = corpus
    listing = tmp_path / "files.lst"
    listing.write_text("# comment\n" + "\n".join(str(root / r["path"]) for r in rows[:3]) + "\n")
    assert [u.path for u in read_source(str(listing))] == [str(root / r["path"]) for r in rows[:3]]
    both = read_source([str(root / rows[0]["path"]), str(manifest)])
    assert len(both) == 1 + len(rows)
    assert len({u.id for u in both}) == len(both)  # repeated ids made unique


def test_file_uris_read_through_pyarrow(corpus):
    root, manifest, rows = corpus
    from_dir = read_source(f"file://{root}/audio")
    assert len(from_dir) == len(rows) and all(u.path.startswith("file://") for u in from_dir)
    from_manifest = read_source(f"file://{manifest}")
    assert [u.path for u in from_manifest] == [f"file://{root / r['path']}" for r in rows]
    # Decoding through the URI gives the same batches as through the local path.
    cfg, spec = DataConfig(batch_seconds=100, shuffle=False), FeatureSpec("waveform")
    a = list(BatchStream(from_manifest, cfg, spec, "pad", use_ray=False).iter_epoch(0))
    b = list(BatchStream(read_source(str(manifest)), cfg, spec, "pad", use_ray=False).iter_epoch(0))
    assert len(a) == len(b) and all((x.inputs == y.inputs).all() for x, y in zip(a, b))


def test_missing_manifest_files_are_quarantined_when_read(tmp_path):
    rows = [json.loads(line) for line in open(make_corpus(tmp_path, n=3))]
    rows.append({"path": "audio/gone.flac", "duration": 1.0})
    write_manifest(tmp_path / "with_missing.jsonl", rows)
    utts = read_source(str(tmp_path / "with_missing.jsonl"))
    assert len(utts) == 4  # not dropped silently
    stream = BatchStream(utts, DataConfig(batch_seconds=100), FeatureSpec("waveform"), "pad", use_ray=False)
    used = sum(len(b) for b in stream.iter_epoch(0))
    assert used == 3
    assert stream.report.quarantined == 1 and stream.report.entries[0]["reason"] == "missing"


def test_unreadable_files_in_a_directory_are_reported_not_lost(tmp_path):
    make_corpus(tmp_path, n=2)
    make_broken_zoo(tmp_path / "audio", split="bad")
    utts = read_source(str(tmp_path / "audio"))
    # Headers that fail are listed (missing.wav is never written, so the zoo has 11 files).
    reasons = sorted(q["reason"] for q in utts.quarantined)
    assert reasons == sorted(["empty", "not-audio", "corrupt", "corrupt", "truncated", "truncated", "zero-length"])
    stream = BatchStream(utts, DataConfig(batch_seconds=100), FeatureSpec("waveform"), "pad", use_ray=False)
    list(stream.iter_epoch(0))
    r = stream.report
    assert r.read == r.used + r.quarantined + r.filtered == 13
    assert r.used == 2 and r.quarantined == 11
    # A caller's subset keeps the scan-time quarantine, so its counts still add up.
    subset = utts.with_rows(u for u in utts if u.id.startswith("spk"))
    sub = BatchStream(subset, DataConfig(batch_seconds=100), FeatureSpec("waveform"), "pad", use_ray=False)
    list(sub.iter_epoch(0))
    assert (sub.report.read, sub.report.used, sub.report.quarantined) == (9, 2, 7)  # the 7 headers that failed


@pytest.mark.parametrize("content, needle", [
    ('{"path": "a.wav", "duration": 1}\nnot json\n', ":2: not valid JSON"),
    ('{"duration": 1}\n', "needs a string 'path'"),
    ('{"path": "a.wav", "duration": "long"}\n', "'duration' must be a number"),
])
def test_malformed_manifest_lines_are_named(tmp_path, content, needle):
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(SpeechSSLError, match=needle):
        read_source(str(tmp_path / "m.jsonl"))


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(SpeechSSLError, match="does not exist"):
        read_source(str(tmp_path / "nowhere"))
