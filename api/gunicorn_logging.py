"""gunicorn's own logs (its error log and the access log) in our format, scrubbed.

deploy/gunicorn.conf.py sets `logger_class = gunicorn_logger(PICSTREAM_LOG_FORMAT)`.
gunicorn builds its handlers in `setup()`; each is then given core/logs.py's filters and
format: JSON lines like every other process's with `PICSTREAM_LOG_FORMAT=json`, and in text
mode error lines in the app's text format and access lines as gunicorn writes them, with
` request_id=<id>` after each while a request is being handled.

SECURITY: gunicorn writes the request's URI, query string included, when an exception
escapes the app ("Error handling request /…?sig=…"); the access format logs the path only
(deploy/gunicorn.conf.py) and the scrubbing filter catches what a traceback or message may
still hold.
"""

from __future__ import annotations

from typing import Any

from gunicorn import glogging  # type: ignore[import-untyped]

from core import logs

ACCESS_TEXT_FORMAT = "%(message)s%(request_suffix)s"


class ScrubbedLogger(glogging.Logger):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's logger whose handlers carry our filters and format."""

    log_format = "text"

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            logs.dress(handler, self.log_format)
        for handler in self.access_log.handlers:
            logs.dress(handler, self.log_format, ACCESS_TEXT_FORMAT)


def gunicorn_logger(log_format: str) -> type[ScrubbedLogger]:
    """The logger class for gunicorn's `logger_class` setting, writing `log_format`."""
    return type("ScrubbedLogger", (ScrubbedLogger,), {"log_format": log_format})
