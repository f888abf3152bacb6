"""Ray Data stage 1 (CPU tasks): decode a shard's batches, and unpack them again in the model actor.

A shard travels as one row: JSON metadata and the raw float32 bytes of its batches back to back.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import pyarrow as pa

from speech_ssl.data.audio import FeatureSpec
from speech_ssl.data.collate import Collator, pack, unpack

DECODE_WORKER_BYTES = 512 << 20  # a Ray worker with torch, soundfile and torchaudio loaded


def decode_task_memory(largest_shard_seconds: float, spec: FeatureSpec) -> float:
    """Bytes a decode task asks for: a worker with torch loaded holding its shard's audio twice (decoded
    rows, then the packed batches), as float32."""
    steps_per_second = spec.sample_rate if spec.kind == "waveform" else 100 * spec.n_mels
    return DECODE_WORKER_BYTES + 2 * largest_shard_seconds * steps_per_second * 4


def decode_shards(table: pa.Table, collator: Collator) -> pa.Table:
    """``map_batches`` function: shard jobs (column ``job``) -> one row per shard: ``meta`` JSON and
    ``inputs``, the float32 bytes of its batches back to back."""
    metas, blobs = [], []
    for job_json in table.column("job").to_pylist():
        job = json.loads(job_json)
        batch_metas, buffers = [], []
        for batch_job in job["batches"]:
            for out in collator(batch_job):
                meta, buffer = pack(out)
                batch_metas.append(meta)
                buffers.append(buffer)
        metas.append(json.dumps({"shard": job["shard"], "starts": job["starts"], "batches": batch_metas,
                                 "sizes": [len(b) for b in buffers]}))
        blobs.append(b"".join(buffers))
    return pa.table({"meta": pa.array(metas, pa.string()), "inputs": pa.array(blobs, pa.large_binary())})


def unpack_shard(meta_json: str, blob) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """The shard's metadata and its batches (Collator outputs with ``inputs`` as numpy arrays)."""
    meta = json.loads(meta_json)
    view = memoryview(blob)

    def batches():
        offset = 0
        for batch_meta, size in zip(meta["batches"], meta["sizes"]):
            yield unpack(batch_meta, view[offset:offset + size])
            offset += size

    return meta, batches()
