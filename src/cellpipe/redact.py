"""Keep credentials out of logs and reports: user info and query values of URLs.

An inbox, a DVC remote or a server may be given as ``scheme://user:password@host/…?token=…``.
Every place that logs or stores such a location writes :func:`redact_url` of it, and the
CLI's log handlers carry :class:`RedactingFilter`, which applies :func:`redact_text` to
every message and traceback, including those of libraries (fsspec, aiohttp, tritonclient).
"""

from __future__ import annotations

import logging
import re
import traceback
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

HIDDEN = "***"
# scheme://… up to whitespace, a quote or a closing bracket: a URL inside free text.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>)\]]+")


def redact_url(url: str) -> str:
    """``url`` with its user info and every query value replaced by ``***``.

    Query values are all hidden, not only those with secret-looking names: signed URLs
    of object stores use many names (X-Amz-Signature, sig, token, code…), and a person
    reading a log needs the location, not its parameters. Plain paths pass unchanged.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # unparseable: hide everything after the scheme
        return url.split("://", 1)[0] + "://" + HIDDEN
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{HIDDEN}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        query = urlencode([(key, HIDDEN) for key, _ in parse_qsl(query, keep_blank_values=True)],
                          safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (see :func:`redact_url`)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group(0)), text)


class RedactingFilter(logging.Filter):
    """Redacts URLs in a record's message and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 (bad format args: the handler reports them itself)
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info))
                                          .rstrip("\n"))
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add :class:`RedactingFilter` to every handler of ``logger`` (default: the root)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
