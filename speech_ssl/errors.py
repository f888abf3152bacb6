"""Errors meant for the person running a command: printed as one message, no traceback.

* :class:`SpeechSSLError`: a failure the user can act on (bad data, nothing usable, a run that cannot go on).
  No restart fixes it, so Ray Train never retries a worker that raised one (``speech_ssl.train.control``).
* :class:`Interrupted`: the command was stopped by a signal (Ctrl-C, SIGTERM from a preemption or
  ``ray job stop``). A ``KeyboardInterrupt``, so that no ``except Exception`` on the way out swallows it;
  its exit code is the shell's ``128 + signal`` (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import signal


class SpeechSSLError(RuntimeError):
    """A failure the user can act on (bad input, nothing to do, a run that cannot continue)."""

    exit_code = 1


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """A stop by signal; ``str()`` is the one line the CLI prints (what stopped, where a re-run resumes)."""

    def __init__(self, signum: int = signal.SIGINT, message: str | None = None):
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(message or f"interrupted ({signal_name(self.signum)})")

    def __reduce__(self):  # picklable with its signal (exceptions pickle their args by default)
        return (self.__class__, (self.signum, str(self)))
