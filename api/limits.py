"""Per-process limits on long-lived requests, so one kind cannot starve the others.

gunicorn's gthread worker serves each request on one of a fixed number of threads, and an
upload, an event stream or a download holds its thread for its whole duration (a download
for as long as its client takes to read it). Uploads also hold up to two part buffers each.
So each kind gets its own budget of slots; a request beyond it gets a 503 with Retry-After at
once instead of queueing behind the others. A client that stops reading altogether is cut
after PICSTREAM_SEND_TIMEOUT (api/gunicorn.py), which frees its slot.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from core.errors import Busy
from core.metrics import SlotMetrics


class Slots:
    def __init__(self, limit: int, what: str, retry_after: int = 5) -> None:
        self.limit = limit
        self.what = what
        self.retry_after = retry_after
        self._free = threading.BoundedSemaphore(limit)
        self.metrics = SlotMetrics(what, limit)

    def admit(self) -> None:
        if not self._free.acquire(blocking=False):
            self.metrics.rejections.inc()
            raise Busy(f"too many {self.what} in progress; retry shortly", self.retry_after)
        self.metrics.in_use.inc()

    def release(self) -> None:
        self._free.release()
        self.metrics.in_use.dec()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold one slot for the duration of a `with` block (an upload)."""
        self.admit()
        try:
            yield
        finally:
            self.release()

    def counted(self, body: Iterator[bytes]) -> CountedBody:
        """A response body that gives its slot back when the server closes it."""
        return CountedBody(body, self)


class CountedBody:
    """A WSGI response iterable that holds one slot while its body is being sent: the slot is
    freed when the inner body ends or fails, or at `close()` (always called by the server,
    also when the client has gone or iteration never began), whichever comes first;
    `close()` also closes the inner body."""

    def __init__(self, body: Iterator[bytes], slots: Slots) -> None:
        self.body = body
        self.slots = slots
        self._closed = False
        self._held = True

    def __iter__(self) -> CountedBody:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self.body)
        except BaseException:
            # Freed now rather than at close(): the client may have the last byte (or have
            # hung up) and ask again before the server gets round to closing this response.
            self._release()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            closer: Any = getattr(self.body, "close", None)
            if closer is not None:
                closer()
        finally:
            self._release()

    def _release(self) -> None:
        if self._held:
            self._held = False
            self.slots.release()
