"""The decoded-audio cache: a corpus decoded and resampled (and featurised) once, read back at memory speed.

Pretraining passes over the same audio hundreds of times; decoding Opus/MP3/FLAC every epoch costs far more
CPU than the training step can spare. ``speech-ssl cache`` writes the corpus once into this layout (a local
folder or any pyarrow-filesystem URI such as ``s3://``, ``gs://``, ``file://``)::

    cache.json          what the cache holds (format version, features, dtype, counts). Written last:
                        a folder without it is an unfinished cache, which ``speech-ssl cache`` resumes.
    index.parquet       one row per cached utterance: the manifest fields, its shard and record batch.
    quarantine.jsonl    input rows that could not be decoded (path, reason, detail, id).
    shards/NNNNN.arrow  Arrow IPC files, ONE record batch per utterance: random access by row. A local
                        shard is memory-mapped and a row is a zero-copy view; a remote shard costs one
                        ranged read per row. (Formats compared in benchmarks/README.md.)
    shards/NNNNN.json   a shard's sidecar (its rows, quarantine, byte size), written after the shard.

Payload of a row: ``waveform``: PCM at the model's rate, int16 (x * 32768, clipped: 16-bit audio as fairseq
reads it) or float32; ``fbank``: the raw Kaldi log-mel frames before per-utterance normalisation, float16
or float32. Normalisation is applied when a row is read, so one cache serves models that normalise and
models that do not, and a float32 cache gives batches identical to decoding the original files.

Rows of a cache are :class:`~speech_ssl.data.sources.Utterance` objects whose ``path`` is their shard and
``cache_row`` their record batch; ``start``/``end`` (when a stream cuts a cached row further) are relative
to the cached row. Every stage reads them through :func:`read_cached_row`, called by the Collator.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from speech_ssl.data.audio import FeatureSpec, decode_file, is_uri, normalize_features, split_uri, within_timeout
from speech_ssl.data.report import QuarantineError
from speech_ssl.errors import SpeechSSLError

FORMAT = "speech-ssl-cache"
FORMAT_VERSION = 1
CACHE_FILE = "cache.json"
INDEX_FILE = "index.parquet"
QUARANTINE_FILE = "quarantine.jsonl"
SHARD_DIR = "shards"
DTYPES = {"waveform": ("int16", "float32"), "fbank": ("float16", "float32")}
DEFAULT_DTYPE = {"waveform": "int16", "fbank": "float16"}
PCM_SCALE = 32768.0
OPEN_SHARDS = 64  # shard readers kept open per process (least recently used closed first)


def feature_key(spec: FeatureSpec) -> dict[str, Any]:
    """What a cache's payload depends on (normalisation is not part of it: it is applied at read time)."""
    key: dict[str, Any] = {"kind": spec.kind, "sample_rate": spec.sample_rate}
    if spec.kind == "fbank":
        key.update(n_mels=spec.n_mels, frame_shift_ms=spec.frame_shift_ms, frame_length_ms=spec.frame_length_ms)
    return key


def resolve_dtype(kind: str, dtype: str) -> str:
    if dtype == "auto":
        return DEFAULT_DTYPE[kind]
    if dtype not in DTYPES[kind]:
        from speech_ssl.config import ConfigError

        raise ConfigError("dtype", f"'{dtype}' cannot store {kind} features.", ["auto", *DTYPES[kind]])
    return dtype


# ---------------------------------------------------------------------------------------------------
# Files: local paths and URIs through one pyarrow filesystem interface
# ---------------------------------------------------------------------------------------------------

