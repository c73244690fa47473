"""Clients that stop reading, facing gunicorn with no proxy in front (README, "Without a
proxy").

300 sockets ask for a signed original (no key needed) with a tiny receive buffer and never
read; an event-stream watcher never reads. The process must keep answering everyone else,
refuse the excess at once with 503 problems, and PICSTREAM_SEND_TIMEOUT after the clients
stopped taking bytes have every thread and slot back.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pytest

from core.settings import ConfigError, Settings
from tests import servers
from tests.http import Api, EventReader, Response
from tests.images import Body, png
from tests.integration.conftest import make_env

MiB = 1024 * 1024
SEND_TIMEOUT = 2.0
MAX_DOWNLOADS = 4
HOSTILE = 300
QUICK = 2.0  # what "still answers" means here: a bound, not a benchmark
BUSY = "urn:picstream:problem:busy"
# Loose enough for two shared cores: the kernel drops a stalled connection once it has
# taken nothing for SEND_TIMEOUT; the slot is back at the relay's next step after that.
RECOVERY = SEND_TIMEOUT + 6.0

T = TypeVar("T")
StartApi = Callable[[dict[str, str]], tuple[servers.Server, Api]]


@pytest.fixture()
def small_server(
    redis_server: servers.Server, s3_server: servers.Server, start_api: StartApi
) -> tuple[servers.Server, Api]:
    """One process with small budgets and a short send deadline."""
    env = make_env(
        redis_server.extra["url"],
        s3_server.extra["endpoint"],
        PICSTREAM_WEB_THREADS="16",
        PICSTREAM_MAX_UPLOADS="2",
        PICSTREAM_MAX_EVENT_STREAMS="1",
        PICSTREAM_MAX_DOWNLOADS=str(MAX_DOWNLOADS),
        PICSTREAM_SEND_TIMEOUT=str(SEND_TIMEOUT),
        PICSTREAM_SSE_HEARTBEAT="1",
    )
    return start_api(env)


def unbufferable_size() -> int:
    """More than the kernel will buffer for one connection (its largest send buffer, twice
    over), so a download to a client that does not read cannot finish."""
    largest = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return max(8 * MiB, 2 * largest + MiB)


def not_reading(api: Api, request: bytes) -> socket.socket:
    """A client with the smallest receive buffer that sends `request` and reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # before connect: the window
    sock.settimeout(5)
    sock.connect((api.host, api.port))
    sock.sendall(request)
    return sock


def answer_of(sock: socket.socket, wait: float = 0.5) -> bytes:
    """What the server sent this client: until it closed, went quiet for `wait` s, or reset
    the connection (at most 64 KiB)."""
    sock.settimeout(wait)
    got = b""
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while len(got) < 64 * 1024 and (chunk := sock.recv(64 * 1024)):
            got += chunk
    return got


