"""Chaos: kill a random process of a running job at a random moment, let the job finish, compare its outputs
with an undisturbed run's (issue 18, item 3).

For each command (``pretrain``, ``finetune``, ``embed``, ``run`` = the pretrain_finetune pipeline) the script
runs one undisturbed reference, then N trials. Every run (reference or trial) gets its own private Ray
cluster of two simulated nodes on this machine: a head (``ray start --head``, 2 CPUs) and a second node
(``ray start --address``, 1 CPU), on free ports, in a private temp dir; the command joins it with
``ray.address=``. Each trial picks, at random, a victim kind the command has and a moment in the
reference's wall time, waits for such a process to exist at or after that moment, and SIGKILLs it:

* ``train_worker``  a Ray Train worker (``ray::RayTrainWorker``)
* ``data_task``     a Ray Data worker while it runs a decode task (``ray::MapBatches(...)``, ``ray::ReadRange...``)
* ``feeder``        the data feeder actor of a training stream (``ray::Feeder``)
* ``embed_actor``   a model actor of ``speech-ssl embed`` (``ray::MapWorker(MapBatches(ShardEmbedder))``)
* ``raylet2``       the raylet of the second node (the node dies with everything on it); a replacement node
                    joins a few seconds later, as an autoscaler would bring one up
* ``driver``        the command itself; the same command is then run again (it resumes)

The run then has to finish by itself (or, after a driver kill, through the re-run), within a hard timeout
(a hang otherwise: everything of the trial is killed). Its outputs are compared with the reference's:

* training: the final ``model.safetensors`` tensors bit-identical (same seed), every complete checkpoint
  loads (model, optimizer, trainer state, every rank's file) and equals the reference's checkpoint of the
  same update bit for bit;
* embedding: the same (id, layer) rows, none duplicated or missing, every vector equal (bit-identical, or
  within ``--embed-tol`` when a re-run re-batched the remaining rows; both are reported);
* run: the pipeline's pretrain and finetune weights, evaluation scores and embedding rows.

Ownership: every process of a trial (the Ray nodes, everything they start, the driver) carries the
environment variable ``SPEECH_SSL_CHAOS=<trial tag>``; only processes whose ``/proc/<pid>/environ`` has this
trial's tag are ever signalled (other people's Ray on this machine is never touched; no ``ray stop``).

Also ``--disk-full``: pretraining whose ``output_dir`` is a small tmpfs (``mount -t tmpfs``, root needed)
that fills up while a later checkpoint is written: the earlier checkpoint must stay complete and loadable,
and the command must say so.

    .venv/bin/python benchmarks/chaos.py --trials 2                       # every command, 2 trials each
    .venv/bin/python benchmarks/chaos.py --commands pretrain --trials 10 --targets train_worker driver
    .venv/bin/python benchmarks/chaos.py --commands none --disk-full       # the disk-full scenarios only

Results: a table on stdout, every trial as JSON in ``--json`` (default benchmarks/results/chaos.json).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # audio_factory: generated corpora

MARK = "SPEECH_SSL_CHAOS"
PYTHON = sys.executable
RAY = str(Path(sys.executable).with_name("ray"))
COMMANDS = ("pretrain", "finetune", "embed", "run")
TARGETS = {
    "pretrain": ("train_worker", "data_task", "feeder", "raylet2", "driver"),
    "finetune": ("train_worker", "data_task", "feeder", "raylet2", "driver"),
    "embed": ("data_task", "embed_actor", "raylet2", "driver"),
    "run": ("train_worker", "data_task", "feeder", "embed_actor", "raylet2", "driver"),
}
# Not drawn by default; name it in --targets: the run's StopFlag actor (speech_ssl.train.control), which a
# lost node takes with it when it was placed there (reproduces the early, "successful" end found by raylet2).
EXTRA_TARGETS = {"pretrain": ("stop_flag",), "finetune": ("stop_flag",), "run": ("stop_flag",)}
HEAD_CPUS, NODE_CPUS = 2, 1
STORE_BYTES = 150_000_000
PRETRAIN_UPDATES, FINETUNE_UPDATES = 8, 6


def now() -> float:
    return time.monotonic()


# --------------------------------------------------------------------------------------------------
# Processes, from /proc (no psutil in the venv)


@dataclasses.dataclass
class Proc:
    pid: int
    ppid: int
    name: str  # the command line as the process shows it (Ray workers set it: "ray::RayTrainWorker...")
    tag: Optional[str]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def processes() -> list[Proc]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat").decode(errors="replace")
        if not stat:
            continue
        rest = stat[stat.rfind(")") + 2:].split()
        if len(rest) < 2 or rest[0] == "Z":
            continue
        tag = None
        for item in _read(f"/proc/{entry}/environ").split(b"\0"):
            if item.startswith(MARK.encode() + b"="):
                tag = item.split(b"=", 1)[1].decode()
                break
        name = _read(f"/proc/{entry}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
        found.append(Proc(int(entry), int(rest[1]), name, tag))
    return found


def owned(tag: str) -> list[Proc]:
    return [p for p in processes() if p.tag == tag]


def descendants(root: int, procs: list[Proc]) -> list[Proc]:
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


def kill_owned(tag: str, timeout: float = 20.0) -> int:
    """SIGKILL every process of this trial (its tag in the environment), until none is left."""
    killed: set[int] = set()
    deadline = now() + timeout
    while now() < deadline:
        mine = [p for p in owned(tag) if p.pid != os.getpid()]
        if not mine:
            break
        for p in mine:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p.pid, signal.SIGKILL)
                killed.add(p.pid)
        time.sleep(0.3)
    return len(killed)


def is_victim(kind: str, p: Proc) -> bool:
    name = p.name
    if kind == "train_worker":
        return name.startswith("ray::RayTrainWorker")
    if kind == "feeder":
        return name.startswith("ray::Feeder")
    if kind == "stop_flag":
        return name.startswith("ray::StopFlag")
    if kind == "embed_actor":
        return name.startswith("ray::MapWorker") and "ShardEmbedder" in name
    if kind == "data_task":  # a Ray Data task running now (an idle worker is "ray::IDLE")
        return name.startswith("ray::") and not name.startswith("ray::MapWorker") and any(
            key in name for key in ("MapBatches(", "ReadRange", "FromItems", "Map(", "ReadFiles"))
    return False


# --------------------------------------------------------------------------------------------------
# A private two-node Ray cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    from ray_heads import listening_addresses

    return bool(listening_addresses(port))


def base_env(tag: str) -> dict[str, str]:
    env = {**os.environ, MARK: tag, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_AUTH_MODE": "disabled",
           "PATH": os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RAY_ADDRESS", None)
    return env


class Cluster:
    """A head (``HEAD_CPUS``) and a second node (``NODE_CPUS``), each a ``ray start --block`` in its own
    session; all their processes carry the trial's tag."""

    def __init__(self, tag: str, log_dir: Path):
        self.tag = tag
        self.log_dir = log_dir
        self.temp_dir = tempfile.mkdtemp(prefix="rcx", dir="/tmp")  # short: Ray's socket paths are limited
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []  # [head, second node, replacements...]

    def _ports(self) -> list[str]:
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]

    def _start(self, args: list[str], manager_port: int, what: str) -> subprocess.Popen:
        log = open(self.log_dir / f"ray_{len(self.nodes)}.log", "w")
        proc = subprocess.Popen([RAY, "start", "--block", f"--object-store-memory={STORE_BYTES}",
                                 "--disable-usage-stats", *args], env=base_env(self.tag), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = now() + 90
        while not listening(manager_port):
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited early; see {self.log_dir}")
            if now() > deadline:
                raise RuntimeError(f"{what} did not come up in 90 s; see {self.log_dir}")
            time.sleep(0.3)
        self.nodes.append(proc)
        return proc

    def start(self) -> "Cluster":
        ports = self._ports()
        self._start(["--head", f"--port={self.port}", f"--num-cpus={HEAD_CPUS}", f"--temp-dir={self.temp_dir}",
                     "--include-dashboard=false", f"--ray-client-server-port={free_port()}", *ports],
                    self.port, "the Ray head")
        self.add_node()
        return self

    def add_node(self) -> subprocess.Popen:
        ports = self._ports()
        manager = int(ports[0].split("=")[1])
        proc = self._start([f"--address={self.address}", f"--num-cpus={NODE_CPUS}", *ports], manager,
                           "the second Ray node")
        time.sleep(1.0)  # registered with the GCS shortly after its raylet listens
        return proc

    def raylet_of(self, node: subprocess.Popen, procs: list[Proc]) -> Optional[Proc]:
        for p in descendants(node.pid, procs):
            if p.name.split(" ", 1)[0].endswith("/raylet"):
                return p
        return None

    def stop(self) -> None:
        kill_owned(self.tag)
        for proc in self.nodes:
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Inputs and the commands under test


def make_inputs(work: Path) -> dict[str, str]:
    """Generated corpora and a random tiny model for embedding (once per work folder)."""
    done = work / "inputs.json"
    if done.exists():
        return json.loads(done.read_text())
    from audio_factory import make_corpus, make_toy_asr_corpus, toy_words

    root = work / "corpus"
    words = toy_words(8, seed=2)
    paths = {
        "unlabeled": str(make_corpus(root, n=12, min_seconds=1.2, max_seconds=2.0, split="unlabeled", seed=3)),
        "valid_u": str(make_corpus(root, n=2, min_seconds=1.2, max_seconds=1.6, split="valid_u", seed=4)),
        "train": str(make_toy_asr_corpus(root, n=12, seed=0, split="train", words=words)),
        "valid": str(make_toy_asr_corpus(root, n=4, seed=1, split="valid", words=words)),
        "test": str(make_toy_asr_corpus(root, n=4, seed=2, split="test", words=words)),
        "embed_input": str(make_corpus(root, n=40, min_seconds=1.0, max_seconds=3.0, split="embed", seed=5)),
    }
    import torch

    from speech_ssl.models import build, save_model

    torch.manual_seed(0)
    save_model(build("tiny"), root / "tiny_model")
    paths["model"] = str(root / "tiny_model")
    done.write_text(json.dumps(paths, indent=1))
    return paths


TRAIN_COMMON = ["trainer.num_workers=2", "trainer.cpus_per_worker=0.5", "trainer.placement_strategy=SPREAD",
                "trainer.checkpoint_every=2", "trainer.log_every=1", "trainer.validate_every=0",
                "trainer.keep_last=100", "trainer.max_failures=3", "trainer.seed=5", "trainer.precision=fp32",
                "data.num_cpus_per_reader=0.5"]


def command_args(command: str, inputs: dict[str, str], out: Path, address: str) -> list[str]:
    ray = [f"ray.address={address}"]
    if command == "pretrain":
        return ["pretrain", f"output_dir={out}", f"data.train={inputs['unlabeled']}",
                f"data.valid={inputs['valid_u']}", "model=tiny", "model_overrides.layerdrop=0.0",
                "data.crop_duration=1.2", "data.batch_seconds=4", f"trainer.max_updates={PRETRAIN_UPDATES}",
                "trainer.optim.schedule=constant", "trainer.optim.lr=1e-3", *TRAIN_COMMON, *ray]
    if command == "finetune":
        return ["finetune", f"output_dir={out}", "init=none", "model=fbank-tiny", f"data.train={inputs['train']}",
                f"data.valid={inputs['valid']}", "data.batch_seconds=6", f"trainer.max_updates={FINETUNE_UPDATES}",
                "trainer.optim.lr=1.5e-3", "ctc.freeze_updates=0", *TRAIN_COMMON, *ray]
    if command == "embed":
        return ["embed", f"checkpoint={inputs['model']}", f"input={inputs['embed_input']}", f"output={out}",
                "layers=[0,2,-1]", "pooling=none", "shard_seconds=3", "data.batch_seconds=6", "progress_seconds=0",
                "precision=fp32", *ray]
    if command == "run":
        stage = lambda s, items: [f"{s}.{a}" for a in items]  # noqa: E731
        return ["run", "pipeline=pretrain_finetune", f"output_dir={out}", f"data.unlabeled={inputs['unlabeled']}",
                f"data.train={inputs['train']}", f"data.valid={inputs['valid']}", f"data.test={inputs['test']}",
                "pretrain.model=fbank-tiny", "pretrain.data.batch_seconds=4", "pretrain.data.crop_duration=1.2",
                "pretrain.data.valid=none", "pretrain.trainer.max_updates=8", "pretrain.trainer.optim.warmup_updates=0",
                *stage("pretrain", TRAIN_COMMON),
                "finetune.data.batch_seconds=6", "finetune.trainer.max_updates=4",
                *stage("finetune", TRAIN_COMMON),
                "embed.shard_seconds=4", "embed.precision=fp32", "evaluate.precision=fp32", *ray]
    raise ValueError(command)


# --------------------------------------------------------------------------------------------------
# Outputs: what a finished run left, and how it compares with the reference


def _tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same_tensors(a: dict, b: dict) -> tuple[bool, str]:
    import torch

    if set(a) != set(b):
        return False, f"keys differ: {sorted(set(a) ^ set(b))[:4]}"
    for k in sorted(a):
        if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
            diff = (a[k].double() - b[k].double()).abs().max().item() if a[k].shape == b[k].shape else float("nan")
            return False, f"tensor {k} differs (max |diff| {diff:.3g})"
    return True, ""


def check_training(out: Path, ref: Path, expected_updates: int) -> dict[str, Any]:
    """Final weights bit-identical; every complete checkpoint loads and equals the reference's of the same
    update; incomplete checkpoint folders are counted (never loaded for a resume, but left behind)."""
    from speech_ssl.models import load
    from speech_ssl.train import checkpoint as ckpt

    res: dict[str, Any] = {"identical": False, "lost": [], "notes": []}
    summary = out / "train_summary.json"
    if not summary.exists():
        res["lost"].append("no train_summary.json")
        return res
    res["updates"] = json.loads(summary.read_text()).get("updates")
    res["resumes"] = json.loads(summary.read_text()).get("resumes")
    final = out / "last" / "model.safetensors"
    if not final.exists():
        res["lost"].append("no last/model.safetensors")
        return res
    same, why = _same_tensors(_tensors(final), _tensors(ref / "last" / "model.safetensors"))
    if not same:
        res["notes"].append(f"final weights: {why}")
    bad_ckpts, differing, incomplete = [], [], []
    for path in ckpt.list_checkpoints(out):
        p = Path(path)
        if not ckpt.is_complete(p):
            incomplete.append(p.name)
            continue
        try:
            load(str(p))
            _, _, state = ckpt.read_main_files(p)
            for r in range(state.world_size):
                ckpt.read_rank_files(p, r)
        except Exception as err:  # noqa: BLE001 - what fails to load is the finding
            bad_ckpts.append(f"{p.name}: {type(err).__name__}: {err}"[:200])
            continue
        twin = ref / p.name / "model.safetensors"
        if twin.exists():
            ok, why_c = _same_tensors(_tensors(p / "model.safetensors"), _tensors(twin))
            if not ok:
                differing.append(f"{p.name}: {why_c}")
    if bad_ckpts:
        res["lost"].append(f"checkpoints that fail to load: {bad_ckpts}")
    if differing:
        res["notes"].append(f"checkpoints differing from the reference's: {differing}")
    if incomplete:
        res["notes"].append(f"incomplete checkpoint folders left: {incomplete}")
    res["identical"] = same and not differing and res["updates"] == expected_updates
    if res["updates"] != expected_updates:
        res["notes"].append(f"updates {res['updates']} != {expected_updates}")
    return res


def embedding_rows(folder: Path) -> tuple[dict[tuple[str, int], Any], int]:
    """(id, layer) -> embedding array, and the number of rows read (duplicates show as rows > keys)."""
    import numpy as np
    import pyarrow.parquet as pq

    from speech_ssl.embed import shards as shard_io

    rows: dict[tuple[str, int], Any] = {}
    count = 0
    for path in sorted(folder.iterdir()):
        if not shard_io.SHARD_PATTERN.match(path.name):
            continue
        table = pq.read_table(path)
        ids, layers = table.column("id").to_pylist(), table.column("layer").to_pylist()
        embeddings = table.column("embedding").to_pylist()
        for i, layer, emb in zip(ids, layers, embeddings):
            count += 1
            rows[(i, int(layer))] = np.asarray(emb, dtype=np.float32)
    return rows, count


def check_embedding(out: Path, ref: Path, tol: float) -> dict[str, Any]:
    import numpy as np

    res: dict[str, Any] = {"identical": False, "lost": [], "notes": []}
    if not (out / "_summary.json").exists():
        res["lost"].append("no _summary.json")
    rows, count = embedding_rows(out)
    want, _ = embedding_rows(ref)
    missing, extra = sorted(set(want) - set(rows)), sorted(set(rows) - set(want))
    if count != len(rows):
        res["lost"].append(f"{count - len(rows)} duplicate rows")
    if missing:
        res["lost"].append(f"{len(missing)} missing rows, e.g. {missing[:3]}")
    if extra:
        res["lost"].append(f"{len(extra)} unexpected rows, e.g. {extra[:3]}")
    worst, bitwise = 0.0, True
    for key in set(rows) & set(want):
        a, b = rows[key], want[key]
        if a.shape != b.shape:
            worst = float("inf")
            bitwise = False
            continue
        if not np.array_equal(a, b):
            bitwise = False
            worst = max(worst, float(np.abs(a - b).max()))
    res["rows"], res["max_abs_diff"], res["bitwise"] = count, worst, bitwise
    if not bitwise:
        res["notes"].append(f"vectors not bit-identical: max |diff| {worst:.3g}")
    res["identical"] = not res["lost"] and worst <= tol
    return res


def check_outputs(command: str, out: Path, ref: Path, tol: float) -> dict[str, Any]:
    if command == "pretrain":
        return check_training(out, ref, PRETRAIN_UPDATES)
    if command == "finetune":
        return check_training(out, ref, FINETUNE_UPDATES)
    if command == "embed":
        return check_embedding(out, ref, tol)
    parts = {"pretrain": check_training(out / "pretrain", ref / "pretrain", 8),
             "finetune": check_training(out / "finetune", ref / "finetune", 4),
             "embed": check_embedding(out / "embed", ref / "embed", tol)}
    res: dict[str, Any] = {"identical": all(p["identical"] for p in parts.values()), "lost": [], "notes": []}
    for name, part in parts.items():
        res["lost"] += [f"{name}: {x}" for x in part["lost"]]
        res["notes"] += [f"{name}: {x}" for x in part["notes"]]
    scores = [out / "evaluate" / "results.json", ref / "evaluate" / "results.json"]
    if not scores[0].exists():
        res["lost"].append("evaluate: no results.json")
        res["identical"] = False
    else:
        a, b = (json.loads(p.read_text()) for p in scores)
        if (a.get("wer"), a.get("cer"), a.get("utterances")) != (b.get("wer"), b.get("cer"), b.get("utterances")):
            res["identical"] = False
            res["notes"].append(f"evaluate: wer/cer {a.get('wer')}/{a.get('cer')} vs {b.get('wer')}/{b.get('cer')}")
    if not (out / "summary.json").exists():
        res["lost"].append("no summary.json")
    return res


# --------------------------------------------------------------------------------------------------
# One run of a command, with or without a kill


@dataclasses.dataclass
class Attempt:
    rc: Optional[int]
    seconds: float
    log: str
    tail: str = ""


def start_driver(args: list[str], tag: str, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    proc = subprocess.Popen([PYTHON, "-m", "speech_ssl", *args], env=base_env(tag), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=str(ROOT))
    log.close()
    return proc


def tail_of(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def progress_of(command: str, out: Path) -> str:
    """Where the run was (for 'what was killed when'): the newest complete checkpoint / shards written."""
    from speech_ssl.train import checkpoint as ckpt

    def newest(folder: Path) -> str:
        latest = ckpt.latest_complete(folder) if folder.is_dir() else None
        return f"ckpt {ckpt.updates_of(Path(latest).name)}" if latest else "no ckpt"

    def shards(folder: Path) -> str:
        return f"{len(list(folder.glob('part-*.parquet'))) if folder.is_dir() else 0} shards"

    if command in ("pretrain", "finetune"):
        return newest(out)
    if command == "embed":
        return shards(out)
    for stage in ("embed", "evaluate", "finetune", "pretrain", "prepare"):
        if (out / stage).is_dir():
            detail = {"pretrain": newest, "finetune": newest, "embed": shards}.get(stage, lambda f: "")(out / stage)
            return f"{stage} {detail}".strip()
    return "starting"


@dataclasses.dataclass
class Kill:
    kind: str
    at: str = ""             # the chosen moment, in words
    done_at: Optional[float] = None
    victim: str = ""
    pid: Optional[int] = None
    progress: str = ""
    replacement_node: bool = False


JOB_KINDS = ("train_worker", "data_task", "feeder", "embed_actor")


def kinds_present(procs: list[Proc], tag: str) -> set[str]:
    """Which victim kinds of the job have a process now ("job": any of them)."""
    present = {k for p in procs if p.tag == tag for k in JOB_KINDS if is_victim(k, p)}
    return present | ({"job"} if present else set())


def progress_count(command: str, out: Path) -> int:
    """How far a run is, in units that only grow: updates of the newest complete checkpoint (training),
    shards written (embedding); for the pipeline their sum over its stages (they run one after another)."""
    from speech_ssl.train import checkpoint as ckpt

    def updates(folder: Path) -> int:
        latest = ckpt.latest_complete(folder) if folder.is_dir() else None
        return ckpt.updates_of(Path(latest).name) if latest else 0

    def shards(folder: Path) -> int:
        return len(list(folder.glob("part-*.parquet"))) if folder.is_dir() else 0

    if command in ("pretrain", "finetune"):
        return updates(out)
    if command == "embed":
        return shards(out)
    return updates(out / "pretrain") + updates(out / "finetune") + shards(out / "embed")


class Moment:
    """When to kill: once the run has reached ``after_progress`` (see ``progress_count``; None: from the
    start), ``seconds`` later; the victim is the first process of its kind found from then on. Random
    moments are drawn in progress units, not wall seconds: the machine's load (shared, 2 cores) changes a
    run's wall time several-fold, which would push wall-clock moments out of the run."""

    def __init__(self, seconds: float = 0.0, after_progress: Optional[int] = None):
        self.seconds, self.after_progress = seconds, after_progress
        self.reached_at: Optional[float] = None

    def describe(self) -> str:
        start = f"progress {self.after_progress}" if self.after_progress is not None else "the start"
        return f"{self.seconds:.1f}s after {start}"

    def reached(self, elapsed: float, progress: Callable[[], int]) -> bool:
        if self.reached_at is None:
            if self.after_progress is not None and progress() < self.after_progress:
                return False
            self.reached_at = elapsed
        return elapsed >= self.reached_at + self.seconds


def random_moment(kind: str, ref: dict, rng: random.Random) -> Moment:
    """A moment drawn uniformly from the progress range in which ``kind`` existed in the reference run (the
    driver and the second node's raylet: the whole run before its last unit), plus 0-1 s."""
    window = ref.get("windows", {}).get(kind if kind in JOB_KINDS else "job")
    total = int(ref.get("progress", 0))
    low, high = (int(window[0]), int(window[1])) if window else (0, total)
    if kind == "stop_flag":  # alive for the whole of training
        low, high = 0, total
    high = max(low, min(high, total - 1))
    return Moment(seconds=rng.uniform(0.0, 1.0), after_progress=rng.randint(low, high))


def find_victim(kind: str, tag: str, driver: subprocess.Popen, cluster: Cluster, rng: random.Random) -> Optional[Proc]:
    procs = processes()
    if kind == "driver":
        return Proc(driver.pid, 0, "speech_ssl driver", tag) if driver.poll() is None else None
    if kind == "raylet2":
        if len(cluster.nodes) < 2:
            return None
        return cluster.raylet_of(cluster.nodes[1], procs)
    matches = [p for p in procs if p.tag == tag and is_victim(kind, p)]
    return rng.choice(matches) if matches else None


def run_trial(command: str, args: list[str], out: Path, trial_dir: Path, tag: str, cluster: Cluster,
              kill: Optional[Kill], moment: Optional[Moment], timeout: float, rng: random.Random,
              observe: Optional[dict] = None, verbose: bool = False) -> dict[str, Any]:
    """Run ``args`` (killing ``kill.kind`` at ``moment``), re-run once if the driver died or the run failed;
    returns attempts, kill, hang."""
    started = now()
    deadline = started + timeout
    attempts: list[Attempt] = []
    hang = False
    for attempt in range(2):
        log_path = trial_dir / f"driver_{attempt}.log"
        t0 = now()
        proc = start_driver(args, tag, log_path)
        while proc.poll() is None:
            elapsed = now() - started
            if now() > deadline:
                hang = True
                break
            if observe is not None:  # process titles seen, and when each victim kind existed
                procs = processes()
                observe.setdefault("titles", set()).update(
                    p.name.split(" ")[0][:60] for p in procs if p.tag == tag and p.name.startswith("ray::"))
                units = progress_count(command, out)
                for k in kinds_present(procs, tag):  # the progress range in which each kind existed
                    window = observe.setdefault("windows", {}).setdefault(k, [units, units])
                    window[1] = units
            if kill is not None and kill.done_at is None and attempt == 0 and moment.reached(
                    elapsed, lambda: progress_count(command, out)):
                victim = find_victim(kill.kind, tag, proc, cluster, rng)
                if victim is not None:
                    kill.progress = progress_of(command, out)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim.pid, signal.SIGKILL)
                    kill.done_at, kill.victim, kill.pid = round(elapsed, 1), victim.name[:80], victim.pid
                    if verbose:
                        print(f"    killed {kill.kind} pid {victim.pid} ({victim.name[:60]}) at {elapsed:.1f}s "
                              f"[{kill.progress}]", flush=True)
                    if kill.kind == "raylet2":  # an autoscaler would bring up a replacement
                        time.sleep(3)
                        try:
                            cluster.add_node()
                            kill.replacement_node = True
                        except RuntimeError as err:
                            print(f"    replacement node failed: {err}", flush=True)
            time.sleep(0.1)
        if hang:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            attempts.append(Attempt(None, now() - t0, str(log_path), tail_of(log_path)))
            break
        attempts.append(Attempt(proc.returncode, now() - t0, str(log_path), tail_of(log_path)))
        if proc.returncode == 0:
            break
        if kill is None or kill.done_at is None:
            break  # failed without a kill: nothing to recover from
        time.sleep(1.0)  # the dead driver's job is cleaned up by Ray; the same command again resumes
    return {"attempts": [dataclasses.asdict(a) for a in attempts], "hang": hang,
            "seconds": round(now() - started, 1)}


# --------------------------------------------------------------------------------------------------
# The benchmark


@contextlib.contextmanager
def cluster_for(tag: str, log_dir: Path) -> Iterator[Cluster]:
    cluster = Cluster(tag, log_dir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def reference(command: str, inputs: dict[str, str], work: Path, timeout: float) -> dict[str, Any]:
    folder = work / "reference" / command
    record = folder / "reference.json"
    if record.exists():
        return json.loads(record.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    tag = f"{os.getpid()}-ref-{command}"
    observed: dict = {}
    out = folder / "out"
    with cluster_for(tag, folder) as cluster:
        result = run_trial(command, command_args(command, inputs, out, cluster.address), out, folder, tag,
                           cluster, None, None, timeout, random.Random(0), observe=observed)
    rc = result["attempts"][-1]["rc"]
    if rc != 0:
        raise RuntimeError(f"the reference {command} run failed (rc {rc}): {result['attempts'][-1]['tail']}")
    info = {"command": command, "out": str(out), "seconds": result["seconds"],
            "processes": sorted(observed.get("titles", ())), "windows": observed.get("windows", {}),
            "progress": progress_count(command, out)}
    record.write_text(json.dumps(info, indent=1))
    return info


def one_trial(command: str, n: int, kind: str, moment: Moment, inputs: dict[str, str], work: Path, ref: dict,
              timeout: float, tol: float, rng: random.Random, verbose: bool = True) -> dict[str, Any]:
    trial_dir = work / "trials" / f"{command}_{n:02d}_{kind}"
    shutil.rmtree(trial_dir, ignore_errors=True)
    trial_dir.mkdir(parents=True)
    tag = f"{os.getpid()}-{command}-{n}"
    out = trial_dir / "out"
    kill = Kill(kind, at=moment.describe())
    with cluster_for(tag, trial_dir) as cluster:
        result = run_trial(command, command_args(command, inputs, out, cluster.address), out, trial_dir, tag,
                           cluster, kill, moment, timeout, rng, verbose=verbose)
    last = result["attempts"][-1]
    completed = not result["hang"] and last["rc"] == 0
    # Completed by itself, or (after a driver kill) by the one re-run that a user would make.
    first_rc = result["attempts"][0]["rc"]
    needed_rerun = len(result["attempts"]) > 1
    row = {"command": command, "trial": n, "kill": dataclasses.asdict(kill), **result,
           "completed": completed and (not needed_rerun or kind == "driver"),
           "completed_after_rerun": completed, "first_rc": first_rc}
    if completed:
        row["check"] = check_outputs(command, out, Path(ref["out"]), tol)
    else:
        row["check"] = {"identical": False, "lost": [], "notes": ["not completed"]}
        with contextlib.suppress(Exception):  # what a failed run left: do its checkpoints still load?
            if command in ("pretrain", "finetune"):
                partial = check_training(out, Path(ref["out"]), -1)
                row["check"]["lost"] = partial["lost"]
    row["identical"] = bool(row["check"]["identical"]) and completed
    return row


def kill_summary(row: dict) -> str:
    k = row["kill"]
    if k["done_at"] is None:
        return f"{k['kind']}: none found ({k['at']})"
    return f"{k['kind']}@{k['done_at']}s [{k['progress']}]"


def print_table(rows: list[dict], commands: list[str]) -> str:
    lines = ["| command | trials | killed | completed | identical | hangs | lost | needed a re-run (non-driver) |",
             "|---|---|---|---|---|---|---|---|"]
    for command in commands:
        mine = [r for r in rows if r["command"] == command]
        if not mine:
            continue
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            command, len(mine), sum(r["kill"]["done_at"] is not None for r in mine),
            sum(r["completed"] for r in mine), sum(r["identical"] for r in mine), sum(r["hang"] for r in mine),
            sum(bool(r["check"]["lost"]) for r in mine),
            sum(r["kill"]["kind"] != "driver" and len(r["attempts"]) > 1 for r in mine)))
    lines += ["", "| command | trial | killed (when, progress then) | rcs | seconds | completed | identical | notes |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = "; ".join(r["check"]["lost"] + r["check"]["notes"])[:160].replace("|", "/")
        if r["hang"]:
            notes = "HANG; " + notes
        rcs = ",".join(str(a["rc"]) for a in r["attempts"])
        lines.append(f"| {r['command']} | {r['trial']} | {kill_summary(r)} | {rcs} | {r['seconds']} | "
                     f"{'yes' if r['completed'] else 'no'} | {'yes' if r['identical'] else 'no'} | {notes} |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# --------------------------------------------------------------------------------------------------
# Disk full during a checkpoint


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[bool]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def checkpoint_bytes(ref_out: Path) -> int:
    from speech_ssl.train import checkpoint as ckpt

    latest = Path(ckpt.latest_complete(ref_out))
    return sum(p.stat().st_size for p in latest.iterdir() if p.is_file())


def _listing(folder: Path) -> dict[str, int]:
    """Every entry directly under ``folder`` (hidden ones too) and its size in bytes (folders: their files)."""
    sizes = {}
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        sizes[p.name] = (sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())
                         if p.is_dir() and not p.is_symlink() else p.lstat().st_size)
    return sizes


def disk_full(inputs: dict[str, str], work: Path, ref: dict, timeout: float, workers: int) -> dict[str, Any]:
    """Pretraining into a tmpfs that holds about 1.6 checkpoints (keep_last=1): the first checkpoint fits, a
    later one runs out of space while it is written. The earlier checkpoint must stay complete and load;
    the command must end (no hang) and say so. Then the tmpfs is grown (space freed, as a user would) and
    the same command run again: it must resume from the intact checkpoint and end with the reference's
    weights."""
    from speech_ssl.train import checkpoint as ckpt

    name = f"disk_full_{workers}w"
    trial_dir = work / "trials" / name
    shutil.rmtree(trial_dir, ignore_errors=True)
    trial_dir.mkdir(parents=True)
    size = int(checkpoint_bytes(Path(ref["out"])) * 1.6) + (2 << 20)
    out = trial_dir / "mnt" / "out"
    row: dict[str, Any] = {"command": name, "tmpfs_bytes": size}
    with tmpfs(out, str(size)) as mounted:
        if not mounted:
            row["skipped"] = "mount -t tmpfs failed (not root?)"
            return row
        tag = f"{os.getpid()}-{name}"
        with cluster_for(tag, trial_dir) as cluster:
            args = command_args("pretrain", inputs, out, cluster.address)
            args = [a for a in args if not a.startswith(("trainer.keep_last=", "trainer.num_workers="))]
            args += ["trainer.keep_last=1", f"trainer.num_workers={workers}"]
            result = run_trial("pretrain", args, out, trial_dir, tag, cluster, None, None, timeout, random.Random(0))
            complete = [Path(p) for p in ckpt.list_checkpoints(out) if ckpt.is_complete(p)]
            incomplete = [Path(p).name for p in ckpt.list_checkpoints(out) if not ckpt.is_complete(p)]
            loads = []
            for p in complete:
                try:
                    from speech_ssl.models import load

                    load(str(p))
                    ckpt.read_main_files(p)
                    loads.append(p.name)
                except Exception as err:  # noqa: BLE001
                    row.setdefault("load_errors", []).append(f"{p.name}: {err}"[:200])
            text = Path(result["attempts"][-1]["log"]).read_text(errors="replace")
            final = "\n".join(text.splitlines()[-20:])
            row.update(result)
            row.update({"rc": result["attempts"][-1]["rc"], "complete": [p.name for p in complete],
                        "incomplete": incomplete, "loadable": loads, "left_behind": _listing(out),
                        "says_no_space": "No space left" in final or "ENOSPC" in final or "disk" in final.lower(),
                        "final_lines_name_intact_checkpoint": any(p.name in final for p in complete),
                        "tracebacks": text.count("Traceback"), "output_lines": len(text.splitlines()),
                        "restarts_by_ray_train": text.count("resumed from") // max(1, workers)})
            row["previous_intact"] = bool(complete) and len(loads) == len(complete)
            # Space freed: the same command again resumes and finishes with the reference's weights.
            subprocess.run(["mount", "-o", f"remount,size={size * 4}", str(out)], capture_output=True)
            (trial_dir / "rerun").mkdir()
            again = run_trial("pretrain", args, out, trial_dir / "rerun", tag, cluster, None, None, timeout,
                              random.Random(0))
            ref_out = Path(ref["out"])
            if workers != 2:  # the reference ran 2 workers: an undisturbed run with these workers, on a roomy disk
                ref_out = trial_dir / "reference" / "out"
                ref_out.parent.mkdir()
                run_trial("pretrain", [a if not a.startswith("output_dir=") else f"output_dir={ref_out}" for a in args],
                          ref_out, ref_out.parent, tag, cluster, None, None, timeout, random.Random(0))
        row["rerun_rc"] = again["attempts"][-1]["rc"]
        row["rerun_hang"] = again["hang"]
        if row["rerun_rc"] == 0:
            same, why = _same_tensors(_tensors(out / "last" / "model.safetensors"),
                                      _tensors(ref_out / "last" / "model.safetensors"))
            row["rerun_identical"], row["rerun_note"] = same, why
            summary = json.loads((out / "train_summary.json").read_text())
            row["rerun_updates"], row["rerun_resumes"] = summary.get("updates"), summary.get("resumes")
        else:
            row["rerun_tail"] = again["attempts"][-1]["tail"]
    return row


# --------------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", nargs="+", default=list(COMMANDS), help="pretrain finetune embed run | none")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--targets", nargs="+", default=None, help="victim kinds to choose from (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="hard limit per trial (s), re-run included")
    parser.add_argument("--embed-tol", type=float, default=1e-4)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "chaos.json")
    parser.add_argument("--disk-full", action="store_true", help="also the disk-full-during-a-checkpoint scenarios")
    parser.add_argument("--budget", type=float, default=None,
                        help="stop starting trials after this many seconds (rounds of one trial per command)")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("speech_ssl").setLevel(logging.ERROR)  # the harness reads checkpoints; quiet about it
    commands = [c for c in args.commands if c != "none"]
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"chaos: work folder {work}", flush=True)
    rng = random.Random(args.seed)
    inputs = make_inputs(work)
    t0 = now()
    refs = {}
    for command in commands + (["pretrain"] if args.disk_full and "pretrain" not in commands else []):
        print(f"reference {command} ...", flush=True)
        refs[command] = reference(command, inputs, work, args.timeout)
        print(f"  {refs[command]['seconds']} s, progress {refs[command].get('progress')} units; victims seen at "
              f"progress {refs[command].get('windows')}", flush=True)
    rows: list[dict] = []
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "work": str(work),
               "load": os.getloadavg(), "references": refs, "trials": rows}

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))

    # Trials in rounds (one per command), so that a budget cut leaves every command measured.
    for n in range(args.trials):
        if args.budget and now() - t0 > args.budget:
            print(f"budget of {args.budget:.0f} s spent: stopping after {n} round(s)", flush=True)
            break
        for command in commands:
            kinds = [k for k in TARGETS[command] + EXTRA_TARGETS.get(command, ())
                     if (not args.targets and k in TARGETS[command]) or (args.targets and k in args.targets)]
            if not kinds:
                continue
            kind = rng.choice(kinds)
            moment = random_moment(kind, refs[command], rng)
            print(f"[{command} {n + 1}/{args.trials}] kill {kind} {moment.describe()}", flush=True)
            row = one_trial(command, n, kind, moment, inputs, work, refs[command], args.timeout, args.embed_tol,
                            rng)
            rows.append(row)
            print(f"  -> {kill_summary(row)}; rc {[a['rc'] for a in row['attempts']]}; {row['seconds']}s; "
                  f"completed {row['completed']}, identical {row['identical']}, hang {row['hang']}"
                  + (f"; {'; '.join(row['check']['lost'] + row['check']['notes'])[:300]}" if not row['identical']
                     else ""), flush=True)
            save()
    if args.disk_full:
        results["disk_full"] = []
        for workers in (2, 0):
            print(f"disk full during a checkpoint ({workers} Ray Train workers) ...", flush=True)
            row = disk_full(inputs, work, refs["pretrain"], args.timeout, workers)
            results["disk_full"].append(row)
            print("  " + json.dumps({k: v for k, v in row.items() if k not in ("attempts", "rerun_tail")},
                                    default=str)[:1500], flush=True)
            if row.get("attempts"):
                print("  last lines:\n    " + row["attempts"][-1]["tail"].replace("\n", "\n    ")[-1500:], flush=True)
            save()
    results["table"] = print_table(rows, commands)
    results["seconds"] = round(now() - t0, 1)
    save()
    print(f"results: {args.json}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
