"""Exceptions that carry a message meant for the user, not a traceback."""


class CellpipeError(Exception):
    """A failure the user can act on; the CLI prints its message and exits non-zero."""


class ParamsError(CellpipeError):
    """params.yaml is missing a section or holds an invalid value."""


class StageFailed(CellpipeError):
    """A stage refused to produce outputs (e.g. too many rejected inputs)."""


class InputError(CellpipeError):
    """Input data is missing or not in a layout cellpipe can read."""
