"""Live progress over Server-Sent Events, through a real gunicorn and a real worker."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from redis import Redis

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
    readers = watchers(api, path, 4)  # the test limit
    try:
        for reader in readers:
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


# ---------------------------------------------------------------- the end of a stream


def events_of(api: Api, image_id: str, last_event_id: str | None = None) -> list[Event]:
    """A whole stream that the server completes by itself (a short timeout: it must not
    wait for anything)."""
    reader = EventReader(api, f"/v1/images/{image_id}/events", last_event_id, timeout=10)
    try:
        assert reader.response.status == 200
        assert reader.response.getheader("Content-Type") == "text/event-stream"
        events = read_all(reader)
        assert reader.comments == 0  # complete at once: no keep-alive was ever needed
    finally:
        reader.close()
    return events


def finished(api: Api, run_jobs: Callable[[], None]) -> tuple[str, list[Event]]:
    """A converted image and every event of its stream (replayed from the start)."""
    image_id = api.upload(photo(320, 240)).json["id"]
    run_jobs()
    story = events_of(api, image_id, last_event_id="0-0")
    assert (story[-1].event, story[-1].data["status"]) == ("status", "ready")
    return image_id, story


def watchers(
    api: Api, path: str, count: int = 1, last_event_id: str | None = None
) -> list[EventReader]:
    """`count` live watchers of `path`, once slots that watchers of earlier tests left are
    free again (the server notices a vanished client at its next heartbeat)."""
    deadline = time.monotonic() + 15
    opened: list[EventReader] = []
    while len(opened) < count:
        reader = EventReader(api, path, last_event_id, timeout=10)
        if reader.response.status == 200:
            opened.append(reader)
            continue
        reader.close()
        assert reader.response.status == 503
        assert time.monotonic() < deadline, "event-stream slots were not freed"
        time.sleep(0.2)
    return opened


def ended(api: Api, path: str, last_event_id: str) -> None:
    resp = api.request("GET", path, headers={"Last-Event-ID": last_event_id}, timeout=10)
    assert resp.status == 204, (last_event_id, resp.status, resp.body[:200])
    assert resp.body == b""
    assert resp.header("Cache-Control") == "no-store"


def test_reconnects_after_the_final_event_get_204_and_hold_no_slot(
    api: Api, run_jobs: Callable[[], None]
) -> None:
    image_id, story = finished(api, run_jobs)
    path = f"/v1/images/{image_id}/events"
    final_id = story[-1].id
    assert final_id is not None
    ms = int(final_id.split("-")[0])

    # A client that comes late gets the final status; reconnecting with its id (what
    # EventSource does 2 s later) or with anything past it gets 204, which stops EventSource.
    late = events_of(api, image_id)
    assert [(e.id, e.event, e.data["status"]) for e in late] == [(final_id, "status", "ready")]
    for past in (final_id, f"{ms}-99", f"{ms + 1}", "18446744073709551615-18446744073709"):
        ended(api, path, past)

    # None of those took a slot: all 4 (the test limit) are there for a running conversion.
    running = api.upload(photo(64, 64)).json["id"]  # no worker: stays processing
    live = watchers(api, f"/v1/images/{running}/events", 4)
    try:
        full = api.request("GET", f"/v1/images/{running}/events", timeout=10)
        assert full.status == 503
        # With every slot busy, the finished image still answers at once.
        for _ in range(6):
            ended(api, path, final_id)
        assert [e.data["status"] for e in events_of(api, image_id)] == ["ready"]
        assert [e.id for e in events_of(api, image_id, story[0].id)] == [e.id for e in story[1:]]
    finally:
        for reader in live:
            reader.close()


def test_a_finished_image_whose_stream_expired_ends_at_once(
    api: Api, run_jobs: Callable[[], None], redis_client: Redis
) -> None:
    image_id, story = finished(api, run_jobs)
    keys = [k for k in redis_client.scan_iter(match="picstream:events:*") if image_id in str(k)]
    assert len(keys) == 1
    redis_client.delete(keys[0])  # what the day-long expiry does
    shown = api.request("GET", f"/v1/images/{image_id}").json

    end_ids = set()
    for last in (None, "0-0", story[0].id, story[-1].id):
        events = events_of(api, image_id, last)
        assert [(e.event, e.data["status"]) for e in events] == [("status", "ready")]
        assert events[0].data["record"] == shown
        end_ids.add(events[0].id)
    # One id for "the end", and reconnecting with it is answered 204.
    assert len(end_ids) == 1
    ended(api, f"/v1/images/{image_id}/events", end_ids.pop() or "")


def test_deleting_an_image_ends_its_watchers_and_their_reconnects(api: Api) -> None:
    image_id = api.upload(photo(64, 64)).json["id"]  # no worker: stays processing
    path = f"/v1/images/{image_id}/events"
    [reader] = watchers(api, path)
    try:
        first = reader.next()
        assert first is not None and first.data["status"] == "processing"
        assert api.request("DELETE", f"/v1/images/{image_id}").status == 204
        rest = read_all(reader)  # ends by itself
    finally:
        reader.close()
    assert [(e.event, e.data) for e in rest] == [("deleted", {"status": "deleted"})]
    assert rest[0].id
    ended(api, path, rest[0].id)  # EventSource's reconnect stops here
    assert api.request("GET", path).status == 404  # a new watcher learns it is gone


def test_unparsable_last_event_ids_are_400(api: Api, run_jobs: Callable[[], None]) -> None:
    image_id, _ = finished(api, run_jobs)
    running = api.upload(photo(64, 64)).json["id"]
    bad = (
        "abc",
        "1-2-3",
        "18446744073709551616-0",
        "1-18446744073709551616",
        "1" * 40,
        "-1",
        "1-",
        "0x10-0",
        "1 2",
        "1\u00b2-0",  # a digit to str.isdigit(), not to int()
    )
    for target in (image_id, running):
        for value in bad:
            resp = api.request(
                "GET", f"/v1/images/{target}/events", headers={"Last-Event-ID": value}, timeout=10
            )
            assert resp.status == 400, (value, resp.status)
            assert resp.header("Content-Type") == "application/problem+json"
            assert resp.json["type"] == "urn:picstream:problem:bad-request"
    # An id past the end of an unfinished image's stream: the current status, then it follows.
    [reader] = watchers(api, f"/v1/images/{running}/events", last_event_id=f"{2**64 - 1}-0")
    try:
        first = reader.next()
        assert first is not None and first.data["status"] == "processing"
    finally:
        reader.close()


def test_status_events_carry_the_links_of_the_record(
    api: Api, run_jobs: Callable[[], None]
) -> None:
    image_id = api.upload(photo(320, 240)).json["id"]
    [reader] = watchers(api, f"/v1/images/{image_id}/events")
    try:
        opening = reader.next()
        assert opening is not None
        assert opening.data["record"] == api.request("GET", f"/v1/images/{image_id}").json
        run_jobs()
        streamed = read_all(reader)
    finally:
        reader.close()
    shown = api.request("GET", f"/v1/images/{image_id}").json
    assert shown["variants"] and all(v["url"] for v in shown["variants"])
    assert streamed[-1].data["record"] == shown
    started = next(e for e in streamed if e.event == "status")
    assert started.data["status"] == "processing"
    assert (started.data["record"]["url"], started.data["record"]["original_url"]) == (
        shown["url"],
        shown["original_url"],
    )
    replayed = events_of(api, image_id, last_event_id="0-0")
    assert [e.data for e in replayed] == [e.data for e in streamed]
