"""Training checkpoints: a model directory that ``speech_ssl.models.load`` accepts, plus resumable state.

A checkpoint directory ``checkpoint_<updates>`` holds
  config.json, model.safetensors         the model (written by ``speech_ssl.models.save_model``)
  vocab.json                             the CTC vocabulary, when the task has one
  optimizer.safetensors                  optimizer state, flattened (structure in the file's metadata)
  trainer_state.json                     update count, scheduler, grad scaler, metrics, best score, ...
  rank_<r>.safetensors                   per worker: RNG states and the data position (metadata)
  COMPLETE.json                          written last by rank 0: files and sizes it wrote
Nothing here is a pickle. A directory without a valid ``COMPLETE.json`` (a crash mid-write) is never
picked up for resuming.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

PREFIX = "checkpoint_"
MARKER = "COMPLETE.json"
_NAME = re.compile(r"^checkpoint_(\d{8,})$")


def checkpoint_name(updates: int) -> str:
    return f"{PREFIX}{updates:08d}"


def updates_of(name: str) -> Optional[int]:
    match = _NAME.match(Path(name).name)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------------
# Nested state (optimizer state dicts, RNG states) <-> flat tensors + JSON structure


def flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Replace every tensor in ``obj`` by a reference into ``tensors``; return the JSON-able rest."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = prefix or "root"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten_state(k, tensors, f"{prefix}.k{i}"), flatten_state(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [flatten_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, float) and not np.isfinite(obj):
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__dict__" in obj:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [unflatten_state(v, tensors) for v in obj]
    return obj


def save_nested(path: Path, state: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten_state(state, tensors)
    save_file(tensors, str(path), metadata={"structure": json.dumps(structure)})


def load_nested(path: Path) -> Any:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        structure = json.loads(f.metadata()["structure"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return unflatten_state(structure, tensors)


# --------------------------------------------------------------------------------------------------
# RNG states


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Writing and reading one checkpoint


@dataclass
class TrainingState:
    """Everything besides the tensors of the model and optimizer that a resume needs."""

    updates: int = 0
    scheduler: dict[str, Any] = field(default_factory=dict)
    scaler: Optional[dict[str, Any]] = None
    metrics: dict[str, float] = field(default_factory=dict)
    best_score: Optional[float] = None
    best_name: Optional[str] = None
    nonfinite_skipped: int = 0
    resumes: int = 0
    world_size: int = 1
    task: str = ""


def write_rank_files(directory: Path, rank: int, data_position: dict[str, int]) -> None:
    """Per-worker part of a checkpoint: RNG states and this worker's position in its data stream."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten_state(capture_rng(), tensors)
    save_file(tensors, str(directory / f"rank_{rank:05d}.safetensors"),
              metadata={"structure": json.dumps(structure), "data": json.dumps(data_position)})


def read_rank_files(directory: Path, rank: int) -> tuple[dict[str, Any], dict[str, int]]:
    from safetensors import safe_open

    path = directory / f"rank_{rank:05d}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return unflatten_state(json.loads(meta["structure"]), tensors), json.loads(meta["data"])


def write_main_files(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     state: TrainingState, extra_files: Optional[dict[str, Any]] = None) -> None:
    """Rank 0's part: model, optimizer, trainer state, task files; then the completion marker."""
    from dataclasses import asdict

    from speech_ssl.models import Wav2Vec2ForCTC, Wav2Vec2ForPreTraining, Wav2Vec2Model, save_model

    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, (Wav2Vec2ForPreTraining, Wav2Vec2ForCTC, Wav2Vec2Model)):
        save_model(model, directory)  # loadable by speech_ssl.models.load
    else:  # any other module the loop trains: its weights, no architecture
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(directory / "model.safetensors"))
    save_nested(directory / "optimizer.safetensors", optimizer.state_dict())
    (directory / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    for name, content in (extra_files or {}).items():
        text = content if isinstance(content, str) else json.dumps(content, indent=1, ensure_ascii=False)
        (directory / name).write_text(text)
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir())
             if p.is_file() and p.name != MARKER and not p.name.startswith("rank_")}
    marker = {"updates": state.updates, "world_size": state.world_size, "files": files}
    tmp = directory / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    os.replace(tmp, directory / MARKER)


