"""Run Ray Data's executor for a stream in a helper actor that lives as long as the stream.

Why not in the consuming process: Ray Data's scheduling loop is a Python thread of the process that
executes the dataset. In a Ray Train worker it shares the GIL with the training thread, which then waits
for the GIL after each of its thousands of small operations: measured here (fbank-tiny, 1 CPU), an
optimizer step went from 0.03 s to 0.4 s and an update took 2x as long.

Why not ``Dataset.streaming_split(1)``, which also moves the executor out: it starts a new coordinator
actor (a new Python process importing Ray Data) for every dataset, that is every epoch and every
validation pass; measured here 5-7 s per epoch on a loaded 2-CPU machine against 0.45 s in-process.
A :class:`Feeder` is started once per stream and executes one dataset after another.

Protocol (one consumer): ``start(dataset)`` begins executing it (stopping whatever ran before; it returns
once the first output block is there) and returns a generation number; ``next(generation)`` returns the
object refs of the next output blocks, ``[]`` once the dataset is exhausted (or for a generation that is no
longer current). These calls run one at a time, in order. ``state()`` runs in a concurrency group of its
own, so it answers while ``start`` or ``next`` waits on blocks that never come: the stall watchdog of
:func:`iter_blocks` asks it what is pending.
The blocks are owned by the feeder; the consumer borrows them through the returned refs.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Iterator

import ray

from speech_ssl.errors import SpeechSSLError


@ray.remote(num_cpus=0, concurrency_groups={"inspect": 1})
class Feeder:
    """Executes datasets on behalf of one consumer (0 CPUs: the executor only schedules)."""

    def __init__(self) -> None:
        self._bundles: Iterator[Any] | None = None
        self._executor: Any = None
        self._generation = 0
        self._phase = "idle"
        self._delivered = 0  # blocks of the current dataset handed to the consumer
        self._last_delivery = time.monotonic()

    def start(self, dataset: Any) -> int:
        """Begin executing ``dataset``; returns a generation number that tags this dataset's ``next`` calls."""
        self._stop()
        self._phase, self._delivered, self._last_delivery = "waiting for its first block", 0, time.monotonic()
        # The dataset's own context (resource limits, preserve_order) governs its execution here.
        ray.data.DataContext._set_current(dataset.context.copy())
        # What Dataset.iter_internal_ref_bundles does, keeping the executor to shut down when the consumer
        # moves on mid-dataset (as Ray Data's own SplitCoordinator does; private API of the pinned Ray). It
        # returns once the first output block is there.
        bundles, _, self._executor = dataset._execute_to_iterator(capture_executor=False)
        self._bundles = iter(bundles)
        self._generation += 1
        self._phase = "streaming"
        return self._generation

    def next(self, generation: int) -> list:
        """Refs of the next bundle's blocks; [] when the dataset is exhausted or ``generation`` is stale (the
        consumer asked ahead and has since started another dataset)."""
        if generation != self._generation or self._bundles is None:
            return []
        for bundle in self._bundles:
            if bundle.blocks:
                self._delivered += len(bundle.blocks)
                self._last_delivery = time.monotonic()
                return [entry.ref for entry in bundle.blocks]
        self._stop()
        self._phase = "finished"
        return []

    @ray.method(concurrency_group="inspect")
    def state(self) -> dict:
        """What this feeder is doing, for a consumer that has waited too long (answers while ``next`` waits)."""
        executor = self._executor
        return {"phase": self._phase, "blocks_delivered": self._delivered,
                "seconds_since_last_block": round(time.monotonic() - self._last_delivery, 1),
                "executor": "not running" if executor is None else "running" if executor.is_alive() else "finished"}

    def _stop(self) -> None:
        executor, self._executor, self._bundles = self._executor, None, None
        if executor is not None:
            executor.shutdown(force=True)


def start_feeder() -> Any:
    """A feeder actor on this node (the executor's tasks and its blocks stay local to the consumer)."""
    node = ray.get_runtime_context().get_node_id()
    strategy = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node, soft=False)
    return Feeder.options(scheduling_strategy=strategy).remote()


def iter_blocks(feeder: Any, dataset: Any, ahead: int, stall_timeout_s: float = 300.0,
                task_cpus: float = 1.0) -> Iterator[Any]:
    """The output blocks of ``dataset`` (pyarrow tables) in order, executed by ``feeder``, with ``ahead`` block
    requests outstanding so the next block is usually there when the consumer asks.

    Never a silent wait: after ``stall_timeout_s`` seconds without a block, SpeechSSLError says what is pending
    (the feeder's state, the cluster's resources, what one decode task of ``task_cpus`` CPUs asks for)."""
    generation = _wait(feeder, feeder.start.remote(dataset), stall_timeout_s, task_cpus)
    pending = deque(feeder.next.remote(generation) for _ in range(max(1, ahead)))
    while pending:
        refs = _wait(feeder, pending.popleft(), stall_timeout_s, task_cpus)
        if not refs:
            return  # requests still pending return [] on their own (exhausted or stale)
        pending.append(feeder.next.remote(generation))
        for ref in refs:
            yield ray.get(ref)


def _wait(feeder: Any, ref: Any, timeout_s: float, task_cpus: float) -> Any:
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        raise SpeechSSLError(stall_message(feeder, timeout_s, task_cpus))
    return ray.get(ref)


def stall_message(feeder: Any, waited_s: float, task_cpus: float) -> str:
    """One paragraph: what the consumer waited for, the feeder's state, the cluster's resources."""
    try:
        state = ray.get(feeder.state.remote(), timeout=10)
        feeding = (f"its feeder is {state['phase']}, {state['blocks_delivered']} blocks delivered so far, the last "
                   f"{state['seconds_since_last_block']:g} s ago, Ray Data's executor {state['executor']}")
    except Exception as err:  # a feeder that cannot answer is itself the news
        feeding = f"its feeder did not answer ({type(err).__name__})"
    total, free = ray.cluster_resources(), ray.available_resources()

    def amount(key: str, scale: float = 1.0, unit: str = "") -> str:
        return f"{free.get(key, 0.0) / scale:.3g}{unit} of {total.get(key, 0.0) / scale:.3g}{unit}"

    return (f"no batch arrived for {waited_s:g} s: the stream's Ray Data decode tasks are pending or stuck; "
            f"{feeding}. The cluster has {amount('CPU')} CPUs, {amount('GPU')} GPUs and "
            f"{amount('object_store_memory', 1 << 30, ' GiB')} of object store free; one decode task asks for "
            f"{task_cpus:g} CPU{'s' if task_cpus > 1 else ''} (data.num_cpus_per_reader). Something holds the "
            "CPUs decode tasks need (training workers, other jobs' tasks: `ray status` shows the demands): give "
            "training workers fewer CPUs (trainer.cpus_per_worker) or lower data.num_cpus_per_reader; if decoding "
            "is only slow, raise data.stall_timeout_s.")
