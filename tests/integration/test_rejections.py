"""Bad input: a clear problem+json error, decided as early as possible, nothing left behind."""

from __future__ import annotations

import socket
import struct
import time
import zlib

import pytest

from core.storage import Store
from tests.http import Api, Response
from tests.images import Body, chunk, png

MiB = 1024 * 1024


def assert_problem(resp: Response, status: int, slug: str) -> None:
    assert resp.status == status, resp.body
    assert resp.header("Content-Type") == "application/problem+json"
    problem = resp.json
    assert problem["status"] == status
    assert problem["type"] == f"urn:picstream:problem:{slug}"
    assert problem["title"] and problem["detail"]
    assert "Traceback" not in resp.body.decode()


def assert_nothing_left(store: Store) -> None:
    assert store.incomplete_uploads() == []
    assert store.keys("") == []


def parse(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


BAD_PNG_IHDR = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 9, 0, 0, 0))
ZERO_WIDTH_PNG = b"\x89PNG\r\n\x1a\n" + chunk(
    b"IHDR", struct.pack(">IIBBBBB", 0, 32, 8, 2, 0, 0, 0)
)
BOMB_PNG = Body(50 * MiB, width=50000, height=50000).head  # 2.5 GP: a decompression bomb


@pytest.mark.parametrize(
    ("head", "status", "slug"),
    [
        (b"this is a text file, not an image at all\n" * 20, 415, "not-an-image"),
        (
            b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
            415,
            "unsupported-format",
        ),
        (b"P6\n65 20\n255\n" + b"\x00" * 200, 415, "unsupported-format"),
        (BAD_PNG_IHDR, 422, "corrupt-image"),
        (ZERO_WIDTH_PNG, 422, "corrupt-image"),
        (BOMB_PNG, 422, "too-many-pixels"),
    ],
    ids=["text", "svg", "ppm", "bad-ihdr", "zero-width", "bomb"],
)
def test_rejected_from_the_head_before_the_rest_is_sent(
    api: Api, store: Store, head: bytes, status: int, slug: str
) -> None:
    # Declare 50 MiB, send only the head, and wait: the answer must come without the rest.
    request = api.headers_for("POST", "/v1/images", f"Content-Length: {50 * MiB}\r\n")
    sock, raw = api.raw(request + head + b"\x00" * 4096)
    sock.close()
    got, body = parse(raw)
    assert got == status, raw[:500]
    assert slug.encode() in body
    assert_nothing_left(store)


def test_rejections_through_a_normal_client_are_problem_json(api: Api, store: Store) -> None:
    assert_problem(api.upload(b"GIF87a"), 422, "corrupt-image")  # too short to hold a size
    assert_problem(api.upload(b"hello world, plain text"), 415, "not-an-image")
    assert_problem(api.upload(b""), 400, "empty-body")
    assert_problem(api.upload(b"", chunked=True), 400, "empty-body")
    assert_nothing_left(store)


def test_declared_size_above_the_limit_is_refused_before_reading(api: Api, store: Store) -> None:
    request = api.headers_for("POST", "/v1/images", f"Content-Length: {301 * MiB}\r\n")
    sock, raw = api.raw(request)
    sock.close()
    got, body = parse(raw)
    assert got == 413
    assert b"too-large" in body
    assert_nothing_left(store)


def test_counted_size_above_the_limit_aborts_the_multipart_upload(
    start_api, env: dict[str, str], store: Store
) -> None:
    _, small = start_api({**env, "PICSTREAM_MAX_UPLOAD_BYTES": "12MiB"})
    body = Body(40 * MiB)  # chunked: only counting can find out; two parts are sent first
    resp = small.upload(iter(body), chunked=True)
    assert_problem(resp, 413, "too-large")
    assert_nothing_left(store)


def test_a_client_disconnecting_mid_body_leaves_nothing(api: Api, store: Store) -> None:
    body = Body(30 * MiB)
    data = body.read_all()
    request = api.headers_for("POST", "/v1/images", f"Content-Length: {body.size}\r\n")
    sock = socket.create_connection((api.host, api.port))
    sock.sendall(request + data[: 17 * MiB])  # three parts in flight or sent, then nothing
    # The abort is only worth asserting once there is a multipart upload to abort.
    deadline = time.monotonic() + 20
    while not store.incomplete_uploads():
        assert time.monotonic() < deadline, "no multipart upload was started"
        time.sleep(0.05)
    sock.close()
    wait_until_clean(store)


def test_a_stalled_client_gets_408_and_its_upload_is_aborted(api: Api, store: Store) -> None:
    body = Body(30 * MiB)
    data = body.read_all()
    request = api.headers_for("POST", "/v1/images", f"Content-Length: {body.size}\r\n")
    started = time.monotonic()
    sock, raw = api.raw(request + data[: 12 * MiB], wait=30)  # then stall
    sock.close()
    got, problem = parse(raw)
    assert got == 408
    assert b"body-timeout" in problem
    assert time.monotonic() - started < 25  # PICSTREAM_READ_TIMEOUT is 2 s in tests
    wait_until_clean(store)


def test_a_broken_chunked_body_is_a_400(api: Api, store: Store) -> None:
    request = api.headers_for("POST", "/v1/images", "Transfer-Encoding: chunked\r\n")
    image = png()
    sock, raw = api.raw(request + f"{len(image):x}\r\n".encode() + image + b"\r\nZZZ\r\n")
    sock.close()
    got, _ = parse(raw)
    assert got == 400
    assert_nothing_left(store)


def wait_until_clean(store: Store, timeout: float = 30) -> None:
    """The server notices a vanished client on its next read: poll, don't sleep blindly."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not store.incomplete_uploads() and not store.keys(""):
            return
        time.sleep(0.2)
    assert_nothing_left(store)


def test_a_corrupt_idat_is_accepted(api: Api) -> None:
    # Damage beyond the header is the worker's to find; the upload itself is fine.
    image = png(4, 4)
    broken = image[:-20] + bytes([image[-20] ^ 0xFF]) + image[-19:]
    assert zlib.crc32(broken) != zlib.crc32(image)
    assert api.upload(broken).status == 201
