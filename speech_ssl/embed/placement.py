"""Resources: how many model actors, with what, and what is left of the Ray cluster for decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from speech_ssl.errors import SpeechSSLError


# Memory, not CPUs, bounds CPU actors on big nodes: each holds the model and a batch's activations (base:
# ~1.5-2 GB), and past a few threads per actor intra-op parallelism loses little.
MAX_CPU_ACTORS_PER_NODE = 8


@dataclass
class Placement:
    device: str
    num_actors: int
    actor_cpus: float
    actor_gpus: float
    threads: int
    reader_cpus: float
    cluster_cpus: float
    cluster_gpus: float


def place(device: str, num_actors: Optional[int], actor_cpus: Optional[float], reader_cpus: float) -> Placement:
    """Actor pool and decode task sizes that fit the running Ray cluster (never a pending forever)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0.0)), float(total.get("GPU", 0.0))
    node_cpus = [c for c in (float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")) if c > 0]
    node_cpus = node_cpus or [cpus]
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    if device == "cuda":
        if gpus < 1:
            raise SpeechSSLError("device=cuda but the Ray cluster has no GPU; use device=cpu (or auto)")
        n = num_actors or int(gpus)
        if n > gpus:
            raise SpeechSSLError(f"num_actors={n} GPU actors, but the cluster has {gpus:g} GPUs")
        a_cpus = actor_cpus if actor_cpus is not None else 1.0
        a_gpus = 1.0
    else:
        # One actor per CPU of a node (up to MAX_CPU_ACTORS_PER_NODE), each with one intra-op thread: on CPUs
        # independent single-thread actors beat one multi-thread actor (2 cores, base: two 1-thread actors
        # 1.2x one 2-thread actor, benchmarks/README.md), at a model's memory per actor.
        n = num_actors or len(node_cpus) * min(MAX_CPU_ACTORS_PER_NODE, max(1, int(min(node_cpus))))
        # CPU actors share a node with the decode tasks: leave each node a little for them.
        per_node = math.ceil(n / max(1, len(node_cpus)))
        a_cpus = actor_cpus if actor_cpus is not None else max(0.5, (min(node_cpus) - 0.5) / per_node)
        a_gpus = 0.0
    free = cpus - n * a_cpus
    if free <= 0:
        raise SpeechSSLError(f"{n} model actors of {a_cpus:g} CPUs take all {cpus:g} CPUs of the cluster and leave "
                             "none for decoding; lower num_actors or actor_cpus")
    decode = min(reader_cpus, free)
    if device == "cpu":
        # A decode task runs on one node: what the smallest node keeps once its share of actors is placed
        # (2 nodes of 1 CPU, an actor of 0.5 CPU on each: a decode task of 1 CPU would never be scheduled).
        node_left = min(node_cpus) - per_node * a_cpus
        if node_left > 0:
            decode = min(decode, node_left)
    return Placement(device, n, a_cpus, a_gpus, max(1, math.ceil(a_cpus)), decode, cpus, gpus)
