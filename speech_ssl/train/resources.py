"""The CPUs and GPUs of a Ray Train run, planned on the driver before any worker starts.

Training workers hold ``trainer.cpus_per_worker`` CPUs (and ``trainer.gpus_per_worker`` GPUs) each for the
whole run; Ray Data's decode tasks need ``data.num_cpus_per_reader`` CPUs besides. When the workers leave
less than that, every decode task stays pending and training waits forever (2 CPUs, 2 workers at 1 CPU).
So the driver plans both against the cluster's totals before ``TorchTrainer.fit``:

* On the embedded local Ray (this command started it, it owns the machine) the documented commands must
  simply work: ``cpus_per_worker`` is lowered to a fraction so that decoding keeps one task's CPUs, and one
  INFO line says what was chosen. Only what can never fit (more GPUs than the machine has) fails.
* On a joined cluster nothing is changed behind the user's back: a plan that does not fit is asked of the
  autoscaler and waited for (``CLUSTER_WAIT_S``, restarted while the autoscaler reports nodes being
  launched), then fails with one paragraph showing the arithmetic and the keys to change.

:func:`plan_resources` is the arithmetic over plain numbers; :func:`plan_on_ray` reads the running Ray.
The result reaches every worker's ``BatchStream`` as a :class:`~speech_ssl.data.read_plan.ReadPlan`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from speech_ssl.data.read_plan import ReadPlan
from speech_ssl.errors import SpeechSSLError

log = logging.getLogger(__name__)

# How long a joined cluster may take to show what the plan needs (nodes joining); tests shorten it.
CLUSTER_WAIT_S = 30.0
POLL_S = 1.0
# Fractional CPUs are planned in hundredths: readable in the log line, far above Ray's granularity (1e-4).
CPU_STEP = 0.01


@dataclass(frozen=True)
class ClusterResources:
    """What the alive nodes have in total (capacity, not what happens to be free right now)."""

    cpus: float
    gpus: float = 0.0
    largest_node_cpus: float = math.inf  # a worker or a decode task runs on one node
    largest_node_gpus: float = math.inf


@dataclass(frozen=True)
class ResourcePlan:
    """What the training workers hold (``cpus_per_worker`` as planned; ``requested_cpus_per_worker`` as
    configured) and what decoding gets (``read``, handed to every worker's streams)."""

    cluster: ClusterResources
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float  # 0 without use_gpu
    requested_cpus_per_worker: float
    read: ReadPlan

    @property
    def decode_cpus(self) -> float:
        return round(self.cluster.cpus - self.read.training_cpus, 4)

    def summary_line(self) -> str:
        """E.g. '2 CPUs: 2 training workers x 0.5 CPU, 1 CPU for decoding (tasks of 1 CPU)'."""
        gpus = f", {_n(self.cluster.gpus, 'GPU')}" if self.gpus_per_worker else ""
        worker = _n(self.cpus_per_worker, "CPU")
        if self.gpus_per_worker:
            worker += f" + {_n(self.gpus_per_worker, 'GPU')}"
        line = (f"{_n(self.cluster.cpus, 'CPU')}{gpus}: {_workers(self.num_workers)} x {worker}, "
                f"{_n(self.decode_cpus, 'CPU')} for decoding (tasks of {_n(self.read.task_cpus, 'CPU')})")
        if self.cpus_per_worker != self.requested_cpus_per_worker:
            line += (f"; trainer.cpus_per_worker={self.requested_cpus_per_worker:g} lowered to "
                     f"{self.cpus_per_worker:g} so that decoding keeps its CPUs")
        return line

    def to_dict(self) -> dict[str, Any]:
        return {"cluster_cpus": self.cluster.cpus, "cluster_gpus": self.cluster.gpus,
                "num_workers": self.num_workers, "cpus_per_worker": self.cpus_per_worker,
                "gpus_per_worker": self.gpus_per_worker, "decode_cpus": self.decode_cpus,
                "decode_task_cpus": self.read.task_cpus}


def _n(value: float, unit: str) -> str:
    value = round(value, 4)
    return f"{value:g} {unit}" + ("s" if value > 1 or value == 0 else "")


def _workers(count: int) -> str:
    return f"{count} training worker" + ("" if count == 1 else "s")


def _floor_step(value: float) -> float:
    return round(math.floor(value / CPU_STEP + 1e-9) * CPU_STEP, 4)


def _problems(cluster: ClusterResources, workers: int, cpus: float, gpus: float, task: float) -> dict[str, list[str]]:
    """What does not fit, by resource ("GPU", "CPU"), each a clause of arithmetic naming the keys involved."""
    short: dict[str, list[str]] = {"GPU": [], "CPU": []}
    if gpus and workers * gpus > cluster.gpus:
        short["GPU"].append(f"{_workers(workers)} x {_n(gpus, 'GPU')} (trainer.num_workers x "
                            f"trainer.gpus_per_worker) need {_n(workers * gpus, 'GPU')}, the cluster has "
                            f"{cluster.gpus:g}")
    elif gpus > cluster.largest_node_gpus:
        short["GPU"].append(f"one training worker needs {_n(gpus, 'GPU')} (trainer.gpus_per_worker), the largest "
                            f"node has {cluster.largest_node_gpus:g}")
    held = workers * cpus
    if held > cluster.cpus:
        short["CPU"].append(f"{_workers(workers)} x {_n(cpus, 'CPU')} (trainer.num_workers x "
                            f"trainer.cpus_per_worker) need {_n(held, 'CPU')}, the cluster has {cluster.cpus:g}")
    elif cluster.cpus - held < task:
        short["CPU"].append(f"{_workers(workers)} x {_n(cpus, 'CPU')} (trainer.num_workers x "
                            f"trainer.cpus_per_worker) hold {_n(held, 'CPU')} of {cluster.cpus:g}, which leaves "
                            f"{_n(cluster.cpus - held, 'CPU')} for decoding, but one decode task needs "
                            f"{_n(task, 'CPU')} (data.num_cpus_per_reader)")
    if cpus > cluster.largest_node_cpus:
        short["CPU"].append(f"one training worker needs {_n(cpus, 'CPU')} (trainer.cpus_per_worker), the largest "
                            f"node has {cluster.largest_node_cpus:g}")
    if task > cluster.largest_node_cpus:
        short["CPU"].append(f"one decode task needs {_n(task, 'CPU')} (data.num_cpus_per_reader), the largest "
                            f"node has {cluster.largest_node_cpus:g}")
    return {kind: clauses for kind, clauses in short.items() if clauses}


def _paragraph(cluster: ClusterResources, short: dict[str, list[str]], workers: int, task: float, embedded: bool,
               waited_s: float) -> str:
    where = "this machine's Ray" if embedded else "the Ray cluster"
    text = (f"{where} ({_n(cluster.cpus, 'CPU')}, {_n(cluster.gpus, 'GPU')}) cannot run this training beside its "
            f"data decoding")
    if waited_s:
        text += f" (waited {waited_s:.0f} s for more nodes)"
    text += ": " + "; ".join(clause for clauses in short.values() for clause in clauses) + ". "
    changes = []
    if "GPU" in short:
        changes.append("lower trainer.num_workers or trainer.gpus_per_worker, or set trainer.use_gpu=false")
    if "CPU" in short:
        fits = _floor_step((cluster.cpus - task) / workers) if task <= cluster.largest_node_cpus else 0.0
        changes.append(f"change trainer.cpus_per_worker (fractions allowed{f'; {fits:g} fits' if fits > 0 else ''}), "
                       "trainer.num_workers or data.num_cpus_per_reader")
    if not embedded:
        changes.append("add nodes to the cluster")
    return text + "To run, " + "; or ".join(changes) + "."


def plan_resources(cluster: ClusterResources, num_workers: int, cpus_per_worker: float, task_cpus: float,
                   gpus_per_worker: float = 0.0, may_shrink: bool = False, waited_s: float = 0.0) -> ResourcePlan:
    """Workers' and decoding's resources on ``cluster``, or a SpeechSSLError paragraph when they cannot fit.

    ``may_shrink`` (the embedded local Ray): where the workers would leave decoding less than one task's
    CPUs, lower ``cpus_per_worker`` so that decoding keeps ``task_cpus`` (or half the machine, on a machine
    too small for a whole task beside the workers). A plan that fits is returned unchanged.
    """
    if num_workers < 1:
        raise ValueError("plan_resources is for Ray Train workers (num_workers >= 1)")
    cpus, task = cpus_per_worker, task_cpus
    if may_shrink and cluster.cpus - num_workers * cpus < task:
        task = min(task, cluster.cpus / 2)
        cpus = min(cpus, _floor_step((cluster.cpus - task) / num_workers))
        if cpus <= 0:  # more workers than hundredths of a CPU: report what was asked
            cpus, task = cpus_per_worker, task_cpus
    short = _problems(cluster, num_workers, cpus, gpus_per_worker, task)
    if short:
        raise SpeechSSLError(_paragraph(cluster, short, num_workers, task, may_shrink, waited_s))
    read = ReadPlan(task_cpus=task, training_cpus=round(num_workers * cpus, 4), streams=num_workers)
    return ResourcePlan(cluster, num_workers, cpus, gpus_per_worker, cpus_per_worker, read)


# -- the running Ray ------------------------------------------------------------------------------------

def cluster_resources() -> ClusterResources:
    import ray

    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return ClusterResources(cpus=float(total.get("CPU", 0.0)), gpus=float(total.get("GPU", 0.0)),
                            largest_node_cpus=max((float(r.get("CPU", 0.0)) for r in nodes), default=0.0),
                            largest_node_gpus=max((float(r.get("GPU", 0.0)) for r in nodes), default=0.0))


def _request_from_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Ask an autoscaler (if any) for these shapes; ``[]`` withdraws the request. A no-op without one."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as err:  # Ray Client connections and clusters without autoscaler state
        log.debug("could not send the resource request to the autoscaler: %s", err)


def _nodes_launching() -> bool:
    """Whether an autoscaler reports nodes being launched (what `ray status` shows as pending)."""
    import ray

    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        if is_autoscaler_v2():
            from ray.autoscaler.v2.sdk import get_cluster_status

            status = get_cluster_status(ray.get_runtime_context().gcs_address)
            return bool(status.pending_launches or status.pending_nodes)
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        report = (json.loads(raw).get("autoscaler_report") or {}) if raw else {}
        return bool(report.get("pending_nodes") or any((report.get("pending_launches") or {}).values()))
    except Exception as err:  # private status API of the pinned Ray; without it, the plain wait applies
        log.debug("could not read the autoscaler's status: %s", err)
        return False


def plan_on_ray(num_workers: int, cpus_per_worker: float, task_cpus: float, gpus_per_worker: float = 0.0,
                embedded: bool | None = None) -> ResourcePlan:
    """:func:`plan_resources` against the running Ray, embedded or joined (see the module docstring)."""
    from speech_ssl.runtime import is_embedded

    embedded = is_embedded() if embedded is None else embedded
    args = (num_workers, cpus_per_worker, task_cpus, gpus_per_worker)
    if embedded:
        return plan_resources(cluster_resources(), *args, may_shrink=True)
    try:
        return plan_resources(cluster_resources(), *args)
    except SpeechSSLError as err:
        log.info("waiting up to %g s for the cluster to grow: %s", CLUSTER_WAIT_S, err)
    worker = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    _request_from_autoscaler([dict(worker) for _ in range(num_workers)] + [{"CPU": task_cpus}])
    started = time.monotonic()
    deadline = started + CLUSTER_WAIT_S
    try:
        while True:
            time.sleep(POLL_S)
            now = time.monotonic()
            if _nodes_launching():
                deadline = max(deadline, now + CLUSTER_WAIT_S)
            try:
                return plan_resources(cluster_resources(), *args)
            except SpeechSSLError:
                if now >= deadline:
                    return plan_resources(cluster_resources(), *args, waited_s=now - started)
    finally:
        # Train's workers and Ray Data's tasks ask for themselves from here on; a standing request would
        # keep nodes up after the run.
        _request_from_autoscaler([])
