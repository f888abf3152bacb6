"""Ray at the edge: start an embedded local Ray, or connect to a cluster, for the length of a command.

With no address (neither ``ray.address=...`` nor ``RAY_ADDRESS``) a private local Ray is started, sized
to this machine, its dashboard bound to 127.0.0.1 only, with quiet logging; it is shut down when the
command ends. With an address, the command joins that cluster and leaves it running.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

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
    include_dashboard / dashboard_port: the embedded Ray's dashboard, always bound to 127.0.0.1.
    """

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    object_store_memory_mb: Optional[int] = None
    include_dashboard: bool = True
    dashboard_port: int = 8265
    log_level: str = "WARNING"


def resolve_address(cfg: RayConfig) -> Optional[str]:
    return cfg.address or os.environ.get("RAY_ADDRESS") or None


def _default_object_store_bytes() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        total = 8 << 30
    return int(min(2 << 30, 0.15 * total))


def quiet_ray_loggers() -> None:
    """Ray Data logs every dataset execution at INFO; our stages print their own progress."""
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # It warns once per process that progress bars are off, which is what we asked for.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def init_ray(cfg: RayConfig) -> bool:
    """Start or join Ray as ``cfg`` says. Returns False when Ray was already initialised (left as is)."""
    global _embedded
    import ray

    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    level = getattr(logging, cfg.log_level.upper(), logging.WARNING)
    quiet_ray_loggers()
    if ray.is_initialized():
        return False
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
        ray.init(address=address, logging_level=level, namespace="speech-ssl")
        return True
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
        dashboard_port=cfg.dashboard_port,
        logging_level=level,
        namespace="speech-ssl",
        configure_logging=True,
    )
    _embedded = True
    return True


def is_embedded() -> bool:
    """Whether the running Ray is the embedded local one that this process started (not a joined cluster,
    not a Ray the caller initialised)."""
    import ray

    return _embedded and ray.is_initialized()


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Ray for the duration of a ``with`` block.

    An embedded Ray started here is shut down after; from a cluster joined here the driver disconnects
    (the cluster keeps running). A Ray initialised by the caller is left alone.
    """
    global _embedded
    import ray

    initialised_here = init_ray(cfg)
    try:
        yield
    finally:
        if initialised_here and ray.is_initialized():
            ray.shutdown()
        if initialised_here:
            _embedded = False


def dashboard_url() -> Optional[str]:
    """The running Ray's dashboard URL (host:port), or None without a dashboard."""
    import ray

    ctx = ray.get_runtime_context()
    try:
        return ray._private.worker.global_worker.node.address_info.get("webui_url") or None  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - Ray internals moved
        return getattr(ctx, "dashboard_url", None)
