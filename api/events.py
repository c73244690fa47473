"""Server-Sent Events for one image's conversion (`GET /v1/images/{id}/events`), fanned out
from Redis streams.

Workers append every status change to the image's Redis stream; core/events.py describes
what an event holds and how it reads as an SSE message, this module how it is sent. Each web
process runs one `EventHub` thread that XREADs every stream someone is watching, on one
Redis connection, and hands entries to the watchers' queues; a watcher's request thread only
waits on its queue. So N watchers cost N idle threads and no Redis connections of their own.

What a client gets from `GET /v1/images/{id}/events`:

- `200 text/event-stream` starting with `retry: 2000`: a browser's EventSource reconnects
  2 s after the stream ends or breaks, sending the last `id:` it saw as `Last-Event-ID`.
  Then the current status (`event: status`), then one event per change, each with its stream
  entry id as `id:`. The response ends right after the final event: status `ready`/`failed`,
  or `deleted`. A `: keep-alive` comment goes out while nothing happens, which is also how a
  disconnected client is noticed (on the next write) and its thread freed; so is one that
  stopped reading, once it has taken none of our bytes for PICSTREAM_SEND_TIMEOUT (the
  kernel drops the connection: api/gunicorn.py).
- `Last-Event-ID` resumes: what came after that entry is replayed (up to a final event),
  then the stream follows. When nothing more will come - the id is at or past the end of a
  ready/failed image's stream, or the image no longer exists - the answer is `204 No
  Content`, the only answer that stops EventSource from reconnecting (every 2 s, forever).
- A finished image whose stream has expired (a day after its last event) has no entries
  to resume from: its status is sent with the id `END` (`18446744073709551615-0`, past any
  real entry), so the reconnect that follows gets 204. On an unfinished image, an id past
  the end of its stream (one it cannot have produced) is treated like no id: the current
  status again.
- Redis unreachable (an outage, the seconds of a Sentinel failover): a new stream gets `503
  queue-unavailable`; a reconnect (with `Last-Event-ID`) gets `200` with only `retry:` and
  the end of the stream, since any answer but 200 or 204 makes EventSource give up for
  good: the browser tries again 2 s later with the same id until Redis is back. A stream
  that is open rides the outage out: the hub reads again once Redis (the promoted master)
  answers, from each watcher's last id, and keep-alives go on meanwhile.
- A `Last-Event-ID` that is not a stream id (`ms` or `ms-seq`, each in 64-bit range, under
  40 characters in all) is a 400 problem.

Only a response that waits for the conversion holds a thread, and so one of the process's
event-stream slots; one that is complete at once (a final status, a replay that reaches the
final event, a 204) is sent as a plain body and takes no slot, so reconnecting browsers of
finished images cannot crowd out watchers of running conversions.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import falcon
import redis
from redis import Redis

from api.limits import Slots
from api.signed_links import SignedLinks
from api.views import record_json
from core.errors import BadRequest, NotFound, QueueUnavailable
from core.events import FINAL, STATUS, Event, events_key, status_event
from core.metrics import SSE_WATCHERS
from core.models import ImageRecord, validate_image_id
from core.records import Records

log = logging.getLogger(__name__)

_ID_ZERO = "0-0"
_U64 = 2**64 - 1
# The id of a finished image's status when its stream is gone: after every real entry id.
END = f"{_U64}-0"
_ID_RE = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
_RETRY = b"retry: 2000\n\n"
_KEEP_ALIVE = b": keep-alive\n\n"

View = Callable[[ImageRecord], dict[str, Any]]
Entry = tuple[str, dict[str, str]]


def parse_last_event_id(value: str | None) -> str | None:
    """`Last-Event-ID` as a full stream id (`ms-seq`), None when absent or empty; BadRequest
    when it is not an id this API can have sent."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    match = _ID_RE.fullmatch(value) if len(value) < 40 else None
    if match is None or any(int(part or 0) > _U64 for part in match.groups()):
        raise BadRequest("Last-Event-ID must be an event id of this stream, like 1732190400000-0")
    return f"{int(match[1])}-{int(match[2] or 0)}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class Watcher:
    key: str
    cursor: str  # the last entry id delivered (or reflected by the initial status)
    inbox: queue.SimpleQueue[Entry] = field(default_factory=queue.SimpleQueue)