def filesystem(path: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    if is_uri(path):
        return split_uri(path)
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    with fs.open_input_stream(inner) as f:
        return f.read()


def write_atomic(path: str, write: Callable[[Any], None]) -> int:
    """Write ``path`` through a temporary name and a rename, so a reader never sees it half written (on
    object stores the move is a copy; an object only appears once its upload completed). Returns its size."""
    fs, inner = filesystem(path)
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as out:
            write(out)
        size = fs.get_file_info(tmp).size
        fs.move(tmp, inner)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:  # noqa: BLE001 - nothing to clean up
            pass
        raise
    return int(size)


def write_json(path: str, data: Any) -> int:
    return write_atomic(path, lambda out: out.write(json.dumps(data, indent=1).encode()))


def exists(path: str) -> bool:
    import pyarrow.fs as pafs

    fs, inner = filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def is_cache(path: str) -> bool:
    """Is ``path`` a cache folder (complete or not)? Bounded in time for URIs."""
    probe = lambda: exists(join(path, CACHE_FILE)) or exists(join(path, SHARD_DIR, "plan.json"))  # noqa: E731
    try:
        return bool(within_timeout(path, probe) if is_uri(path) else probe())
    except SpeechSSLError:
        raise
    except OSError as err:
        raise SpeechSSLError(f"cannot read {path}: {err}") from None


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------

def encode(feats: np.ndarray, dtype: str) -> bytes:
    if dtype == "int16":
        return np.clip(np.rint(feats * PCM_SCALE), -32768, 32767).astype("<i2").tobytes()
    return feats.astype("<f2" if dtype == "float16" else "<f4").tobytes()


def decode_payload(buffer, dtype: str, n_mels: int) -> np.ndarray:
    """A row's bytes -> float32 features ([T] samples or [frames, n_mels])."""
    if dtype == "int16":
        out = np.frombuffer(buffer, dtype="<i2").astype(np.float32)
        out *= np.float32(1.0 / PCM_SCALE)
        return out
    raw = np.frombuffer(buffer, dtype="<f2" if dtype == "float16" else "<f4")
    out = raw.astype(np.float32)  # a copy: writable, independent of the (memory-mapped) shard
    return out.reshape(-1, n_mels) if n_mels else out


def shard_schema(spec: FeatureSpec, dtype: str):
    import pyarrow as pa

    fields = [("id", pa.string()), ("source_path", pa.string()), ("start", pa.float64()), ("end", pa.float64()),
              ("duration", pa.float64()), ("text", pa.string()), ("speaker", pa.string()), ("steps", pa.int64()),
              ("data", pa.large_binary())]
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "dtype": dtype,
            "features": json.dumps(feature_key(spec), sort_keys=True)}
    return pa.schema(fields, metadata=meta)


def plan_shards(durations: Sequence[float], shard_seconds: float, max_rows: int = 20000) -> list[tuple[int, int]]:
    """Consecutive [first, end) row ranges of about ``shard_seconds`` of audio each (deterministic, so a
    resumed run writes the same shards)."""
    ranges, first, seconds = [], 0, 0.0
    for i, d in enumerate(durations):
        seconds += float(d)
        if seconds >= shard_seconds or i + 1 - first >= max_rows:
            ranges.append((first, i + 1))
            first, seconds = i + 1, 0.0
    if first < len(durations):
        ranges.append((first, len(durations)))
    return ranges


def fingerprint(rows: Sequence[dict], spec: FeatureSpec, dtype: str) -> str:
    """Identifies what a cache is a cache of: its rows (id, path, segment) and its payload."""
    h = hashlib.sha256(json.dumps([feature_key(spec), dtype, FORMAT_VERSION]).encode())
    for r in rows:
        h.update(json.dumps([r["id"], r["path"], r["start"], r["end"]]).encode())
    return h.hexdigest()[:32]


def write_shard(root: str, number: int, rows: list[dict], spec: FeatureSpec, dtype: str) -> dict[str, Any]:
    """Decode ``rows`` into shard ``number`` (atomically), then its sidecar. Returns the sidecar: the rows
    kept (manifest fields, record batch), the quarantined ones, the shard's size in bytes."""
    import pyarrow as pa

    raw_spec = FeatureSpec(spec.kind, spec.sample_rate, spec.n_mels, False, spec.frame_shift_ms, spec.frame_length_ms)
    schema = shard_schema(spec, dtype)
    kept: list[dict] = []
    quarantined: list[dict] = []

    def write(out) -> None:
        with pa.ipc.new_file(out, schema) as writer:
            for row in rows:
                try:
                    feats = decode_file(row["path"], raw_spec, row["start"] or 0.0, row["end"])
                except QuarantineError as err:
                    quarantined.append({"path": row["source_path"], "reason": err.reason, "detail": err.detail,
                                        "id": row["id"]})
                    continue
                # The duration stays the input's (not the decoded length): streams plan batches from durations, so
                # a cache and its original corpus give the same plan.
                entry = {"id": row["id"], "source_path": row["source_path"], "start": row["start"], "end": row["end"],
                         "duration": float(row["duration"]), "text": row["text"], "speaker": row["speaker"],
                         "steps": int(feats.shape[0])}
                batch = pa.RecordBatch.from_pylist([{**entry, "data": encode(feats, dtype)}], schema=schema)
                writer.write_batch(batch)
                kept.append({**entry, "row": len(kept)})

    name = f"{number:05d}"
    size = write_atomic(join(root, SHARD_DIR, f"{name}.arrow"), write)
    sidecar = {"shard": number, "bytes": size, "rows": kept, "quarantined": quarantined,
               "audio_seconds": float(sum(r["duration"] for r in kept))}
    write_json(join(root, SHARD_DIR, f"{name}.json"), sidecar)
    return sidecar


