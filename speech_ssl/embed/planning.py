"""Planning on the driver: the rows to embed -> length-bucketed batches -> shards of consecutive batches,
and each shard as the plain-JSON job a decode task gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from speech_ssl.data.collate import job_row
from speech_ssl.data.config import DataConfig
from speech_ssl.data.plan import plan_epoch
from speech_ssl.data.sources import Utterance
from speech_ssl.embed import shards as shard_io

MIN_SHARD_SECONDS = 30.0


def shard_seconds_for(requested: float, total_seconds: float, num_actors: int) -> float:
    """Audio per shard: ``requested`` at most; small jobs get smaller shards (down to MIN_SHARD_SECONDS),
    at least four per actor, so that decoding overlaps compute and every actor has work."""
    return min(requested, max(MIN_SHARD_SECONDS, total_seconds / (4 * num_actors)))


@dataclass
class ShardPlan:
    name: str
    batches: list[list[int]]  # row indices per planned batch
    audio_seconds: float


def plan_shards(rows: list[Utterance], data: DataConfig, mode: str, shard_seconds: float, run: int) -> list[ShardPlan]:
    """Length-bucketed batches (the data layer's plan, in length order), grouped into shards of
    consecutive batches holding about ``shard_seconds`` of audio each."""
    durations = [r.duration for r in rows]
    batches = plan_epoch(durations, data, "exact" if mode == "exact" else "pad", seed=0, epoch=0)
    shard_list: list[ShardPlan] = []
    current: list[list[int]] = []
    seconds = 0.0
    for batch in batches:
        current.append(batch)
        seconds += sum(durations[i] for i in batch)
        if seconds >= shard_seconds:
            shard_list.append(ShardPlan(shard_io.shard_name(run, len(shard_list)), current, seconds))
            current, seconds = [], 0.0
    if current:
        shard_list.append(ShardPlan(shard_io.shard_name(run, len(shard_list)), current, seconds))
    return shard_list


def shard_job(plan: ShardPlan, rows: list[Utterance]) -> dict[str, Any]:
    """What a decode task needs for one shard (plain JSON)."""
    batches = []
    for k, batch in enumerate(plan.batches):
        batch_rows = [{**job_row(rows[i]), "text": None} for i in batch]
        batches.append({"epoch": 0, "position": k, "index": k, "rows": batch_rows})
    starts = {rows[i].id: rows[i].start for batch in plan.batches for i in batch}
    return {"shard": plan.name, "batches": batches, "starts": starts}

