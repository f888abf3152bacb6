"""Where the training loop runs: in this process, or as one worker of a Ray Train ``TorchTrainer``.

Both contexts give the loop its rank, world size and device, and store checkpoints under the run's
storage root (``<output_dir>`` by default; a URI such as ``s3://bucket/runs/<name>`` on clusters).
The Ray context hands each checkpoint to ``ray.train.report`` (Ray persists and registers it, and
restarts the worker group from storage after a failure); the local one writes it atomically itself.
In both, resuming means: the newest *complete* checkpoint under the storage root.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from speech_ssl.train import checkpoint as ckpt

log = logging.getLogger(__name__)


class LocalContext:
    """A single process, no Ray: rank 0 of 1; checkpoints written to a temp name and renamed."""

    distributed = False

    def __init__(self, storage_root: str, device: Optional[torch.device] = None):
        self.rank = 0
        self.world_size = 1
        self.storage_root = storage_root
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def latest_checkpoint(self) -> Optional[Path]:
        return _latest_local_copy(self.storage_root)

    def save_checkpoint(self, name: str, write: Callable[[Path], None], metrics: dict[str, Any]) -> str:
        if "://" in self.storage_root:  # a URI: written locally, then uploaded (marker last)
            with tempfile.TemporaryDirectory(prefix="speech-ssl-ckpt-") as tmp:
                write(Path(tmp))
                return ckpt.upload(Path(tmp), f"{self.storage_root.rstrip('/')}/{name}")
        root = Path(self.storage_root)
        root.mkdir(parents=True, exist_ok=True)
        final = root / name
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        write(tmp)
        if final.exists():  # a stale, incomplete copy from an interrupted run
            shutil.rmtree(final)
        os.replace(tmp, final)
        return str(final)

    def barrier(self) -> None:
        pass


def _latest_local_copy(storage_root: str) -> Optional[Path]:
    """The newest complete checkpoint under ``storage_root`` as a local folder (None: none yet). On remote
    storage every worker downloads its own copy, to a temporary folder."""
    found = ckpt.latest_complete(storage_root)
    if found is None:
        return None
    if "://" not in found:
        return Path(found)
    return ckpt.download(found, Path(tempfile.mkdtemp(prefix="speech-ssl-resume-")) / Path(found).name)


class RayTrainContext:
    """One worker of a Ray Train run (the process group is already set up by ``TorchTrainer``)."""

    distributed = True

    def __init__(self, storage_root: str):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.storage_root = storage_root
        self.device = ray.train.torch.get_device()

    def latest_checkpoint(self) -> Optional[Path]:
        return _latest_local_copy(self.storage_root)

    def save_checkpoint(self, name: str, write: Callable[[Path], None], metrics: dict[str, Any]) -> str:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="speech-ssl-ckpt-") as tmp:
            write(Path(tmp))
            # Every worker reports (a barrier); Ray merges their files into one directory in storage
            # and registers the checkpoint only once all uploads are done.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
        return f"{self.storage_root.rstrip('/')}/{name}"

    def barrier(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
