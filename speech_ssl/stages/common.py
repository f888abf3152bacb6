"""Pieces shared by the stage configurations."""

from __future__ import annotations

from dataclasses import field
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
