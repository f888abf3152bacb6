"""Ray at the edge: start an embedded local Ray, or connect to a cluster, for the length of a command.

With no address (neither ``ray.address=...`` nor ``RAY_ADDRESS``) a private local Ray is started, sized
to this machine, its dashboard bound to 127.0.0.1 only (on a free port when the configured one is taken, so
that two commands can run side by side); it is shut down when the command ends. With an address, the
command joins that cluster and leaves it running.

Ray's own output (its loggers, the output of its worker processes, its C++ core's lines) goes to
``<log_dir>/ray.log`` while our lines stay on the console: ``ray.log_level`` (``speech_ssl.logs``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from speech_ssl.logs import LOG_LEVEL_CHOICES, RayOutput, check_level, is_quiet

log = logging.getLogger(__name__)

# Set before Ray starts so that the raylet and every worker inherit them.
_QUIET_ENV = {
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    # Ray Data's own progress bars and per-dataset INFO lines fight with ours; our stages print their own.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}

LOCALHOST = "127.0.0.1"

# True while the Ray that init_ray started itself (no address) runs: this command then owns the whole
# machine's Ray and may size its own work to fit it (speech_ssl.train.resources).
_embedded = False


@dataclass
class RayConfig:
    """Where the command's Ray comes from.

    address: a cluster to join (``auto``, ``<host>:6379`` or ``ray://<host>:10001``); ``None`` uses
        ``RAY_ADDRESS`` if set, else starts an embedded local Ray.
    num_cpus / num_gpus: size of the embedded Ray (default: what this machine has).
    object_store_memory_mb: object store of the embedded Ray (default: Ray's choice, capped at 2 GiB
        so that small machines keep memory for the workers).
    include_dashboard / dashboard_port: the embedded Ray's dashboard, always bound to 127.0.0.1 (on the next free
        port when another command's Ray holds this one).
    log_level: Ray's own output: quiet (the default) sends it to <output_dir>/logs/ray.log and keeps our lines
        only on the console; DEBUG | INFO | WARNING | ERROR shows it on the console as Ray prints it, its
        loggers at that level.
    """

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    object_store_memory_mb: Optional[int] = None
    include_dashboard: bool = True
    dashboard_port: int = 8265
    log_level: str = field(default="quiet", metadata={"choices": list(LOG_LEVEL_CHOICES)})


def resolve_address(cfg: RayConfig) -> Optional[str]:
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def _default_object_store_bytes() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return int(min(2 << 30, 0.15 * total))


def quiet_ray_loggers(level: int = logging.WARNING) -> None:
    """Ray Data logs every dataset execution at INFO; our stages print their own progress."""
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    # It warns once per process that progress bars are off, which is what we asked for.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


DEFAULT_DASHBOARD_PORT = 8265


def dashboard_port(cfg: RayConfig) -> Optional[int]:
    """The dashboard port to ask Ray for. The default (8265) becomes None: Ray then takes 8265 or, when another
    command's Ray holds it, the next free port of the 50 after it (checked as it binds, so two commands
    starting at once both find one). Another port is used when free, else a free port is chosen."""
    if cfg.dashboard_port == DEFAULT_DASHBOARD_PORT:
        return None
    if _port_free(cfg.dashboard_port):
        return cfg.dashboard_port
    port = _free_port()
    log.info("dashboard port %d is taken (another Ray on this machine?): using %d", cfg.dashboard_port, port)
    return port


# The Ray output router of the session this process started (closed when it ends).
_output: Optional[RayOutput] = None


def init_ray(cfg: RayConfig, log_dir: Optional[str | Path] = None) -> bool:
    """Start or join Ray as ``cfg`` says. Returns False when Ray was already initialised (left as is).

    ``log_dir``: where Ray's own output goes (``<log_dir>/ray.log``) unless ``cfg.log_level`` asks for it on
    the console."""
    global _output
    import ray

    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    quiet = is_quiet(cfg.log_level)
    level = logging.WARNING if quiet else getattr(logging, check_level(cfg.log_level), logging.WARNING)
    quiet_ray_loggers(level)
    if ray.is_initialized():
        return False
    output = RayOutput(cfg.log_level, log_dir)
    output.before_init()
    try:
        _start_or_join(cfg, level, quiet)
    except BaseException:
        output.close()
        raise
    output.after_init()
    _output = output
    if output.quiet:  # one line: where to look (Ray's own "View the dashboard at" line went to the file)
        url = dashboard_url() if cfg.include_dashboard and _embedded else None
        log.info("Ray: %sits own output in %s (ray.log_level=INFO shows it here)",
                 f"dashboard http://{url}, " if url else "", output.path)
    return True


def _start_or_join(cfg: RayConfig, level: int, quiet: bool) -> None:
    global _embedded
    import ray

    address = resolve_address(cfg)
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        # Ray 2.60 heads use token authentication by default, but a connecting driver only sends the
        # token in "token" mode: switch it on when a token is at hand and the user has not chosen.
        token_file = os.environ.get("RAY_AUTH_TOKEN_PATH", os.path.expanduser("~/.ray/auth_token"))
        if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(token_file)):
            # Ray read its auth mode into a cached config when it was imported: setting the variable alone
            # would not reach this process (private API of the pinned Ray: sets it and refreshes the cache).
            from ray._private.authentication.authentication_token_setup import _enable_token_auth

            _enable_token_auth()
        ray.init(address=address, logging_level=level, namespace="speech-ssl", configure_logging=not quiet)
        return
    store = (cfg.object_store_memory_mb << 20) if cfg.object_store_memory_mb else _default_object_store_bytes()
    # An embedded Ray must never start the job server or dashboard on a public interface.
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(
        address="local",
        num_cpus=cfg.num_cpus,  # None: Ray detects the cores (cgroup limits included)
        num_gpus=cfg.num_gpus,
        object_store_memory=store,
        include_dashboard=cfg.include_dashboard,
        dashboard_host=LOCALHOST,
        dashboard_port=dashboard_port(cfg) if cfg.include_dashboard else None,
        logging_level=level,
        namespace="speech-ssl",
        # Quiet: speech_ssl.logs routes Ray's loggers to the file (Ray would add a console handler).
        configure_logging=not quiet,
    )
    _embedded = True


def is_embedded() -> bool:
    """Whether the running Ray is the embedded local one that this process started (not a joined cluster,
    not a Ray the caller initialised)."""
    import ray

    return _embedded and ray.is_initialized()


def ray_log_path() -> Optional[Path]:
    """The file that holds Ray's own output in this session (None when it goes to the console)."""
    return _output.path if _output is not None and _output.quiet else None


@contextlib.contextmanager
def ray_session(cfg: RayConfig, log_dir: Optional[str | Path] = None) -> Iterator[None]:
    """Ray for the duration of a ``with`` block.

    An embedded Ray started here is shut down after; from a cluster joined here the driver disconnects
    (the cluster keeps running). A Ray initialised by the caller is left alone. ``log_dir``: where Ray's own
    output goes (``<log_dir>/ray.log``; ``speech_ssl.logs``), usually ``<output_dir>/logs``.
    """
    global _embedded, _output
    import ray

    initialised_here = init_ray(cfg, log_dir)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        try:
            if initialised_here and ray.is_initialized():
                ray.shutdown()
        finally:
            if initialised_here:
                _embedded = False
                output, _output = _output, None
                if output is not None:
                    if failed and output.quiet and output.diverted:
                        log.info("Ray's own output (worker tracebacks included): %s", output.path)
                    output.close()


def dashboard_url() -> Optional[str]:
    """The running Ray's dashboard URL (host:port), or None without a dashboard."""
    import ray

    ctx = ray.get_runtime_context()
    try:
        return ray._private.worker.global_worker.node.address_info.get("webui_url") or None  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - Ray internals moved
        return getattr(ctx, "dashboard_url", None)
