"""Exceptions that carry a message meant for the user, not a traceback."""

import signal


class CellpipeError(Exception):
    """A failure the user can act on; the CLI prints its message and exits non-zero."""


class ParamsError(CellpipeError):
    """params.yaml is missing a section or holds an invalid value."""


class StageFailed(CellpipeError):
    """A stage refused to produce outputs (e.g. too many rejected inputs)."""


class InputError(CellpipeError):
    """Input data is missing or not in a layout cellpipe can read."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a command that saves its work on a stop ran (the
    train stage: see stages/train.py); the CLI then exits with 128 + the signal number,
    the status a shell gives a process the signal ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
