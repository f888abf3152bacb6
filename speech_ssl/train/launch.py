"""Launch the training loop: in this process (``trainer.num_workers=0``) or on Ray Train workers.

The driver resolves everything that should happen once (reading the corpus, building a vocabulary)
into the task object, then ships it to the workers. Checkpoints live under the storage root:
``<output_dir>`` itself by default, or ``<trainer.storage_path>/<output_dir name>`` (e.g. S3) on
clusters. After the run, ``<output_dir>/last`` and ``<output_dir>/best`` are checkpoint directories.

While training runs, SIGINT and SIGTERM stop it politely (speech_ssl.train.control): every worker stops
after the same update, rank 0 writes a checkpoint, and ``run_training`` raises ``Interrupted`` (exit code
130 / 143) naming the checkpoint a re-run resumes from; a second signal stops at once. A worker's
SpeechSSLError (bad data, bad config) ends the run without Ray Train's restarts and reaches the user as is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs

from speech_ssl import storage
from speech_ssl.data.config import DataConfig
from speech_ssl.errors import SpeechSSLError, signal_name
from speech_ssl.train import checkpoint as ckpt
from speech_ssl.train.config import TrainerConfig
from speech_ssl.train.context import LocalContext, RayTrainContext
from speech_ssl.train.loop import train
from speech_ssl.train.resources import ResourcePlan, plan_on_ray
from speech_ssl.train.task import Task

log = logging.getLogger(__name__)


# What rank 0 writes beside the checkpoints, published to the storage root (and from there to output_dir).
RUN_FILES = ("metrics.jsonl", "curves.png", "tensorboard", ".worker_summary.json")


def storage_root(output_dir: str | Path, cfg: TrainerConfig) -> str:
    """Where the checkpoints of a run go: ``<trainer.storage_path>/<output_dir name>`` when storage_path is
    set (it wins), else ``output_dir`` itself (a local path, an NFS path or a URI such as s3://)."""
    if cfg.storage_path:
        return storage.join(cfg.storage_path, storage.name_of(output_dir))
    return storage.normalize(output_dir)


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or (name.startswith("quarantine_") and name.endswith(".jsonl"))


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _rank0_work_dir(output_dir: str, root: str, driver_node: str | None) -> Path:
    """Where rank 0 writes metrics, curves and quarantine lists while it trains: ``output_dir`` itself when
    that is a local path on the driver's node (as without Ray); otherwise a local folder of this node whose
    files are published to the storage root (the driver copies them on to ``output_dir``)."""
    if not storage.is_uri(output_dir) and not storage.is_uri(root) and storage.normalize(root) == output_dir:
        return Path(output_dir)  # checkpoints are here too: this folder must be on this node (or shared)
    if not storage.is_uri(output_dir) and driver_node is not None and _node_id() == driver_node:
        return Path(output_dir)
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="speech-ssl-rank0-")) / storage.name_of(output_dir)
    work.mkdir()
    # A resumed run continues the metrics of the checkpoint it resumes from (later records are dropped).
    latest = ckpt.latest_complete(root)
    if latest is not None and storage.is_file(storage.join(latest, "metrics.jsonl")):
        (work / "metrics.jsonl").write_bytes(storage.read_bytes(storage.join(latest, "metrics.jsonl")))
    return work


def _publish_run_files(work: Path, root: str) -> None:
    """Rank 0's files -> the storage root (each atomically), when they were written elsewhere."""
    if not storage.is_uri(root) and storage.normalize(root) == storage.normalize(work):
        return
    for path in sorted(work.iterdir()):
        if not _is_run_file(path.name):
            continue
        if path.is_dir():
            storage.put_tree(path, storage.join(root, path.name))
        else:
            storage.put_file(path, storage.join(root, path.name))


