"""Webhooks: the final record POSTed to an allow-listed URL, signed, retried."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import pytest
from PIL import Image

from tests import servers
from tests.http import Api

SECRET = "webhook-secret-for-tests-0123456789abcdef"


class Receiver:
    """A loopback HTTP server that records POSTs and answers with queued statuses."""

    def __init__(self) -> None:
        self.port = servers.free_port()
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(receiver.answers.pop(0) if receiver.answers else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


@pytest.fixture()
def hooked(
    start_api: Callable[[dict[str, str]], tuple[servers.Server, Api]],
    env: dict[str, str],
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> Api:
    """An API (and, through os.environ, in-process jobs) with webhooks to the receiver."""
    extra = {
        "PICSTREAM_WEBHOOK_HOSTS": f"127.0.0.1:{receiver.port}",
        "PICSTREAM_WEBHOOK_SECRET": SECRET,
    }
    for name, value in extra.items():
        monkeypatch.setenv(name, value)
    _, api = start_api({**env, **extra})
    return api


def photo() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 10)).save(out, "JPEG")
    return out.getvalue()


def verify(headers: dict[str, str], body: bytes) -> bool:
    parts = dict(p.split("=", 1) for p in headers["x-picstream-signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
    fresh = abs(time.time() - int(parts["t"])) < 300
    return fresh and hmac.compare_digest(expected.hexdigest(), parts["v1"])


def test_final_record_is_posted_signed_after_retries(
    hooked: Api, receiver: Receiver, run_jobs: Callable[[], None]
) -> None:
    receiver.answers = [500, 503]  # the receiver is down twice, then takes it
    url = f"http://127.0.0.1:{receiver.port}/hooks/picstream"
    created = hooked.upload(photo(), query=f"?callback={quote(url, safe='')}")
    assert created.status == 201, created.body
    assert created.json["callback"] == url
    deadline = time.monotonic() + 30
    while len(receiver.received) < 3 and time.monotonic() < deadline:
        run_jobs()  # conversion, then the delivery and its retries as they fall due
        time.sleep(0.5)
    assert len(receiver.received) == 3
    headers, body = receiver.received[-1]
    assert verify(headers, body)
    assert headers["x-picstream-event"] == "image.ready"
    sent = json.loads(body)
    assert sent["type"] == "image.ready"
    assert sent["record"]["id"] == created.json["id"]
    assert sent["record"]["status"] == "ready"
    assert not verify({"x-picstream-signature": headers["x-picstream-signature"]}, body + b" ")


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata: not allow-listed
        "http://127.0.0.1:1/other-port",
        "file:///etc/passwd",
        "http://user:pass@127.0.0.1/",
        "not a url",
    ],
)
def test_callbacks_outside_the_allow_list_are_refused_before_upload(hooked: Api, url: str) -> None:
    resp = hooked.upload(photo(), query=f"?callback={quote(url, safe='')}")
    assert resp.status == 400
    assert resp.header("Content-Type") == "application/problem+json"
    assert hooked.request("GET", "/v1/images").json["images"] == []