def timed(call: Callable[[], T]) -> tuple[T, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def established_from(server: servers.Server, ports: set[int]) -> int:
    """How many connections from these client ports the gunicorn worker still holds open."""
    (pid,) = servers.worker_pids(server)
    return servers.established(pid, ports)


def at_once(count: int, call: Callable[[], T]) -> list[T]:
    """`count` calls started together, each on its own thread."""
    results: list[T] = []
    threads = [threading.Thread(target=lambda: results.append(call())) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == count, "a call did not return"
    return results


def download(api: Api, path: str) -> Response:
    return api.request("GET", path, timeout=10)


def assert_busy(resp: Response) -> None:
    assert resp.status == 503
    assert resp.json["type"] == BUSY
    assert resp.header("Retry-After")


@contextlib.contextmanager
def opened(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def test_downloaders_that_never_read_cannot_take_the_process_down(
    small_server: tuple[servers.Server, Api],
) -> None:
    server, api = small_server
    body = Body(unbufferable_size())
    created = api.upload(iter(body), headers={"Content-Length": str(body.size)})
    assert created.status == 201
    image_id = created.json["id"]
    original = f"/v1/images/{image_id}/original"
    signed_url = api.request("GET", f"/v1/images/{image_id}?signed=600").json["original_signed_url"]
    signed = urlsplit(signed_url)
    request = f"GET {signed.path}?{signed.query} HTTP/1.1\r\nHost: x\r\n\r\n".encode()

    began = time.monotonic()
    with opened([]) as hostile:
        for _ in range(HOSTILE):
            hostile.append(not_reading(api, request))

        # While the downloaders hold every download slot, the process still answers: the
        # next download is refused at once, the rest is served.
        refused, seconds = timed(lambda: download(api, original))
        assert_busy(refused)
        assert seconds < QUICK
        health, seconds = timed(lambda: api.request("GET", "/healthz", timeout=10))
        assert health.status == 200 and seconds < QUICK
        uploaded, seconds = timed(lambda: api.upload(png(32, 32)))
        assert uploaded.status == 201 and seconds < QUICK

        # Within the send deadline (and a margin) the stalled downloads are cut: a download
        # succeeds again, every slot at once, and no hostile connection is left open.
        while (again := download(api, original)).status != 200:
            assert_busy(again)
            assert time.monotonic() - began < RECOVERY, "stalled downloads kept their slots"
            time.sleep(0.2)
        assert again.body == body.read_all()
        assert all(r.status == 200 for r in at_once(MAX_DOWNLOADS, lambda: download(api, original)))
        ports = {sock.getsockname()[1] for sock in hostile}
        while established_from(server, ports):
            assert time.monotonic() - began < RECOVERY, "stalled connections were not cut"
            time.sleep(0.2)

        # Every hostile client got an answer: a download that was then cut, or a 503 problem.
        answers = [answer_of(sock) for sock in hostile]
    served = [a for a in answers if a.startswith(b"HTTP/1.1 200 ")]
    busy = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
    assert len(served) + len(busy) == HOSTILE
    assert MAX_DOWNLOADS <= len(served) <= 3 * MAX_DOWNLOADS
    assert all(json.loads(a.partition(b"\r\n\r\n")[2])["type"] == BUSY for a in busy)


def test_an_event_watcher_that_never_reads_is_cut_and_frees_its_slot(
    small_server: tuple[servers.Server, Api],
) -> None:
    server, api = small_server
    image_id = api.upload(png(64, 64)).json["id"]  # no worker: it stays processing
    path = f"/v1/images/{image_id}/events"
    began = time.monotonic()
    with opened([not_reading(api, api.headers_for("GET", path))]) as (stalled,):
        assert stalled.recv(16).startswith(b"HTTP/1.1 200 ")  # admitted; read no further
        assert_busy(api.request("GET", path, timeout=10))  # the only event slot is taken

        while True:
            watcher = EventReader(api, path, timeout=10)
            if watcher.response.status == 200:
                break
            watcher.close()
            assert time.monotonic() - began < RECOVERY, "the stalled watcher kept its slot"
            time.sleep(0.2)
        try:
            first = watcher.next()
            assert first is not None and first.data["status"] == "processing"
        finally:
            watcher.close()
        assert established_from(server, {stalled.getsockname()[1]}) == 0


def test_the_budgets_leave_threads_for_everything_else() -> None:
    base = {"S3_ENDPOINT": "http://127.0.0.1:9", "S3_ACCESS_KEY": "k", "S3_SECRET_KEY": "s"}
    defaults = Settings.from_env(base)
    budgets = defaults.max_uploads + defaults.max_event_streams + defaults.max_downloads
    assert defaults.web_threads - budgets >= defaults.max_downloads  # as many left free
    # Threads sized for the other two budgets only: downloads get half of what they leave.
    sized = {"PICSTREAM_WEB_THREADS": "64", "PICSTREAM_MAX_UPLOADS": "16"}
    assert Settings.from_env({**base, **sized}).max_downloads == 4
    with pytest.raises(ConfigError, match="PICSTREAM_MAX_DOWNLOADS"):
        Settings.from_env({**base, **sized, "PICSTREAM_MAX_DOWNLOADS": "8"})
