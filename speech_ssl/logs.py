"""Logs for people: our lines on the console, Ray's own output in a file.

A command that runs on Ray gets four kinds of output, and :class:`RayOutput` sends each where it belongs
while its Ray session lasts (``speech_ssl.runtime.ray_session``):

* our log lines (``HH:MM:SS LEVEL speech_ssl...: message``) from the driver: the console, as always;
* the stdout/stderr of Ray's worker processes, which Ray forwards to the driver with ``(Actor pid=...)``
  prefixes: our own lines among them (a training worker's ``[train] update ...``) go to the console
  without the prefix; everything else (Ray Train's ``Reporting training result ...`` dumps, Ray Data's
  notices, tracebacks of Ray's threads, the C++ core lines of worker processes) goes to the Ray log file;
* Ray's Python loggers in the driver (``ray``, ``ray.data``, ...: the token-authentication notice, Ray
  Data's warnings): the Ray log file;
* the C++ core of the driver process, which writes its error lines (``[... E ...] core_worker.cc:...``)
  straight to file descriptor 2: those lines, and only those, are taken off the console into the Ray log
  file (a pipe on descriptor 2 while the session lasts; everything else written there passes through).

``ray.log_level`` is the one switch: ``quiet`` (the default) does the above; a logging level (``INFO``,
``DEBUG``, ...) leaves Ray's output on the console as Ray prints it (without colour codes) and sets Ray's
Python loggers to that level. Files we write never carry ANSI colour codes (:func:`strip_ansi`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("speech_ssl.logs")

# Our format, on the driver and on Ray's workers (speech_ssl.cli, speech_ssl.train.launch).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"

QUIET = "quiet"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_LEVEL_CHOICES = (QUIET,) + LEVELS

# ANSI escape sequences (colours, cursor moves).
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
# A line of ours as our formatter writes it (Ray's dedup may append " [repeated 2x across cluster]").
OURS = re.compile(r"^\d\d:\d\d:\d\d (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) (?:speech_ssl|pipelines)[\w.]*: ")
# A line of Ray's C++ core: "[2026-12-05 21:07:45,452 E 16839 16895] core_worker.cc:2465: ..."
RAY_CORE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [TDIWEF] \d+ \d+\] ")

# Ray's Python loggers whose console handlers move to the file in quiet mode.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "ray.util", "ray.serve")
# ray.init(configure_logging=False) clears the "ray" logger's handlers and then logs (the token-authentication
# notice): these children hold the file handler themselves while the session lasts.
RAY_CHILDREN = ("ray._private", "ray._common", "ray.util", "ray.autoscaler", "ray.dashboard")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (what files get)."""
    return ANSI.sub("", text) if "\x1b" in text else text


class PlainFormatter(logging.Formatter):
    """Our format, without ANSI codes (for files)."""

    def __init__(self, fmt: str = LOG_FORMAT, datefmt: Optional[str] = DATE_FORMAT):
        super().__init__(fmt, datefmt)

    def format(self, record: logging.LogRecord) -> str:
        return strip_ansi(super().format(record))


def is_ours(line: str) -> bool:
    return bool(OURS.match(strip_ansi(line)))


def check_level(value: str) -> str:
    """``quiet`` or an upper-case logging level."""
    return QUIET if value.lower() == QUIET else value.upper()


def is_quiet(level: str) -> bool:
    return check_level(level) == QUIET


