"""One planned batch -> arrays: decode (or read from a cache) every row, quarantine the bad ones, crop or
pad, encode transcripts.

The same :class:`Collator` runs in Ray Data ``map_batches`` tasks and in-process, so both paths give
identical batches. Crop offsets are drawn from ``(seed, epoch, batch index)``: a batch is the same
wherever and whenever it is made (after a resume too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from speech_ssl.data.audio import FeatureSpec, decode_file
from speech_ssl.data.cache import read_cached_row
from speech_ssl.data.report import QuarantineError
from speech_ssl.data.text import TextNormalizer, Vocabulary


def job_row(utt) -> dict[str, Any]:
    """A job's row for an :class:`~speech_ssl.data.sources.Utterance` (plain data, shipped to decode tasks)."""
    return {"id": utt.id, "path": utt.path, "source_path": utt.source_path, "start": utt.start, "end": utt.end,
            "text": utt.text, "cache_row": utt.cache_row}


def row_features(row: dict[str, Any], spec: FeatureSpec) -> np.ndarray:
    """Features of one job row: read from a decoded-audio cache when it is a cached row, else decoded."""
    start, end = row.get("start") or 0.0, row.get("end")
    if row.get("cache_row") is not None:
        return read_cached_row(row["path"], row["cache_row"], spec, start, end)
    return decode_file(row["path"], spec, start, end)


@dataclass
class Collator:
    """Makes the arrays of planned batches (picklable: shipped to Ray Data tasks).

    A job is ``{"epoch", "position", "index", "rows": [{"id", "path", "source_path", "start", "end",
    "text", "cache_row"?}]}``; the result is a list of dicts (one, or one per distinct length in ``exact`` mode) with
    ``inputs`` (None when every row was bad), ``lengths``, ``ids``, ``paths``, ``texts``, ``targets``,
    ``audio_seconds``, ``padded_seconds``, ``quarantined``, ``epoch``, ``position``.
    """

    spec: FeatureSpec
    mode: str
    crop_duration: Optional[float] = None
    seed: int = 0
    vocab: Optional[Vocabulary] = None
    normalizer: Optional[TextNormalizer] = None

    def crop_steps(self) -> Optional[int]:
        if self.mode != "crop" or not self.crop_duration:
            return None
        return max(1, int(round(self.crop_duration / self.spec.unit_seconds)))

    def __call__(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        feats: list[np.ndarray] = []
        kept: list[dict] = []
        quarantined: list[dict] = []
        for row in job["rows"]:
            try:
                feats.append(row_features(row, self.spec))
                kept.append(row)
            except QuarantineError as err:
                quarantined.append({"path": row["path"], "reason": err.reason, "detail": err.detail, "id": row["id"]})
        base = {"epoch": job["epoch"], "position": job["position"], "quarantined": quarantined}
        if not feats:
            return [dict(base, inputs=None, lengths=[], ids=[], paths=[], texts=[], targets=None,
                         audio_seconds=0.0, padded_seconds=0.0)]
        if self.mode == "exact":
            groups: dict[int, list[int]] = {}
            for k, f in enumerate(feats):
                groups.setdefault(f.shape[0], []).append(k)
            parts = list(groups.values())
        else:
            parts = [list(range(len(feats)))]
        outputs = []
        for n, part in enumerate(parts):
            out = self._assemble([feats[k] for k in part], [kept[k] for k in part], job)
            out.update(base if n == 0 else dict(base, quarantined=[]))
            outputs.append(out)
        return outputs

    def _assemble(self, feats: list[np.ndarray], rows: list[dict], job: dict) -> dict[str, Any]:
        lengths = np.array([f.shape[0] for f in feats], dtype=np.int64)
        if self.mode == "crop":
            target = int(lengths.min())
            limit = self.crop_steps()
            if limit is not None:
                target = min(target, limit)
            rng = np.random.default_rng([int(self.seed), int(job["epoch"]), int(job["index"]), 0xC409])
            starts = [int(rng.integers(0, L - target + 1)) for L in lengths]
            inputs = np.stack([f[s:s + target] for f, s in zip(feats, starts)])
            lengths = np.full(len(feats), target, dtype=np.int64)
        else:
            width = int(lengths.max())
            inputs = np.zeros((len(feats), width) + feats[0].shape[1:], dtype=np.float32)
            for k, f in enumerate(feats):
                inputs[k, : f.shape[0]] = f
        unit = self.spec.unit_seconds
        texts = [r.get("text") for r in rows]
        if self.normalizer is not None:
            texts = [None if t is None else self.normalizer(t) for t in texts]
        targets = None
        if self.vocab is not None:
            targets = [self.vocab.encode(t or "") for t in texts]
        return {
            "inputs": np.ascontiguousarray(inputs, dtype=np.float32),
            "lengths": lengths.tolist(),
            "ids": [r["id"] for r in rows],
            "paths": [r["source_path"] for r in rows],
            "texts": texts,
            "targets": targets,
            "audio_seconds": float(lengths.sum()) * unit,
            "padded_seconds": float(inputs.shape[0] * inputs.shape[1]) * unit,
        }


# Transport through Ray Data: one Arrow row per output, the metadata as JSON and the array as raw bytes
# (no ragged tensor columns, no pickled objects in blocks).

def pack(out: dict[str, Any]) -> tuple[str, bytes]:
    inputs = out["inputs"]
    meta = {k: v for k, v in out.items() if k != "inputs"}
    meta["shape"] = None if inputs is None else list(inputs.shape)
    return json.dumps(meta), b"" if inputs is None else inputs.tobytes()


def unpack(meta_json: str, buffer) -> dict[str, Any]:
    out = json.loads(meta_json)
    shape = out.pop("shape")
    out["inputs"] = None if shape is None else np.frombuffer(buffer, dtype=np.float32).reshape(shape)
    return out


def collate_arrow_batch(table, collator: Collator):
    """``map_batches`` function: a pyarrow table of jobs (column ``job``) -> packed outputs."""
    import pyarrow as pa

    metas, buffers = [], []
    for job_json in table.column("job").to_pylist():
        for out in collator(json.loads(job_json)):
            meta, buf = pack(out)
            metas.append(meta)
            buffers.append(buf)
    return pa.table({"meta": pa.array(metas, pa.string()), "inputs": pa.array(buffers, pa.large_binary())})
