"""How a training worker's stream sizes its Ray Data decode tasks: planned once, on the driver.

The driver (``speech_ssl.train.resources``) knows what *all* training workers hold; a worker only knows
its own share. A :class:`ReadPlan` carries the driver's numbers to every worker's ``BatchStream``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReadPlan:
    """task_cpus: CPUs one decode task asks for (``data.num_cpus_per_reader``, or less where the machine is
        too small for it).
    training_cpus: CPUs the training workers hold together for the whole run (never free for decoding).
    streams: streams that read at the same time (one per training worker); they share the decode CPUs.
    """

    task_cpus: float
    training_cpus: float
    streams: int

    def stream_cpus(self, cluster_cpus: float) -> float:
        """CPUs Ray Data may use for one stream: the cluster's CPUs besides training, shared fairly among the
        streams, but never less than one task's (a budget below one task would schedule nothing)."""
        return max(self.task_cpus, (cluster_cpus - self.training_cpus) / max(1, self.streams))
