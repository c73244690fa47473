"""An image's Server-Sent Events (`GET /v1/images/{id}/events`) until its conversion ends.

The stream starts with the current status and ends right after the final event (status
`ready` or `failed`, or `deleted`). A stream cut before that is reopened with
`Last-Event-ID`, which replays what came after it; a `204` then means nothing more will
come, and the record says how it ended.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cli.client import (
    BACKOFF,
    MAX_RETRY_AFTER,
    Api,
    ApiError,
    Interrupted,
    NetworkError,
    transient,
)

FINAL_STATUSES = frozenset({"ready", "failed"})


@dataclass(frozen=True)
class Event:
    """One event: its `id:`, `event:` name and `data:` (lines joined with newlines)."""

    id: str | None
    name: str
    data: str

    def payload(self) -> dict[str, Any]:
        """`data` as a JSON object ({} when it is not one)."""
        try:
            value = json.loads(self.data)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def final(self) -> bool:
        if self.name == "deleted":
            return True
        return self.name == "status" and self.payload().get("status") in FINAL_STATUSES


@dataclass(frozen=True)
class Outcome:
    """How a conversion ended: `ready`, `failed` or `deleted`, why, and the last record."""

    status: str
    error: str | None
    record: dict[str, Any] | None


def parse(lines: Iterable[str]) -> Iterator[Event]:
    """Events from the stream's lines (the text/event-stream rules: `field: value` lines, a
    blank line ends an event, `:` lines are comments, `id` persists)."""
    name, last_id = "", None
    data: list[str] = []
    for line in lines:
        if not line:
            if data or name:
                yield Event(last_id, name or "message", "\n".join(data))
            name, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        elif field == "id" and "\0" not in value:
            last_id = value


def outcome_of(event: Event) -> Outcome:
    """The outcome a final event tells."""
    if event.name == "deleted":
        return Outcome("deleted", "the image was deleted", None)
    data = event.payload()
    record = data.get("record") if isinstance(data.get("record"), dict) else None
    error = data.get("error") or (record or {}).get("error")
    return Outcome(str(data.get("status")), error, record)


def follow(
    api: Api,
    image_id: str,
    on_event: Callable[[Event], None] | None = None,
    stop: threading.Event | None = None,
) -> Outcome:
    """Follow the image until its conversion ends, calling `on_event` for each event."""
    stop = stop or threading.Event()
    last_id: str | None = None
    failures = 0
    path = f"/v1/images/{image_id}/events"
    while not stop.is_set():
        headers = {"Accept": "text/event-stream"}
        if last_id:
            headers["Last-Event-ID"] = last_id
        try:
            with api.stream("GET", path, headers) as resp:
                if resp.status_code == 204:  # nothing more will come
                    return _from_record(api, image_id)
                for event in parse(resp.iter_lines()):
                    last_id = event.id or last_id
                    failures = 0
                    if on_event:
                        on_event(event)
                    if event.final:
                        return outcome_of(event)
            # Cut before the final event (a restart, a proxy): reopen where it stopped.
            failures = _pause(
                stop, failures, NetworkError(api.url, "the event stream ended early"), None
            )
        except ApiError as exc:
            if not transient(exc):
                raise
            failures = _pause(stop, failures, exc, exc.retry_after)
        except NetworkError as exc:
            failures = _pause(stop, failures, exc, None)
    raise Interrupted()


def _pause(stop: threading.Event, failures: int, exc: Exception, retry_after: float | None) -> int:
    failures += 1
    if failures > len(BACKOFF):
        raise exc
    stop.wait(min(retry_after, MAX_RETRY_AFTER) if retry_after else BACKOFF[failures - 1])
    return failures


def _from_record(api: Api, image_id: str) -> Outcome:
    try:
        record = api.json("GET", f"/v1/images/{image_id}")
    except ApiError as exc:
        if exc.status == 404:
            return Outcome("deleted", "the image was deleted", None)
        raise
    return Outcome(record["status"], record.get("error"), record)
