"""Model settings (issue 19): one key per setting, typed and described, resolved once into a ModelConfig.

The stages carry the preset (``model``) and the user's typed layer (``model_overrides.*``); fine-tuning's
defaults of masking and dropouts are a layer below the user's, so an explicit value always wins; the old
duplicate keys (``ctc.mask_prob`` ...) fail naming the new one; and every recipe resolves to the settings it
had before the recipes were cut to what differs from the defaults (``recipe_settings.json``, written by the
code before this change; ``python tests/test_model_settings.py --write`` rewrites it after a deliberate
change of a default).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import sys
from pathlib import Path

import pytest

from speech_ssl.cli.hydra_app import CONF_DIR, build_config, check_overrides, compose_config
from speech_ssl.config import ConfigError, from_dict, to_dict
from speech_ssl.models.config import ModelConfig, ModelOverrides, resolve_config
from speech_ssl.stages import finetune, pretrain
from speech_ssl.train.tasks.ctc import (FINETUNE_MODEL_DEFAULTS, CTCConfig, FinetuneModelOverrides,
                                        finetune_model_config, init_model_config)

GOLDEN = Path(__file__).with_name("recipe_settings.json")
REQUIRED = {
    "pretrain": ["output_dir=/tmp/o", "data.train=/tmp/train.jsonl"],
    "finetune": ["output_dir=/tmp/o", "init=none", "data.train=/tmp/t.jsonl", "data.valid=/tmp/v.jsonl"],
    "run": [],
}
MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


def _composed(name: str, *overrides: str):
    return build_config(name, compose_config(name, [*REQUIRED[name], *check_overrides(name, list(overrides))]))


# --------------------------------------------------------------------------------------------------
# one key per setting


def test_model_overrides_has_one_typed_described_key_per_model_setting():
    from speech_ssl.cli.help import field_descriptions

    for cls in (ModelOverrides, FinetuneModelOverrides):
        assert [f.name for f in dataclasses.fields(cls)] == MODEL_FIELDS
        assert all(f.default is None for f in dataclasses.fields(cls))
        described = field_descriptions(cls)
        assert [n for n in MODEL_FIELDS if not described.get(n, "").strip()] == []
    with pytest.raises(ConfigError, match="model_overrides.mask_prob"):
        from_dict(finetune.Config, {"output_dir": "o", "init": "none", "data": {"train": "t", "valid": "v"},
                                    "model_overrides": {"mask_prob": "lots"}})
    for cls in (ModelOverrides, FinetuneModelOverrides):  # Ray ships them to the workers
        layer = cls(mask_prob=0.3, conv_channels=[8, 8])
        assert pickle.loads(pickle.dumps(layer)) == layer


def test_every_model_setting_has_exactly_one_key():
    """No model setting is also a ctc.* (or any other stage) key: model_overrides.<name> is its only home."""
    from speech_ssl.cli.help import all_keys

    assert not set(f.name for f in dataclasses.fields(CTCConfig)) & set(MODEL_FIELDS)
    for cls in (pretrain.Config, finetune.Config):
        keys = [k for k, _ in all_keys(cls)]
        homes = {name: [k for k in keys if k.split(".")[-1] == name and not k.startswith("data.")]
                 for name in MODEL_FIELDS}
        assert {n: h for n, h in homes.items() if h != [f"model_overrides.{n}"]} == {}, cls


@pytest.mark.parametrize("name, arg, new_key", [
    ("finetune", "ctc.mask_prob=0.5", "model_overrides.mask_prob"),
    ("finetune", "ctc.layerdrop=0", "model_overrides.layerdrop"),
    ("finetune", "ctc.dropout=0.1", "model_overrides.dropout"),
    ("run", "finetune.ctc.mask_channel_prob=0.1", "finetune.model_overrides.mask_channel_prob"),
])
def test_an_old_duplicate_key_fails_naming_the_new_one(name, arg, new_key):
    with pytest.raises(ConfigError) as info:
        check_overrides(name, [arg])
    assert info.value.key == arg.split("=")[0] and f"this setting is {new_key}" in info.value.paragraph()


def test_an_old_key_in_a_recipe_file_fails_naming_the_new_one():
    data = {"output_dir": "o", "init": "none", "data": {"train": "t", "valid": "v"}, "ctc": {"mask_prob": 0.5}}
    with pytest.raises(ConfigError, match=r"'ctc.mask_prob'.*this setting is model_overrides.mask_prob"):
        from_dict(finetune.Config, data)


def test_the_command_line_exits_2_naming_the_new_key(capsys):
    from speech_ssl.cli import main

    assert main(["finetune", *REQUIRED["finetune"], "ctc.mask_prob=0.3"]) == 2
    err = capsys.readouterr().err
    assert "model_overrides.mask_prob" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# layers: preset or checkpoint < fine-tuning defaults < the user's keys


def test_an_explicit_user_value_wins_over_the_finetuning_layer():
    unset = finetune_model_config("tiny", FinetuneModelOverrides())
    assert dataclasses.asdict(unset) == dataclasses.asdict(resolve_config("tiny", FINETUNE_MODEL_DEFAULTS.given()))
    assert unset.mask_prob == 0.65 and unset.dropout == 0.0 and unset.activation_dropout == 0.1
    chosen = finetune_model_config("tiny", FinetuneModelOverrides(mask_prob=0.3, dropout=0.2))
    assert chosen.mask_prob == 0.3 and chosen.dropout == 0.2 and chosen.mask_channel_prob == 0.25
    # through the command line: the recipe's value, then the user's
    assert _composed("finetune", "recipe=cpu_tiny").model_overrides.mask_prob == 0.5
    cfg = _composed("finetune", "recipe=cpu_tiny", "model_overrides.mask_prob=0.2", "model_overrides.layerdrop=0.3")
    resolved = finetune_model_config(cfg.model, cfg.model_overrides)
    assert (resolved.mask_prob, resolved.layerdrop, resolved.mask_channel_length) == (0.2, 0.3, 16)
    # an explicit value equal to the preset's still counts (it is not mistaken for "unset")
    assert finetune_model_config("tiny", FinetuneModelOverrides(dropout=0.1)).dropout == 0.1


def test_pretraining_resolves_preset_then_user():
    cfg = _composed("pretrain", "model=tiny", "model_overrides.num_layers=2", "model_overrides.mask_prob=0.5")
    model = pretrain.model_config(cfg)
    assert (model.num_layers, model.mask_prob, model.embed_dim) == (2, 0.5, 256)
    with pytest.raises(ConfigError, match="model_overrides.num_heads"):
        pretrain.model_config(_composed("pretrain", "model_overrides.num_heads=7"))


def test_a_checkpoint_keeps_its_own_settings_unless_the_user_overrides_them(tmp_path):
    """A pretraining checkpoint gets the fine-tuning layer (fairseq's fine-tuning replaces pretraining
    masking and dropouts); a checkpoint that is already a CTC model keeps its own; the user's keys win."""
    import torch

    from speech_ssl.data import DataConfig, Vocabulary
    from speech_ssl.models import Wav2Vec2ForCTC, build, export_hf, save_model
    from speech_ssl.train.tasks.ctc import CTCTask

    torch.manual_seed(0)
    save_model(build("tiny"), tmp_path / "pretrained")
    own = resolve_config("tiny", {"mask_prob": 0.05, "mask_channel_prob": 0.0, "layerdrop": 0.0, "dropout": 0.1})
    ctc = Wav2Vec2ForCTC(own, 5)
    save_model(ctc, tmp_path / "ctc")
    export_hf(ctc, tmp_path / "ctc_hf")

    base, finetuned = init_model_config(str(tmp_path / "pretrained"))
    assert not finetuned
    model = finetune_model_config(base, FinetuneModelOverrides(), base_is_finetuned=finetuned)
    assert (model.mask_prob, model.mask_channel_prob, model.dropout) == (0.65, 0.25, 0.0)

    for init in ("ctc", "ctc_hf"):
        base, finetuned = init_model_config(str(tmp_path / init))
        assert finetuned, init
        kept = finetune_model_config(base, FinetuneModelOverrides(), base_is_finetuned=True)
        assert (kept.mask_prob, kept.mask_channel_prob, kept.layerdrop, kept.dropout) == (0.05, 0.0, 0.0, 0.1)
        user = finetune_model_config(base, FinetuneModelOverrides(mask_prob=0.3), base_is_finetuned=True)
        assert (user.mask_prob, user.layerdrop) == (0.3, 0.0)

    # the task trains exactly the resolved model, on the checkpoint's weights
    vocab = Vocabulary.build(["AB CD"])
    task = CTCTask(init=str(tmp_path / "ctc"), model_config=user, data=DataConfig(), train=[], valid=None, vocab=vocab)
    built = task.build_model()
    assert dataclasses.asdict(built.config) == dataclasses.asdict(user) and built.vocab_size == len(vocab)
    for key, value in ctc.encoder.state_dict().items():
        torch.testing.assert_close(built.encoder.state_dict()[key], value, atol=0, rtol=0, msg=key)