def is_complete(directory: str | Path) -> bool:
    """A checkpoint is complete when rank 0's marker lists files that all exist with those sizes and
    every rank's file is present. Works on local paths and storage URIs (s3://, gs://)."""
    fs, path = storage_fs(str(directory))
    try:
        with fs.open_input_stream(f"{path}/{MARKER}") as f:
            marker = json.loads(f.read().decode())
        names = list(marker["files"]) + [f"rank_{r:05d}.safetensors" for r in range(int(marker.get("world_size", 1)))]
        infos = {Path(i.path).name: i for i in fs.get_file_info([f"{path}/{n}" for n in names])}
        for name in names:
            info = infos.get(name)
            if info is None or info.type != pafs.FileType.File:
                return False
            if name in marker["files"] and info.size != marker["files"][name]:
                return False
    except (OSError, ValueError, KeyError):
        return False
    return True


def read_main_files(directory: Path) -> tuple[dict[str, torch.Tensor], Any, TrainingState]:
    """Model state dict (our key layout), optimizer state and trainer state of a checkpoint."""
    model_state = load_file(str(directory / "model.safetensors"))
    optimizer_state = load_nested(directory / "optimizer.safetensors")
    raw = json.loads((directory / "trainer_state.json").read_text())
    return model_state, optimizer_state, TrainingState(**raw)


# --------------------------------------------------------------------------------------------------
# A directory of checkpoints (the run's storage: a local path, or a URI such as s3://bucket/run)


def storage_fs(root: str):
    """(pyarrow filesystem, path inside it) for a local path or a URI (``speech_ssl.storage.filesystem``)."""
    from speech_ssl import storage

    return storage.filesystem(root)


def list_checkpoints(root: str | Path) -> list[str]:
    """Checkpoint directories under ``root`` (paths or URIs like ``root``), oldest first."""
    fs, path = storage_fs(str(root))
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    names = sorted((updates_of(i.base_name), i.base_name) for i in infos
                   if i.type == pafs.FileType.Directory and updates_of(i.base_name) is not None)
    return [f"{str(root).rstrip('/')}/{name}" for _, name in names]


def latest_complete(root: str | Path) -> Optional[str]:
    """The newest complete checkpoint under ``root`` (incomplete ones are skipped, with a warning)."""
    for path in reversed(list_checkpoints(root)):
        if is_complete(path):
            return path
        log.warning("skipping incomplete checkpoint %s (interrupted while being written)", path)
    return None


def prune(root: str | Path, keep_last: int, keep: set[str]) -> None:
    """Delete complete checkpoints beyond the newest ``keep_last``, except the names in ``keep``."""
    complete = [p for p in list_checkpoints(root) if is_complete(p)]
    fs, _ = storage_fs(str(root))
    for path in complete[: max(0, len(complete) - keep_last)]:
        if Path(path).name not in keep:
            try:
                fs.delete_dir(storage_fs(path)[1])
            except OSError as err:  # a concurrent pruner or a vanished dir: not worth failing a run
                log.warning("could not delete old checkpoint %s: %s", path, err)


# What a model directory needs (``speech_ssl.models.load``, fine-tuning's ``init``, evaluate's ``checkpoint``);
# the rest of a checkpoint (optimizer state, per-rank RNG states, the marker) only serves resuming.
RESUME_ONLY = ("optimizer.safetensors", MARKER)


def is_model_file(name: str) -> bool:
    return name not in RESUME_ONLY and not name.startswith("rank_")


def download(src: str, dest: Path, model_only: bool = False) -> Path:
    """Copy checkpoint ``src`` (path or URI) into local directory ``dest`` (replacing it); with
    ``model_only`` just the files of the model directory (no optimizer or RNG state)."""
    from speech_ssl import storage

    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    storage.get_tree(src, tmp, skip=RESUME_ONLY + tuple(n for n in _names(src) if n.startswith("rank_"))
                     if model_only else ())
    os.replace(tmp, dest)
    return dest


def _names(location: str) -> list[str]:
    from speech_ssl import storage

    return [i.base_name for i in storage.listdir(location)]


def upload(local_dir: Path, dest: str) -> str:
    """Copy a checkpoint written locally to ``dest`` (path or URI), each file atomically and the
    completion marker last, so that ``is_complete`` never accepts a partial upload."""
    from speech_ssl import storage

    storage.put_tree(local_dir, dest, skip=(MARKER,))
    if (Path(local_dir) / MARKER).exists():
        storage.put_file(Path(local_dir) / MARKER, storage.join(dest, MARKER))
    return dest


def point(link: Path, target: Path) -> None:
    """Make ``link`` (e.g. ``<output_dir>/last``) refer to checkpoint ``target``, atomically.

    A relative symlink where the filesystem allows it; otherwise a copy swapped into place.
    """
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
    try:
        os.symlink(os.path.relpath(target, link.parent), tmp, target_is_directory=True)
        os.replace(tmp, link)
        return
    except OSError:
        pass
    shutil.copytree(target, tmp)
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    os.replace(tmp, link)
