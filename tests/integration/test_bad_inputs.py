"""Hostile and confused clients through a real gunicorn: every input is a clear 4xx problem (or
handled as RFC 9110 says), nothing is stored, and an error answered before the body was read
closes the connection."""

from __future__ import annotations

import gzip
import http.client
import io
import select
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from PIL import Image

from core.storage import Store
from tests.http import Api, Response, multipart
from tests.images import png
from tests.integration.conftest import MiB
from tests.servers import Server, free_port

HUGE = "9" * 4400  # more digits than int() converts (sys.get_int_max_str_digits: 4300)
PROBLEM = "application/problem+json"


def assert_problem(resp: Response, status: int, slug: str) -> None:
    assert resp.status == status, resp.body[:500]
    assert resp.header("Content-Type") == PROBLEM
    problem = resp.json
    assert problem["status"] == status
    assert problem["type"] == f"urn:picstream:problem:{slug}"
    assert "Traceback" not in resp.body.decode()


def assert_nothing_stored(api: Api, store: Store) -> None:
    assert store.keys("") == []
    assert store.incomplete_uploads() == []
    assert api.request("GET", "/v1/images").json["images"] == []


def raw_response(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(status_line.split(" ")[1]), headers, body)


def send(
    api: Api, method: str, path: str, headers: dict[str, str], pieces: Iterable[bytes]
) -> tuple[Response, BaseException | None]:
    """http.client as a plain client uses it, except that a failed send is not the end: the
    answer the server gave before closing is read after it. Returns it and the send error.

    http.client does not read while it sends, so a body larger than the socket buffers ends
    in BrokenPipeError whatever the server answers or says about the connection (measured:
    20 MiB always, 1 MiB never); the answer is still there to be read, as urllib3 does."""
    conn = http.client.HTTPConnection(api.host, api.port, timeout=30)
    try:
        conn.putrequest(method, path)
        for name, value in headers.items():
            conn.putheader(name, value)
        error: BaseException | None = None
        try:
            conn.endheaders()
            for piece in pieces:
                conn.send(piece)
        except (BrokenPipeError, ConnectionResetError) as exc:
            error = exc
        resp = conn.getresponse()
        got = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        return got, error
    finally:
        conn.close()


def junk(total: int, piece: int = MiB) -> Iterable[bytes]:
    block = b"\x00" * piece
    for _ in range(total // piece):
        yield block


# --- 1, 2: Range ---------------------------------------------------------------------------


@pytest.fixture()
def original(api: Api) -> tuple[str, bytes]:
    image = png(40, 30)
    assert api.upload(image, "ranged").status == 201
    return "/v1/images/ranged/original", image


@pytest.mark.parametrize(
    ("header", "status", "part"),
    [
        (f"bytes={HUGE}", 200, slice(None)),  # not a range (no dash): ignored
        (f"bytes=0-{HUGE}", 206, slice(None)),  # to the end
        (f"bytes=-{HUGE}", 206, slice(None)),  # a suffix longer than the body: all of it
        # last before first: invalid, ignored (both can't be huge: headers stop at 8190 bytes)
        (f"bytes={HUGE}-{'9' * 3000}", 200, slice(None)),
        ("BYTES=1-2", 206, slice(1, 3)),  # range units are case-insensitive
        ("Bytes=-3", 206, slice(-3, None)),
    ],
)
def test_range_headers_of_any_size_and_case(
    api: Api, original: tuple[str, bytes], header: str, status: int, part: slice
) -> None:
    path, image = original
    resp = api.request("GET", path, headers={"Range": header})
    assert resp.status == status, resp.body[:300]
    assert resp.body == image[part]
    if status == 206:
        start = part.start % len(image) if part.start is not None else 0
        expected = f"bytes {start}-{start + len(image[part]) - 1}/{len(image)}"
        assert resp.header("Content-Range") == expected


def test_a_first_byte_past_any_end_is_416(api: Api, original: tuple[str, bytes]) -> None:
    path, image = original
    resp = api.request("GET", path, headers={"Range": f"bytes={HUGE}-"})
    assert_problem(resp, 416, "requested-range-not-satisfiable")
    assert resp.header("Content-Range") == f"bytes */{len(image)}"


# --- 3: callback URLs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "callback",
    ["http://host:99999/", "http://host:abc/", "http://127.0.0.1:1:80/", "http://[::1/"],
)
def test_unreadable_callback_urls_are_400(api: Api, store: Store, callback: str) -> None:
    query = "?callback=" + callback.replace(":", "%3A").replace("/", "%2F")
    assert_problem(api.upload(png(), query=query), 400, "bad-request")
    assert_problem(api.upload(png(), "with-callback", query=query), 400, "bad-request")
    assert_nothing_stored(api, store)


