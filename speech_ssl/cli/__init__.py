"""``speech-ssl <command> key=value ...``: the only place where Hydra meets the library.

Each command is a Hydra app over ``conf/<command>/config.yaml`` (``version_base="1.3"``) whose base layer
is generated from the command's typed ``Config`` dataclass, so the YAML files carry only the values
that differ from the dataclass defaults (recipes), and ``--help`` shows the full configuration.

The flow of a command line:
1. overrides are checked against the dataclass before Hydra composes anything, so a misspelt key
   fails with one paragraph naming the key and the valid choices (exit code 2);
2. Hydra composes ``schema -> config.yaml -> recipe -> overrides``;
3. the composed config is resolved to plain data and converted into the dataclass (types checked);
4. the stage's ``run(cfg)`` does the work.
"""

from __future__ import annotations

import logging
import os
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from speech_ssl.cli.hydra_app import CONF_DIR, check_overrides, compose_config, run_hydra_app
from speech_ssl.config import ConfigError
from speech_ssl.errors import SpeechSSLError
from speech_ssl.stages import COMMANDS
from speech_ssl.stages.common import StageNotBuilt

__all__ = ["main", "CONF_DIR"]

EXIT_USAGE = 2


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name.ljust(width)}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    return (
        "usage: speech-ssl <command> [key=value ...] [--help]\n\n"
        "Self-supervised speech pretraining (wav2vec 2.0) at cluster scale on Ray.\n\n"
        "commands:\n" + "\n".join(lines) + "\n\n"
        "Each command is a Hydra app: `speech-ssl <command> --help` prints its configuration;\n"
        f"configs live in {CONF_DIR}. With no `ray.address` (or RAY_ADDRESS) an embedded local Ray\n"
        "is started for the command and shut down after it.\n"
    )


def _command_help(name: str, overrides: Sequence[str]) -> str:
    from omegaconf import OmegaConf

    command = COMMANDS[name]
    module = command.load()
    doc = textwrap.dedent(module.__doc__ or "").strip()
    cfg_doc = textwrap.dedent(module.Config.__doc__ or "").strip()
    recipes = sorted(p.stem for p in (CONF_DIR / name / "recipe").glob("*.yaml"))
    cfg = compose_config(name, list(overrides))
    text = f"usage: speech-ssl {name} [key=value ...]\n\n{doc}\n"
    if cfg_doc and not cfg_doc.startswith(module.Config.__name__ + "("):
        text += f"\n{cfg_doc}\n"
    if recipes:
        text += f"\nrecipes (recipe=<name>): {', '.join(recipes)}\n"
    text += f"\nconfiguration ({CONF_DIR / name / 'config.yaml'}):\n\n"
    text += OmegaConf.to_yaml(cfg, resolve=False)
    return text


def _setup_logging() -> None:
    level = os.environ.get("SPEECH_SSL_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("speech_ssl").setLevel(level)
    logging.getLogger("pipelines").setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if argv else EXIT_USAGE
    name, overrides = argv[0], argv[1:]
    if name not in COMMANDS:
        err = ConfigError("command", f"unknown command '{name}'.", list(COMMANDS))
        print(f"speech-ssl: {err.paragraph()}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging()
    try:
        overrides = check_overrides(name, overrides)
        if any(arg in ("-h", "--help") for arg in overrides):
            print(_command_help(name, [a for a in overrides if a not in ("-h", "--help")]))
            return 0
        return run_hydra_app(name, overrides)
    except ConfigError as err:
        print(f"speech-ssl {name}: {err.paragraph()}", file=sys.stderr)
        return EXIT_USAGE
    except StageNotBuilt:
        print(f"speech-ssl {name}: this stage is not built yet in this version of speech-ssl; "
              "nothing was run.", file=sys.stderr)
        return EXIT_USAGE
    except SpeechSSLError as err:
        print(f"speech-ssl {name}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"speech-ssl {name}: interrupted", file=sys.stderr)
        return 130