def shard_state(root: str, number: int) -> tuple[Optional[str], Optional[dict]]:
    """(why shard ``number`` must be written, None when it is complete; its sidecar, None when there is none:
    the shard was never finished)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    name = f"{number:05d}"
    fs, shard = filesystem(join(root, SHARD_DIR, f"{name}.arrow"))
    try:
        sidecar = json.loads(read_bytes(join(root, SHARD_DIR, f"{name}.json")))
    except (OSError, ValueError):
        return "not written", None
    info = fs.get_file_info(shard)
    if info.type != pafs.FileType.File:
        return "shard file missing", sidecar
    if info.size != sidecar["bytes"]:
        return f"{info.size} bytes on disk, {sidecar['bytes']} written (truncated or overwritten)", sidecar
    try:
        with fs.open_input_file(shard) as f:
            batches = pa.ipc.open_file(f).num_record_batches
    except (OSError, pa.ArrowInvalid) as err:
        return f"unreadable Arrow file ({err})", sidecar
    if batches != len(sidecar["rows"]):
        return f"{batches} rows in the file, {len(sidecar['rows'])} in its sidecar", sidecar
    return None, sidecar


def open_plan(root: str, plan: dict[str, Any]) -> dict[str, Any]:
    """The plan of the cache at ``root``: ``plan`` written there for a new cache, the one found for an
    unfinished or complete cache of the same input and payload. A cache of anything else is refused."""
    path = join(root, SHARD_DIR, "plan.json")
    if not is_cache(root):
        fs, inner = filesystem(join(root, SHARD_DIR))
        fs.create_dir(inner, recursive=True)
        write_json(path, plan)
        return plan
    try:
        found = json.loads(read_bytes(path))
    except (OSError, ValueError):
        raise SpeechSSLError(f"{root} holds a cache this version cannot resume (no readable {SHARD_DIR}/plan.json): "
                             "choose another output or delete it") from None
    if found.get("fingerprint") != plan["fingerprint"]:
        raise SpeechSSLError(f"{root} holds a cache of another input or payload (written for {found.get('input')}, "
                             f"{found.get('features')}, dtype {found.get('dtype')}): choose another output, or delete "
                             "it to write this one")
    return found


def complete_shards(root: str, count: int) -> tuple[dict[int, dict], dict[int, Optional[str]]]:
    """(sidecars of the shards that are complete, {shard: why it must be written again, None: it never was})."""
    done: dict[int, dict] = {}
    todo: dict[int, Optional[str]] = {}
    for number in range(count):
        problem, sidecar = shard_state(root, number)
        if problem is None:
            done[number] = sidecar
        else:
            todo[number] = problem if sidecar is not None else None
    return done, todo


def finalize(root: str, meta: dict[str, Any], sidecars: list[dict], scanned: Sequence[dict] = ()) -> dict[str, Any]:
    """Write the index, the quarantine list (``scanned``: files the input scan could not read, then each
    shard's) and, last, ``cache.json``. Returns the cache's metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, list] = {k: [] for k in ("id", "source_path", "start", "end", "duration", "text", "speaker",
                                                "steps", "shard", "row")}
    quarantined = list(scanned)
    for sidecar in sorted(sidecars, key=lambda s: s["shard"]):
        for r in sidecar["rows"]:
            for k in columns:
                columns[k].append(sidecar["shard"] if k == "shard" else r[k])
        quarantined.extend(sidecar["quarantined"])
    table = pa.table(columns)

    def write_index(out) -> None:
        pq.write_table(table, out)

    write_atomic(join(root, INDEX_FILE), write_index)
    write_atomic(join(root, QUARANTINE_FILE),
                  lambda out: out.write("".join(json.dumps(q) + "\n" for q in quarantined).encode()))
    meta = {**meta, "rows": table.num_rows, "quarantined": len(quarantined),
            "hours": float(sum(columns["duration"])) / 3600, "bytes": int(sum(s["bytes"] for s in sidecars)),
            "shards": len(sidecars),
            # What readers check the shards against (one listing, no sidecar reads per shard).
            "shard_bytes": {f"{s['shard']:05d}.arrow": s["bytes"] for s in sidecars}}
    write_json(join(root, CACHE_FILE), meta)
    return meta


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------

def load_meta(root: str) -> dict[str, Any]:
    """``cache.json`` of a complete cache, checked for format and version."""
    path = join(root, CACHE_FILE)
    try:
        raw = within_timeout(root, lambda: read_bytes(path)) if is_uri(root) else read_bytes(path)
    except FileNotFoundError:
        raise SpeechSSLError(f"{root} is an unfinished cache (no {CACHE_FILE}): run `speech-ssl cache` with "
                             "the same input and output again to complete it") from None
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise SpeechSSLError(
            f"{root} was written by another version of speech-ssl (cache format {meta.get('format')!r} version "
            f"{meta.get('format_version')}; this version reads {FORMAT!r} version {FORMAT_VERSION}): write it again "
            "with `speech-ssl cache`")
    return meta