def test_help_shows_each_model_key_and_where_its_value_comes_from(monkeypatch):
    from speech_ssl.cli.help import command_help

    monkeypatch.setenv("COLUMNS", "160")
    text = command_help("finetune", REQUIRED["finetune"] + ["recipe=cpu_tiny"])
    lines = {line.split("=")[0].strip(): line for line in text.splitlines() if "=" in line}
    assert "null: 0.65, the fine-tuning default" in lines["model_overrides.mask_prob"].replace("  ", " ")
    assert lines["model_overrides.mask_prob"].split()[0] == "model_overrides.mask_prob=0.5"  # the recipe's
    assert lines["model_overrides.num_layers"].split()[0] == "model_overrides.num_layers=null"
    assert not any(key.startswith("ctc.mask") for key in lines)


# --------------------------------------------------------------------------------------------------
# recipes: only what differs from the defaults, resolving as before


def _flat(value, prefix=""):
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: value}


def _settings(name: str, cfg) -> dict:
    """What a recipe's configuration runs with: every key but the model overrides, plus the resolved model
    (and, for fine-tuning, the changes applied over a pretraining checkpoint)."""
    if name == "run":
        return {"pretrain": _settings("pretrain", cfg.pretrain), "finetune": _settings("finetune", cfg.finetune)}
    data = to_dict(cfg)
    data.pop("model_overrides")
    if name == "pretrain":
        data["resolved_model"] = dataclasses.asdict(pretrain.model_config(cfg))
    else:
        data["resolved_model"] = dataclasses.asdict(finetune_model_config(cfg.model, cfg.model_overrides))
        data["on_pretrained_init"] = {**FINETUNE_MODEL_DEFAULTS.given(), **cfg.model_overrides.given()}
    return data


