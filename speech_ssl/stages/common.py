"""Pieces shared by the stage configurations."""

from __future__ import annotations

import contextlib
from dataclasses import field
from pathlib import Path
from typing import Any, Iterator


class StageNotBuilt(RuntimeError):
    """Raised by a command whose stage does not exist yet; the CLI exits with code 2."""


def model_choices() -> list[str]:
    from speech_ssl.models.presets import PRESET_NAMES

    return list(PRESET_NAMES)


def model_field(default: str = "tiny") -> Any:
    return field(default=default, metadata={"choices": model_choices})


def model_overrides_field() -> Any:
    """``model_overrides.<ModelConfig field>=value``: the user's layer of model settings (a ModelOverrides,
    every key typed and described, null where not set)."""
    from speech_ssl.models.config import ModelOverrides

    return field(default_factory=ModelOverrides)


def save_resolved_config(output_dir: Path, stage: str, cfg: Any, model_config: Any = None) -> Path:
    """Write the stage's fully resolved configuration beside its outputs (``<stage>_config.json``), with the
    ModelConfig its settings resolved to (``model``) when given."""
    import dataclasses
    import json

    from speech_ssl.config import to_dict

    from speech_ssl import storage

    record = {"stage": stage, "config": to_dict(cfg)}
    if model_config is not None:
        record["model"] = dataclasses.asdict(model_config)
    text = json.dumps(record, indent=1)
    if storage.is_uri(output_dir):  # written at once where it goes (s3://, gs://, ...)
        storage.write_text(storage.join(output_dir, f"{stage}_config.json"), text)
        # and in the local work folder that is uploaded at the end
        (storage.local_work_dir(output_dir) / f"{stage}_config.json").write_text(text)
        return storage.local_work_dir(output_dir) / f"{stage}_config.json"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{stage}_config.json"
    path.write_text(text)
    return path


def resolve_model_config(preset: Any, *layers: Any) -> Any:
    """The ModelConfig of ``preset`` with ``layers`` of overrides applied (later wins); ConfigError names a bad
    key or value. The same function as ``speech_ssl.models.config.resolve_config``."""
    from speech_ssl.models.config import resolve_config

    return resolve_config(preset, *layers)


# --------------------------------------------------------------------------------------------------
# Checks made before Ray starts: a command with a bad path or corpus stops in seconds, leaving nothing
# behind (nothing here creates a file or folder).


def _is_uri(path: str) -> bool:
    return "://" in str(path)


def check_input_path(key: str, value: Any) -> None:
    """``value`` (a path, or a list of them) exists and is readable; URIs are left to their readers.

    A ConfigError names ``key``: a wrong path is a usage error (exit code 2)."""
    import os

    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_input_path(f"{key}[{i}]", item)
        return
    text = str(value)
    if not text or _is_uri(text):
        return
    from speech_ssl.config import ConfigError

    path = Path(text).expanduser()
    if not path.exists():
        raise ConfigError(key, f"'{text}' does not exist (resolved to {path.absolute()}).")
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, mode):
        raise ConfigError(key, f"'{text}' is not readable by this user.")


def check_output_dir(key: str, value: Any) -> None:
    """``value`` is a folder that exists and is writable, or one that can be created (its nearest existing
    parent is a writable folder). Nothing is created here: a failed check leaves nothing behind."""
    import os

    text = str(value or "")
    if not text or _is_uri(text):
        return
    from speech_ssl.config import ConfigError

    path = Path(text).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(key, f"'{text}' is an existing file; {key} must be a folder (created if missing).")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"cannot create '{text}': {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise ConfigError(key, f"'{text}' {what} by this user.")


def check_output_file(key: str, value: Any) -> None:
    """A file to be written: not an existing folder, and its folder can be written or created."""
    text = str(value or "")
    if not text or _is_uri(text):
        return
    from speech_ssl.config import ConfigError

    path = Path(text).expanduser().absolute()
    if path.is_dir():
        raise ConfigError(key, f"'{text}' is an existing folder; {key} names a file to write.")
    check_output_dir(key, str(path.parent))


