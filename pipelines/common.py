"""Wiring shared by the pipeline definitions: who sets which path, the prepare stage, training storage."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from speech_ssl.config import ConfigError
from speech_ssl.pipeline import Stage
from speech_ssl.stages import prepare as prepare_stage


def owned(value: Any, key: str, where: str) -> None:
    """A path the pipeline decides (a stage's own folder): setting it yourself is a configuration error."""
    if value not in (None, ""):
        raise ConfigError(key, f"is set by the pipeline ({where}); leave it out and choose output_dir instead.")


def given(value: Any, default: Any) -> Any:
    """A path the pipeline wires (an earlier stage's output) unless you give one (e.g. finetune.init=none)."""
    return value if value not in (None, "") else default


def none_or(value: Any) -> Any:
    """``none`` on the command line switches an optional input off (e.g. pretrain.data.valid=none)."""
    return None if value == "none" else value


def require_data(cfg, pipeline: str, splits: list[str]) -> dict[str, str]:
    """The ``data.*`` inputs a pipeline needs, or one error naming the first that is missing."""
    missing = [s for s in splits if not getattr(cfg.data, s)]
    if missing:
        raise ConfigError(f"data.{missing[0]}", f"the {pipeline} pipeline needs data.{', data.'.join(splits)} "
                                                f"(missing: {', '.join(missing)}).")
    data = {s: getattr(cfg.data, s) for s in splits}
    _check_demo_mix(data)
    return data


def _check_demo_mix(data: dict[str, str]) -> None:
    """Your audio with the demo's labels (or the reverse) is almost surely a forgotten data.* argument."""
    from speech_ssl.demo import CORPUS_DIR

    demo = {k for k, v in data.items() if "://" not in v and Path(v).resolve().is_relative_to(CORPUS_DIR)}
    if demo and len(demo) < len(data):
        raise ConfigError(f"data.{sorted(demo)[0]}",
                          f"mixes the demo corpus ({', '.join(f'data.{k}' for k in sorted(demo))}) with your data "
                          f"({', '.join(f'data.{k}' for k in sorted(set(data) - demo))}); give every data.* input "
                          "of the pipeline.")


def shared(output_dir: Path, published: Optional[str], *parts: str) -> str:
    """Where a later stage reads an earlier stage's output (a checkpoint, embeddings, a cache): under the
    run's URI ``output_dir`` when it has one (``published``; the runner uploads each stage's folder when
    it finishes), so that a stage running on another node finds it; else in the local folder."""
    if published is None:
        return str(output_dir.joinpath(*parts))
    from speech_ssl import storage

    return storage.join(published, *parts)


def manifest(output_dir: Path, split: str) -> str:
    """Where the prepare stage writes the manifest of ``split``."""
    return str(output_dir / "prepare" / f"{split}.jsonl")


def run_prepare(configs: dict[str, prepare_stage.Config]) -> dict[str, Any]:
    """The prepare stage of a pipeline: ``speech-ssl prepare`` once per input (split)."""
    result = {}
    for split, cfg in configs.items():
        prepare_stage.run(cfg)
        quarantine = Path(prepare_stage.quarantine_path(cfg.output))
        result[split] = {"manifest": cfg.output, "utterances": _lines(Path(cfg.output)),
                         "quarantine": str(quarantine), "quarantined": _lines(quarantine)}
    return result


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def prepare(cfg, output_dir: Path, inputs: dict[str, str]) -> Stage:
    """One manifest per input under ``<output_dir>/prepare/`` (durations probed, bad files reported)."""
    owned(cfg.prepare.input, "prepare.input", "the data.* inputs")
    owned(cfg.prepare.output, "prepare.output", f"{output_dir}/prepare/<split>.jsonl")
    owned(cfg.prepare.quarantine, "prepare.quarantine", "beside each manifest")
    configs = {split: replace(cfg.prepare, input=source, output=manifest(output_dir, split), ray=cfg.ray)
               for split, source in inputs.items()}
    return Stage("prepare", run_prepare, configs, provides=[f"{split}.jsonl" for split in inputs])


def trainer_storage(trainer, storage_path: Optional[str], output_dir: Path):
    """``storage_path`` (e.g. ``s3://bucket/runs``) as the training stages' checkpoint storage:
    ``<storage_path>/<output_dir name>``, so that every run keeps its checkpoints apart."""
    if trainer.storage_path or not storage_path:
        return trainer
    return replace(trainer, storage_path=f"{storage_path.rstrip('/')}/{output_dir.name}")


def training_storage(stage_output: Path, trainer) -> str:
    from speech_ssl.train.launch import storage_root

    return storage_root(stage_output, trainer)
