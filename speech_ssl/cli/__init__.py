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

import contextlib
import logging
import os
import sys
import threading
import textwrap
from pathlib import Path
from typing import Iterator, Optional, Sequence

from speech_ssl.cli.hydra_app import CONF_DIR, check_overrides, compose_config, run_hydra_app
from speech_ssl.config import ConfigError
from speech_ssl.errors import Interrupted, SpeechSSLError
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
        "`speech-ssl <command> --help` describes every key of a command with its current value, and its\n"
        "recipes and model presets (overrides given with --help show their effect). Each command is a\n"
        f"Hydra app; configs live in {CONF_DIR}. With no `ray.address` (or RAY_ADDRESS) an embedded local Ray\n"
        "is started for the command and shut down after it.\n"
    )


def _command_help(name: str, overrides: Sequence[str]) -> str:
    """Every key of the command in one line (description from its dataclass docstrings, current value),
    its recipes and model presets: ``speech_ssl.cli.help``."""
    from speech_ssl.cli.help import command_help

    return command_help(name, list(overrides))


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


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` (exit 130 / 143 with one line) wherever the command is; training
    replaces them with polite stops while it runs (speech_ssl.train.control). Without this, SIGTERM would
    kill the command silently. Ray's ``ray.get`` turns a handler's exception into a bare KeyboardInterrupt,
    so the signal is remembered and the bare one re-raised as ``Interrupted``."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def interrupt(signum, frame):
        received.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except KeyboardInterrupt as err:
        if received and not isinstance(err, Interrupted):
            raise Interrupted(received[-1]) from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _print_to_pager(text: str) -> None:
    """Print help to stdout; a reader that stops early (``| head``, a pager quit) is not an error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python would report the broken pipe again when it flushes stdout at exit: point it at devnull.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_to_pager(_usage())
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
            _print_to_pager(_command_help(name, [a for a in overrides if a not in ("-h", "--help")]))
            return 0
        with _signals_interrupt():
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
    except Interrupted as err:  # a stop by signal: one line saying where a re-run resumes
        print(f"speech-ssl {name}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"speech-ssl {name}: interrupted", file=sys.stderr)
        return 130