def check_spec(meta: dict[str, Any], spec: FeatureSpec, root: str, use: str = "this model") -> None:
    """Refuse a cache whose payload is not what ``spec`` needs, naming every mismatch."""
    have, want = meta["features"], feature_key(spec)
    diffs = [f"{k} {have.get(k)!r} (needed: {v!r})" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise SpeechSSLError(
            f"the cache {root} holds {have.get('kind')} features that do not fit {use}: {'; '.join(diffs)}. "
            f"Write a cache for it with `speech-ssl cache input=<the original corpus> output=<new folder> "
            f"model=<the model's preset>` (or read the original audio instead of the cache)")


def read_index(root: str, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The cached rows of a complete cache (``meta``: its ``cache.json``), after checking that every shard is
    there at its written size (a truncated or missing shard is an error naming it, never a short read)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, inner = filesystem(join(root, INDEX_FILE))
    with fs.open_input_file(inner) as f:
        index = pq.read_table(f).to_pylist()
    shard_fs, shard_dir = filesystem(join(root, SHARD_DIR))
    sizes = {os.path.basename(i.path): i.size
             for i in shard_fs.get_file_info(pafs.FileSelector(shard_dir)) if i.type == pafs.FileType.File}
    for name, written in sorted(meta["shard_bytes"].items()):
        if sizes.get(name) != written:
            found = "missing" if name not in sizes else f"{sizes[name]} bytes, {written} written"
            raise SpeechSSLError(f"the cache {root} is damaged: shard {SHARD_DIR}/{name} is {found}. Run "
                                 "`speech-ssl cache` with the same input and output again: it finds and rewrites "
                                 "damaged shards")
    return index


class _ShardReaders:
    """Open shard readers of this process, least recently used closed first (thread-safe)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._open: OrderedDict[str, tuple[Any, Any, str, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> tuple[Any, str, int]:
        """(IPC file reader, dtype, n_mels) of a shard."""
        with self._lock:
            if path in self._open:
                self._open.move_to_end(path)
                _, reader, dtype, n_mels = self._open[path]
                return reader, dtype, n_mels
        handle, reader = _open_shard(path)
        meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
        if meta.get("format") != FORMAT or int(meta.get("format_version", -1)) != FORMAT_VERSION:
            raise SpeechSSLError(f"{path} is not a shard of this version's cache format: write the cache again")
        features = json.loads(meta["features"])
        n_mels = int(features.get("n_mels", 0)) if features["kind"] == "fbank" else 0
        with self._lock:
            self._open[path] = (handle, reader, meta["dtype"], n_mels)
            while len(self._open) > self.capacity:
                _, (old, *_) = self._open.popitem(last=False)
                old.close()
        return reader, meta["dtype"], n_mels


def _open_shard(path: str):
    import pyarrow as pa

    try:
        if is_uri(path) and not path.startswith("file://"):
            fs, inner = split_uri(path)
            handle = fs.open_input_file(inner)
        else:
            handle = pa.memory_map(path[len("file://"):] if path.startswith("file://") else path, "r")
        return handle, pa.ipc.open_file(handle)
    except (OSError, pa.ArrowInvalid) as err:
        raise SpeechSSLError(f"cannot open the cache shard {path} ({err}); run `speech-ssl cache` with the same "
                             "input and output again to rewrite it") from None


@functools.lru_cache(maxsize=1)
def _readers() -> _ShardReaders:
    return _ShardReaders(OPEN_SHARDS)


def read_cached_row(path: str, row: int, spec: FeatureSpec, start: float = 0.0, end: Optional[float] = None) -> np.ndarray:
    """Features of record batch ``row`` of shard ``path`` (or its [start, end) seconds), normalised as
    ``spec`` asks: what :func:`~speech_ssl.data.audio.decode_file` gives for the original audio."""
    reader, dtype, n_mels = _readers().get(path)
    batch = reader.get_batch(row)
    feats = decode_payload(batch.column(batch.schema.get_field_index("data"))[0].as_buffer(), dtype, n_mels)
    if start or end is not None:
        rate = spec.sample_rate
        first = int(round(start * rate)) if start else 0
        last = None if end is None else int(round(end * rate))
        if spec.kind == "fbank":
            # The frames a decode of the [start, end) samples would give: the same count, from the nearest frame.
            first_frame = int(round(first / spec.frame_shift))
            count = feats.shape[0] if last is None else spec.num_steps(last - first)
            feats = feats[first_frame:first_frame + count]
        else:
            feats = feats[first:last]
        if feats.shape[0] == 0:
            raise QuarantineError("too-short", f"segment [{start}, {end}) s of a cached row is empty")
    return normalize_features(feats, spec)


@dataclass
class CacheInfo:
    """A complete cache as a source: its folder and metadata (features, dtype, counts)."""

    root: str
    meta: dict[str, Any]