class _LogFile:
    """The Ray log file: line-buffered, plain text, shared by threads."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        text = strip_ansi(text)
        if not text.endswith("\n"):
            text += "\n"
        with self._lock:
            try:
                self._file.write(text)
            except ValueError:  # closed: a late line from a Ray thread
                pass
            except OSError as err:  # e.g. a full disk: Ray's lines are lost, never the run
                self._failed(err)

    def close(self) -> None:
        with self._lock:
            try:
                self._file.close()
            except OSError as err:
                self._failed(err)

    def _failed(self, err: OSError) -> None:
        if not getattr(self, "_told", False):
            self._told = True
            print(f"speech-ssl: Ray's log file {self.path} cannot be written ({err.strerror}); its lines are "
                  "dropped from here on", file=sys.stderr, flush=True)


class _FileHandler(logging.Handler):
    def __init__(self, sink: _LogFile):
        super().__init__(logging.NOTSET)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write(self.format(record))
        except Exception:  # noqa: BLE001 - a log line must never break the command
            self.handleError(record)


def _is_console(handler: logging.Handler) -> bool:
    from ray._private.log import PlainRayHandler

    if isinstance(handler, PlainRayHandler):
        return True
    stream = getattr(handler, "stream", None)
    return (type(handler) is logging.StreamHandler or isinstance(handler, logging._StderrHandler)) and \
        stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)


class _StderrFilter:
    """Takes Ray's C++ core lines off file descriptor 2 (the driver's core worker writes its errors there,
    past Python): a pipe replaces descriptor 2 and a thread passes every other byte on to the real stderr.
    Python's own ``sys.stderr`` writes straight to the real stderr, so their order with stdout is kept."""

    def __init__(self, sink: _LogFile):
        self.sink = sink
        self.saved: Optional[int] = None
        self.thread: Optional[threading.Thread] = None
        self.swapped: list[tuple[Any, Any]] = []  # (holder, old stream): logging handlers, sys
        self.console = None
        self.read_fd: Optional[int] = None

    def start(self) -> bool:
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, 2)
            os.close(write_fd)
        except OSError:
            return False
        self.read_fd = read_fd
        # Python's writes bypass the pipe: a stream on the real stderr replaces the one on descriptor 2.
        with contextlib.suppress(AttributeError, ValueError, OSError):
            if sys.stderr.fileno() == 2:
                old = sys.stderr
                self.console = open(os.dup(self.saved), "w", buffering=1, encoding=getattr(old, "encoding", None)
                                    or "utf-8", errors=getattr(old, "errors", None) or "backslashreplace")
                sys.stderr = self.console
                self.swapped.append((sys, old))
                for logger in [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                                       if isinstance(lg, logging.Logger)]:
                    for handler in logger.handlers:
                        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                            handler.setStream(self.console)
                            self.swapped.append((handler, old))
        self.thread = threading.Thread(target=self._pump, name="speech-ssl-stderr-filter", daemon=True)
        self.thread.start()
        return True

    def _write_console(self, data: bytes) -> None:
        while data:
            try:
                n = os.write(self.saved, data)
            except OSError:
                return
            data = data[n:]

    def _pump(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.read_fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = []
            for raw in lines:
                text = raw.decode("utf-8", "backslashreplace")
                if RAY_CORE.match(strip_ansi(text)):
                    self.sink.write(f"(driver) {text}")
                else:
                    out.append(raw + b"\n")
            if pending and not pending.startswith(b"[") and not pending.startswith(b"\x1b"):
                out.append(pending)  # a partial line that cannot be Ray's: pass it on now
                pending = b""
            if out:
                self._write_console(b"".join(out))
        if pending:
            self._write_console(pending)

    def stop(self) -> None:
        if self.saved is None:
            return
        with contextlib.suppress(Exception):
            if self.console is not None:
                self.console.flush()
        for holder, old in reversed(self.swapped):
            if holder is sys:
                if sys.stderr is self.console:
                    sys.stderr = old
            elif getattr(holder, "stream", None) is self.console:
                holder.setStream(old)
        with contextlib.suppress(OSError):
            os.dup2(self.saved, 2)  # closes the pipe's write end: the thread reads to the end and stops
        if self.thread is not None:
            self.thread.join(timeout=2.0)
        if self.thread is None or not self.thread.is_alive():
            # A process that inherited the pipe could still hold it: then the thread keeps passing its bytes on
            # (and the descriptors stay open), so that such a writer never meets a closed pipe.
            with contextlib.suppress(OSError):
                os.close(self.read_fd)
            with contextlib.suppress(OSError):
                os.close(self.saved)
            if self.console is not None:
                with contextlib.suppress(Exception):
                    self.console.close()
        self.saved = None


def default_log_dir() -> Path:
    return Path(tempfile.gettempdir()) / "speech-ssl-logs"


class RayOutput:
    """Where Ray's output goes for one Ray session (see the module docstring).

    ``level``: ``quiet`` or a logging level (``ray.log_level``). ``log_dir``: where ``ray.log`` is written
    (default: ``<tmp>/speech-ssl-logs/ray-<time>-<pid>.log``)."""

    HANDLER = "speech_ssl_logs"

    def __init__(self, level: str = QUIET, log_dir: Optional[str | Path] = None):
        self.level = check_level(level)
        self.quiet = self.level == QUIET
        if log_dir is not None and "://" not in str(log_dir):
            self.path = Path(log_dir).expanduser().resolve() / "ray.log"
        else:
            self.path = default_log_dir() / f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        self.sink: Optional[_LogFile] = None
        self._moved: list[tuple[logging.Logger, logging.Handler]] = []
        self._unpropagated: list[logging.Logger] = []
        self._handler: Optional[_FileHandler] = None
        self._stderr: Optional[_StderrFilter] = None
        self._router_installed = False
        self.diverted = 0  # lines that went to the file instead of the console

    # -- before ray.init ---------------------------------------------------------------------------
    def before_init(self) -> None:
        # Ray's own documented switch: no colour codes around the "(pid=...)" prefixes it prints.
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        if not self.quiet:
            return
        self.sink = _LogFile(self.path)
        self.sink.write(f"===== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}")
        self._handler = _FileHandler(self.sink)
        self.move_ray_loggers()

    def move_ray_loggers(self) -> None:
        """Ray's Python loggers write to the file instead of the console (again after ``ray.data`` is
        imported: it configures its own logger then)."""
        if self._handler is None:
            return
        import ray  # noqa: F401 - configures the "ray" logger
        with contextlib.suppress(ImportError):
            import ray.data  # noqa: F401 - configures "ray.data"
        names = set(RAY_LOGGERS) | {n for n in logging.Logger.manager.loggerDict if n.startswith("ray.")}
        for name in sorted(names):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if handler is not self._handler and _is_console(handler):
                    logger.removeHandler(handler)
                    self._moved.append((logger, handler))
                    if self._handler not in logger.handlers:
                        logger.addHandler(self._handler)
        root_ray = logging.getLogger("ray")
        if self._handler not in root_ray.handlers:
            root_ray.addHandler(self._handler)
            self._moved.append((root_ray, None))  # type: ignore[arg-type]
        root_ray.propagate = False
        for name in RAY_CHILDREN:
            child = logging.getLogger(name)
            if self._handler not in child.handlers:
                child.addHandler(self._handler)
                self._moved.append((child, None))  # type: ignore[arg-type]
                if child.propagate:
                    child.propagate = False
                    self._unpropagated.append(child)

    # -- after ray.init ----------------------------------------------------------------------------
    def after_init(self) -> None:
        if not self.quiet:
            return
        self.move_ray_loggers()
        self._install_router()
        if os.name == "posix" and os.environ.get("SPEECH_SSL_STDERR_FILTER", "1") != "0":
            self._stderr = _StderrFilter(self.sink)
            if not self._stderr.start():
                self._stderr = None

    def _install_router(self) -> None:
        try:
            from ray._private import ray_logging, worker
        except ImportError:  # pragma: no cover - Ray moved its internals: leave Ray's own printing
            return
        dispatcher = ray_logging.global_worker_stdstream_dispatcher
        names = [name for name, _ in dispatcher.handlers]
        if "ray_print_logs" not in names:
            return  # log_to_driver is off: nothing is forwarded
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler(self.HANDLER, self._route)
        self._router_installed = True
        self._print = worker.print_to_stdstream

    def _route(self, data: dict[str, Any]) -> None:
        """One batch of forwarded worker lines: ours to the console (no prefix), the rest to the file."""
        try:
            lines = data.get("lines") or []
            if data.get("pid") == "autoscaler":  # as Ray prints them: its event summaries only
                from ray._private.worker import filter_autoscaler_events

                lines = list(filter_autoscaler_events(lines))
            ours: list[str] = []
            theirs: list[str] = []
            previous_ours = False
            for line in lines:
                plain = strip_ansi(line)
                if OURS.match(plain) or (previous_ours and (plain.startswith((" ", "\t", "Traceback")))):
                    ours.append(line)
                    previous_ours = True
                else:
                    theirs.append(line)
                    previous_ours = False
            if ours:
                self._print(dict(data, lines=ours), ignore_prefix=True)
            if theirs and self.sink is not None:
                self.diverted += len(theirs)
                who = data.get("pid")
                if data.get("actor_name"):
                    who = f"{data['actor_name']} pid={who}"
                elif data.get("task_name"):
                    who = f"{data['task_name']} pid={who}"
                elif who not in ("raylet", "autoscaler"):
                    who = f"pid={who}"
                ip = data.get("ip")
                where = "" if ip == data.get("localhost") else f", ip={ip}"
                err = " stderr" if data.get("is_err") else ""
                self.sink.write("".join(f"({who}{where}{err}) {strip_ansi(line)}\n" for line in theirs))
        except Exception:  # noqa: BLE001 - never lose the log thread: fall back to Ray's printing
            with contextlib.suppress(Exception):
                from ray._private import worker

                worker.print_to_stdstream(data, ignore_prefix=False)

    # -- at the end --------------------------------------------------------------------------------
    def close(self) -> None:
        if self._stderr is not None:
            self._stderr.stop()
            self._stderr = None
        if self._router_installed:
            from ray._private import ray_logging

            ray_logging.global_worker_stdstream_dispatcher.remove_handler(self.HANDLER)
            self._router_installed = False
        for logger, handler in reversed(self._moved):
            if self._handler in logger.handlers:
                logger.removeHandler(self._handler)
            if handler is not None and handler not in logger.handlers:
                logger.addHandler(handler)
        self._moved.clear()
        for logger in self._unpropagated:
            logger.propagate = True
        self._unpropagated.clear()
        if self.sink is not None:
            self.sink.close()
            self.sink = None
