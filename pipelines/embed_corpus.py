"""prepare -> embed: a corpus into Parquet shards with a checkpoint you give.

    prepare    data.unlabeled (a directory, manifest or list) -> prepare/unlabeled.jsonl
    embed      embed.checkpoint over prepare/unlabeled.jsonl -> embed/*.parquet

``embed.checkpoint`` is required (ours, a transformers directory or a fairseq ``.pt``); layers, pooling,
dtype and the actor settings are under ``embed.*``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from pipelines.common import manifest, owned, prepare, require_data, shared
from speech_ssl.config import ConfigError
from speech_ssl.pipeline import Stage
from speech_ssl.stages import embed

NAME = "embed_corpus"


def stages(cfg, published: Optional[str] = None) -> list[Stage]:
    """The stages, wired under ``cfg.output_dir``; ``published``: the run's URI output_dir (see
    ``pipelines.common.shared``)."""
    out = Path(cfg.output_dir).resolve()
    data = require_data(cfg, NAME, ["unlabeled"])
    owned(cfg.embed.output, "embed.output", f"{out}/embed")
    if not cfg.embed.checkpoint:
        raise ConfigError("embed.checkpoint", "the embed_corpus pipeline needs a checkpoint to embed with "
                                              "(ours, a transformers directory or a fairseq .pt file).")
    em = replace(cfg.embed, input=manifest(out, "unlabeled"), output=shared(out, published, "embed"), ray=cfg.ray)
    return [
        prepare(cfg, out, data),
        Stage("embed", embed.run, em, needs=["prepare"]),
    ]


def summarize(out: Path, results: dict[str, Any]) -> dict[str, Any]:
    em = results.get("embed") or {}
    counts = em.get("counts", {})
    run = em.get("this_run", {})
    highlights = [f"embedded {counts.get('used')} utterances ({em.get('audio_hours', {}).get('total', 0):.3f} h) "
                  f"with {em.get('model', {}).get('checkpoint')}: layers {em.get('layers')}, pooling "
                  f"{em.get('pooling')}, {em.get('dtype')}; {counts.get('quarantined', 0)} quarantined, "
                  f"{counts.get('filtered', 0)} filtered",
                  f"this run: {run.get('audio_seconds_per_second', 0):.1f} s of audio per second"]
    return {
        "results": {"embedded_utterances": counts.get("used"), "quarantined": counts.get("quarantined"),
                    "shards": len(em.get("shards", []))},
        "highlights": highlights,
        "outputs": {"embeddings (Parquet)": em.get("output", str(out / "embed")),
                    "embedding summary": str(out / "embed" / "_summary.json"),
                    "quarantine report": str(out / "embed" / "_quarantine.jsonl"),
                    "stage logs and records": f"{out}/<stage>/stage.log, stage.json"},
    }
