"""Parquet shards of embeddings: the table layout, atomic writes, and what a finished output already holds.

One row per (utterance, layer):

    id          string   utterance id (``<id>@<k>`` for segment k of a long recording)
    path        string   the audio path as given in the input (manifest entry, list line, scanned file)
    start       float64  segment start in the recording, seconds (0 for whole files)
    duration    float64  seconds of audio embedded
    layer       int16    transformers' hidden_states index (0: Transformer input, i: layer i's output)
    frames      int32    valid output frames (the mean of ``pooling=mean`` is over these)
    embedding   pooling=none: list<fixed_size_list<float, dim>>, i.e. [frames, dim]
                pooling=mean: fixed_size_list<float, dim>, i.e. [dim]
                float is float32, or float16 with ``dtype=float16``

Plain Arrow types only (no extension types), so pandas, pyarrow and Ray Data read the shards without
speech-ssl: ``np.stack(pq.read_table(f)["embedding"][0].as_py())`` is one utterance's [frames, dim].
The schema metadata key ``speech_ssl`` holds JSON: model, layers, pooling, dtype, dim, frame rate,
and the fingerprint a re-run compares before it appends.

Shards are ``part-r<run>-<index>.parquet``. A shard is written to a hidden temporary name in the same
folder (``.part-....parquet.tmp-<random>``; readers skip names starting with ``.`` or ``_``) and then
renamed, so a finished name always holds a whole shard. Side files are ``_summary.json``,
``_quarantine.jsonl`` and ``_config.json``.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from speech_ssl.data.audio import is_uri, split_uri

METADATA_KEY = b"speech_ssl"
SHARD_PATTERN = re.compile(r"^part-r(\d+)-(\d+)\.parquet$")
TEMP_PATTERN = re.compile(r"^\.part-r\d+-\d+\.parquet\.tmp-[0-9a-f]+$")
SUMMARY = "_summary.json"
QUARANTINE = "_quarantine.jsonl"
CONFIG = "_config.json"


def shard_name(run: int, index: int) -> str:
    return f"part-r{run:03d}-{index:05d}.parquet"


def schema(dim: int, pooling: str, dtype: str, metadata: Optional[dict[str, Any]] = None) -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    vector = pa.list_(value, dim)  # fixed-size list
    embedding = vector if pooling == "mean" else pa.list_(vector)
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("start", pa.float64(), nullable=False),
        pa.field("duration", pa.float64(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),
        pa.field("frames", pa.int32(), nullable=False),
        pa.field("embedding", embedding, nullable=False),
    ]
    meta = {METADATA_KEY: json.dumps(metadata or {}).encode()}
    return pa.schema(fields, metadata=meta)


@dataclass
class ShardBuilder:
    """Collects the rows of one shard; ``table()`` assembles them without a per-frame Python loop."""

    dim: int
    pooling: str
    dtype: str
    metadata: dict[str, Any] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    values: list[np.ndarray] = field(default_factory=list)

    def add(self, id: str, path: str, start: float, duration: float, frames: int,
            embeddings: dict[int, np.ndarray]) -> None:
        """One utterance: ``embeddings`` maps layer -> [frames, dim] or [dim]."""
        for layer in sorted(embeddings):
            self.ids.append(id)
            self.paths.append(path)
            self.starts.append(float(start))
            self.durations.append(float(duration))
            self.layers.append(int(layer))
            self.frames.append(int(frames))
            self.values.append(embeddings[layer])

    def __len__(self) -> int:
        return len(self.ids)

    def table(self) -> pa.Table:
        sch = schema(self.dim, self.pooling, self.dtype, self.metadata)
        value_type = np.float16 if self.dtype == "float16" else np.float32
        flat = (np.concatenate([v.reshape(-1) for v in self.values]) if self.values
                else np.zeros(0, value_type)).astype(value_type, copy=False)
        # Typed: zero-copy (an untyped pa.array scans the whole buffer).
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=sch.field("embedding").type.value_type
                                                             if self.pooling == "mean" else
                                                             sch.field("embedding").type.value_type.value_type),
                                                    self.dim)
        if self.pooling == "mean":
            embedding = vectors
        else:
            offsets = np.zeros(len(self.values) + 1, dtype=np.int32)
            np.cumsum([v.shape[0] for v in self.values], out=offsets[1:])
            embedding = pa.ListArray.from_arrays(pa.array(offsets), vectors)
        columns = [
            pa.array(self.ids, pa.string()), pa.array(self.paths, pa.string()),
            pa.array(self.starts, pa.float64()), pa.array(self.durations, pa.float64()),
            pa.array(self.layers, pa.int16()), pa.array(self.frames, pa.int32()),
            embedding.cast(sch.field("embedding").type),
        ]
        return pa.Table.from_arrays(columns, schema=sch)


def write_options(sch: pa.Schema) -> dict[str, Any]:
    """Parquet options: the small columns compressed (zstd) with statistics; the embedding values stored
    plain (model outputs barely compress, by 7% with zstd at 2.5x the write time), no dictionary, no
    statistics."""
    embedding = "embedding.list.element" if pa.types.is_fixed_size_list(sch.field("embedding").type) \
        else "embedding.list.element.list.element"
    small = [name for name in sch.names if name != "embedding"]
    return {"compression": {**{name: "zstd" for name in small}, embedding: "none"},
            "use_dictionary": ["id", "path"], "write_statistics": small}


# ---------------------------------------------------------------------------------------------------
# The output folder (a local path or a pyarrow-filesystem URI)
# ---------------------------------------------------------------------------------------------------

class OutputDir:
    """Where shards go. Local folders use os calls (rename is atomic); URIs a pyarrow filesystem."""

    def __init__(self, location: str):
        self.location = location.rstrip("/") if is_uri(location) else os.path.abspath(os.path.expanduser(location))
        if is_uri(self.location):
            self.fs, self.root = split_uri(self.location)
        else:
            self.fs, self.root = None, self.location

    def join(self, name: str) -> str:
        return f"{self.root}/{name}"

    def uri(self, name: str) -> str:
        return f"{self.location}/{name}"

    def makedirs(self) -> None:
        if self.fs is None:
            os.makedirs(self.root, exist_ok=True)
        else:
            self.fs.create_dir(self.root, recursive=True)

    def names(self) -> list[str]:
        if self.fs is None:
            return sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)

    def write_table(self, name: str, table: pa.Table) -> None:
        """Write ``table`` under a hidden temporary name, then rename it to ``name``."""
        tmp = self.join(f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            pq.write_table(table, tmp, filesystem=self.fs, **write_options(table.schema))
            if self.fs is None:
                os.replace(tmp, self.join(name))
            else:
                self.fs.move(tmp, self.join(name))
        except BaseException:
            self.remove(tmp)
            raise

    def write_text(self, name: str, text: str) -> None:
        tmp = self.join(f".{name}.tmp-{uuid.uuid4().hex[:12]}")
        if self.fs is None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, self.join(name))
        else:
            with self.fs.open_output_stream(tmp) as f:
                f.write(text.encode())
            self.fs.move(tmp, self.join(name))

    def read_text(self, name: str) -> Optional[str]:
        try:
            if self.fs is None:
                with open(self.join(name), encoding="utf-8") as f:
                    return f.read()
            with self.fs.open_input_stream(self.join(name)) as f:
                return f.read().decode()
        except (FileNotFoundError, OSError):
            return None

    def remove(self, path: str) -> None:
        try:
            if self.fs is None:
                os.remove(path)
            else:
                self.fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass


@dataclass
class ExistingOutput:
    """What earlier runs left in an output folder."""

    shards: list[str]  # finished shard names
    done: dict[str, int]  # utterance id -> rows (layers) found for it
    fingerprint: Optional[dict[str, Any]]  # of the first shard read (all must agree)
    last_run: int  # highest run number among the shard names (0: none)
    stale_temps: list[str]  # leftover temporary files of interrupted runs
    unreadable: list[str]  # finished names that do not read as Parquet (left alone, not counted)


def scan_output(out: OutputDir, fingerprint: dict[str, Any]) -> ExistingOutput:
    """Finished shards and the utterances they hold; a shard of another configuration is an error.

    Only the ``id`` column and the schema metadata are read, so this stays cheap for large outputs.
    """
    from speech_ssl.errors import SpeechSSLError

    shards, stale, unreadable = [], [], []
    done: dict[str, int] = {}
    found_fp: Optional[dict[str, Any]] = None
    last_run = 0
    for name in out.names():
        if TEMP_PATTERN.match(name):
            stale.append(name)
            continue
        match = SHARD_PATTERN.match(name)
        if not match:
            continue
        last_run = max(last_run, int(match.group(1)))
        try:
            table = pq.read_table(out.join(name), columns=["id"], filesystem=out.fs)
        except (pa.ArrowInvalid, OSError):
            unreadable.append(name)
            continue
        meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}") or b"{}")
        shard_fp = meta.get("fingerprint")
        if shard_fp != fingerprint:
            differing = sorted(k for k in set(fingerprint) | set(shard_fp or {})
                               if (shard_fp or {}).get(k) != fingerprint.get(k))
            raise SpeechSSLError(
                f"{out.uri(name)} was written with another configuration (differs in: {', '.join(differing)}; "
                f"it has {', '.join(f'{k}={(shard_fp or {}).get(k)!r}' for k in differing)}). A re-run only "
                "adds to an output of the same checkpoint, layers, pooling, dtype and precision: choose a new "
                "output folder, or set overwrite=true to delete the existing shards first.")
        found_fp = shard_fp
        shards.append(name)
        for utt_id in table.column("id").to_pylist():
            done[utt_id] = done.get(utt_id, 0) + 1
    return ExistingOutput(shards, done, found_fp, last_run, stale, unreadable)


def shard_files(out: OutputDir) -> list[str]:
    return [n for n in out.names() if SHARD_PATTERN.match(n)]


def complete_ids(existing: ExistingOutput, num_layers: int) -> set[str]:
    """Utterances with a row for every requested layer (a shard always holds all of them)."""
    return {utt_id for utt_id, rows in existing.done.items() if rows >= num_layers}


def read_embeddings(paths: Sequence[str]) -> pa.Table:
    """All rows of the given shards as one table (a convenience for tests and notebooks)."""
    return pa.concat_tables([pq.read_table(p) for p in paths])
