"""Ray Data stage 2 (the actor pool): ``ShardEmbedder`` loads the model once, then embeds a decoded shard's
batches with an :class:`~speech_ssl.embed.embedder.Embedder` and writes the shard itself (temporary name,
then rename), returning only counts to the driver."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from speech_ssl.embed import shards as shard_io
from speech_ssl.embed.decode import unpack_shard


@dataclass
class ActorSpec:
    """What every model actor is built from (plain data, shipped to the actors)."""

    checkpoint: str
    layers: list[int]
    pooling: str
    dtype: str
    precision: str
    device: str  # cpu | cuda
    threads: int  # torch intra-op threads (CPU actors)
    output: str
    unit_seconds: float  # seconds per input step
    metadata: dict[str, Any]
    concurrent_shards: int = 1  # shards in one actor at once: one computes, the others are written
    compile: bool = False  # torch.compile of the encoder


class ShardEmbedder:
    """Ray Data actor: loads the model once, then embeds and writes one shard per call.

    With ``concurrent_shards > 1`` Ray Data runs that many calls in threads of the actor; the Embedder
    runs one batch at a time on the device (its own lock), and the Parquet encoding and writing of
    finished shards, which release the GIL, overlap the next shard's compute. On a GPU a frame-level shard
    takes far longer to write than to compute. A shard's batches go through ``Embedder.embed_batches``: on
    a GPU the copy of a batch's embeddings to (pinned) host memory overlaps the next batch's compute.
    """

    def __init__(self, spec: ActorSpec):
        import torch

        from speech_ssl.embed.embedder import Embedder

        if spec.device == "cpu" and spec.threads > 0:
            torch.set_num_threads(spec.threads)
        self.spec = spec
        from speech_ssl import storage

        # A URI checkpoint is downloaded once per node (storage.fetched), wherever this actor runs.
        self.embedder = Embedder.from_checkpoint(storage.fetched(spec.checkpoint), layers=spec.layers, pooling=spec.pooling,
                                                 device=spec.device, precision=spec.precision, dtype=spec.dtype,
                                                 compile=spec.compile)
        # What precision=auto became on this actor's device, in every shard it writes.
        self.metadata = dict(spec.metadata, resolved_precision=self.embedder.precision)
        self.out = shard_io.OutputDir(spec.output)

    def __call__(self, table: pa.Table) -> pa.Table:
        results = []
        blobs = table.column("inputs")
        for k, meta_json in enumerate(table.column("meta").to_pylist()):
            results.append(json.dumps(self.embed_shard(meta_json, blobs[k].as_buffer())))
        return pa.table({"result": pa.array(results, pa.string())})

    def embed_shard(self, meta_json: str, blob) -> dict[str, Any]:
        import torch

        started = time.perf_counter()
        meta, batches = unpack_shard(meta_json, blob)
        spec, embedder = self.spec, self.embedder
        builder = shard_io.ShardBuilder(embedder.dim, spec.pooling, spec.dtype, dict(self.metadata))
        quarantined: list[dict] = []
        utterances = 0
        audio_seconds = padded_seconds = 0.0
        launched: list[tuple[list[str], list[str], Any, Any]] = []  # (ids, paths, lengths, frames) per batch

        def model_batches() -> Iterator[tuple[Any, Any]]:
            """The shard's batches as the model takes them; read one batch ahead by embed_batches."""
            for batch in batches:
                quarantined.extend(batch["quarantined"])
                if batch["inputs"] is None:
                    continue
                inputs = torch.from_numpy(np.array(batch["inputs"]))  # a private, writable copy
                lengths = torch.tensor(batch["lengths"], dtype=torch.long)
                frames = embedder.output_lengths(lengths)
                keep = frames > 0
                for k in (~keep).nonzero().flatten().tolist():  # shorter than the front end's receptive field
                    quarantined.append({"path": batch["paths"][k], "reason": "too-short", "id": batch["ids"][k],
                                        "detail": f"{int(lengths[k])} input steps give no output frame"})
                if not bool(keep.any()):
                    continue
                if not bool(keep.all()):
                    index = keep.nonzero().flatten()
                    inputs, lengths, frames = inputs[index], lengths[index], frames[index]
                ids = [i for i, ok in zip(batch["ids"], keep.tolist()) if ok]
                paths = [p for p, ok in zip(batch["paths"], keep.tolist()) if ok]
                width = int(lengths.max())
                inputs = inputs[:, :width]
                single = bool((lengths == width).all())
                launched.append((ids, paths, lengths, frames))
                yield inputs, None if single else lengths

        for k, embeddings in enumerate(embedder.embed_batches(model_batches())):
            ids, paths, lengths, frames = launched[k]
            launched[k] = None  # type: ignore[call-overload]
            if spec.device == "cpu":
                release_freed_memory()
            for b, utt_id in enumerate(ids):
                builder.add(utt_id, paths[b], meta["starts"].get(utt_id, 0.0),
                            float(lengths[b]) * spec.unit_seconds, int(frames[b]), embeddings[b])
            utterances += len(ids)
            audio_seconds += float(lengths.sum()) * spec.unit_seconds
            padded_seconds += float(len(ids) * int(lengths.max())) * spec.unit_seconds
        written, rows = None, len(builder)
        if rows:
            self.out.write_table(meta["shard"], builder.table())
            written = meta["shard"]
        del builder
        release_freed_memory()
        return {"shard": written, "planned": meta["shard"], "utterances": utterances, "rows": rows,
                "audio_seconds": audio_seconds, "padded_seconds": padded_seconds, "quarantined": quarantined,
                "seconds": time.perf_counter() - started, "precision": embedder.precision}


def release_freed_memory() -> None:
    """Hand memory that torch freed back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Utterances of every length make tensors of every size; glibc keeps the freed blocks in its heaps, and
    an actor's resident memory grew to over 5 GB for a 0.1 h corpus with BASE (1.2 GB with a trim after
    each batch, at no measurable cost).
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - probe: musl and macOS have none
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
