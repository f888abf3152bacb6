"""The decoded-audio cache: `speech-ssl cache` writes a corpus once; streams read it back as the decode path
would have made it (identical batches in float32, within storage precision otherwise); bad audio is
quarantined at cache time; damaged shards are found, reported and rewritten; caches of another format
version or feature spec are refused; URIs work; the stages take a cache wherever they take audio."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from audio_factory import make_corpus, make_mixed_manifest, make_toy_asr_corpus, toy_words
from speech_ssl.cli import main
from speech_ssl.data import BatchStream, DataConfig, FeatureSpec, read_source
from speech_ssl.data.audio import REACH_TIMEOUT_S
from speech_ssl.errors import SpeechSSLError
from speech_ssl.stages import cache as cache_stage

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_torch_thread")]

WAVE = FeatureSpec("waveform", normalize=True)
FBANK = FeatureSpec("fbank", n_mels=80, normalize=True)


def write_cache(source, output, **kw) -> dict:
    return cache_stage.run(cache_stage.Config(input=str(source), output=str(output), **kw))


def batches(utterances, spec, mode="pad", **data):
    cfg = DataConfig(batch_seconds=6.0, crop_duration=1.0 if mode == "crop" else None, **data)
    return list(BatchStream(utterances, cfg, spec, mode, use_ray=False).iter_epoch(0))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_corpus")
    manifest, bad = make_mixed_manifest(root, good=10)
    return root, manifest, bad


@pytest.mark.parametrize("model, spec", [("tiny", WAVE), ("fbank-tiny", FBANK)])
def test_float32_cache_gives_the_batches_of_the_original_audio(ray_local, mixed, tmp_path, model, spec):
    root, manifest, bad = mixed
    out = tmp_path / "cache"
    meta = write_cache(manifest, out, model=model, dtype="float32", shard_seconds=5.0)
    assert meta["rows"] == 10 and meta["quarantined"] == len(bad) and meta["shards"] >= 3
    assert json.loads((out / "cache.json").read_text())["features"]["kind"] == spec.kind

    # Bad audio is quarantined when the cache is written, with the reason the decode path gives.
    entries = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert {e["path"]: e["reason"] for e in entries} == bad

    cached = read_source(str(out))
    assert len(cached) == 10 and all(u.cache_row is not None for u in cached)
    assert [c.root for c in cached.caches] == [str(out)]
    original = read_source(str(manifest))
    good = original.with_rows([u for u in original if u.source_path not in bad])
    for mode in ("pad", "crop"):
        expected, got = batches(good, spec, mode), batches(cached, spec, mode)
        assert len(expected) == len(got) >= 2
        for x, y in zip(expected, got):
            assert x.ids == y.ids and x.paths == y.paths  # paths as the user gave them, not the shards
            assert torch_equal(x.inputs, y.inputs) and x.lengths.tolist() == y.lengths.tolist()


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_default_dtypes_are_half_the_size_and_within_storage_precision(ray_local, mixed, tmp_path):
    _, manifest, bad = mixed
    raw_wave, raw_fbank = FeatureSpec("waveform"), FeatureSpec("fbank", n_mels=80)
    wave = write_cache(manifest, tmp_path / "pcm", model="tiny")
    fbank = write_cache(manifest, tmp_path / "f16", model="fbank-tiny")
    assert (wave["dtype"], fbank["dtype"]) == ("int16", "float16")
    wave32 = write_cache(manifest, tmp_path / "pcm32", model="tiny", dtype="float32")
    assert abs(wave["bytes"] / wave32["bytes"] - 0.5) < 0.05  # 2 bytes a sample instead of 4
    good = [u for u in read_source(str(manifest)) if u.source_path not in bad]
    for x, y in zip(batches(good, raw_wave), batches(read_source(str(tmp_path / "pcm")), raw_wave)):
        assert x.ids == y.ids
        assert float((x.inputs - y.inputs).abs().max()) <= 0.5 / 32768 + 1e-7  # rounding to 16 bits
    for x, y in zip(batches(good, raw_fbank), batches(read_source(str(tmp_path / "f16")), raw_fbank)):
        err = (x.inputs - y.inputs).abs()
        assert float(err.max()) <= 1e-3 * float(x.inputs.abs().max()) + 1e-3  # float16's 11-bit mantissa


def test_a_damaged_shard_is_found_reported_and_rewritten(ray_local, mixed, tmp_path, caplog):
    _, manifest, _ = mixed
    out = tmp_path / "cache"
    first = write_cache(manifest, out, model="tiny", shard_seconds=5.0)
    shard = out / "shards" / "00001.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated (a disk filled up, a copy cut short)
    with pytest.raises(SpeechSSLError, match=r"shards/00001.arrow is \d+ bytes, \d+ written.*speech-ssl cache"):
        read_source(str(out))

    with caplog.at_level("WARNING", logger="speech_ssl"):
        again = write_cache(manifest, out, model="tiny", shard_seconds=5.0)
    assert again["written_shards"] == 1 and "shard 00001 is damaged" in caplog.text
    assert shard.read_bytes() == data
    assert len(read_source(str(out))) == first["rows"]

    # An interrupted run (a shard never finished: no sidecar) is resumed, the rest is kept.
    (out / "shards" / "00002.json").unlink()
    (out / "cache.json").unlink()
    with pytest.raises(SpeechSSLError, match="unfinished cache"):
        read_source(str(out))
    assert write_cache(manifest, out, model="tiny", shard_seconds=5.0)["written_shards"] == 1
    assert len(read_source(str(out))) == first["rows"]


def test_refuses_other_versions_other_features_and_other_inputs(ray_local, mixed, tmp_path):
    root, manifest, _ = mixed
    out = tmp_path / "cache"
    write_cache(manifest, out, model="tiny")
    rows = read_source(str(out))
    with pytest.raises(SpeechSSLError, match=r"kind 'waveform' \(needed: 'fbank'\)"):
        BatchStream(rows, DataConfig(), FBANK, "pad", use_ray=False)
    with pytest.raises(SpeechSSLError, match=r"sample_rate 16000 \(needed: 8000\)"):
        BatchStream(rows, DataConfig(sample_rate=8000), FeatureSpec("waveform", sample_rate=8000), "pad",
                    use_ray=False)

    meta = json.loads((out / "cache.json").read_text())
    (out / "cache.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(SpeechSSLError, match="cache format 'speech-ssl-cache' version 99; this version reads"):
        read_source(str(out))
    (out / "cache.json").write_text(json.dumps(meta))

    other = make_corpus(root, n=3, split="other")
    with pytest.raises(SpeechSSLError, match="holds a cache of another input"):
        write_cache(other, out, model="tiny")
    with pytest.raises(SpeechSSLError, match="holds a cache of another input"):
        write_cache(manifest, out, model="fbank-tiny")
    with pytest.raises(SpeechSSLError, match="cannot take as input"):
        write_cache(out, tmp_path / "cache_of_cache", model="tiny")


def test_cache_on_a_filesystem_uri(ray_local, mixed, tmp_path):
    _, manifest, _ = mixed
    uri = f"file://{tmp_path}/uri_cache"
    write_cache(manifest, uri, model="tiny", shard_seconds=5.0)
    by_uri, by_path = read_source(uri), read_source(str(tmp_path / "uri_cache"))
    assert all(u.path.startswith("file://") for u in by_uri)
    for x, y in zip(batches(by_uri, WAVE), batches(by_path, WAVE)):
        assert x.ids == y.ids and torch_equal(x.inputs, y.inputs)


@pytest.mark.timeout(60)
def test_an_unreachable_object_store_fails_within_seconds(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = "s3://speech-ssl-no-such-bucket/cache"
    started = time.monotonic()
    with pytest.raises(SpeechSSLError) as err:
        read_source(uri)
    assert uri in str(err.value)
    assert time.monotonic() - started < REACH_TIMEOUT_S + 5


@pytest.mark.timeout(420)
@pytest.mark.slow
def test_stages_read_a_cache(ray_local, tmp_path):
    """pretrain and embed on a waveform cache, finetune and evaluate on an fbank cache, from the command line."""
    corpus = make_corpus(tmp_path, n=8, split="unlabeled")
    assert main(["cache", f"input={corpus}", f"output={tmp_path / 'wave_cache'}", "model=tiny"]) == 0
    pretrained = tmp_path / "pt"
    assert main(["pretrain", f"output_dir={pretrained}", "model=tiny", f"data.train={tmp_path / 'wave_cache'}",
                 "data.batch_seconds=4", "data.crop_duration=1.0", "trainer.num_workers=0", "trainer.max_updates=2",
                 "trainer.log_every=1", "trainer.checkpoint_every=2"]) == 0
    train_log = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("split") == "train" and np.isfinite(r["loss"]) for r in train_log)
    embedded = tmp_path / "emb"
    assert main(["embed", f"checkpoint={pretrained / 'last'}", f"input={tmp_path / 'wave_cache'}",
                 f"output={embedded}", "progress_seconds=0"]) == 0
    assert sorted(pq.read_table(embedded).column("id").to_pylist()) == sorted(u.id for u in read_source(str(corpus)))

    words = toy_words(6, seed=3)
    train = make_toy_asr_corpus(tmp_path, n=12, seed=0, split="train", words=words)
    assert main(["cache", f"input={train}", f"output={tmp_path / 'fbank_cache'}", "model=fbank-tiny"]) == 0
    tuned = tmp_path / "ft"
    assert main(["finetune", f"output_dir={tuned}", "init=none", "model=fbank-tiny",
                 f"data.train={tmp_path / 'fbank_cache'}", f"data.valid={tmp_path / 'fbank_cache'}",
                 "data.batch_seconds=6", "trainer.num_workers=0", "trainer.max_updates=2",
                 "trainer.checkpoint_every=2", "ctc.freeze_updates=0"]) == 0
    assert main(["evaluate", f"checkpoint={tuned / 'best'}", f"data.test={tmp_path / 'fbank_cache'}"]) == 0
    # A cache for one model does not feed another.
    assert main(["evaluate", f"checkpoint={tuned / 'best'}", f"data.test={tmp_path / 'wave_cache'}"]) == 1
    assert os.path.exists(tuned / "best")
