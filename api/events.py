"""Server-Sent Events for one image's conversion, fanned out from Redis streams.

Workers append every status change to `picstream:events:{owner}:{id}` (core/events.py). Each
web process runs one `EventHub` thread that XREADs every stream someone is watching, on one
Redis connection, and hands entries to the watchers' queues; a watcher's request thread only
waits on its queue. So N watchers cost N idle threads and no Redis connections of their own.

A stream starts with the current status (id = the stream position it reflects), then one
event per change, and ends after the final `ready`/`failed` status. `Last-Event-ID` resumes
after that entry. Comment lines are sent as heartbeats, which is also how a disconnected
client is noticed (on the next write) and its thread freed.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from redis import Redis

from core.events import events_key
from core.models import ImageRecord

log = logging.getLogger(__name__)

FINAL = ("ready", "failed")
_ID_ZERO = "0-0"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(eq=False)
class Watcher:
    key: str
    cursor: str  # the last entry id delivered (or reflected by the initial status)
    inbox: queue.SimpleQueue[tuple[str, dict[str, str]]] = field(default_factory=queue.SimpleQueue)


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

    @property
    def watching(self) -> int:
        with self._lock:
            return sum(len(group) for group in self._watchers.values())

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
                self._deliver(key, entries)

    def _deliver(self, key: str, entries: list[tuple[str, dict[str, str]]]) -> None:
        with self._lock:
            group = list(self._watchers.get(key, ()))
        for watcher in group:
            for entry_id, fields in entries:
                if _id_key(entry_id) > _id_key(watcher.cursor):
                    watcher.cursor = entry_id
                    watcher.inbox.put((entry_id, fields))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(found: Any) -> list[tuple[str, list[tuple[str, dict[str, str]]]]]:
    """XREAD's answer (RESP2 list or RESP3 dict, bytes) as plain strings."""
    items = found.items() if isinstance(found, dict) else (found or [])
    out = []
    for key, entries in items:
        if isinstance(entries, list) and entries and isinstance(entries[0], list):
            entries = entries[0]  # RESP3 wraps the entries once more
        decoded = [
            (_text(entry_id), {_text(k): _text(v) for k, v in (fields or {}).items()})
            for entry_id, fields in entries
        ]
        out.append((_text(key), decoded))
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
    """The events of one image for one client, as an iterator of SSE bytes."""

    hub: EventHub
    owner: str
    image_id: str
    heartbeat: float = 15.0

    def open(self, record: ImageRecord, last_event_id: str | None) -> Iterator[bytes]:
        key = events_key(self.owner, self.image_id)
        head = self._head(key)
        if last_event_id and self._valid_id(last_event_id):
            replay = self._since(key, last_event_id)
            return self._follow(key, last_event_id, replay, None)
        opening = frame("status", _status_data(record), head)
        if record.status in FINAL:
            return iter([opening])
        return self._follow(key, head, [], opening)

    def _follow(
        self,
        key: str,
        cursor: str,
        replay: list[tuple[str, dict[str, str]]],
        opening: bytes | None,
    ) -> Iterator[bytes]:
        watcher = self.hub.watch(key, replay[-1][0] if replay else cursor)
        try:
            yield b"retry: 2000\n\n"
            if opening:
                yield opening
            for entry_id, fields in replay:
                yield _entry_frame(entry_id, fields)
                if _is_final(fields):
                    return
            while True:
                try:
                    entry_id, fields = watcher.inbox.get(timeout=self.heartbeat)
                except queue.Empty:
                    yield b": keep-alive\n\n"
                    continue
                yield _entry_frame(entry_id, fields)
                if _is_final(fields):
                    return
        finally:
            self.hub.unwatch(watcher)

    def _head(self, key: str) -> str:
        last = self.hub.redis.xrevrange(key, count=1)
        return _text(last[0][0]) if last else _ID_ZERO

    def _since(self, key: str, after: str) -> list[tuple[str, dict[str, str]]]:
        entries = self.hub.redis.xrange(key, min=f"({after}", max="+") or []
        return [
            (_text(i), {_text(k): _text(v) for k, v in (fields or {}).items()})
            for i, fields in entries
        ]

    @staticmethod
    def _valid_id(value: str) -> bool:
        ms, _, seq = value.partition("-")
        return ms.isdigit() and (seq == "" or seq.isdigit()) and len(value) < 40


def _status_data(record: ImageRecord) -> dict[str, Any]:
    return {"status": record.status, "record": record.to_dict()}


def _entry_frame(entry_id: str, fields: dict[str, str]) -> bytes:
    kind = fields.get("type", "status")
    data: dict[str, Any] = {k: v for k, v in fields.items() if k not in ("type", "record")}
    if "record" in fields:
        data["record"] = json.loads(fields["record"])
    return frame(kind, data, entry_id)


def _is_final(fields: dict[str, str]) -> bool:
    kind = fields.get("type")
    return kind == "deleted" or (kind == "status" and fields.get("status") in FINAL)
