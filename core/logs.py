"""Log lines of every process: the request id on each, one format, and no secrets.

- The request id of the request (or job) being handled lives in one contextvar. The web binds
  it for each request (api/requestid.py), the worker for each job from the job's meta
  (`JOB_META_KEY`, put there by core/jobs.py when the job is queued), so a conversion job and
  the webhook deliveries it queues log the id of the upload that caused them.
- `PICSTREAM_LOG_FORMAT=text` (the default): `time pid LEVEL logger: message`, followed by
  ` request_id=<id>` while one is bound. `json`: one JSON object per line with `time`
  (UTC, ISO 8601), `level`, `logger`, `message`, `process`, `request_id` (null outside a
  request or job) and, when there is one, `exception` (the traceback as text).
- SECURITY: `ScrubFilter` sits on every handler we install (ours, gunicorn's, rq's through the
  root logger) and rewrites each line before it is formatted; see `scrub` for what it hides.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import IO

TEXT_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s%(request_suffix)s"
JOB_META_KEY = "request_id"  # where a job carries the id of the request that queued it
# What a request id may be (api/requestid.py enforces it on the way in): safe in a header, a
# log line, a JSON string, a URN and an nginx `return` body without any escaping.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
REDACTED = "[redacted]"

_request_id: ContextVar[str | None] = ContextVar("picstream_request_id", default=None)


def bind_request_id(request_id: str | None) -> Token[str | None]:
    """Make `request_id` the id of every line this thread (or context) logs from now on."""
    return _request_id.set(request_id)


def current_request_id() -> str | None:
    return _request_id.get()


@contextmanager
def request_id_bound(request_id: str | None) -> Iterator[None]:
    """The id bound for the block, and the previous one again after it."""
    token = bind_request_id(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (None outside a request or job) and `request_suffix` (for the text
    format) to each record. A record that names its own `request_id` (`extra=`) keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or _request_id.get()
        record.request_id = request_id
        record.request_suffix = f" request_id={request_id}" if request_id else ""
        return True


# SECURITY: what must never reach a log. Signed links carry `sig` (core/signing.py), presigned
# store URLs `X-Amz-Signature` and `X-Amz-Credential`, tus and webhook URLs may carry a
# `token`, clients send `Authorization: Bearer <api key or pst_ token>`. The value is
# replaced, the name kept, so a line still says what was there.
_SECRET_QUERY = re.compile(
    r"(?i)(?<![A-Za-z0-9_-])"
    r"(sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|token|access_token)"
    r"(=|%3D)[^&\s\"'<>;,]*"
)
# A credential is a run of token characters; "the bearer of" is not one.
_BEARER = re.compile(r"(?i)\b(bearer)(\s+|%20|\+)(?=[^\s\"'<>,;]{8})[^\s\"'<>,;]+")
_AUTHORIZATION = re.compile(
    r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)((?:bearer|basic)\s+)?[^\s\"'<>,;]+"
)
_UPLOAD_TOKEN = re.compile(r"pst_[A-Za-z0-9_.-]+")


def scrub(text: str) -> str:
    """`text` with the values of secret query parameters, Authorization header values and
    upload tokens replaced by `[redacted]`."""
    if not text:
        return text
    text = _SECRET_QUERY.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    text = _AUTHORIZATION.sub(lambda m: f"{m[1]}{m[2] or ''}{REDACTED}", text)
    text = _BEARER.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    return _UPLOAD_TOKEN.sub(f"pst_{REDACTED}", text)


class ScrubFilter(logging.Filter):
    """SECURITY: rewrites each record's message, traceback and stack with `scrub`. The
    message is formatted here (its arguments may be a URL with a signature) and the
    arguments dropped; the traceback is formatted here too and kept as `exc_text`, which
    formatters print instead of formatting `exc_info` again."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a broken format: logging would print its own error
            return True
        record.msg, record.args = scrub(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring). Run `RequestIdFilter` first."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "request_id": getattr(record, "request_id", None),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False)


def formatter(log_format: str, text_format: str = TEXT_FORMAT) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(text_format)


def dress(handler: logging.Handler, log_format: str, text_format: str = TEXT_FORMAT) -> None:
    """Give an existing handler (gunicorn's) our filters and format."""
    for kind in (RequestIdFilter, ScrubFilter):
        if not any(isinstance(f, kind) for f in handler.filters):
            handler.addFilter(kind())
    handler.setFormatter(formatter(log_format, text_format))


def configure(level: str, log_format: str, stream: IO[str] | None = None) -> None:
    """The process's root handler, replacing any other: everything that propagates to the
    root (our loggers, rq's, the libraries') is written through it."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    dress(handler, log_format)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
