"""How a training run is steered from outside its loop: polite stops, and which failures Ray may retry.

Stopping politely (Ctrl-C, or SIGTERM from a preemption or ``ray job stop``):

    driver: first SIGINT/SIGTERM -> StopRequest records it -> StopFlag actor (or, in-process, a flag)
    workers: StopWatch.requested() asks without blocking, once per update; the loop folds the answer into
             the all-reduce it does every update, so every rank stops after the same update; rank 0 writes
             a checkpoint; the workers return and the driver raises ``Interrupted`` (exit 130 / 143)
    driver: a second signal raises ``Interrupted`` at once (Ray Train's controller is aborted; the newest
            complete checkpoint is untouched and a re-run resumes from it)

Ray Train's own SIGINT handler (abort, then ``sys.exit(0)`` that surfaces as exit 1 with no message) is
replaced, and its failure policy too: a worker that raised :class:`~speech_ssl.errors.SpeechSSLError` or
:class:`~speech_ssl.config.ConfigError` (bad data, bad config, nothing usable) is never restarted, since a
restart cannot fix it; worker deaths, node losses and other infrastructure faults are retried as
``FailureConfig(max_failures)`` says. Both hooks are private methods of Ray 2.60's ``DataParallelTrainer``
(``_initialize_and_run_controller``, ``_register_sigint_handler``); ``tests/test_faults.py`` checks they exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from typing import Any, Callable, Iterator, Optional

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

from speech_ssl.config import ConfigError
from speech_ssl.errors import Interrupted, SpeechSSLError, signal_name

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
NOT_RETRIED = (SpeechSSLError, ConfigError)
log = logging.getLogger(__name__)
RAY_TRAIN_FN_LOGGER = "ray.train.v2._internal.util"  # logs "Error in training function" + traceback


# --------------------------------------------------------------------------------------------------
# Which failures are retried


def user_error(error: BaseException) -> Optional[BaseException]:
    """The first error a restart cannot fix among a failed worker group's errors (None for infrastructure)."""
    if isinstance(error, WorkerGroupError):
        for _, failure in sorted(error.worker_failures.items()):
            if isinstance(failure, NOT_RETRIED):
                return failure
    return None


class _HideUserErrorTraceback(logging.Filter):
    """Drops Ray Train's "Error in training function" traceback of a worker once it is armed: the driver
    tells a SpeechSSLError as one paragraph, and the worker's copy would add a traceback per rank."""

    armed = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.armed and record.getMessage().startswith("Error in training function"):
            return False
        return True


@contextlib.contextmanager
def user_errors_told_by_driver() -> Iterator[None]:
    """Around a worker's training function: a SpeechSSLError / ConfigError leaving it is not logged here
    (Ray Train logs every worker's exception with its traceback; ``speech_ssl.train.launch`` prints ours)."""
    quiet = _HideUserErrorTraceback()
    logging.getLogger(RAY_TRAIN_FN_LOGGER).addFilter(quiet)
    try:
        yield
    except NOT_RETRIED:
        quiet.armed = True
        raise


