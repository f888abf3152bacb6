"""The Ray Data graph of ``speech-ssl embed``: shard jobs -> decode tasks -> the model actor pool ->
per-shard results, under the cluster's resources and the object-store budget."""

from __future__ import annotations

import json
from typing import Any, Iterator

from speech_ssl.data.collate import Collator
from speech_ssl.data.config import DataConfig
from speech_ssl.embed.actor import ActorSpec, ShardEmbedder
from speech_ssl.embed.decode import decode_shards
from speech_ssl.embed.placement import Placement
from speech_ssl.errors import SpeechSSLError


def run_shards(jobs: list[dict], collator: Collator, actor_spec: ActorSpec, placement: Placement,
               data: DataConfig, shard_memory_bytes: float) -> Iterator[dict[str, Any]]:
    """The shard jobs through decode tasks and the actor pool; yields each shard's result (the actor's
    counts) as it finishes. Ray's errors become a SpeechSSLError naming the user-code exception."""
    import ray
    from ray.data import ActorPoolStrategy, ExecutionResources, TaskPoolStrategy

    ds = ray.data.from_items([{"job": json.dumps(job)} for job in jobs], override_num_blocks=len(jobs))
    ds = ds.map_batches(
        decode_shards, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        fn_kwargs={"collator": collator}, num_cpus=placement.reader_cpus,
        compute=TaskPoolStrategy(size=data.max_readers),
        # A decode task's memory (decode.decode_task_memory). Saying so also keeps Ray Data from fusing
        # decoding into the model actors, which it does to consecutive maps asking for the same resources
        # (1 CPU each, say): decoding would then run on their thread.
        memory=shard_memory_bytes,
    )
    ds = ds.map_batches(
        ShardEmbedder, fn_constructor_kwargs={"spec": actor_spec}, batch_size=1, batch_format="pyarrow",
        zero_copy_batch=True, compute=ActorPoolStrategy(size=placement.num_actors),
        num_cpus=placement.actor_cpus, num_gpus=placement.actor_gpus,
        # Ray Data restarts an actor that dies and retries its shard (the rename makes a retry safe).
    )
    ctx = ds.context
    ctx.print_on_execution_start = False
    ctx.enable_progress_bars = False
    # Decoded shards waiting for an actor are bounded by buffer_mb of object store memory.
    ctx.execution_options.resource_limits = ExecutionResources(
        cpu=placement.cluster_cpus, gpu=placement.cluster_gpus,
        object_store_memory=float(max(data.buffer_mb, 64)) * (1 << 20))
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for result in table.column("result").to_pylist():
                yield json.loads(result)
    except ray.exceptions.RayError as err:
        raise SpeechSSLError(f"embedding failed (finished shards are kept; a re-run continues from them): "
                             f"{_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    """The user-code exception inside Ray's wrappers (``ValueError: ...``), else the last line."""
    import re

    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for line in lines:
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*: ", line) and not line.startswith(("ray.", "Ray")):
            return line
    return lines[-1] if lines else type(err).__name__