def _worker_main(config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    import torch

    # Our lines only: Ray's loggers propagate to the root logger, so a root handler would repeat them.
    ours = logging.getLogger("speech_ssl")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
    from speech_ssl.runtime import quiet_ray_loggers

    quiet_ray_loggers()
    cfg: TrainerConfig = config["trainer"]
    threads = config.get("threads")
    if threads:
        torch.set_num_threads(threads)
    from speech_ssl.train.control import StopWatch, user_errors_told_by_driver

    ctx = RayTrainContext(config["storage_root"])
    watch = StopWatch(config.get("stop_flag"))
    work = Path(config["output_dir"])
    if ctx.rank == 0:
        work = _rank0_work_dir(config["output_dir"], config["storage_root"], config.get("driver_node"))
    with user_errors_told_by_driver():
        summary = train(config["task"], cfg, ctx, work, stop_requested=watch.requested)
    if ctx.rank == 0:  # what only the workers know (resumes, nodes), for the driver's summary
        (work / ".worker_summary.json").write_text(json.dumps(summary, default=str))
        _publish_run_files(work, config["storage_root"])


def _threads_per_worker(cfg: TrainerConfig) -> int:
    # A worker holding a fraction of a CPU still gets one intra-op thread; whole CPUs get that many.
    return max(1, int(cfg.cpus_per_worker))


def resume_point(root: str) -> str:
    """Where a re-run of the same command starts, in words (the newest complete checkpoint, if any)."""
    latest = ckpt.latest_complete(root)
    if latest is None:
        return "no checkpoint was written yet, so the same command starts from the beginning"
    return f"the same command resumes from {latest} (update {ckpt.updates_of(latest)})"


def run_training(task: Task, cfg: TrainerConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train ``task`` as ``cfg`` says, resuming from the checkpoints under its storage root if any.

    ``output_dir`` is a local path or a URI (``s3://``, ``gs://``, ...). A URI's files are made in a local
    work folder of the driver and uploaded (each atomically) at the end, or when a stop ends the run; the
    checkpoints go straight to the storage root. Raises ``Interrupted`` after a stop by SIGINT / SIGTERM
    (see the module doc)."""
    from speech_ssl.train.control import stop_on_signals

    location = storage.normalize(output_dir)
    work = storage.local_work_dir(location)
    work.mkdir(parents=True, exist_ok=True)
    root = storage_root(location, cfg)
    try:
        with stop_on_signals(lambda: resume_point(root)) as stop:
            if cfg.num_workers == 0:
                summary = _train_here(task, cfg, work, root, stop.requested)
            else:
                summary = _fit_on_ray(task, cfg, location, work, root, stop)
        if stop.signum is not None:
            _gather_run_files(root, work)
            _finalise_pointers(work, root, {}, model_only=storage.is_uri(location))
            raise stop.interrupted(f"stopped by {signal_name(stop.signum)}; {resume_point(root)}")
        if summary.get("updates", cfg.max_updates) < cfg.max_updates:  # never a quiet success when short
            raise SpeechSSLError(f"training ended after {summary['updates']} of {cfg.max_updates} updates "
                                 f"without a stop request; {resume_point(root)}")
        _gather_run_files(root, work)
        _finalise_pointers(work, root, summary, model_only=storage.is_uri(location))
        (work / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    finally:
        if storage.is_uri(location):
            storage.put_tree(work, location, skip=(".speech-ssl.lock",))
    if storage.is_uri(location):
        summary["last"], summary["best"] = storage.join(location, "last"), storage.join(location, "best")
    return summary


def _gather_run_files(root: str, work: Path) -> None:
    """Rank 0's published files (metrics, curves, TensorBoard, quarantine lists) from the storage root into
    the driver's folder, when rank 0 wrote them elsewhere (another node, or a URI output_dir)."""
    if not storage.is_uri(root) and storage.normalize(root) == storage.normalize(work):
        return
    for entry in storage.listdir(root):
        if not _is_run_file(entry.base_name):
            continue
        src = storage.join(root, entry.base_name)
        if entry.type == pafs.FileType.Directory:
            storage.get_tree(src, work / entry.base_name)
        else:
            storage.write_bytes(str(work / entry.base_name), storage.read_bytes(src))


def _train_here(task: Task, cfg: TrainerConfig, output_dir: Path, root: str, stop_requested) -> dict[str, Any]:
    """The loop in this process, beside Ray Data's decode tasks: as many threads as the worker would hold,
    not torch's default of every core (oversubscribed, a step is several times slower)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(_threads_per_worker(cfg))
    try:
        return train(task, cfg, LocalContext(root), output_dir, stop_requested=stop_requested)
    finally:
        torch.set_num_threads(previous)


def _plan_resources(task: Task, cfg: TrainerConfig) -> tuple[TrainerConfig, ResourcePlan]:
    """Plan the workers' resources and the data decoding's together, on the driver, before any worker starts
    (see speech_ssl.train.resources); the decode numbers go to the task's streams. Returns the trainer config
    the workers run with (``cpus_per_worker`` lowered on the embedded local Ray where needed)."""
    data = getattr(task, "data", None)
    task_cpus = (data if isinstance(data, DataConfig) else DataConfig()).num_cpus_per_reader
    plan = plan_on_ray(cfg.num_workers, cfg.cpus_per_worker, task_cpus, cfg.gpus_per_worker if cfg.use_gpu else 0.0)
    log.info("%s", plan.summary_line())
    if hasattr(task, "read_plan"):
        task.read_plan = plan.read
    return dataclasses.replace(cfg, cpus_per_worker=plan.cpus_per_worker), plan


def _fit_on_ray(task: Task, cfg: TrainerConfig, location: str, output_dir: Path, root: str, stop) -> dict[str, Any]:
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from speech_ssl.train.control import ControlledTorchTrainer, start_stop_flag, user_error

    cfg, plan = _plan_resources(task, cfg)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    trainer = ControlledTorchTrainer(
        _worker_main,
        stop=stop,
        train_loop_config={"task": task, "trainer": cfg, "storage_root": root, "output_dir": location,
                           "driver_node": _node_id(),
                           "threads": _threads_per_worker(cfg), "stop_flag": start_stop_flag(stop)},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources,
                                     placement_strategy=cfg.placement_strategy),
        run_config=RunConfig(
            # Ray Train's own files and our checkpoints share the root: <storage_path>/<name> = root.
            name=storage.name_of(root),
            storage_path=storage.parent_of(root),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # Retention (last K plus the best) is ours: see speech_ssl.train.checkpoint.prune.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            # Ray Train logs every report (with all metrics) at INFO; our own lines say what matters.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        cause = user_error(err)  # bad data or config: not retried (speech_ssl.train.control), told as is
        if cause is not None:
            raise cause from None
        raise SpeechSSLError(f"training failed after {cfg.max_failures} automatic restarts: {err}") from err
    if stop.signum is not None:
        return {}
    summary = _summary_from_storage(root)
    summary["ray_result_path"] = str(result.path)
    summary["resources"] = plan.to_dict()  # what the workers actually held
    _gather_run_files(root, output_dir)
    summary_file = output_dir / ".worker_summary.json"
    if summary_file.exists():
        summary.update({k: v for k, v in json.loads(summary_file.read_text()).items() if k not in summary})
    return summary


def _summary_from_storage(root: str) -> dict[str, Any]:
    last = ckpt.latest_complete(root)
    if last is None:
        raise SpeechSSLError(f"training finished without a complete checkpoint under {root}")
    fs, path = ckpt.storage_fs(last)
    with fs.open_input_stream(f"{path}/trainer_state.json") as f:
        state = json.loads(f.read().decode())
    best = state.get("best_name")
    return {"updates": state["updates"], "last": last,
            "best": f"{root.rstrip('/')}/{best}" if best else last,
            "metrics": state.get("metrics", {}), "nonfinite_skipped": state.get("nonfinite_skipped", 0)}


def _finalise_pointers(output_dir: Path, root: str, summary: dict[str, Any], model_only: bool = False) -> None:
    """``<output_dir>/last`` and ``best``: symlinks into local storage, or local copies of remote ones (just
    the model directory with ``model_only``: what an output_dir on a URI gets, beside the full checkpoints)."""
    last = summary.get("last") or ckpt.latest_complete(root)
    if last is None:
        return
    best = summary.get("best") or last
    if best and "://" not in best and not os.path.isabs(best):
        best = f"{root.rstrip('/')}/{best}"
    for link, target in (("last", last), ("best", best)):
        if "://" in root:
            ckpt.download(target, output_dir / link, model_only=model_only)
        else:
            ckpt.point(output_dir / link, Path(target))
    summary["last"], summary["best"] = str(output_dir / "last"), str(output_dir / "best")
