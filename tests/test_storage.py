"""Outputs on a filesystem URI that is not a local path: a local S3 server (moto), read back through pyarrow.

``speech_ssl.storage`` on its own (atomic writes, trees, listing), then, on two simulated Ray nodes, a tiny
pretraining with 2 workers and a tiny embedding whose outputs must all be found under ``s3://`` afterwards:
checkpoints complete and loadable, metrics and curves, configs and summaries, Parquet rows complete and
unduplicated; and a resume from the URI alone (the driver's local work folder deleted in between).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from audio_factory import make_corpus, make_mixed_manifest, make_toy_asr_corpus, toy_words
from speech_ssl import storage

BUCKET = "speech-ssl-test"
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free port; the AWS_* variables point pyarrow (and Ray's workers, which inherit
    the driver's environment) at it. Yields the bucket's URI."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage._filesystem.cache_clear()
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="testing",
                      secret_key="testing", region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
    yield f"s3://{BUCKET}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._filesystem.cache_clear()
    server.stop()


def s3fs_and_path(uri: str):
    fs, path = pafs.FileSystem.from_uri(uri)  # plain pyarrow, not our module: what any reader would do
    assert fs.type_name == "s3"
    return fs, path


def all_files(uri: str) -> list[str]:
    fs, path = s3fs_and_path(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


# --------------------------------------------------------------------------------------------------
# The module on its own


def test_storage_writes_reads_and_lists_on_s3_and_local(s3, tmp_path):
    base = f"{s3}/unit"
    storage.write_text(storage.join(base, "a/b.json"), '{"x": 1}')
    assert json.loads(storage.read_text(f"{base}/a/b.json")) == {"x": 1}
    storage.write_text(f"{base}/a/b.json", '{"x": 2}')  # replaced whole
    assert storage.read_text(f"{base}/a/b.json") == '{"x": 2}'
    assert storage.is_dir(f"{base}/a") and storage.is_file(f"{base}/a/b.json") and not storage.exists(f"{base}/zz")
    local = tmp_path / "tree"
    (local / "sub").mkdir(parents=True)
    (local / "one.txt").write_text("1")
    (local / "sub" / "two.bin").write_bytes(b"\x00" * 70_000)
    storage.put_tree(local, f"{base}/tree")
    assert all_files(f"{base}/tree") == ["one.txt", "sub/two.bin"]  # no temporary objects left behind
    storage.copy_tree(f"{base}/tree", f"{base}/copy")
    back = tmp_path / "back"
    storage.get_tree(f"{base}/copy", back)
    assert (back / "sub" / "two.bin").read_bytes() == b"\x00" * 70_000 and (back / "one.txt").read_text() == "1"
    assert [i.base_name for i in storage.listdir(f"{base}/tree")] == ["one.txt", "sub"]
    storage.delete_dir(f"{base}/copy")
    assert all_files(f"{base}/copy") == []
    # Local paths: the same calls; a write goes through a temporary name that does not survive.
    storage.write_text(tmp_path / "loc" / "f.txt", "hello")
    assert os.listdir(tmp_path / "loc") == ["f.txt"] and (tmp_path / "loc" / "f.txt").read_text() == "hello"
    assert storage.name_of(f"{s3}/runs/pt/") == "pt" and storage.parent_of(f"{s3}/runs/pt") == f"{s3}/runs"


def test_fetched_downloads_a_uri_once_per_content_and_races_safely(s3, tmp_path, monkeypatch):
    """What a Ray Train worker or an embed actor does with ``init=s3://...``/``checkpoint=s3://...``: a
    local copy made once per node and content, even when several processes ask at the same moment."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("SPEECH_SSL_WORK_DIR", str(tmp_path / "work"))
    assert storage.fetched(tmp_path / "here") == tmp_path / "here"  # local paths pass through
    src = f"{s3}/fetch/best"
    storage.write_text(f"{src}/config.json", '{"a": 1}')
    storage.write_bytes(f"{src}/model.safetensors", b"w" * 50_000)
    with ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda _: storage.fetched(src), range(4)))
    assert len(set(copies)) == 1 and copies[0].name == "best", copies
    first = copies[0]
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "model.safetensors"]
    assert (first / "model.safetensors").read_bytes() == b"w" * 50_000
    assert not [p for p in (tmp_path / "work" / "fetched").iterdir() if ".tmp-" in p.name]  # losers cleaned up
    stamp = (first / "config.json").stat().st_mtime_ns
    assert storage.fetched(src) == first and (first / "config.json").stat().st_mtime_ns == stamp  # reused
    storage.write_text(f"{src}/config.json", '{"a": 22}')  # new content: a new copy
    second = storage.fetched(src)
    assert second != first and (second / "config.json").read_text() == '{"a": 22}'
    assert storage.fetched(f"{src}/config.json").read_text() == '{"a": 22}'  # a single file too
    with pytest.raises(FileNotFoundError, match="nothing at"):
        storage.fetched(f"{s3}/fetch/missing")


