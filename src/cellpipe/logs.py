"""Logging for the command-line programs (``cellpipe`` and ``python -m flows``)."""

from __future__ import annotations

import logging

from cellpipe.redact import install_log_redaction

# Libraries that log every request at INFO; their lines drown the pipeline's own.
_CHATTY = ("httpx", "httpcore")


def configure_logging(verbose: bool = False) -> None:
    """Timestamped lines on stderr, debug with ``verbose``, credentials redacted."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        for name in _CHATTY:
            logging.getLogger(name).setLevel(logging.WARNING)
    install_log_redaction()  # no inbox/remote/server credentials in any log line
