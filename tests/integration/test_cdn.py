"""Delivery through shared caches and to plain HTTP tools: `Cache-Control` of signed links
(PICSTREAM_SIGNED_CACHE), `If-Modified-Since` (`curl -z`, `wget -N`), and the signed `/best`
and `/events` links a browser uses where it cannot send the key (`<img>`, EventSource).
"""

from __future__ import annotations

import http.client
import time
import urllib.parse
from collections.abc import Callable, Iterator
from datetime import timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any

import falcon.testing
import pytest

from core.storage import Store
from tests import servers
from tests.http import Api, Event, EventReader, Response
from tests.images import png
from tests.integration.conftest import ALICE_KEY
from tests.links import converted, local

ClientWith = Callable[..., falcon.testing.TestClient]
AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
IMMUTABLE = "private, max-age=31536000, immutable"
REVALIDATE = "private, no-cache"


def expires_of(url: str) -> int:
    return int(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))["expires"])


def without(url: str, name: str) -> str:
    """`url` with query parameter `name` removed."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != name]
    return f"{parts.path}?{urllib.parse.urlencode(query)}"


def max_age(cache_control: str) -> int:
    for directive in cache_control.split(","):
        name, _, value = directive.strip().partition("=")
        if name == "max-age":
            return int(value)
    raise AssertionError(f"no max-age in {cache_control!r}")


# --- Cache-Control of signed links ---------------------------------------------------------


def test_pinned_signed_links_are_public_until_they_expire(
    client_with: ClientWith, run_jobs: Callable[[], None]
) -> None:
    public = client_with(PICSTREAM_SIGNED_CACHE="public")
    record = converted(public, run_jobs)
    variant = record["variants"][0]
    for url, etag in [
        (record["original_signed_url"], record["blake3"]),
        (variant["signed_url"], variant["blake3"]),
    ]:
        for method, headers in [("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=0-3"})]:
            before = int(time.time())
            resp = public.simulate_request(method, local(url), headers=headers)
            after = int(time.time())
            assert resp.status_code in (200, 206), (url, method, resp.text)
            control = resp.headers["Cache-Control"]
            assert control.startswith("public, max-age=") and control.endswith(", immutable")
            # Never cached past the link's end: after it, the origin refuses the link.
            assert expires_of(url) - after <= max_age(control) <= expires_of(url) - before
            assert 590 <= max_age(control) <= 600
        revalidated = public.simulate_get(local(url), headers={"If-None-Match": f'"{etag}"'})
        assert revalidated.status_code == 304
        assert revalidated.headers["Cache-Control"].startswith("public, max-age=")
        # Without the version the bytes behind the URL may change: revalidate, privately.
        assert public.simulate_get(without(url, "v")).headers["Cache-Control"] == REVALIDATE

    short = public.simulate_get(
        "/v1/images/holiday-1", headers=AS_ALICE, query_string="signed=5"
    ).json
    resp = public.simulate_get(local(short["original_signed_url"]))
    assert 0 <= max_age(resp.headers["Cache-Control"]) <= 5


def test_answers_to_the_key_are_never_public(
    client_with: ClientWith, run_jobs: Callable[[], None]
) -> None:
    public = client_with(PICSTREAM_SIGNED_CACHE="public")
    record = converted(public, run_jobs)
    for url in (record["original_url"], record["variants"][0]["url"]):
        resp = public.simulate_get(local(url), headers=AS_ALICE)
        assert resp.status_code == 200 and resp.headers["Cache-Control"] == IMMUTABLE
    plain = public.simulate_get("/v1/images/holiday-1/original", headers=AS_ALICE)
    assert plain.headers["Cache-Control"] == REVALIDATE


def test_signed_links_stay_private_by_default(
    client: falcon.testing.TestClient, run_jobs: Callable[[], None]
) -> None:
    record = converted(client, run_jobs)
    for url in (record["original_signed_url"], record["variants"][0]["signed_url"]):
        resp = client.simulate_get(local(url))
        assert resp.status_code == 200 and resp.headers["Cache-Control"] == IMMUTABLE


def test_best_is_never_immutable_and_varies_by_accept(
    client_with: ClientWith, run_jobs: Callable[[], None]
) -> None:
    public = client_with(PICSTREAM_SIGNED_CACHE="public")
    record = converted(public, run_jobs)
    signed = local(record["best_signed_url"])
    assert "v=" not in signed
    webp = public.simulate_get(f"{signed}&width=10", headers={"Accept": "image/webp"})
    assert webp.status_code == 200 and webp.headers["Content-Type"] == "image/webp"
    chosen = next(v for v in record["variants"] if f'"{v["blake3"]}"' == webp.headers["ETag"])
    assert webp.content == public.simulate_get(local(chosen["signed_url"])).content
    # The width is the client's to choose: it is not part of what is signed.
    wide = public.simulate_get(f"{signed}&width=5000", headers={"Accept": "image/webp"})
    assert wide.status_code == 200
    # Even a `?v=` naming the bytes it chose does not pin /best, signed or with the key.
    pinned = f"&width=10&v={chosen['blake3'][:16]}"
    for resp in (
        public.simulate_get(signed + pinned, headers={"Accept": "image/webp"}),
        public.simulate_get(
            "/v1/images/holiday-1/best?" + pinned[1:],
            headers={**AS_ALICE, "Accept": "image/webp"},
        ),
    ):
        assert resp.status_code == 200
        assert resp.headers["Cache-Control"] == REVALIDATE
        assert resp.headers["Vary"] == "Accept"


def test_record_links_sign_best_and_events_only_with_signed(
    client: falcon.testing.TestClient,
) -> None:
    assert client.simulate_put("/v1/images/x", body=png(), headers=AS_ALICE).status_code == 201
    plain = client.simulate_get("/v1/images/x", headers=AS_ALICE).json
    assert "best_signed_url" not in plain and "events_signed_url" not in plain
    signed = client.simulate_get("/v1/images/x", headers=AS_ALICE, query_string="signed=60").json
    for name, path in [("best_signed_url", "best"), ("events_signed_url", "events")]:
        parts = urllib.parse.urlsplit(signed[name])
        assert parts.path == f"/v1/images/x/{path}"
        assert set(urllib.parse.parse_qs(parts.query)) == {"owner", "expires", "sig"}
        # Each signature is for its own path.
        other = "events" if path == "best" else "best"
        assert client.simulate_get(f"/v1/images/x/{other}?{parts.query}").status_code == 403


# --- If-Modified-Since ---------------------------------------------------------------------


def test_if_modified_since_answers_304_for_a_current_copy(
    client: falcon.testing.TestClient, run_jobs: Callable[[], None]
) -> None:
    record = converted(client, run_jobs)
    etag = f'"{record["blake3"]}"'
    original = "/v1/images/holiday-1/original"
    full = client.simulate_get(original, headers=AS_ALICE)
    stamp = full.headers["Last-Modified"]
    modified = parsedate_to_datetime(stamp)

    def asking(since: str, method: str = "GET", path: str = original, **more: str) -> Any:
        headers = {**AS_ALICE, "If-Modified-Since": since, **more}
        return client.simulate_request(method, path, headers=headers)

    for since in (
        stamp,
        format_datetime(modified + timedelta(days=1), usegmt=True),
        modified.strftime("%A, %d-%b-%y %H:%M:%S GMT"),  # RFC 850
        modified.strftime("%a %b %d %H:%M:%S %Y").replace(" 0", "  "),  # asctime
    ):
        resp = asking(since)
        assert resp.status_code == 304, since
        assert resp.content == b""
        assert resp.headers["ETag"] == etag and resp.headers["Last-Modified"] == stamp
    assert asking(stamp, "HEAD").status_code == 304
    assert asking(stamp, Range="bytes=0-9").status_code == 304  # conditionals come first
    variant = f"/v1/images/holiday-1/variants/{record['variants'][0]['name']}"
    assert asking(stamp, path=variant).status_code == 304
    assert asking(stamp, path="/v1/images/holiday-1/best?width=10").status_code == 304

    for since in (
        format_datetime(modified - timedelta(seconds=1), usegmt=True),  # older copy
        "yesterday",
        "Sun, 31 Feb 2026 08:49:37 GMT",
        "",
    ):
        resp = asking(since)
        assert resp.status_code == 200, since
        assert resp.content == full.content

    # If-None-Match decides whenever it is there (RFC 9110 13.2.2).
    stale = asking(stamp, **{"If-None-Match": '"another"'})
    assert stale.status_code == 200 and stale.content == full.content
    assert asking("yesterday", **{"If-None-Match": etag}).status_code == 304


# --- through nginx -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def public_front(env: dict[str, str], workdir: Path, store: Store) -> Iterator[tuple[Api, Api]]:
    """nginx with downloads handed off, and a bare gunicorn, both with public signed links."""
    public = {**env, "PICSTREAM_SIGNED_CACHE": "public"}
    front = servers.start_front({**public, "PORT": str(servers.free_port())}, workdir / "cdn")
    direct = servers.start_gunicorn({**public, "PORT": str(servers.free_port())}, workdir / "cdn")
    try:
        yield Api("127.0.0.1", front.port, ALICE_KEY), Api("127.0.0.1", direct.port, ALICE_KEY)
    finally:
        front.stop()
        direct.stop()


HOP_BY_HOP = {"server", "date", "connection", "keep-alive", "transfer-encoding"}


def same_answer(through: Response, direct: Response) -> None:
    assert (through.status, through.body) == (direct.status, direct.body)
    mine = {k: v for k, v in through.headers.items() if k not in HOP_BY_HOP}
    theirs = {k: v for k, v in direct.headers.items() if k not in HOP_BY_HOP}
    # max-age counts down: the two answers may be a second apart.
    mine.pop("cache-control", None), theirs.pop("cache-control", None)
    assert mine == theirs


def test_handed_off_downloads_are_cacheable_and_conditional(
    public_front: tuple[Api, Api], run_jobs: Callable[[], None], store: Store
) -> None:
    front, direct = public_front
    data = png(40, 30)
    assert front.upload(data, "holiday-1").status == 201
    run_jobs()
    record = front.request("GET", "/v1/images/holiday-1?signed=600").json
    signed = local(record["original_signed_url"])
    got = front.request("GET", signed, key=None)
    assert got.status == 200 and got.body == data
    control = got.header("cache-control") or ""
    assert control.startswith("public, max-age=") and control.endswith(", immutable")
    assert 590 <= max_age(control) <= 600
    stamp = got.header("last-modified") or ""
    cases: list[tuple[str, dict[str, str], str | None]] = [
        (signed, {}, None),
        (signed, {"If-Modified-Since": stamp}, None),
        (local(record["original_url"]), {"If-Modified-Since": stamp}, ALICE_KEY),
        (
            "/v1/images/holiday-1/original",
            {"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"},
            ALICE_KEY,
        ),
        (local(record["variants"][0]["signed_url"]), {}, None),
        (local(record["best_signed_url"]) + "&width=10", {"Accept": "image/webp"}, None),
    ]
    for n, (path, headers, key) in enumerate(cases):
        # One request id for both: each answer carries the id it was given.
        headers = {**headers, "X-Request-Id": f"cdn-case-{n}"}
        same_answer(
            front.request("GET", path, headers=headers, key=key),
            direct.request("GET", path, headers=headers, key=key),
        )
    # `curl -z` / `wget -N` through the front: 304 decided by the app, nothing handed off.
    again = front.request("GET", signed, headers={"If-Modified-Since": stamp}, key=None)
    assert again.status == 304 and again.body == b""
    assert (again.header("cache-control") or "").startswith("public, max-age=")
    keyed = front.request("GET", local(record["original_url"]))
    assert keyed.header("cache-control") == IMMUTABLE


# --- signed /events: EventSource without a key ---------------------------------------------


class SignedEvents(EventReader):
    """An event stream read as a browser's EventSource reads it: no Authorization header,
    the same URL on every reconnect, `Last-Event-ID` after the first."""

    def __init__(self, api: Api, path: str, last_event_id: str | None = None) -> None:
        self.conn = http.client.HTTPConnection(api.host, api.port, timeout=30)
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        self.comments = 0

    def all(self) -> list[Event]:
        events = []
        while (event := self.next()) is not None:
            events.append(event)
        return events


def test_a_signed_events_link_streams_to_ready_and_survives_reconnects(
    api: Api, run_jobs: Callable[[], None]
) -> None:
    assert api.upload(png(40, 30), "holiday-1").status == 201
    record = api.request("GET", "/v1/images/holiday-1?signed=600").json
    events = local(record["events_signed_url"])
    stream = SignedEvents(api, events)
    try:
        assert stream.response.status == 200
        assert stream.response.getheader("Content-Type") == "text/event-stream"
        assert stream.response.getheader("Cache-Control") == "no-store"
        first = stream.next()
        assert first is not None and first.data["status"] == "processing"
        run_jobs()  # the stream is open: what the worker does arrives on it
        seen = [first, *stream.all()]
    finally:
        stream.close()
    last = seen[-1]
    assert (last.event, last.data["status"]) == ("status", "ready")
    # The links in the events need the key: a signed link never mints links.
    assert "original_signed_url" not in last.data["record"]

    # EventSource reconnects to the same URL with the last id it saw.
    assert first.id is not None and last.id is not None
    replay = SignedEvents(api, events, last_event_id=first.id)
    try:
        assert replay.response.status == 200
        assert [(e.id, e.event) for e in replay.all()] == [(e.id, e.event) for e in seen[1:]]
    finally:
        replay.close()
    done = SignedEvents(api, events, last_event_id=last.id)
    try:
        assert done.response.status == 204  # what stops EventSource
    finally:
        done.close()

    anonymous = Api(api.host, api.port, None)
    minted = anonymous.request("GET", f"{events}&signed=604800")
    assert minted.status == 403  # a link cannot sign itself a longer life
    other = anonymous.request("GET", events.replace("holiday-1", "holiday-2"))
    assert other.status == 403
