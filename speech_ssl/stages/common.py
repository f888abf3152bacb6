"""Pieces shared by the stage configurations."""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Any


class StageNotBuilt(RuntimeError):
    """Raised by a command whose stage does not exist yet; the CLI exits with code 2."""


def model_choices() -> list[str]:
    from speech_ssl.models.presets import PRESET_NAMES

    return list(PRESET_NAMES)


def model_field(default: str = "tiny") -> Any:
    return field(default=default, metadata={"choices": model_choices})


def model_override_keys() -> list[str]:
    import dataclasses

    from speech_ssl.models.config import ModelConfig

    return [f.name for f in dataclasses.fields(ModelConfig)]


def model_overrides_field() -> Any:
    """``model_overrides.<ModelConfig field>=value`` on the command line; keys checked before running."""
    return field(default_factory=dict, metadata={"keys": model_override_keys})


def save_resolved_config(output_dir: Path, stage: str, cfg: Any) -> Path:
    """Write the stage's fully resolved configuration beside its outputs (``<stage>_config.json``)."""
    import json

    from speech_ssl.config import to_dict

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{stage}_config.json"
    path.write_text(json.dumps({"stage": stage, "config": to_dict(cfg)}, indent=1))
    return path


def resolve_model_config(preset: str, overrides: dict[str, Any]) -> Any:
    """The ModelConfig of ``preset`` with ``overrides`` applied; ConfigError names a bad key or value."""
    import dataclasses

    from speech_ssl.config import ConfigError, from_dict
    from speech_ssl.models.presets import PRESETS

    if preset not in PRESETS:
        raise ConfigError("model", f"unknown model preset '{preset}'.", list(PRESETS))
    base = dataclasses.asdict(PRESETS[preset])
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ConfigError(f"model_overrides.{unknown[0]}", f"unknown model setting '{unknown[0]}'.", list(base))
    return from_dict(type(PRESETS[preset]), {**base, **overrides}, "model_overrides")
