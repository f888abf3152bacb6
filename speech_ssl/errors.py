"""Errors meant for the person running a command: printed as one message, no traceback."""


class SpeechSSLError(RuntimeError):
    """A failure the user can act on (bad input, nothing to do, a run that cannot continue)."""

    exit_code = 1
