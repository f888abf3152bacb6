"""Hydra plumbing for the commands: schema nodes from dataclasses, override checks, the app itself."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence, get_args, get_origin

from speech_ssl.config import MISSING, ConfigError, check_key, from_dict, to_dict
from speech_ssl.stages import COMMANDS


def _find_conf_dir() -> Path:
    """The Hydra configs: ``speech_ssl/conf`` inside the package, which is where an installed wheel has them
    (in a checkout it is a link to the top-level ``conf/``: see [tool.setuptools.package-data] in
    pyproject.toml); the checkout's ``conf/`` itself where that link was not made (a clone without symlinks)."""
    from importlib.resources import files

    package = Path(str(files("speech_ssl"))).resolve()
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "pretrain" / "config.yaml").is_file():
            return candidate.resolve()
    raise RuntimeError(f"speech-ssl cannot find its configs: no conf/ in {package} (a wheel built without its "
                       f"package data?) nor beside it")


CONF_DIR = _find_conf_dir()

# Hydra's own settings for every command: run in the current directory, write nothing of its own,
# leave logging to us.
_HYDRA_OVERRIDES = [
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra.job.chdir=false",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
]


def schema_dict(cls: type) -> dict[str, Any]:
    """The defaults of dataclass ``cls`` as plain data; required fields become ``???``."""
    import typing

    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            value = to_dict(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            value = to_dict(field.default_factory())
        elif dataclasses.is_dataclass(hints[field.name]):
            value = schema_dict(hints[field.name])
        else:
            value = MISSING
        out[field.name] = value
    return out


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    from speech_ssl.demo import corpus_path

    if not OmegaConf.has_resolver("demo"):
        OmegaConf.register_new_resolver("demo", lambda name="": corpus_path(name))
    if not OmegaConf.has_resolver("command_line"):
        OmegaConf.register_new_resolver("command_line", _command_line_overrides)


def _command_line_overrides() -> list[str]:
    """The running command's overrides as checked (``speech-ssl submit`` forwards them to ``speech-ssl run``
    on the cluster); empty under the compose API (``--help``), where no command line runs."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _register_schema(name: str) -> None:
    from hydra.core.config_store import ConfigStore

    cls = COMMANDS[name].load().Config
    ConfigStore.instance().store(name=f"{name}_schema", node=schema_dict(cls))


def _mapping_keys(cls: type, dotted: str) -> list[str] | None:
    """Valid sub-keys of a free-form mapping field, when its metadata names them (``keys``)."""
    import typing

    tp: Any = cls
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            return None
        fields = {f.name: f for f in dataclasses.fields(tp)}
        field = fields.get(part)
        if field is None:
            return None
        hint = typing.get_type_hints(tp)[part]
        if get_origin(hint) is dict and i == len(parts) - 2:
            keys = field.metadata.get("keys") if field.metadata else None
            return list(keys() if callable(keys) else keys) if keys is not None else None
        args = [a for a in get_args(hint) if a is not type(None)]
        tp = args[0] if get_origin(hint) is not None and len(args) == 1 else hint
    return None


def _inside_mapping(cls: type, dotted: str) -> bool:
    """True when ``dotted`` ends inside a free-form mapping (a key Hydra cannot know in advance)."""
    import typing

    tp: Any = cls
    for part in dotted.split(".")[:-1]:
        if not dataclasses.is_dataclass(tp):
            return get_origin(tp) is dict or tp is dict
        tp = typing.get_type_hints(tp)[part]
        args = [a for a in get_args(tp) if a is not type(None)]
        if get_origin(tp) is not None and get_origin(tp) is not dict and len(args) == 1:
            tp = args[0]
    return get_origin(tp) is dict or tp is dict


def check_overrides(name: str, overrides: Sequence[str]) -> list[str]:
    """Validate ``key=value`` overrides against the command's dataclass; return them ready for Hydra.

    Keys inside free-form mappings (``model_overrides.*``) are rewritten to Hydra's ``++`` form so that
    they may be added or replaced without the user knowing Hydra's append syntax.
    """
    cls = COMMANDS[name].load().Config
    recipes = sorted(p.stem for p in (CONF_DIR / name / "recipe").glob("*.yaml"))
    out = []
    for arg in overrides:
        if arg.startswith("-") or "=" not in arg:
            if not arg.startswith("-"):
                raise ConfigError(arg, "expected key=value (for example trainer.max_updates=100).",
                                  [f.name for f in dataclasses.fields(cls)])
            out.append(arg)
            continue
        key, value = arg.split("=", 1)
        bare = key.lstrip("+~")
        if bare.startswith("hydra.") or bare.startswith("hydra/"):
            out.append(arg)
            continue
        if bare == "recipe":
            if value not in recipes:
                raise ConfigError("recipe", f"unknown recipe '{value}' for '{name}'.", recipes)
            out.append(arg)
            continue
        check_key(cls, bare)
        if _inside_mapping(cls, bare):
            valid = _mapping_keys(cls, bare)
            leaf = bare.split(".")[-1]
            if valid is not None and leaf not in valid:
                raise ConfigError(bare, f"unknown key '{leaf}'.", valid)
            out.append(f"++{bare}={value}")
        else:
            out.append(arg)
    return out


def compose_config(name: str, overrides: list[str]):
    """The composed (unresolved) config of a command, through Hydra's compose API (for --help)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    _register_resolvers()
    _register_schema(name)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR / name), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def build_config(name: str, cfg: Any) -> Any:
    """A composed Hydra config as the command's typed dataclass (raises ConfigError)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    data.pop("hydra", None)
    return from_dict(COMMANDS[name].load().Config, data)


def run_hydra_app(name: str, overrides: list[str]) -> int:
    """Run command ``name`` as a Hydra app (``@hydra.main``) and return its exit code."""
    import hydra

    _register_resolvers()
    _register_schema(name)
    module = COMMANDS[name].load()
    outcome: dict[str, Any] = {"code": 0, "error": None}

    def task(cfg: Any) -> None:
        try:
            config = build_config(name, cfg)
            result = module.run(config)
            # Stages return summaries for pipelines; only an int is an exit code.
            outcome["code"] = result if isinstance(result, int) and not isinstance(result, bool) else 0
        except Exception as err:  # handed back to main(), which knows how to report each kind
            outcome["error"] = err

    app = hydra.main(config_path=str(CONF_DIR / name), config_name="config", version_base="1.3")(task)
    saved_argv = sys.argv
    sys.argv = [f"speech-ssl {name}", *_HYDRA_OVERRIDES, *overrides]
    try:
        app()
    finally:
        sys.argv = saved_argv
    if outcome["error"] is not None:
        raise outcome["error"]
    return outcome["code"]
