"""Live progress over Server-Sent Events, through a real gunicorn and a real worker."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests import servers
from tests.http import Api, Event, EventReader


def photo(width: int = 900, height: int = 600) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 60, 40)).save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture()
def start_worker(env: dict[str, str], workdir: Path) -> Iterator[Callable[[], servers.Server]]:
    started: list[servers.Server] = []

    def start() -> servers.Server:
        server = servers.start_worker(env, workdir / "workers", "events-worker")
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def read_all(reader: EventReader) -> list[Event]:
    events = []
    while (event := reader.next()) is not None:
        events.append(event)
    return events


def test_events_follow_a_conversion_to_the_end(
    api: Api, start_worker: Callable[[], servers.Server]
) -> None:
    image_id = api.upload(photo()).json["id"]
    path = f"/v1/images/{image_id}/events"
    reader = EventReader(api, path)
    try:
        assert reader.response.status == 200
        assert reader.response.getheader("Content-Type") == "text/event-stream"
        assert reader.response.getheader("Cache-Control") == "no-store"
        first = reader.next()
        assert first is not None and first.event == "status"
        assert first.data["status"] == "processing"  # the current state, at once
        start_worker()  # only now does conversion begin
        rest = read_all(reader)  # ends by itself after the final event
    finally:
        reader.close()

    statuses = [e for e in rest if e.event == "status"]
    variants = [e for e in rest if e.event == "variant"]
    final = rest[-1]
    assert final.event == "status" and final.data["status"] == "ready"
    assert final.data["record"]["status"] == "ready"
    names = {v["name"] for v in final.data["record"]["variants"]}
    assert {v.data["name"] for v in variants if v.data["status"] == "ready"} == names
    assert statuses[-1] is final
    ids = [e.id for e in rest]
    assert all(ids) and len(set(ids)) == len(ids)
    assert ids == sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-")))

    # Reconnecting with Last-Event-ID replays exactly what came after that event.
    resumed = EventReader(api, path, last_event_id=rest[1].id)
    try:
        replay = read_all(resumed)
    finally:
        resumed.close()
    assert [e.id for e in replay] == ids[2:]

    # A client that connects after the end gets the final state and the stream ends.
    late = EventReader(api, path)
    try:
        only = read_all(late)
    finally:
        late.close()
    assert [e.data["status"] for e in only] == ["ready"]


def test_heartbeats_and_disconnected_watchers_free_their_slots(api: Api) -> None:
    image_id = api.upload(photo(64, 64)).json["id"]  # no worker: stays processing
    path = f"/v1/images/{image_id}/events"
    readers = [EventReader(api, path, timeout=10) for _ in range(4)]  # the test limit
    try:
        for reader in readers:
            assert reader.response.status == 200
            assert reader.next() is not None
        refused = api.request("GET", path)
        assert refused.status == 503
        assert refused.header("Retry-After")
        assert refused.json["type"] == "urn:picstream:problem:busy"
        # Heartbeats arrive while nothing happens (1 s apart in the tests).
        line = readers[0].response.readline()
        while not line.startswith(b":"):
            line = readers[0].response.readline()
        assert line == b": keep-alive\n"
        for reader in readers[:2]:
            reader.close()
        # The server notices on its next heartbeat write and frees those threads.
        deadline = time.monotonic() + 15
        while True:
            again = EventReader(api, path, timeout=10)
            if again.response.status == 200:
                readers.append(again)
                break
            again.close()
            assert time.monotonic() < deadline, "slots of closed watchers were not freed"
            time.sleep(0.3)
    finally:
        for reader in readers:
            reader.close()


def test_events_of_unknown_or_foreign_images_are_404(api: Api) -> None:
    resp = api.request("GET", "/v1/images/nope/events")
    assert resp.status == 404
    assert resp.header("Content-Type") == "application/problem+json"
