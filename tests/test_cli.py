"""The `speech-ssl` command line: help, configuration errors, and every command's config."""

from __future__ import annotations

import subprocess
import sys

import pytest

from speech_ssl.cli import main
from speech_ssl.cli.hydra_app import build_config, compose_config
from speech_ssl.config import ConfigError
from speech_ssl.stages import COMMANDS

# Values for each command's required keys, enough to build its typed config.
REQUIRED = {
    "prepare": ["input=/tmp/in", "output=/tmp/out.jsonl"],
    "cache": ["input=/tmp/in", "output=/tmp/cache"],
    "pretrain": ["output_dir=/tmp/o", "data.train=/tmp/train.jsonl"],
    "finetune": ["output_dir=/tmp/o", "init=none", "data.train=/tmp/t.jsonl", "data.valid=/tmp/v.jsonl"],
    "evaluate": ["checkpoint=/tmp/c", "data.test=/tmp/t.jsonl"],
    "transcribe": ["checkpoint=/tmp/c", "input=/tmp/a.wav"],
    "embed": ["checkpoint=/tmp/c", "input=/tmp/in", "output=/tmp/out"],
    "export": ["checkpoint=/tmp/c", "output=/tmp/hf"],
    "probe": ["checkpoint=/tmp/c", "train=/tmp/t.jsonl", "valid=/tmp/v.jsonl"],
    "run": [],
    "submit": ["ray.address=http://127.0.0.1:8265"],
}


def test_every_command_has_required_values_listed():
    assert set(REQUIRED) == set(COMMANDS)


def test_top_level_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "speech_ssl", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in out.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_prints_its_config(name, capsys):
    assert main([name, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"usage: speech-ssl {name}" in text
    assert "configuration (" in text
    cfg_cls = COMMANDS[name].load().Config
    import dataclasses

    for f in dataclasses.fields(cfg_cls):
        assert f"\n{f.name}:" in text, f"--help of {name} does not show '{f.name}'"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_default_config_builds_its_dataclass(name):
    """conf/<name>/config.yaml (and its default recipe) composes into the command's dataclass."""
    cfg = compose_config(name, REQUIRED[name])
    typed = build_config(name, cfg)
    assert isinstance(typed, COMMANDS[name].load().Config)


def test_misspelt_key_is_one_clear_paragraph():
    out = subprocess.run(
        [sys.executable, "-m", "speech_ssl", "pretrain", "trainer.max_udpates=5"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    err = out.stderr.strip()
    assert "Traceback" not in err
    assert "'trainer.max_udpates'" in err and "Did you mean 'max_updates'" in err
    assert "Valid choices:" in err and "num_workers" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["pretrain", "output_dir=/tmp/o", "data.train=x", "trainer.max_updates=abc"], "expected an integer"),
        (["pretrain", "output_dir=/tmp/o"], "'data.train': a required value is missing"),
        (["pretrain", "output_dir=/tmp/o", "data.train=x", "model=tinny"], "Valid choices: tiny"),
        (["pretrain", "output_dir=/tmp/o", "data.train=x", "trainer.precision=fp8"], "Valid choices: auto, fp32"),
        (["pretrain", "datta.train=x"], "Did you mean 'data'"),
        (["pretrain", "recipe=nope"], "unknown recipe"),
        (["pretrain", "just-a-word"], "expected key=value"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_bad_configuration_exits_2_with_the_key_named(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_model_override_keys_are_checked(capsys):
    from speech_ssl.cli.hydra_app import check_overrides

    with pytest.raises(ConfigError) as info:
        check_overrides("pretrain", ["model_overrides.not_a_model_field=1"])
    assert "not_a_model_field" in info.value.paragraph()


def _recipes():
    from speech_ssl.cli.hydra_app import CONF_DIR

    return sorted((p.parent.parent.name, p.stem) for p in CONF_DIR.glob("*/recipe/*.yaml"))


@pytest.mark.parametrize("name, recipe", _recipes())
def test_every_recipe_builds_its_dataclass(name, recipe):
    cfg = compose_config(name, [*REQUIRED[name], f"recipe={recipe}"])
    typed = build_config(name, cfg)
    assert isinstance(typed, COMMANDS[name].load().Config)
    if hasattr(typed, "model"):
        from speech_ssl.stages.common import resolve_model_config

        resolve_model_config(typed.model, getattr(typed, "model_overrides", {}))