def check_rows_resolve(key: str, rows: Any, spec: Any, sample: int = 32) -> None:
    """Stop before Ray starts when a corpus's files are not where its rows say: a manifest copied out of its
    folder names paths relative to the folder it is in now, and every worker would only find every file
    missing (an error no restart fixes). Checks up to ``sample`` rows spread over the corpus; a few missing
    files are only reported (they are quarantined when read)."""
    import logging
    import os

    from speech_ssl.errors import SpeechSSLError

    local = [r for r in rows if r.cache_row is None and not _is_uri(r.path)]
    if not local:
        return
    step = max(1, len(local) // sample)
    sampled = local[::step][:sample]
    missing = [r for r in sampled if not os.path.exists(r.path)]
    if len(missing) == len(sampled):
        first = missing[0]
        relative = not os.path.isabs(first.source_path)
        folder = os.path.dirname(os.path.abspath(str(spec))) if os.path.isfile(str(spec)) else None
        hint = (f" Relative paths in a manifest are read from the manifest's own folder ({folder}): was it "
                "moved or copied away from its audio? Keep it beside the audio, or write absolute paths "
                "(speech-ssl prepare)." if relative and folder else "")
        raise SpeechSSLError(f"{key}: none of the {len(sampled)} files checked in {spec} exists (for example "
                             f"'{first.source_path}' -> {first.path}).{hint}")
    if missing:
        logging.getLogger("speech_ssl").warning(
            "%s: %d of %d files checked in %s are missing (e.g. %s); missing files are quarantined when read",
            key, len(missing), len(sampled), spec, missing[0].path)


def require_rows(key: str, rows: Any, spec: Any) -> None:
    """A corpus with no usable row at all is an error here, not on every training worker."""
    from speech_ssl.errors import SpeechSSLError

    if len(rows):
        return
    bad = list(getattr(rows, "quarantined", []) or [])
    detail = f" ({len(bad)} unreadable, e.g. {bad[0]['path']}: {bad[0]['reason']})" if bad else ""
    raise SpeechSSLError(f"{key}: no usable audio in {spec}{detail}")


def check_caches_fit(key: str, rows: Any, model_config: Any, sample_rate: int) -> None:
    """Decoded-audio caches in a corpus must hold the features the model preset reads (fbank vs waveform,
    mel bins, normalisation): checked on the driver, before Ray starts."""
    from speech_ssl.errors import SpeechSSLError

    caches = list(getattr(rows, "caches", []) or [])
    if not caches:
        return
    from speech_ssl.data.cache import check_spec
    from speech_ssl.data.model_inputs import feature_spec_for

    spec = feature_spec_for(model_config, sample_rate)
    for cache in caches:
        try:
            check_spec(cache.meta, spec, cache.root)
        except SpeechSSLError as err:
            raise SpeechSSLError(f"{key}: {err}") from None


# --------------------------------------------------------------------------------------------------
# One command per output folder


LOCK_NAME = ".speech-ssl.lock"
_held_locks: dict[str, int] = {}  # lock path -> depth: a pipeline's stages may lock a folder it holds


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot), to tell a reused pid from its owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict[str, Any]) -> bool:
    """Whether the process named in a lock file still runs (unknowable on another host: assumed alive)."""
    import os
    import socket

    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get("started_ticks")
    return started is None or _process_start(pid) in (None, started)


def _command_line(command: str) -> str:
    """This process's command line as the user typed it (the interpreter and script by name only)."""
    import os
    import sys

    argv = list(getattr(sys, "orig_argv", None) or sys.argv)
    if len(argv) < 2:
        return f"speech-ssl {command}"
    line = " ".join(" ".join(os.path.basename(a) if i < 2 else a for i, a in enumerate(argv)).split())
    return line if len(line) <= 300 else line[:297] + "..."  # one line, of a readable length


def _describe_holder(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}: "
            f"{holder.get('command')}")


@contextlib.contextmanager
def output_lock(output_dir: Any, command: str) -> Iterator[None]:
    """Hold ``<output_dir>/.speech-ssl.lock`` while a command writes there, so that two commands never write
    one folder at once: a second one refuses at once, naming the first (pid, host, command line).

    The lock is an ``flock`` (released by the kernel when its process dies, however it dies) on a file that
    also names its holder; a holder that is gone (dead pid on this host) is taken over with a warning.
    Created only after the command's checks passed; creates ``output_dir``."""
    import fcntl
    import json
    import logging
    import os
    import socket
    import sys
    import time

    from speech_ssl.errors import SpeechSSLError

    if _is_uri(str(output_dir)):  # object stores have no locks; nothing to hold
        yield
        return
    folder = Path(output_dir).expanduser().resolve()
    path = str(folder / LOCK_NAME)
    if path in _held_locks:  # this process holds it already (a pipeline running one of its stages)
        _held_locks[path] += 1
        try:
            yield
        finally:
            _held_locks[path] -= 1
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with os.fdopen(os.dup(fd), "r", encoding="utf-8", errors="replace") as f:
            previous_text = f.read().strip()
        try:
            previous = json.loads(previous_text) if previous_text else {}
        except json.JSONDecodeError:
            previous = {}
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SpeechSSLError(
                f"{folder} is in use by another speech-ssl command ({_describe_holder(previous)}); wait for it "
                f"to finish or choose another output folder. If that process is gone, delete {path}.") from None
        if previous and _holder_alive(previous):
            # Locked by a process on another host (its flock may not reach us) or the file was replaced.
            raise SpeechSSLError(
                f"{folder} is in use by another speech-ssl command ({_describe_holder(previous)}); wait for it "
                f"to finish or choose another output folder. If that process is gone, delete {path}.")
        if previous:
            # The last holder died without releasing it: its outputs may be half written, which every
            # command resumes from (complete checkpoints only) or overwrites.
            logging.getLogger("speech_ssl").warning(
                "taking over the stale lock of %s left by %s, which is no longer running", folder,
                _describe_holder(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(command),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "started_ticks": _process_start(os.getpid())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        _held_locks[path] = 1
        try:
            yield
        finally:
            del _held_locks[path]
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly
    finally:
        os.close(fd)  # closing drops the flock
