"""The Ray Data path: identical batches to the in-process path, and no starvation inside Train-like workers.

The longer Ray Data runs are slow-marked (make test); test-fast keeps the short ones (a stream on Ray inside a
task with fractional CPUs, the scheduling loop's process)."""

from __future__ import annotations

import pytest
import torch

from audio_factory import make_corpus, make_mixed_manifest
from speech_ssl.data import BatchStream, DataConfig, FeatureSpec, TextNormalizer, Vocabulary, read_source

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    manifest, expected = make_mixed_manifest(tmp_path_factory.mktemp("mixed"), good=10, labeled=True)
    return read_source(str(manifest)), expected


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.ids, x.paths, x.texts, x.position, x.epoch, x.quarantined) == \
               (y.ids, y.paths, y.texts, y.position, y.epoch, y.quarantined)
        assert torch.equal(x.inputs, y.inputs) and torch.equal(x.lengths, y.lengths)
        assert (x.targets is None) == (y.targets is None)
        if x.targets is not None:
            assert torch.equal(x.targets, y.targets) and torch.equal(x.target_lengths, y.target_lengths)
        assert x.audio_seconds == y.audio_seconds and x.padded_seconds == y.padded_seconds


@pytest.mark.slow
def test_ray_and_in_process_paths_give_identical_batches(ray_local, mixed):
    utts, expected = mixed
    norm = TextNormalizer()
    vocab = Vocabulary.build([u.text for u in utts], norm)
    cases = [
        (FeatureSpec("waveform", normalize=True), "crop", dict(crop_duration=1.2), {}),
        (FeatureSpec("fbank", normalize=True), "pad", {}, dict(vocab=vocab, normalizer=norm)),
    ]
    for spec, mode, cfg_extra, kwargs in cases:
        cfg = DataConfig(batch_seconds=6, **cfg_extra)
        on_ray = BatchStream(utts, cfg, spec, mode, seed=4, use_ray=True, **kwargs)
        local = BatchStream(utts, cfg, spec, mode, seed=4, use_ray=False, **kwargs)
        _same(list(on_ray.iter_epoch(2)), list(local.iter_epoch(2)))
        assert on_ray.report.to_dict() == local.report.to_dict()
        assert on_ray.report.quarantined == len(expected) and on_ray.report.used == 10
        # Resuming on Ray gives the tail of the same epoch.
        full = list(local.iter_epoch(3))
        _same(list(on_ray.iter_epoch(3, start=2)), [b for b in full if b.position >= 2])


@pytest.mark.slow
def test_streams_inside_fractional_cpu_workers_do_not_starve(ray_local, tmp_path):
    """Two Train-like actors at 0.5 CPU each on 2 CPUs, each reading its shard through Ray Data."""
    import ray

    manifest = make_corpus(tmp_path, n=12, min_seconds=0.5, max_seconds=1.5, fmt="flac")

    @ray.remote(num_cpus=0.5)
    class Worker:
        def read(self, rank, world_size):
            utts = read_source(str(manifest))
            stream = BatchStream(utts, DataConfig(batch_seconds=3), FeatureSpec("fbank"), "pad", rank=rank,
                                 world_size=world_size, use_ray=True)
            return [i for epoch in (0, 1) for b in stream.iter_epoch(epoch) for i in b.ids]

    workers = [Worker.remote() for _ in range(2)]
    ids = ray.get([w.read.remote(r, 2) for r, w in enumerate(workers)], timeout=150)
    assert sorted(ids[0] + ids[1]) == sorted(2 * [u.id for u in read_source(str(manifest))])
    for w in workers:
        ray.kill(w)


def test_reader_cpus_are_clamped_to_what_the_worker_leaves(ray_local, tmp_path):
    """A worker holding 1.5 of 2 CPUs asks decode tasks for 0.5 CPU instead of hanging on 1."""
    import ray

    manifest = make_corpus(tmp_path, n=4, min_seconds=0.5, max_seconds=1.0)

    @ray.remote(num_cpus=1.5)
    def read():
        stream = BatchStream(read_source(str(manifest)), DataConfig(batch_seconds=100), FeatureSpec("waveform"),
                             "pad", use_ray=True)
        return sum(len(b) for b in stream.iter_epoch(0))

    assert ray.get(read.remote(), timeout=120) == 4


