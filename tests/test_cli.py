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


def _help(name: str, *overrides: str, columns: int = 100, monkeypatch=None, capsys=None) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main([name, *overrides, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_key_has_a_description_in_its_dataclass_docstring(name):
    """Fails when a Config field (nested ones included) gains no ``name: description`` entry."""
    from speech_ssl.cli.help import undescribed_keys

    assert undescribed_keys(name) == [], f"describe these keys of '{name}' in their dataclass docstrings"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_lists_every_key_with_its_value_in_one_line(name, monkeypatch, capsys):
    from speech_ssl.cli.help import all_keys, config_lines
    from speech_ssl.stages import run as run_stage

    text = _help(name, monkeypatch=monkeypatch, capsys=capsys)
    lines = text.splitlines()
    assert lines[0].startswith(f"usage: speech-ssl {name}")
    assert max(len(line) for line in lines) <= 100, "help wider than the terminal's 100 columns"
    stages = {stage for stage in COMMANDS if stage != name}
    for key, description in all_keys(COMMANDS[name].load().Config):
        top = key.split(".")[0]
        if name in ("run", "submit") and top in stages and issubclass(COMMANDS[name].load().Config,
                                                                      run_stage.Config):
            continue  # a whole stage: its own --help lists its keys; run shows those it sets
        assert any(line.startswith(f"  {key}=") or line.startswith(f"  {key}.*") for line in lines), \
            f"--help of {name} does not show '{key}'"
    # one line per key: the key=value line carries the start of its description
    for line in lines:
        if line.startswith("  ") and "=" in line.split()[0] and not line.startswith("    "):
            assert len(line.split(None, 1)) == 2, f"no description on: {line!r}"


def test_help_shows_values_after_overrides_and_recipes(monkeypatch, capsys):
    text = _help("pretrain", "recipe=base", "trainer.optim.lr=0.00123", "data.train=/x/t.jsonl",
                 monkeypatch=monkeypatch, capsys=capsys)
    assert "  trainer.optim.lr=0.00123 " in text
    assert "  data.train=/x/t.jsonl " in text
    assert "base (in use)" in text and "cpu_tiny," in text
    assert "  output_dir=??? " in text
    # the descriptions come from the docstrings
    assert "the peak learning rate" in text


@pytest.mark.parametrize("name", ["pretrain", "finetune", "cache", "run"])
def test_help_lists_model_presets(name, monkeypatch, capsys):
    from speech_ssl.models.presets import PRESET_NAMES

    text = _help(name, *REQUIRED[name], monkeypatch=monkeypatch, capsys=capsys)
    presets = text.split("model presets (model=<name>):", 1)[1].split("\n\n", 1)[0]
    for preset in PRESET_NAMES:
        assert f"{preset} (" in presets


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_documents_init_none_where_there_is_an_init_key(name, monkeypatch, capsys):
    from speech_ssl.cli.help import all_keys

    init_keys = [k for k, _ in all_keys(COMMANDS[name].load().Config) if k.split(".")[-1] == "init"]
    text = _help(name, monkeypatch=monkeypatch, capsys=capsys)
    for key in init_keys:
        assert f"{key}=none" in text
    assert bool(init_keys) == ("init=none" in text)


def test_help_of_run_lists_the_stage_values_it_sets_not_every_stage_key(monkeypatch, capsys):
    text = _help("run", monkeypatch=monkeypatch, capsys=capsys)
    assert "  pretrain.model=fbank-tiny " in text  # set by the demo recipe
    assert "pretrain.data.sample_rate=" not in text  # a stage default: in `speech-ssl pretrain --help`
    assert "`speech-ssl pretrain --help`" in text
    assert len(text.splitlines()) < 120


def test_docstring_parser_handles_shared_wildcard_and_inline_entries():
    import dataclasses as dc

    from speech_ssl.cli.help import field_descriptions

    @dc.dataclass
    class Base:
        """Summary line, not an entry.

        alpha / beta: shared by two keys, continued
            on an indented line.
        mask_*: every mask_ key. gamma: after a sentence; delta applies only with it.

        A closing paragraph that belongs to no entry."""

        alpha: int = 0
        beta: int = 0
        mask_prob: float = 0.0
        mask_length: int = 1
        gamma: int = 0
        delta: int = 0

    @dc.dataclass
    class Child(Base):
        """delta: described here. alpha: see below."""

    found = field_descriptions(Child)
    assert found["alpha"] == found["beta"] == "shared by two keys, continued on an indented line."
    assert found["mask_prob"] == found["mask_length"] == "every mask_ key."
    assert found["gamma"] == "after a sentence; delta applies only with it."
    assert found["delta"] == "described here."


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


def test_help_read_by_a_reader_that_stops_early_is_not_an_error():
    """`speech-ssl pretrain --help | head`: the reader may close the pipe before help is written (here it is
    closed before the command starts, so every write fails): exit 0, no BrokenPipeError traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "speech_ssl", "pretrain", "--help"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
