"""``speech-ssl embed``: batch-embed a corpus into Parquet shards with a Ray Data actor pool.

See :mod:`speech_ssl.embed.pipeline` for the path of data and :mod:`speech_ssl.embed.shards` for the
table layout. A re-run into the same output embeds only what its finished shards lack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from speech_ssl.data.config import DataConfig
from speech_ssl.precision import precision_field
from speech_ssl.runtime import RayConfig


def _embed_data() -> DataConfig:
    # Batches in length order (no shuffling needed), so neighbouring lengths share a batch.
    return DataConfig(shuffle=False)


@dataclass
class Config:
    """checkpoint: ours, a transformers directory or a fairseq .pt file. input: a directory, manifest or list.
    output: the folder of Parquet shards (plus _summary.json and _quarantine.jsonl).
    layers: transformers' hidden_states numbering (0: the context network's input, i: layer i's output;
        negative from the end, -1 the last). No layer past the deepest requested one is computed.
    pooling: none (frame-level [frames, dim]) | mean ([dim], over valid frames).
    dtype: of the stored embeddings.
    precision: auto (bf16 autocast on GPUs that have it, else fp16; on CPUs bf16 autocast where they have
        native bf16 dot products (AMX, avx512_bf16; detected and logged by each actor), else fp32) | fp32 |
        bf16 (any device) | fp16 (GPUs only). What each actor resolved it to is in each shard's metadata
        (resolved_precision) and in _summary.json (this_run.resolved_precision).
    compile: run the encoder under torch.compile (dynamic shapes: batches of any size and length reuse
        the compiled graphs); the same embeddings as eager mode, after a compilation per actor.
    batching: pad (length-bucketed padded batches; exact for both front-end norm modes) | exact (rows of
        identical length only, no padding at all).
    device: auto (GPU actors when the cluster has GPUs) | cpu | cuda.
    num_actors: model actors (null: one per GPU; on CPUs one per CPU of each node, at most 8 per node).
        actor_cpus: CPUs each (null: 1 with a GPU; on CPUs, the node's CPUs less half a CPU for decoding,
        shared by its actors). A CPU actor runs ceil(actor_cpus) intra-op threads.
    concurrent_shards: shards an actor holds at once: one computes while the others are encoded and written
        (null: 1 on CPUs, 4 with a GPU, where writing a frame-level shard takes longer than computing it).
    shard_seconds: audio per Parquet shard at most (a crash loses at most the shards in flight); small jobs get
        smaller shards (down to 30 s), at least four per actor.
    overwrite: delete the output's shards first instead of continuing them.
    progress_seconds: interval of the progress lines."""

    checkpoint: str
    input: str
    output: str
    layers: list[int] = field(default_factory=lambda: [-1])
    pooling: str = field(default="mean", metadata={"choices": ["none", "mean"]})
    dtype: str = field(default="float32", metadata={"choices": ["float32", "float16"]})
    precision: str = precision_field()
    compile: bool = False
    batching: str = field(default="pad", metadata={"choices": ["pad", "exact"]})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})
    num_actors: Optional[int] = None
    actor_cpus: Optional[float] = None
    concurrent_shards: Optional[int] = None
    shard_seconds: float = 600.0
    overwrite: bool = False
    progress_seconds: float = 10.0
    data: DataConfig = field(default_factory=_embed_data)
    ray: RayConfig = field(default_factory=RayConfig)


def run(cfg: Config) -> dict:
    """Embed the corpus; returns the summary written to ``<output>/_summary.json``."""
    from speech_ssl.embed.pipeline import embed_corpus
    from speech_ssl.stages.common import check_input_path, check_output_dir, output_lock

    check_input_path("checkpoint", cfg.checkpoint)  # before Ray starts
    check_input_path("input", cfg.input)
    check_output_dir("output", cfg.output)
    with output_lock(cfg.output, "embed"):  # two embeds into one folder would write the same shards
        return embed_corpus(cfg)
