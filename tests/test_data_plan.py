"""The batch plan and the in-process stream: shards, reshuffles, resume, bucketing, modes, counts."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import speech_ssl.data.collate as collate_module
from audio_factory import make_corpus, make_mixed_manifest, make_toy_asr_corpus, speechlike, write_audio
from speech_ssl.data import (BatchStream, DataConfig, FeatureSpec, TextNormalizer, Utterance, Vocabulary,
                             read_source)
from speech_ssl.data.plan import batch_cost
from speech_ssl.errors import SpeechSSLError

pytestmark = pytest.mark.timeout(60)
WAVE = FeatureSpec("waveform")


def synthetic(n: int = 600, lo: float = 1.0, hi: float = 15.0, seed: int = 0, labeled: bool = False):
    """Utterances with durations only: enough to plan (planning never opens a file)."""
    rng = random.Random(seed)
    return [Utterance(id=f"u{i}", path=f"/nowhere/u{i}.wav", source_path=f"u{i}.wav",
                      duration=round(rng.uniform(lo, hi), 3), text="AB" if labeled else None) for i in range(n)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return read_source(str(make_corpus(root, n=16, min_seconds=0.8, max_seconds=2.5, fmt="wav", speakers=4)))


def _row_ids(stream, epoch, rank=None):
    return [stream.rows[i].id for b in stream.rank_batches(epoch, rank) for i in b]


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_disjoint_cover_the_epoch_and_balance(world_size):
    utts = synthetic()
    cfg = DataConfig(batch_seconds=60, max_batch_size=16)
    streams = [BatchStream(utts, cfg, WAVE, "pad", rank=r, world_size=world_size, seed=3, use_ray=False)
               for r in range(world_size)]
    for epoch in (0, 1):
        shards = [set(_row_ids(s, epoch)) for s in streams]
        assert sum(len(s) for s in shards) == len(utts)  # no row twice
        assert set().union(*shards) == {u.id for u in utts}  # every row once
        counts = [s.num_batches(epoch) for s in streams]
        assert max(counts) - min(counts) <= 1
        assert counts == streams[0].num_batches_all_ranks(epoch)


def test_two_workers_read_disjoint_covering_batches(small):
    cfg = DataConfig(batch_seconds=6)
    seen = [[i for b in BatchStream(small, cfg, WAVE, "crop", rank=r, world_size=2, use_ray=False).iter_epoch(0)
             for i in b.ids] for r in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(u.id for u in small)


def test_reshuffled_every_epoch_reproducibly_from_the_seed():
    utts = synthetic()
    cfg = DataConfig(batch_seconds=60)
    a = BatchStream(utts, cfg, WAVE, "pad", seed=7, use_ray=False)
    b = BatchStream(utts, cfg, WAVE, "pad", seed=7, use_ray=False)
    c = BatchStream(utts, cfg, WAVE, "pad", seed=8, use_ray=False)
    assert a.epoch_plan(0) != a.epoch_plan(1)  # a new order and new batches each epoch
    assert a.epoch_plan(1) == b.epoch_plan(1)  # the same from the same seed
    assert a.epoch_plan(1) != c.epoch_plan(1)
    # Batch composition changes, not only batch order.
    assert {tuple(sorted(x)) for x in a.epoch_plan(0)} != {tuple(sorted(x)) for x in a.epoch_plan(1)}
    fixed = BatchStream(utts, DataConfig(batch_seconds=60, shuffle=False), WAVE, "pad", use_ray=False)
    assert fixed.epoch_plan(0) == fixed.epoch_plan(1)


def test_resume_from_a_plan_position_matches_the_uninterrupted_epoch(small, monkeypatch):
    cfg = DataConfig(batch_seconds=4, crop_duration=1.0)
    full = list(BatchStream(small, cfg, WAVE, "crop", seed=5, use_ray=False).iter_epoch(1))
    assert len(full) >= 4
    decoded = []
    real_decode = collate_module.decode_file
    monkeypatch.setattr(collate_module, "decode_file", lambda path, *a: decoded.append(path) or real_decode(path, *a))
    start = 3
    resumed = list(BatchStream(small, cfg, WAVE, "crop", seed=5, use_ray=False).iter_epoch(1, start=start))
    assert [b.position for b in resumed] == list(range(start, len(full)))
    for x, y in zip(full[start:], resumed):
        assert x.ids == y.ids and x.position == y.position
        assert torch.equal(x.inputs, y.inputs)  # same crops: offsets come from (seed, epoch, batch)
    # Earlier batches were skipped without opening their files.
    assert sorted(decoded) == sorted(small[0].path.rsplit("/", 3)[0] + "/" + p for b in full[start:] for p in b.paths)


@pytest.mark.parametrize("width", [0.05, 0.1, 0.25])
def test_bucketing_bounds_padding_waste(width):
    utts = synthetic(n=2000, lo=0.5, hi=20.0)
    durations = [u.duration for u in utts]
    stream = BatchStream(utts, DataConfig(batch_seconds=120, bucket_width=width), WAVE, "pad", use_ray=False)
    bound = width / (1 + width)
    for batch in stream.epoch_plan(0):
        d = [durations[i] for i in batch]
        assert 1 - sum(d) / batch_cost(d, "pad", None) <= bound + 1e-9
    unbucketed = BatchStream(utts, DataConfig(batch_seconds=120, bucket_width=None), WAVE, "pad", use_ray=False)
    assert stream.plan_stats(0).padding_waste <= bound
    assert unbucketed.plan_stats(0).padding_waste > 0.3  # what bucketing saves


def test_observed_padding_waste_is_reported_and_bounded(small):
    stream = BatchStream(small, DataConfig(batch_seconds=5, bucket_width=0.1), WAVE, "pad", use_ray=False)
    batches = list(stream.iter_epoch(0))
    for b in batches:
        assert b.padded_seconds == pytest.approx(b.inputs.shape[0] * b.inputs.shape[1] / 16000)
        assert b.audio_seconds == pytest.approx(b.lengths.sum().item() / 16000)
        assert (b.inputs[b.padding_mask()] == 0).all()
    assert 0 <= stream.report.padding_waste <= 0.1 / 1.1 + 0.01
    assert "padding" in stream.report.summary_line()


def test_budget_and_batch_size_are_respected():
    utts = synthetic(n=500, lo=1.0, hi=10.0)
    durations = [u.duration for u in utts]
    for mode, crop in (("pad", None), ("crop", 4.0)):
        cfg = DataConfig(batch_seconds=30, max_batch_size=5, crop_duration=crop)
        for batch in BatchStream(utts, cfg, WAVE, mode, use_ray=False).epoch_plan(0):
            assert len(batch) <= 5
            assert len(batch) == 1 or batch_cost([durations[i] for i in batch], mode, crop) <= 30


def test_crop_mode_batches_have_no_padding_and_respect_crop_duration(small):
    cfg = DataConfig(batch_seconds=6, crop_duration=1.0)
    for b in BatchStream(small, cfg, WAVE, "crop", use_ray=False).iter_epoch(0):
        assert (b.lengths == b.inputs.shape[1]).all() and b.inputs.shape[1] <= 16000
        assert b.audio_seconds == b.padded_seconds


def test_exact_mode_batches_hold_identical_lengths(tmp_path):
    # Three lengths, several files each, as an embedding corpus of fixed-length clips would have.
    rows = []
    for i in range(9):
        seconds = [1.0, 1.5, 2.0][i % 3]
        path = write_audio(tmp_path / f"c{i}.wav", speechlike(seconds, 16000, seed=i), 16000)
        rows.append(Utterance(id=f"c{i}", path=str(path), source_path=path.name, duration=seconds))
    for spec in (WAVE, FeatureSpec("fbank")):
        batches = list(BatchStream(rows, DataConfig(batch_seconds=100), spec, "exact", use_ray=False).iter_epoch(0))
        assert len(batches) == 3
        for b in batches:
            assert (b.lengths == b.inputs.shape[1]).all() and len(b) == 3


def test_long_recordings_are_segmented_and_filters_are_counted(tmp_path):
    path = write_audio(tmp_path / "long.wav", speechlike(7.0, 16000, seed=1), 16000)
    short = write_audio(tmp_path / "short.wav", speechlike(0.3, 16000, seed=2), 16000)
    labeled_long = write_audio(tmp_path / "labeled.wav", speechlike(7.0, 16000, seed=3), 16000)
    utts = [Utterance("long", str(path), "long.wav", 7.0), Utterance("short", str(short), "short.wav", 0.3),
            Utterance("labeled", str(labeled_long), "labeled.wav", 7.0, text="AB")]
    cfg = DataConfig(segment_duration=3.0, min_duration=0.5, max_duration=5.0, batch_seconds=100)
    stream = BatchStream(utts, cfg, WAVE, "pad", use_ray=False)
    assert [r.id for r in stream.rows] == ["long@0000", "long@0001", "long@0002"]
    assert all(r.duration == pytest.approx(7 / 3) for r in stream.rows)
    batches = list(stream.iter_epoch(0))
    assert sum(b.lengths.sum().item() for b in batches) == pytest.approx(7 * 16000, abs=3)
    r = stream.report
    assert (r.read, r.used, r.quarantined, r.filtered) == (5, 3, 0, 2)
    assert r.reasons("filtered") == {"too-short": 1, "too-long": 1}


def test_counts_add_up_and_reasons_are_reported(tmp_path):
    manifest, expected = make_mixed_manifest(tmp_path, good=8)
    stream = BatchStream(read_source(str(manifest)), DataConfig(batch_seconds=8), WAVE, "pad", seed=1,
                         use_ray=False)
    batches = list(stream.iter_epoch(0))
    r = stream.report
    assert r.read == r.used + r.quarantined + r.filtered == 8 + len(expected)
    assert r.used == 8 and r.quarantined == len(expected)
    got = {e["path"].split(str(tmp_path) + "/")[1]: e["reason"] for e in r.entries}
    assert got == expected
    in_batches = {p for b in batches for p, _ in b.quarantined}
    assert in_batches <= {str(tmp_path / p) for p in expected}
    out = r.write_jsonl(tmp_path / "quarantine.jsonl")
    assert len(open(out).readlines()) == len(expected)
    # A second epoch counts again but lists nothing twice.
    list(stream.iter_epoch(1))
    assert r.read == 2 * (8 + len(expected)) and len(r.entries) == len(expected)


def test_a_corpus_where_everything_is_bad_fails_clearly(tmp_path):
    manifest, expected = make_mixed_manifest(tmp_path, good=0)
    stream = BatchStream(read_source(str(manifest)), DataConfig(), WAVE, "pad", use_ray=False)
    with pytest.raises(SpeechSSLError, match="nothing usable"):
        list(stream.iter_epoch(0))
    with pytest.raises(SpeechSSLError, match="nothing usable.*too-short"):
        BatchStream(synthetic(n=5, lo=1, hi=2), DataConfig(min_duration=5.0), WAVE, "pad", use_ray=False)


def test_targets_come_from_the_vocabulary(tmp_path):
    utts = read_source(str(make_toy_asr_corpus(tmp_path, n=10)))
    normalizer = TextNormalizer()
    vocab = Vocabulary.build([u.text for u in utts], normalizer)
    stream = BatchStream(utts, DataConfig(batch_seconds=10), FeatureSpec("fbank"), "pad", use_ray=False,
                         vocab=vocab, normalizer=normalizer)
    for b in stream.iter_epoch(0):
        assert b.inputs.shape[2] == 80 and b.targets.dtype == torch.long
        for k, text in enumerate(b.texts):
            n = b.target_lengths[k].item()
            assert vocab.decode(b.targets[k, :n].tolist()) == text
            assert (b.targets[k, n:] == 0).all()
    # Rows without transcripts cannot be fine-tuned on.
    utts[0].text = None
    with pytest.raises(SpeechSSLError, match="no transcript"):
        BatchStream(utts, DataConfig(), FeatureSpec("fbank"), "pad", use_ray=False, vocab=vocab)