def _recipes() -> list[tuple[str, str]]:
    return [(name, p.stem) for name in REQUIRED for p in sorted((CONF_DIR / name / "recipe").glob("*.yaml"))]


def _resolved(name: str, recipe: str) -> dict:
    return json.loads(json.dumps(_flat(_settings(name, _composed(name, f"recipe={recipe}")))))


@pytest.mark.parametrize("name, recipe", _recipes())
def test_recipes_resolve_to_the_settings_they_had(name, recipe):
    golden = json.loads(GOLDEN.read_text())[f"{name}/{recipe}"]
    now = _resolved(name, recipe)
    assert {k: (golden.get(k), now.get(k)) for k in set(golden) | set(now) if golden.get(k) != now.get(k)} == {}


@pytest.mark.parametrize("name, recipe", [r for r in _recipes() if r[0] in ("pretrain", "finetune")])
def test_recipes_carry_only_what_differs_from_the_defaults(name, recipe):
    import yaml

    from speech_ssl.cli.hydra_app import schema_dict
    from speech_ssl.stages import COMMANDS

    defaults = _flat(schema_dict(COMMANDS[name].load().Config))
    given = _flat(yaml.safe_load((CONF_DIR / name / "recipe" / f"{recipe}.yaml").read_text()))
    assert [k for k, v in given.items() if k in defaults and defaults[k] == v] == []


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    golden = {f"{n}/{r}": _resolved(n, r) for n, r in _recipes()}
    GOLDEN.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}"
                                         for k, v in sorted(golden.items())) + "\n}\n")