def test_a_planned_stream_sizes_its_tasks_from_the_plan_not_from_what_its_caller_holds(ray_local, tmp_path):
    """Two workers at 0.5 CPU on 2 CPUs: the driver's plan leaves 1 CPU to decoding, shared by two streams."""
    import ray

    from speech_ssl.data.read_plan import ReadPlan
    from speech_ssl.data.stream import reader_cpus

    plan = ReadPlan(task_cpus=0.5, training_cpus=1.0, streams=2)
    assert reader_cpus(1.0, plan) == (0.5, 0.5)
    manifest = make_corpus(tmp_path, n=4, min_seconds=0.5, max_seconds=1.0)

    @ray.remote(num_cpus=0.5)
    def read():
        stream = BatchStream(read_source(str(manifest)), DataConfig(batch_seconds=2), FeatureSpec("waveform"),
                             "pad", use_ray=True, read_plan=plan)
        return sum(len(b) for b in stream.iter_epoch(0))

    assert ray.get(read.remote(), timeout=120) == 4


def test_the_scheduling_loop_runs_outside_the_consuming_process(ray_local, mixed):
    """Ray Data's executor thread would share the GIL with a training thread (an update took 2x as long)."""
    import threading

    utts, _ = mixed
    stream = BatchStream(utts, DataConfig(batch_seconds=3), FeatureSpec("waveform"), "pad", use_ray=True)
    seen = []
    for batch in stream.iter_epoch(0):
        seen.append(len(batch))
        names = [t.name for t in threading.enumerate()]
        assert not [n for n in names if n.startswith("StreamingExecutor")], names
    assert sum(seen) == 10


@pytest.mark.slow
def test_one_helper_actor_serves_every_epoch_and_an_abandoned_epoch_leaks_nothing(ray_local, mixed):
    """A helper process per epoch cost seconds per epoch and per validation pass; one per stream does not."""
    from ray._private.state import actors  # the GCS actor table (the state API needs the dashboard)

    utts, _ = mixed
    cfg = DataConfig(batch_seconds=2)
    local = BatchStream(utts, cfg, FeatureSpec("waveform"), "pad", seed=1, use_ray=False)
    stream = BatchStream(utts, cfg, FeatureSpec("waveform"), "pad", seed=1, use_ray=True)
    list(BatchStream(utts, cfg, FeatureSpec("waveform"), "pad", use_ray=True).iter_epoch(0))  # Ray Data's own actors
    before = set(actors())
    first = stream.iter_epoch(0)
    next(first)  # the consumer leaves epoch 0 after one batch (a run that reached max_updates)
    first.close()
    for epoch in (1, 2, 3):
        _same(list(stream.iter_epoch(epoch)), list(local.iter_epoch(epoch)))
    created = [info for actor_id, info in actors().items() if actor_id not in before]
    assert len(created) == 1, [info.get("ActorClassName") for info in created]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_stream_whose_decode_tasks_cannot_start_fails_naming_what_is_pending(ray_local, tmp_path):
    """Every CPU held elsewhere (here an actor; in the issue, training workers): an error, not a silent wait."""
    import time

    import ray

    from speech_ssl.errors import SpeechSSLError

    manifest = make_corpus(tmp_path, n=4, min_seconds=0.5, max_seconds=1.0)

    @ray.remote(num_cpus=2)
    class Hog:
        def ready(self):
            return True

    hog = Hog.remote()
    ray.get(hog.ready.remote(), timeout=60)
    try:
        stream = BatchStream(read_source(str(manifest)), DataConfig(batch_seconds=2, stall_timeout_s=5),
                             FeatureSpec("waveform"), "pad", use_ray=True)
        started = time.monotonic()
        with pytest.raises(SpeechSSLError) as err:
            list(stream.iter_epoch(0))
        assert time.monotonic() - started < 60
    finally:
        ray.kill(hog)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("no batch arrived for 5 s")
    # The feeder's state: asked to start, no block yet (on a loaded machine its start may not have run yet,
    # or it may not answer the state query in time: then the message says so).
    assert any(s in text for s in ("waiting for its first block, 0 blocks delivered", "idle, 0 blocks delivered",
                                   "its feeder did not answer")), text
    assert "0 of 2 CPUs" in text and "one decode task asks for 1 CPU" in text
    assert "data.stall_timeout_s" in text and "trainer.cpus_per_worker" in text