def test_a_failed_write_keeps_the_previous_file(s3, tmp_path):
    for target in (f"{s3}/fail/x.txt", str(tmp_path / "x.txt")):
        storage.write_text(target, "old")
        with pytest.raises(Exception):
            storage.put_file(tmp_path / "missing-source", target)
        assert storage.read_text(target) == "old"
    assert all_files(f"{s3}/fail") == ["x.txt"]
    assert sorted(os.listdir(tmp_path)) == ["x.txt"]


def test_checkpoint_upload_is_complete_only_with_its_marker(s3, tmp_path):
    from speech_ssl.train import checkpoint as ckpt

    d = tmp_path / "checkpoint_00000002"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"m" * 100)
    (d / "rank_00000.safetensors").write_bytes(b"r")
    root = f"{s3}/ckpts"
    storage.put_tree(d, f"{root}/checkpoint_00000002")  # no marker: never picked up
    assert ckpt.latest_complete(root) is None
    marker = {"updates": 2, "world_size": 1, "files": {"model.safetensors": 100}}
    (d / ckpt.MARKER).write_text(json.dumps(marker))
    ckpt.upload(d, f"{root}/checkpoint_00000004")
    assert ckpt.latest_complete(root) == f"{root}/checkpoint_00000004"
    marker["files"]["model.safetensors"] = 101  # a size that disagrees: incomplete
    storage.write_text(f"{root}/checkpoint_00000004/{ckpt.MARKER}", json.dumps(marker))
    assert ckpt.latest_complete(root) is None


# --------------------------------------------------------------------------------------------------
# Two simulated nodes, outputs on s3://