class NoRetryForUserErrors(DefaultFailurePolicy):
    """Ray Train's default policy, except that a worker's SpeechSSLError / ConfigError ends the run at once."""

    def make_decision(self, training_failed_error) -> FailureDecision:
        if user_error(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


# --------------------------------------------------------------------------------------------------
# Stop requests: driver side


class StopRequest:
    """The driver's record of a stop: which signal asked for it, and whom to tell.

    ``requested()`` is what the in-process loop (``trainer.num_workers=0``) asks; ``forward_to(flag)`` tells
    Ray Train workers through a StopFlag actor; ``on_force(fn)`` runs before an immediate stop (abort Ray
    Train's controller)."""

    def __init__(self, describe_resume: Callable[[], str]):
        self.signum: Optional[int] = None
        self.forced: Optional[Interrupted] = None
        self._event = threading.Event()
        self._flags: list[Any] = []
        self._force_hooks: list[Callable[[], None]] = []
        self._describe_resume = describe_resume

    def requested(self) -> bool:
        return self._event.is_set()

    def forward_to(self, flag) -> None:
        self._flags.append(flag)
        if self.signum is not None:  # a signal came before the workers' flag existed
            flag.request.remote(self.signum)

    def on_force(self, hook: Callable[[], None]) -> None:
        self._force_hooks.append(hook)

    def handle(self, signum: int, frame=None) -> None:
        """Signal handler: the first signal asks for a polite stop, the second stops at once."""
        if self.signum is not None:
            self._force(signum)
        self.signum = signum
        self._event.set()
        for flag in self._flags:
            flag.request.remote(signum)

    def _force(self, signum: int) -> None:
        for hook in self._force_hooks:
            with contextlib.suppress(Exception):  # best effort: the driver's exit ends its actors anyway
                hook()
        # Ray's ray.get turns whatever a signal handler raises into a bare KeyboardInterrupt: kept here for
        # stop_on_signals to raise instead.
        self.forced = Interrupted(signum, f"stopped at once ({signal_name(signum)}, a second signal); "
                                          f"{self._describe_resume()}")
        raise self.forced

    def interrupted(self, message: str) -> Interrupted:
        return Interrupted(self.signum or signal.SIGINT, message)


@contextlib.contextmanager
def stop_on_signals(describe_resume: Callable[[], str]) -> Iterator[StopRequest]:
    """SIGINT and SIGTERM request a polite stop while the block runs (main thread only: elsewhere signals
    cannot be caught, and the caller's handlers stay); the previous handlers come back afterwards."""
    stop = StopRequest(describe_resume)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, stop.handle)
    try:
        yield stop
    except KeyboardInterrupt:
        if stop.forced is not None:
            raise stop.forced from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@ray.remote(num_cpus=0, max_concurrency=1000)
class StopFlag:
    """Holds the stop request for the workers of one run; ``wait()`` returns once a stop is requested, so a
    worker keeps one call pending and checks it without blocking (no polling traffic)."""

    def __init__(self):
        self._event = asyncio.Event()
        self._signum = 0

    async def request(self, signum: int) -> None:
        self._signum = signum
        self._event.set()

    async def wait(self) -> int:
        await self._event.wait()
        return self._signum


def start_stop_flag(stop: StopRequest):
    """A StopFlag actor that ``stop`` forwards signals to (owned by the driver: it ends with the command).

    It lives on the driver's node: a flag on another node would die with that node, and a node loss must
    be a restart from the last checkpoint, never a stop."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    flag = StopFlag.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True)).remote()
    stop.forward_to(flag)
    return flag


# --------------------------------------------------------------------------------------------------
# Stop requests: worker side


class StopWatch:
    """A worker's view of the run's StopFlag: ``requested()`` never blocks (one pending ``wait()`` call)."""

    def __init__(self, flag):
        self._pending = flag.wait.remote() if flag is not None else None
        self._seen = False

    def requested(self) -> bool:
        if self._seen or self._pending is None:
            return self._seen
        ready, _ = ray.wait([self._pending], timeout=0)
        if not ready:
            return False
        try:
            ray.get(self._pending)
        except ray.exceptions.RayError as err:  # the flag is gone (its node died): that is no stop request
            log.warning("the run's stop flag is lost (%s); training goes on, a stop now ends it at once",
                        type(err).__name__)
            self._pending = None
            return False
        self._seen = True
        return True


# --------------------------------------------------------------------------------------------------
# The trainer


class ControlledTorchTrainer(TorchTrainer):
    """TorchTrainer with our failure policy and without Ray Train's SIGINT handler (``StopRequest``'s
    handlers stay in place; an immediate stop aborts the controller through ``on_force``)."""

    def __init__(self, *args, stop: StopRequest, **kwargs):
        super().__init__(*args, **kwargs)
        self._stop = stop

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = NoRetryForUserErrors(self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _register_sigint_handler(self, controller) -> None:
        self._stop.on_force(lambda: controller.abort.remote())