class EventHub:
    """One reader thread per process for all watched event streams."""

    def __init__(self, client: Redis, block_ms: int = 250) -> None:
        self.redis = client
        self.block_ms = block_ms
        self._lock = threading.Lock()
        self._watchers: dict[str, set[Watcher]] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, key: str, cursor: str) -> Watcher:
        watcher = Watcher(key, cursor)
        with self._lock:
            self._watchers.setdefault(key, set()).add(watcher)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="event-hub", daemon=True)
                self._thread.start()
        self._wake.set()
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        with self._lock:
            group = self._watchers.get(watcher.key)
            if group is not None:
                group.discard(watcher)
                if not group:
                    del self._watchers[watcher.key]

    def _positions(self) -> dict[str, str]:
        with self._lock:
            return {
                key: min((w.cursor for w in group), key=_id_key)
                for key, group in self._watchers.items()
            }

    def _run(self) -> None:
        while True:
            streams = self._positions()
            if not streams:
                self._wake.wait(timeout=5)
                self._wake.clear()
                continue
            try:
                found = self.redis.xread(streams, block=self.block_ms, count=100)  # type: ignore[arg-type]
            except redis.RedisError as exc:
                log.warning("event hub: Redis read failed (%s); retrying", type(exc).__name__)
                time.sleep(1)
                continue
            for key, entries in _decoded(found):
                self._deliver(key, entries, streams.get(key, _ID_ZERO))

    def _deliver(self, key: str, entries: list[Entry], since: str) -> None:
        """Hand entries read after `since` to the watchers that had everything up to it.
        One that joined behind `since` during the read would miss the entries in between:
        it waits for the next read, which starts from its own cursor."""
        with self._lock:
            group = list(self._watchers.get(key, ()))
        for watcher in group:
            if _id_key(watcher.cursor) < _id_key(since):
                continue
            for entry_id, fields in entries:
                if _id_key(entry_id) > _id_key(watcher.cursor):
                    watcher.cursor = entry_id
                    watcher.inbox.put((entry_id, fields))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entries(raw: Any) -> list[Entry]:
    return [
        (_text(entry_id), {_text(k): _text(v) for k, v in (fields or {}).items()})
        for entry_id, fields in raw or []
    ]


def _decoded(found: Any) -> list[tuple[str, list[Entry]]]:
    """XREAD's answer (RESP2 list or RESP3 dict, bytes) as plain strings."""
    items = found.items() if isinstance(found, dict) else (found or [])
    out = []
    for key, entries in items:
        if isinstance(entries, list) and entries and isinstance(entries[0], list):
            entries = entries[0]  # RESP3 wraps the entries once more
        out.append((_text(key), _entries(entries)))
    return out