def test_ipv6_callback_hosts_match_the_allow_list(
    start_api: Callable[[dict[str, str]], tuple[Server, Api]],
    env: dict[str, str],
    store: Store,
) -> None:
    port = free_port()
    _, hooked = start_api(
        {
            **env,
            "PICSTREAM_WEBHOOK_HOSTS": f"[::1]:{port}",
            "PICSTREAM_WEBHOOK_SECRET": "webhook-secret-for-tests-0123456789abcdef",
        }
    )
    listed = f"http://[::1]:{port}/hook"
    created = hooked.upload(png(), query=f"?callback={listed}")
    assert created.status == 201, created.body
    assert store.keys("") != []
    elsewhere = hooked.upload(png(), query=f"?callback=http://[::1]:{port + 1}/hook")
    assert_problem(elsewhere, 400, "bad-request")
    assert f"[::1]:{port + 1}" in elsewhere.json["detail"]


# --- 4: Accept on /best --------------------------------------------------------------------


@pytest.fixture()
def converted(api: Api, run_jobs: Callable[[], None]) -> dict[str, Any]:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (40, 120, 200)).save(out, "JPEG", quality=90)
    assert api.upload(out.getvalue(), "negotiated").status == 201
    run_jobs()
    record: dict[str, Any] = api.request("GET", "/v1/images/negotiated").json
    assert record["status"] == "ready", record
    assert {v["format"] for v in record["variants"]} >= {"avif", "webp", "jpeg"}
    return record


def test_a_zero_weight_refuses_a_format(api: Api, converted: dict[str, Any]) -> None:
    expected = {
        "image/avif,image/webp": "image/avif",
        "image/avif;q=0.0,image/webp": "image/webp",
        "image/avif;q=0.00,image/webp": "image/webp",
        "image/avif;q=0,image/webp": "image/webp",
        "image/avif;Q=0,image/webp": "image/webp",
        "image/avif ; q = 0.000 , image/webp": "image/webp",
        "image/avif;q=0.5,image/webp;q=0.9": "image/webp",
        "image/avif;q=0": "image/jpeg",
        "image/avif,image/webp,*/*;q=0.8": "image/avif",
        "image/webp,image/*;q=0": "image/webp",
    }
    for accept, content_type in expected.items():
        resp = api.request("GET", "/v1/images/negotiated/best", headers={"Accept": accept})
        assert resp.status == 200, (accept, resp.body[:300])
        assert resp.header("Content-Type") == content_type, accept
        assert resp.header("Vary") == "Accept"
    refused = api.request("GET", "/v1/images/negotiated/best", headers={"Accept": "image/*;q=0"})
    assert_problem(refused, 404, "not-found")


# --- 5: transfer codings -------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate, chunked", "identity, chunked"])
def test_transfer_codings_other_than_chunked_are_refused(
    api: Api, store: Store, coding: str
) -> None:
    data = gzip.compress(png())
    body = f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
    request = api.headers_for("POST", "/v1/images", f"Transfer-Encoding: {coding}\r\n")
    sock, raw = api.raw(request + body)
    sock.close()
    resp = raw_response(raw)
    assert_problem(resp, 400, "bad-request")
    assert "Transfer-Encoding" in resp.json["detail"]
    assert resp.header("Connection") == "close"
    assert_nothing_stored(api, store)


# --- 6: Repr-Digest ------------------------------------------------------------------------


def test_a_digest_member_named_twice_is_400(api: Api, store: Store) -> None:
    a = "X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE="
    b = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    for header in (f"sha-256=:{a}:, sha-256=:{b}:", f"sha-256=:{a}:,sha-256=:{a}:"):
        resp = api.upload(png(), headers={"Repr-Digest": header})
        assert_problem(resp, 400, "bad-request")
        assert "more than once" in resp.json["detail"]
    assert_nothing_stored(api, store)


