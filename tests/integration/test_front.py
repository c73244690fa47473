"""nginx in front of gunicorn, as `make run` and production run it (deploy/nginx.conf).

Uploads stream through in constant memory without temp files, event streams stay live,
nginx's own refusals are problem+json, `Expect: 100-continue` is answered only after the key
was checked, downloads are handed to nginx with the app's headers — and hostile clients
(headers trickling in, downloads never read) tie up nginx connections, not gunicorn threads:
gunicorn reads request headers on its request threads, and a download it relays holds its
thread for as long as the client does not read.
"""

from __future__ import annotations

import io
import json
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from redis import Redis

from core.events import events_key
from core.storage import Store
from tests import servers
from tests.http import Api, EventReader, Response
from tests.images import Body, png
from tests.integration.conftest import ALICE_KEY, MiB

ATTACKERS = 300
# Longer than any attack lasts: one byte a second, the header never ends.
SLOW_HEADER = b"GET /healthz HTTP/1.1\r\nHost: attacker\r\nX-Slow: " + b"a" * 120
SLOW_ORIGINAL = 16 * MiB  # far more than nginx's buffers and the sockets' together
WITHIN = 2.0  # seconds a bystander's request may take while under attack


@pytest.fixture()
def front(nginx: servers.Front) -> Api:
    return Api("127.0.0.1", nginx.port, ALICE_KEY)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def problem(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert headers["content-type"] == "application/problem+json", (status, headers, body)
    doc: dict[str, Any] = json.loads(body)
    assert doc["status"] == status
    assert doc["type"].startswith("urn:picstream:problem:")
    return doc


# --- uploads, events, errors ---------------------------------------------------------------


def test_a_large_upload_streams_through_in_constant_memory_without_temp_files(
    nginx: servers.Front, front: Api
) -> None:
    part = 16 * MiB  # the fixture's PICSTREAM_PART_SIZE
    assert front.upload(png(8, 8)).status == 201  # the worker has served a first upload
    (pid,) = servers.worker_pids(nginx.web)
    body = Body(512 * MiB)
    before = servers.rss_kib(pid)
    with servers.PeakRss(pid) as peak:
        resp = front.upload(iter(body), headers={"Content-Length": str(body.size)})
    assert resp.status == 201, resp.body
    assert resp.json["size"] == body.size and resp.json["blake3"] == body.blake3
    growth = (peak.peak - before) * 1024
    assert growth <= 3 * part, f"gunicorn worker grew {growth / MiB:.0f} MiB"
    assert nginx.temp_files() == []


def test_chunked_uploads_pass_through_chunked(nginx: servers.Front, front: Api) -> None:
    body = Body(24 * MiB)
    resp = front.upload(iter(body), chunked=True)
    assert resp.status == 201, resp.body
    assert resp.json["blake3"] == body.blake3
    assert nginx.temp_files() == []


def test_event_streams_deliver_live_events(front: Api, redis_client: Redis) -> None:
    record = front.upload(png(8, 8)).json  # no worker runs: it stays processing
    reader = EventReader(front, f"/v1/images/{record['id']}/events", timeout=10)
    try:
        assert reader.response.status == 200
        assert reader.response.getheader("Content-Type") == "text/event-stream"
        first = reader.next()
        assert first is not None and first.data["status"] == "processing"
        sent = time.monotonic()
        redis_client.xadd(
            events_key("alice", record["id"], record["gen"]),
            {"type": "variant", "name": "w256.webp", "status": "ready"},
        )
        live = reader.next()
        arrived = time.monotonic() - sent
    finally:
        reader.close()
    assert live is not None and live.event == "variant" and live.data["name"] == "w256.webp"
    assert arrived < 1.0, f"the event took {arrived:.2f} s through nginx"


@pytest.mark.parametrize(
    ("request_bytes", "status", "slug"),
    [
        # Declared above client_max_body_size (the upload limit + 2 MiB): refused before any
        # byte of the body is read, by nginx.
        (
            b"PUT /v1/images/big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + ALICE_KEY.encode()
            + b"\r\nContent-Length: 700000000\r\n\r\n",
            413,
            "too-large",
        ),
        (b"GET /healthz?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri-too-long"),
        (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "request-header-fields-too-large",
        ),
        (b"GARBAGE\r\n\r\n", 400, "bad-request"),
        (b"GET /_picstream/store HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not-found"),
    ],
)
def test_nginx_refusals_are_problems(
    front: Api, request_bytes: bytes, status: int, slug: str
) -> None:
    sock, raw = front.raw(request_bytes, wait=5)
    sock.close()
    got, headers, body = parse(raw)
    assert got == status, raw[:300]
    assert problem(status, headers, body)["type"] == f"urn:picstream:problem:{slug}"


def test_a_stalled_upload_gets_the_apps_408(front: Api) -> None:
    sock = socket.create_connection((front.host, front.port), timeout=10)
    try:
        sock.sendall(
            f"PUT /v1/images/stalled HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE_KEY}"
            f"\r\nContent-Length: {8 * MiB}\r\n\r\n".encode()
            + Body(6 * MiB).read_all()
        )
        answer = sock.recv(65536)  # the app's PICSTREAM_READ_TIMEOUT (2 s) passes first
    finally:
        sock.close()
    status, headers, body = parse(answer)
    assert status == 408, answer
    assert problem(408, headers, body)["type"] == "urn:picstream:problem:body-timeout"


def test_the_apps_own_problems_pass_unchanged(front: Api, api: Api) -> None:
    same_id = {"X-Request-Id": "own-problem-1"}
    through, direct = (a.request("GET", "/v1/images/nope", headers=same_id) for a in (front, api))
    assert through.status == direct.status == 404
    assert through.header("content-type") == "application/problem+json"
    assert through.json == direct.json


def test_expect_100_continue_comes_only_after_the_key_is_checked(front: Api) -> None:
    body = png(40, 30)

    def ask(key: str, image_id: str) -> tuple[socket.socket, bytes]:
        sock = socket.create_connection((front.host, front.port), timeout=5)
        sock.sendall(
            f"PUT /v1/images/{image_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        return sock, sock.recv(65536)

    sock, answer = ask("not-a-key-0123456789abcdef", "refused")
    sock.close()
    status, headers, doc = parse(answer)
    assert status == 401, answer  # no 100 first: the client never sends the body
    assert problem(401, headers, doc)["type"] == "urn:picstream:problem:unauthorized"
    assert headers["www-authenticate"].startswith("Bearer")

    sock, answer = ask(ALICE_KEY, "accepted")
    try:
        assert answer == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        final = b""
        while b"\r\n\r\n" not in final:
            final += sock.recv(65536)
    finally:
        sock.close()
    assert parse(final)[0] == 201


# --- downloads handed off ------------------------------------------------------------------

HOP_BY_HOP = {"server", "date", "connection", "keep-alive", "transfer-encoding"}


def same_answer(through: Response, direct: Response) -> None:
    """The answer through nginx (bytes from the store) is the app's own answer."""
    assert through.status == direct.status, (through.status, direct.status, through.body[:200])
    assert through.body == direct.body
    mine = {k: v for k, v in through.headers.items() if k not in HOP_BY_HOP}
    theirs = {k: v for k, v in direct.headers.items() if k not in HOP_BY_HOP}
    assert mine == theirs


def photo() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (320, 240), (30, 120, 200)).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_handed_off_downloads_answer_like_the_app(
    front: Api, api: Api, run_jobs: Callable[[], None]
) -> None:
    data = photo()
    created = front.upload(data, "holiday", query="?filename=%C3%9Cn%C3%AFcode%20x.jpg")
    assert created.status == 201, created.body
    run_jobs()
    record = front.request("GET", "/v1/images/holiday?signed=600").json
    assert record["status"] == "ready", record
    etag = f'"{record["blake3"]}"'
    original = "/v1/images/holiday/original"
    pinned = record["original_url"].split(str(front.port), 1)[1]
    signed = record["original_signed_url"].split(str(front.port), 1)[1]
    variant = record["variants"][0]["url"].split(str(front.port), 1)[1]
    cases: list[tuple[str, str, dict[str, str], str | None]] = [
        ("GET", original, {}, ALICE_KEY),
        ("GET", pinned, {}, ALICE_KEY),
        ("GET", signed, {}, None),
        ("GET", original, {"Range": "bytes=100-199"}, ALICE_KEY),
        ("GET", pinned, {"Range": "bytes=-10"}, ALICE_KEY),
        ("GET", original, {"Range": "bytes=0-5,9-12"}, ALICE_KEY),  # several: the whole body
        ("GET", original, {"Range": "bytes=5-9", "If-Range": '"stale"'}, ALICE_KEY),
        ("GET", original, {"If-None-Match": etag}, ALICE_KEY),
        ("GET", original, {"Range": f"bytes={len(data)}-"}, ALICE_KEY),
        ("HEAD", original, {}, ALICE_KEY),
        ("GET", variant, {}, ALICE_KEY),
        ("GET", "/v1/images/holiday/best?width=100", {"Accept": "image/webp"}, ALICE_KEY),
    ]
    for n, (method, path, case_headers, key) in enumerate(cases):
        headers = {**case_headers, "X-Request-Id": f"front-case-{n}"}  # the same id both ways
        through = front.request(method, path, headers=headers, key=key)
        direct = api.request(method, path, headers=headers, key=key)
        same_answer(through, direct)
    assert front.request("GET", original).body == data


def test_no_client_can_ask_a_bare_gunicorn_for_a_hand_off(api: Api) -> None:
    data = png(20, 20)
    image_id = api.upload(data).json["id"]
    resp = api.request(
        "GET", f"/v1/images/{image_id}/original", headers={"X-Picstream-Accel-Redirect": "1"}
    )
    assert resp.status == 200 and resp.body == data
    assert resp.header("x-accel-redirect") is None


def test_a_handed_off_download_of_a_missing_file_is_a_404_problem(front: Api, store: Store) -> None:
    record = front.upload(png(8, 8), "gone").json
    store.delete(f"alice/gone/{record['gen']}/original")
    resp = front.request("GET", record["original_url"].split(str(front.port), 1)[1])
    assert resp.status == 404
    assert resp.header("content-type") == "application/problem+json"
    assert resp.json["type"] == "urn:picstream:problem:not-found"
    assert resp.header("cache-control") == "no-store"  # never the object's "immutable"
    assert resp.header("content-disposition") is None


def test_a_handed_off_download_from_a_store_that_is_down_is_a_503_problem(
    front: Api, nginx: servers.Front, env: dict[str, str], workdir: Path
) -> None:
    path = front.upload(png(8, 8)).json["original_url"].split(str(front.port), 1)[1]
    down = {
        **env,
        "PORT": str(servers.free_port()),
        "S3_ENDPOINT": f"http://127.0.0.1:{servers.free_port()}",  # nothing listens there
    }
    other = servers.start_front(down, workdir / "front-store-down")
    try:
        broken = Api("127.0.0.1", other.port, ALICE_KEY)
        for method in ("GET", "HEAD"):
            resp = broken.request(method, path)
            assert resp.status == 503, (method, resp.body)
            assert resp.header("cache-control") in (None, "no-store")
            assert resp.header("etag") is None
        assert broken.request("GET", path).json["type"] == (
            "urn:picstream:problem:storage-unavailable"
        )
    finally:
        other.stop()


# --- hostile clients -----------------------------------------------------------------------


@contextmanager
def slow_headers(port: int, ticks: threading.Event) -> Iterator[list[socket.socket]]:
    """ATTACKERS connections, each sending one more byte of its header every second (for at
    most len(SLOW_HEADER) seconds); `ticks` is set once every socket has sent two bytes."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(ATTACKERS)]
    stop = threading.Event()

    def drip() -> None:
        for n in range(len(SLOW_HEADER)):
            for sock in socks:
                with suppress(OSError):
                    sock.send(SLOW_HEADER[n : n + 1])
            if n == 1:
                ticks.set()
            if stop.wait(1.0):
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        yield socks
    finally:
        stop.set()
        dripper.join()
        for sock in socks:
            sock.close()


@contextmanager
def slow_readers(port: int, path: str) -> Iterator[list[socket.socket]]:
    """ATTACKERS downloads of `path` with a tiny receive window that are never read."""
    socks: list[socket.socket] = []
    try:
        for _ in range(ATTACKERS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: attacker\r\n\r\n".encode())
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def answered(socks: list[socket.socket], timeout: float) -> int:
    """How many of `socks` have had an answer start arriving within `timeout` s (unread)."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    ready: set[Any] = set()
    deadline = time.monotonic() + timeout
    try:
        while len(ready) < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.2):
                ready.add(key.fileobj)
                selector.unregister(key.fileobj)
    finally:
        selector.close()
    return len(ready)


