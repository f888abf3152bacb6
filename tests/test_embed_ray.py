"""``speech-ssl embed`` end to end on a local Ray (one Ray for the module).

Generated corpora in several formats and rates with a zoo of broken files; a layer-norm model (``tiny``)
through the command line and a group-norm model through the Python API (its actor holding two shards at
once, as GPU actors do). The Parquet output is read back
by pyarrow and pandas in a process where neither speech_ssl nor ray can be imported, and by Ray Data.
Every stored embedding equals the utterance embedded alone (1e-4), so batching changed nothing. Resuming:
a run after a shard was lost (and an unfinished temporary file left behind) redoes only that shard's
utterances and leaves every other shard untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from audio_factory import make_corpus, make_format_corpus, make_mixed_manifest
from speech_ssl.cli import main
from speech_ssl.data import DataConfig, decode_utterance, read_source
from speech_ssl.embed import Embedder
from speech_ssl.embed import shards as shard_io
from speech_ssl.errors import SpeechSSLError
from speech_ssl.models import build, save_model
from speech_ssl.stages.embed import Config, run
from speech_ssl.data.model_inputs import feature_spec_for

# The embed stage end to end on Ray (slow); its parts (the embedder, shard tables, scans) are test_embed.py's.
pytestmark = pytest.mark.slow
TOL = 1e-4
LAYERS = [0, 2, 4]  # asked as [0,2,-1] of the 4-layer tiny model


def shard_paths(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if shard_io.SHARD_PATTERN.match(p.name))


def rows_by_key(out: Path) -> dict[tuple[str, int], dict]:
    table = pq.read_table(out)
    return {(r["id"], r["layer"]): r for r in table.to_pylist()}


def reference(checkpoint: Path, listing: str, layers, pooling: str) -> dict[str, dict[int, np.ndarray]]:
    """Every decodable utterance embedded alone (batch of one, no padding)."""
    embedder = Embedder.from_checkpoint(str(checkpoint), layers=layers, pooling=pooling, precision="fp32")
    spec = feature_spec_for(embedder.config)
    refs = {}
    for utt in read_source(listing):
        try:
            wave = decode_utterance(utt, spec)
        except Exception:
            continue
        refs[utt.id] = embedder(torch.from_numpy(wave)[None])[0]
    return refs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_corpus")
    _, bad = make_mixed_manifest(root, good=6)
    make_format_corpus(root, seconds=1.0)
    listing = root / "inputs.txt"
    listing.write_text("mixed.jsonl\nformats.jsonl\n")
    return root, listing, bad


@pytest.fixture(scope="module")
def tiny_run(ray_local, corpus):
    root, listing, _ = corpus
    torch.manual_seed(0)
    save_model(build("tiny"), root / "tiny")
    out = root / "out_tiny"
    code = main(["embed", f"checkpoint={root / 'tiny'}", f"input={listing}", f"output={out}", "layers=[0,2,-1]",
                 "pooling=none", "shard_seconds=6", "data.batch_seconds=8", "progress_seconds=0",
                 "precision=fp32"])  # exact comparisons: auto is bf16 on CPUs with native bf16
    assert code == 0
    return root, listing, out


@pytest.mark.timeout(180)
def test_layer_norm_model_end_to_end(tiny_run, corpus, ray_local):
    root, listing, out = tiny_run
    _, _, bad = corpus
    summary = json.loads((out / "_summary.json").read_text())
    counts = summary["counts"]
    assert counts["read"] == 6 + 12 + 13
    assert counts["read"] == counts["used"] + counts["quarantined"] + counts["filtered"]
    assert (counts["used"], counts["quarantined"], counts["filtered"]) == (19, 12, 0)
    assert summary["layers"] == LAYERS and summary["pooling"] == "none"
    assert 0 < summary["this_run"]["padding_waste"] < 0.1  # batches were padded, and little
    assert summary["this_run"]["audio_seconds_per_second"] > 0
    assert len(shard_paths(out)) >= 3 and sorted(summary["shards"]) == [p.name for p in shard_paths(out)]

    # Quarantine report: every broken file with its reason.
    entries = [json.loads(line) for line in (out / "_quarantine.jsonl").read_text().splitlines()]
    reasons = {e["path"].split(str(root) + "/", 1)[-1]: e["reason"] for e in entries}
    assert reasons == bad

    # Each good utterance: one row per layer, [frames, dim], equal to the utterance embedded alone.
    refs = reference(root / "tiny", str(listing), LAYERS, "none")
    assert len(refs) == 19
    rows = rows_by_key(out)
    assert len(rows) == 19 * 3
    for utt_id, ref in refs.items():
        for layer in LAYERS:
            row = rows[(utt_id, layer)]
            got = np.asarray(row["embedding"], dtype=np.float32)
            assert got.shape == ref[layer].shape and row["frames"] == got.shape[0]
            assert np.abs(got - ref[layer]).max() < TOL, (utt_id, layer)
    paths = {r["path"] for r in rows.values()}  # as given in the manifests
    assert "good/utt000.flac" in paths and "formats/mp3_44100_2ch.mp3" in paths

    # Ray Data reads the folder too.
    import ray

    assert ray.data.read_parquet(str(out)).count() == 19 * 3


@pytest.mark.timeout(60)
def test_output_reads_with_pyarrow_and_pandas_alone(tiny_run):
    _, _, out = tiny_run
    script = (
        "import sys\n"
        "sys.modules['speech_ssl'] = None; sys.modules['ray'] = None\n"  # neither can be imported
        "import numpy as np, pandas as pd, pyarrow.parquet as pq\n"
        f"t = pq.read_table({str(out)!r})\n"
        "first = np.stack(t['embedding'][0].as_py())\n"
        f"df = pd.read_parquet({str(out)!r})\n"
        "print(t.num_rows, first.shape[1], first.shape[0] == t['frames'][0].as_py(), len(df),"
        " sorted(int(x) for x in set(df['layer'])))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "57 256 True 57 [0, 2, 4]"


@pytest.mark.timeout(180)
def test_group_norm_model_mean_pooling(ray_local, tmp_path):
    make_corpus(tmp_path, n=8, min_seconds=0.5, max_seconds=2.0, fmt="wav", split="audio")
    torch.manual_seed(1)
    model = build("tiny", conv_norm="group", conv_bias=False, layer_norm_first=False, normalize_waveform=False)
    save_model(model, tmp_path / "group")
    cfg = Config(checkpoint=str(tmp_path / "group"), input=str(tmp_path / "audio"), output=str(tmp_path / "out"),
                 layers=[1, -1], pooling="mean", shard_seconds=3, concurrent_shards=2, precision="fp32",
                 data=DataConfig(shuffle=False, batch_seconds=6, bucket_width=0.5))
    summary = run(cfg)
    assert summary["counts"]["used"] == 8 and summary["this_run"]["padding_waste"] > 0
    assert summary["this_run"]["shards_written"] >= 2  # written while the actor computed the next one
    frames = reference(tmp_path / "group", str(tmp_path / "audio"), [1, 4], "none")
    rows = rows_by_key(tmp_path / "out")
    assert len(rows) == 16
    for utt_id, ref in frames.items():
        for layer in (1, 4):
            row = rows[(utt_id, layer)]
            got = np.asarray(row["embedding"], dtype=np.float32)
            assert got.shape == (256,) and row["frames"] == ref[layer].shape[0]
            assert np.abs(got - ref[layer].mean(axis=0)).max() < TOL, (utt_id, layer)


@pytest.mark.timeout(180)
def test_resume_redoes_only_the_lost_shard(tiny_run, tmp_path):
    root, listing, original = tiny_run
    out = tmp_path / "out"
    shutil.copytree(original, out)
    before = rows_by_key(out)
    shards = shard_paths(out)
    victim = shards[1]
    lost = set(pq.read_table(victim, columns=["id"]).column("id").to_pylist())
    # The shard is gone, but a whole copy of it lies under an unfinished temporary name.
    leftover = out / f".{victim.name}.tmp-0123456789ab"
    victim.rename(leftover)
    untouched = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_paths(out)}

    cfg = Config(checkpoint=str(root / "tiny"), input=str(listing), output=str(out), layers=[0, 2, -1],
                 pooling="none", shard_seconds=6, batching="exact", precision="fp32",
                 data=DataConfig(shuffle=False, batch_seconds=8))
    summary = run(cfg)
    counts = summary["counts"]
    assert counts["embedded_this_run"] == len(lost)
    assert counts["already_embedded"] == 19 - len(lost)
    assert counts["read"] == counts["used"] + counts["quarantined"] + counts["filtered"] == 31
    assert not leftover.exists()
    now = {p.name: p for p in shard_paths(out)}
    for name, stat in untouched.items():
        assert (now[name].stat().st_ino, now[name].stat().st_mtime_ns) == stat
    new = sorted(set(now) - set(untouched))
    assert new and all(name.startswith("part-r002-") for name in new)
    assert set(pq.read_table(out / new[0], columns=["id"]).column("id").to_pylist()) <= lost
    after = rows_by_key(out)
    assert set(after) == set(before)
    for key in after:
        a = np.asarray(after[key]["embedding"], np.float32)
        assert np.abs(a - np.asarray(before[key]["embedding"], np.float32)).max() < TOL
    assert len(summary["runs"]) == 2

    # Nothing left to do: no shard written, no Ray work.
    again = run(cfg)
    assert again["counts"]["embedded_this_run"] == 0 and again["this_run"]["shards_written"] == 0
    assert sorted(now) == [p.name for p in shard_paths(out)]

    # Another configuration never mixes into this output.
    with pytest.raises(SpeechSSLError, match="another configuration"):
        run(Config(checkpoint=str(root / "tiny"), input=str(listing), output=str(out), layers=[1], pooling="none"))