# --- 7: a multipart envelope declared far above the limit ----------------------------------


@pytest.mark.parametrize("target", ["POST /v1/images", "PUT /v1/images/envelope"])
def test_a_huge_multipart_envelope_is_413_before_its_body(
    api: Api, store: Store, target: str
) -> None:
    method, path = target.split(" ")
    headers = (
        f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {2 * 1024 * MiB}\r\n"
    )
    # Nothing of the body is sent: a server waiting for the part headers would answer 408
    # after PICSTREAM_READ_TIMEOUT instead.
    sock, raw = api.raw(api.headers_for(method, path, headers))
    sock.close()
    resp = raw_response(raw)
    assert_problem(resp, 413, "too-large")
    assert resp.header("Connection") == "close"
    assert_nothing_stored(api, store)


def test_a_multipart_upload_still_has_its_part_name(api: Api) -> None:
    pieces, content_type = multipart(png(), filename="holiday.png")
    resp = api.upload(pieces, headers={"Content-Type": content_type}, query="?filename=x.png")
    assert resp.status == 201, resp.body
    assert resp.json["filename"] == "holiday.png"


# --- errors before the body was read close the connection ----------------------------------


def test_a_large_upload_without_a_key_sees_its_401(api: Api, store: Store) -> None:
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(20 * MiB)}
    resp, _ = send(api, "POST", "/v1/images", headers, junk(20 * MiB))
    assert_problem(resp, 401, "unauthorized")
    assert resp.header("Connection") == "close"
    assert_nothing_stored(api, store)


def test_a_declared_size_over_the_limit_sees_its_413(api: Api, store: Store) -> None:
    headers = {
        "Authorization": f"Bearer {api.key}",
        "Content-Type": "application/octet-stream",
        "Content-Length": str(301 * MiB),  # the test limit is 300 MiB
    }
    resp, _ = send(api, "POST", "/v1/images", headers, junk(20 * MiB))
    assert_problem(resp, 413, "too-large")
    assert resp.header("Connection") == "close"
    assert_nothing_stored(api, store)


def test_errors_after_the_whole_body_keep_the_connection(api: Api, store: Store) -> None:
    # A body read to its end leaves nothing to drain: no reason to close.
    other = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="  # the SHA-256 of b""
    resp = api.upload(png(), headers={"Repr-Digest": f"sha-256=:{other}:"})
    assert_problem(resp, 422, "digest-mismatch")
    assert resp.header("Connection") == "keep-alive"
    assert api.request("GET", "/v1/images/missing").header("Connection") == "keep-alive"
    assert_nothing_stored(api, store)


def test_busy_closes_the_connection(
    start_api: Callable[[dict[str, str]], tuple[Server, Api]],
    env: dict[str, str],
    store: Store,
) -> None:
    _, one = start_api({**env, "PICSTREAM_MAX_UPLOADS": "1", "PICSTREAM_READ_TIMEOUT": "60"})
    # An upload that sends its headers and then nothing holds the only slot.
    request = one.headers_for("POST", "/v1/images", f"Content-Length: {MiB}\r\n")
    held, _ = one.raw(request, wait=0.5)
    try:
        headers = {
            "Authorization": f"Bearer {one.key}",
            "Content-Type": "application/octet-stream",
            "Content-Length": str(20 * MiB),
        }
        for _ in range(100):  # until the held upload has its slot (a probe that got it: 415)
            resp, _ = send(one, "POST", "/v1/images", headers, junk(20 * MiB))
            if resp.status == 503:
                break
            assert_problem(resp, 415, "not-an-image")
            if select.select([held], [], [], 0)[0]:
                # On a loaded machine the held upload came after a probe had the slot and
                # was itself refused (503): hold it again.
                held.close()
                held, _ = one.raw(request, wait=0.5)
        assert_problem(resp, 503, "busy")
        assert resp.header("Retry-After")
        assert resp.header("Connection") == "close"
    finally:
        held.close()
    assert store.keys("") == []