def frame(event: str, data: dict[str, Any] | str, entry_id: str | None = None) -> bytes:
    """One SSE message."""
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines = [f"id: {entry_id}"] if entry_id else []
    lines.append(f"event: {event}")
    lines.extend(f"data: {line}" for line in body.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


@dataclass
class EventStream:
    """The events of one image for one client. `key` is the image's event stream; `view`
    turns a record into what the client sees (the record with its links)."""

    hub: EventHub
    key: str
    view: View
    heartbeat: float = 15.0

    def open(
        self, load: Callable[[], ImageRecord], resume: str | None
    ) -> bytes | Iterator[bytes] | None:
        """The answer for a client that has seen up to `resume` (a parsed Last-Event-ID):
        None when nothing more will come (204), bytes for a stream that is complete now,
        an iterator for one that follows the conversion (it holds a thread).
        `load` reads the record; NotFound from it is the caller's."""
        try:
            head = self._head()
            # Read after the head, so the status is at least as new as the id sent with it.
            record = load()
            if resume is not None and head is not None and _id_key(resume) < _id_key(head):
                return self._replay(self._since(resume), record.status in FINAL)
        except redis.RedisError as exc:
            raise QueueUnavailable(f"event read failed: Redis {type(exc).__name__}") from exc
        final = record.status in FINAL
        position = head or (END if final else _ID_ZERO)
        if resume is not None and final and _id_key(resume) >= _id_key(position):
            return None
        if resume is not None and not final and resume == position:
            return self._follow(position, b"")  # the client is up to date
        return self._begin(record, position)

    def _begin(self, record: ImageRecord, position: str) -> bytes | Iterator[bytes]:
        """The current status, then (unless final) what follows it."""
        opening = frame(STATUS, status_event(record).data(self.view), position)
        if record.status in FINAL:
            return _RETRY + opening
        return self._follow(position, opening)

    def _replay(self, entries: list[Entry], final: bool) -> bytes | Iterator[bytes]:
        """Entries after the client's id: up to the first final one, then the end; if
        none is final, the stream follows on (unless the record is final all the same:
        the reconnect then gets 204 rather than a stream that would wait forever)."""
        frames = []
        for entry_id, fields in entries:
            event = Event.from_fields(fields)
            frames.append(self._frame(entry_id, event))
            if event.final:
                return _RETRY + b"".join(frames)
        if final:
            return _RETRY + b"".join(frames)
        return self._follow(entries[-1][0], b"".join(frames))

    def _follow(self, cursor: str, first: bytes) -> Iterator[bytes]:
        watcher = self.hub.watch(self.key, cursor)
        SSE_WATCHERS.inc()
        try:
            yield _RETRY + first
            while True:
                try:
                    entry_id, fields = watcher.inbox.get(timeout=self.heartbeat)
                except queue.Empty:
                    yield _KEEP_ALIVE
                    continue
                event = Event.from_fields(fields)
                yield self._frame(entry_id, event)
                if event.final:
                    return
        finally:
            self.hub.unwatch(watcher)
            SSE_WATCHERS.dec()

    def _head(self) -> str | None:
        last = self.hub.redis.xrevrange(self.key, count=1)
        return _text(last[0][0]) if last else None

    def _since(self, after: str) -> list[Entry]:
        return _entries(self.hub.redis.xrange(self.key, min=f"({after}", max="+"))

    def _frame(self, entry_id: str, event: Event) -> bytes:
        return frame(event.type, event.data(self.view), entry_id)


class Events:
    """/v1/images/{image_id}/events: the resource. The owner's record is looked up (another
    owner's id is a 404); links in it are signed with `?signed=SECONDS`. A response that
    follows the conversion holds one of `slots`."""

    def __init__(
        self,
        records: Records,
        hub: EventHub,
        slots: Slots,
        links: SignedLinks,
        *,
        heartbeat: float,
    ) -> None:
        self.records = records
        self.hub = hub
        self.slots = slots
        self.links = links
        self.heartbeat = heartbeat

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        resume = parse_last_event_id(req.get_header("Last-Event-ID"))
        sign = self.links.signer(req)

        def load() -> ImageRecord:
            return self.records.get(req.context.owner, validate_image_id(image_id))

        try:
            record = load()
            key = events_key(record.owner, record.id, record.gen)
            stream = EventStream(self.hub, key, lambda r: record_json(req, r, sign), self.heartbeat)
            body = stream.open(load, resume)
        except NotFound:
            if resume is None:
                raise
            body = None  # a reconnect after `deleted`: nothing more will come
        except QueueUnavailable as exc:
            if resume is None:
                raise
            log.warning("event stream reconnect during a Redis outage: %s", exc.detail)
            body = _RETRY  # ends at once: EventSource reconnects with the same id
        resp.set_header("Cache-Control", "no-store")
        if body is None:
            resp.status = falcon.HTTP_204  # what stops a browser's EventSource
            return
        resp.content_type = "text/event-stream"
        resp.set_header("X-Accel-Buffering", "no")  # tell nginx not to buffer the stream
        if isinstance(body, bytes):
            resp.data = body  # complete already: no thread held, no slot taken
            return
        self.slots.admit()
        resp.stream = self.slots.counted(body)