@pytest.fixture(scope="module")
def two_nodes(s3):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 << 20})
    cluster.add_node(num_cpus=1, object_store_memory=150 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_pretrain_on_two_nodes_writes_everything_to_s3_and_resumes_from_it(s3, two_nodes, tmp_path, monkeypatch):
    from speech_ssl.models import load
    from speech_ssl.runtime import RayConfig
    from speech_ssl.stages import pretrain
    from speech_ssl.train import checkpoint as ckpt
    from speech_ssl.train.config import OptimConfig, TrainerConfig

    work = tmp_path / "driver-work"
    monkeypatch.setenv("SPEECH_SSL_WORK_DIR", str(work))
    train = make_corpus(tmp_path / "corpus", n=10, min_seconds=1.2, max_seconds=2.0, split="train")
    out = f"{s3}/runs/pt"

    def config(max_updates: int) -> pretrain.Config:
        return pretrain.Config(
            output_dir=out,
            data=pretrain.PretrainDataConfig(train=str(train), batch_seconds=4.0, crop_duration=1.2,
                                             num_cpus_per_reader=0.5),
            model="tiny",
            trainer=TrainerConfig(num_workers=2, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD",
                                  max_updates=max_updates, log_every=1, checkpoint_every=2, validate_every=0,
                                  optim=OptimConfig(lr=5e-4, schedule="constant")),
            ray=RayConfig(),
        )

    summary = pretrain.run(config(4))
    assert summary["updates"] == 4 and len(set(summary["worker_nodes"])) == 2, summary
    files = all_files(out)
    for name in ("pretrain_config.json", "train_summary.json", "metrics.jsonl", "curves.png",
                 "last/model.safetensors", "last/config.json", "best/model.safetensors",
                 "checkpoint_00000004/COMPLETE.json", "checkpoint_00000004/rank_00001.safetensors"):
        assert name in files, (name, files)
    assert not [f for f in files if ".tmp" in f], files  # nothing half-written left behind
    assert not [f for f in files if f.startswith("last/") and ("optimizer" in f or "rank_" in f)]
    assert ckpt.latest_complete(out) == f"{out}/checkpoint_00000004"
    fs, path = s3fs_and_path(out)
    with fs.open_input_stream(f"{path}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f.read().decode().splitlines()]
    assert sorted(r["update"] for r in records if r["split"] == "train") == [1, 2, 3, 4]
    assert json.loads(storage.read_text(f"{out}/train_summary.json"))["updates"] == 4
    model = load(ckpt.download(f"{out}/last", tmp_path / "last"))  # the model loads from what S3 holds
    assert type(model).__name__ == "Wav2Vec2ForPreTraining"

    # A fresh driver (no local work folder): resumes from the newest complete checkpoint on S3.
    import shutil

    shutil.rmtree(work)
    summary = pretrain.run(config(6))
    assert summary["updates"] == 6 and summary["resumes"] >= 1, summary
    with fs.open_input_stream(f"{path}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f.read().decode().splitlines()]
    assert sorted(r["update"] for r in records if r["split"] == "train") == [1, 2, 3, 4, 5, 6]  # continued
    assert ckpt.latest_complete(out) == f"{out}/checkpoint_00000006"
    state = json.loads(storage.read_text(f"{out}/checkpoint_00000006/trainer_state.json"))
    assert state["updates"] == 6 and state["resumes"] == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_embed_on_two_nodes_writes_complete_unduplicated_shards_to_s3(s3, two_nodes, tmp_path):
    import torch

    from speech_ssl.models import build, save_model
    from speech_ssl.runtime import RayConfig
    from speech_ssl.stages import embed

    manifest, bad = make_mixed_manifest(tmp_path, good=6)
    torch.manual_seed(0)
    save_model(build("tiny"), tmp_path / "tiny")
    out = f"{s3}/emb"
    cfg = embed.Config(checkpoint=str(tmp_path / "tiny"), input=str(manifest), output=out, layers=[0, -1],
                       pooling="mean", shard_seconds=3, progress_seconds=0, precision="fp32", num_actors=2,
                       actor_cpus=0.5, ray=RayConfig())
    summary = embed.run(cfg)
    files = all_files(out)
    assert "_summary.json" in files and not [f for f in files if ".tmp" in f], files
    shards = [f for f in files if f.startswith("part-") and f.endswith(".parquet")]
    assert len(shards) >= 2, files
    fs, path = s3fs_and_path(out)
    ids = []
    for name in shards:
        table = pq.read_table(f"{path}/{name}", filesystem=fs)
        ids += list(zip(table.column("id").to_pylist(), table.column("layer").to_pylist()))
    used = json.loads(storage.read_text(f"{out}/_summary.json"))["counts"]
    assert len(ids) == len(set(ids)), "duplicated rows"
    utterances = {i for i, _ in ids}
    assert len(ids) == 2 * len(utterances)  # both layers of every utterance
    assert len(utterances) >= 6 and not utterances & {Path(p).stem for p in bad}, (utterances, bad)
    assert summary["counts"] == used
    # A re-run adds nothing: every row is found under the URI.
    again = embed.run(cfg)
    assert again["counts"].get("embedded_this_run", 0) == 0, again["counts"]
    assert [f for f in all_files(out) if f.startswith("part-")] == shards


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_on_two_nodes_publishes_every_stage_to_s3_and_a_fresh_head_skips_them(s3, two_nodes, tmp_path,
                                                                                   monkeypatch):
    """``speech-ssl run output_dir=s3://...``: the stages that read an earlier stage's output (fine-tuning
    workers spread over both nodes, evaluation, the embed actors) read it from the URI, embeddings go
    straight there, and a driver with no local work folder finds everything finished."""
    import shutil

    from speech_ssl.cli import main
    from test_pipeline import _args

    words = toy_words(6, seed=2)
    corpus = {"unlabeled": make_corpus(tmp_path / "c", n=6, min_seconds=1.2, max_seconds=2.0, split="unlabeled"),
              "train": make_toy_asr_corpus(tmp_path / "c", n=6, seed=0, split="train", words=words),
              "valid": make_toy_asr_corpus(tmp_path / "c", n=2, seed=1, split="valid", words=words),
              "test": make_toy_asr_corpus(tmp_path / "c", n=2, seed=2, split="test", words=words)}
    work = tmp_path / "driver-work"
    monkeypatch.setenv("SPEECH_SSL_WORK_DIR", str(work))
    out = f"{s3}/runs/all"
    spread = ["finetune.trainer.num_workers=2", "finetune.trainer.cpus_per_worker=0.5",
              "finetune.trainer.placement_strategy=STRICT_SPREAD", "finetune.data.num_cpus_per_reader=0.5",
              "pretrain.trainer.max_updates=4", "embed.num_actors=2", "embed.actor_cpus=0.5"]
    args = [a for a in _args(corpus, Path(out), *spread) if not a.startswith("ray.")]
    args = [f"output_dir={out}" if a.startswith("output_dir=") else a for a in args]
    assert main(args) == 0

    files = all_files(out)
    for name in ("summary.json", "summary.md", "pretrain/best/model.safetensors", "finetune/best/vocab.json",
                 "evaluate/results.json", "embed/_summary.json", "pretrain/checkpoint_00000004/COMPLETE.json",
                 *(f"{stage}/stage.json" for stage in ("prepare", "pretrain", "finetune", "evaluate", "embed"))):
        assert name in files, (name, files)
    assert [f for f in files if f.startswith("embed/part-") and f.endswith(".parquet")], files
    assert not [f for f in files if ".tmp" in f], files
    records = {stage: json.loads(storage.read_text(f"{out}/{stage}/stage.json"))
               for stage in ("finetune", "evaluate", "embed")}
    assert all(r["status"] == "done" for r in records.values()), records
    wired = {"finetune.init": records["finetune"]["config"]["init"],
             "evaluate.checkpoint": records["evaluate"]["config"]["checkpoint"],
             "embed.checkpoint": records["embed"]["config"]["checkpoint"],
             "embed.output": records["embed"]["config"]["output"]}
    assert wired == {"finetune.init": f"{out}/pretrain/best", "evaluate.checkpoint": f"{out}/finetune/best",
                     "embed.checkpoint": f"{out}/pretrain/best", "embed.output": f"{out}/embed"}, wired
    assert len(set(records["finetune"]["result"]["worker_nodes"])) == 2, records["finetune"]["result"]
    assert not list(work.rglob("*.parquet"))  # the embedding never went through the driver's disk

    shutil.rmtree(work)  # a fresh head: everything it needs is on S3
    assert main(args) == 0
    summary = json.loads(storage.read_text(f"{out}/summary.json"))
    assert {row["stage"]: row["status"] for row in summary["stages"]} == {
        "prepare": "skipped", "pretrain": "skipped", "finetune": "skipped", "evaluate": "skipped",
        "embed": "skipped"}, summary["stages"]