def bystander_is_served(api: Api, image_id: str) -> None:
    """/healthz, an authenticated upload and an authenticated download, each within 2 s."""
    calls: list[tuple[str, Callable[[], Response], int]] = [
        ("healthz", lambda: api.request("GET", "/healthz", timeout=5), 200),
        (
            "upload",
            lambda: api.request(
                "POST", "/v1/images", png(16, 16), {"Content-Type": "image/png"}, timeout=5
            ),
            201,
        ),
        ("download", lambda: api.request("GET", f"/v1/images/{image_id}/original", timeout=5), 200),
    ]
    for what, call, status in calls:
        started = time.monotonic()
        resp = call()
        took = time.monotonic() - started
        assert resp.status == status, (what, resp.status, resp.body[:300])
        assert took < WITHIN, f"{what} took {took:.2f} s under attack"


def signed_original(api: Api) -> tuple[str, str]:
    """A large original's signed link (path) and a small image's id."""
    body = Body(SLOW_ORIGINAL)
    big = api.upload(iter(body), headers={"Content-Length": str(body.size)}).json["id"]
    record = api.request("GET", f"/v1/images/{big}?signed=600").json
    small = api.upload(png(10, 10)).json["id"]
    return record["original_signed_url"].split(str(api.port), 1)[1], small


def test_slow_headers_do_not_reach_gunicorn(front: Api) -> None:
    small = front.upload(png(10, 10)).json["id"]
    ticks = threading.Event()
    with slow_headers(front.port, ticks):
        assert ticks.wait(10), "the attackers did not start"
        bystander_is_served(front, small)
    bystander_is_served(front, small)  # and after they left


def test_downloads_never_read_do_not_pin_gunicorn(front: Api) -> None:
    path, small = signed_original(front)
    with slow_readers(front.port, path) as socks:
        # Every download has begun (and stalled): the app has answered them all already.
        assert answered(socks, timeout=20) == ATTACKERS
        bystander_is_served(front, small)
    bystander_is_served(front, small)
