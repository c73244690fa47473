"""Chunked uploads read with recv_into through a real gunicorn (api/gunicorn.py
`ChunkedSocketBody`): exact framing sent on raw sockets, the bytes checked in the bucket.

The first test fails when gunicorn logs that it fell back to its own copying reader; the
refusals fail too, as their details (and the 32 KiB trailer cap) are only ours.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from collections.abc import Callable, Iterable, Iterator

import pytest
from blake3 import blake3

from api.gunicorn import CHUNKED_MISSED, CHUNKED_TAKEN
from core.storage import Store
from tests.http import Api, Response
from tests.images import Body, jpeg, png
from tests.integration.test_fast_paths import logged
from tests.integration.test_rejections import assert_nothing_left, assert_problem
from tests.keys import keys_of
from tests.servers import Server

MiB = 1024 * 1024
PART = 5 * MiB  # the test servers' part size


class Connection:
    """One raw HTTP/1.1 connection: exact bytes out, the answers read in order."""

    def __init__(self, api: Api, timeout: float = 60) -> None:
        self.api = api
        self.sock = socket.create_connection((api.host, api.port), timeout=timeout)
        self.answers = self.sock.makefile("rb")

    def head(self, method: str = "POST", path: str = "/v1/images", extra: str = "") -> bytes:
        return self.api.headers_for(
            method, path, "Content-Type: application/octet-stream\r\n" + extra
        )

    def upload_head(self) -> bytes:
        return self.head(extra="Transfer-Encoding: chunked\r\n")

    def answer(self) -> Response:
        status_line = self.answers.readline()
        assert status_line, "the server closed the connection without answering"
        headers: dict[str, str] = {}
        while (line := self.answers.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = self.answers.read(int(headers.get("content-length", "0")))
        return Response(int(status_line.split()[1]), headers, body)

    def closed_by_server(self) -> bool:
        return self.answers.read(1) == b""

    @contextlib.contextmanager
    def sending(self, pieces: Iterable[bytes]) -> Iterator[None]:
        """Send `pieces` on a thread while the caller reads the answer: the server may answer
        (and stop reading) before the last byte is sent."""

        def send() -> None:
            with contextlib.suppress(OSError):  # answered early, or shut by the test
                for piece in pieces:
                    self.sock.sendall(piece)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            sender.join()

    def close(self) -> None:
        self.answers.close()
        self.sock.close()


@pytest.fixture()
def conn(api: Api) -> Iterator[Connection]:
    connection = Connection(api)
    yield connection
    connection.close()


def framed(chunks: Iterable[bytes], ext: bytes = b"", trailers: bytes = b"") -> Iterator[bytes]:
    """Each chunk in its framing (with `ext` after each size), then the last chunk."""
    for data in chunks:
        yield b"%x%s\r\n" % (len(data), ext)
        yield data
        yield b"\r\n"
    yield b"0%s\r\n%s\r\n" % (ext, trailers)


def cut(data: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    """`data` in pieces of the given sizes, in turn, repeated."""
    sizes = list(sizes)
    at, i = 0, 0
    while at < len(data):
        yield data[at : at + sizes[i % len(sizes)]]
        at += sizes[i % len(sizes)]
        i += 1


def joined(pieces: Iterable[bytes], batch: int = MiB) -> Iterator[bytes]:
    """Tiny pieces sent in batches (a sendall per 1-byte chunk would time the test out)."""
    pending = bytearray()
    for piece in pieces:
        pending += piece
        if len(pending) >= batch:
            yield bytes(pending)
            pending.clear()
    yield bytes(pending)


def assert_stored(store: Store, resp: Response, data: bytes) -> None:
    assert resp.status == 201, resp.body
    assert (resp.json["size"], resp.json["blake3"]) == (len(data), blake3(data).hexdigest())
    assert store.read_bytes(keys_of(resp.json).original) == data
    assert store.incomplete_uploads() == []


def test_a_chunked_upload_is_read_with_recv_into(api: Api, gunicorn: Server) -> None:
    resp = api.upload(iter([png()]), chunked=True)
    assert resp.status == 201, resp.body
    assert logged(gunicorn, CHUNKED_TAKEN), gunicorn.output()[-3000:]
    assert CHUNKED_MISSED not in gunicorn.output()


BIG = Body(12 * MiB + 17)  # three parts of 5 MiB
SMALL = jpeg(640, 480, orientation=6, pad=20_000)


def upload_framings() -> dict[str, tuple[bytes, list[bytes]]]:
    big = BIG.read_all()
    return {
        "one-byte chunks": (SMALL, list(joined(framed(cut(SMALL, [1]))))),
        "odd sizes": (big, list(framed(cut(big, [1, 3, 4093, 65537, 1048573, 7])))),
        "extensions": (
            png(),
            list(framed(cut(png(), [5, 9]), ext=b' ; name=value;flag;q="a \\" b"')),
        ),
        "trailers": (SMALL, list(framed([SMALL], trailers=b"X-Checksum: abc\r\nX-Note: \r\n"))),
        "many tiny chunks": (big[: 2 * MiB], list(joined(framed(cut(big[: 2 * MiB], [3, 1]))))),
        "one huge chunk": (big, list(framed([big]))),
        "chunks crossing parts": (big, list(framed(cut(big, [PART - 1, PART + 1, 3])))),
    }


@pytest.fixture(scope="module")
def framings() -> dict[str, tuple[bytes, list[bytes]]]:
    return upload_framings()


@pytest.mark.parametrize(
    "name",
    [
        "one-byte chunks",
        "odd sizes",
        "extensions",
        "trailers",
        "many tiny chunks",
        "one huge chunk",
        "chunks crossing parts",
    ],
)
def test_uploads_are_stored_byte_for_byte(
    conn: Connection, store: Store, framings: dict[str, tuple[bytes, list[bytes]]], name: str
) -> None:
    data, pieces = framings[name]
    with conn.sending([conn.upload_head(), *pieces]):
        resp = conn.answer()
    assert_stored(store, resp, data)


def test_the_connection_is_kept_alive_after_a_chunked_upload(
    conn: Connection, store: Store
) -> None:
    image = png(4, 4)
    conn.sock.sendall(conn.upload_head() + b"".join(framed([image], trailers=b"X-A: b\r\n")))
    created = conn.answer()
    assert_stored(store, created, image)
    assert created.header("Connection") != "close"
    # The next request on the same connection, then two sent back to back (pipelined).
    path = f"/v1/images/{created.json['id']}"
    conn.sock.sendall(conn.head("GET", path))
    assert conn.answer().json == created.json
    second = png(5, 5)
    conn.sock.sendall(
        conn.upload_head() + b"".join(framed(cut(second, [2]))) + conn.head("GET", path)
    )
    uploaded = conn.answer()
    assert uploaded.status == 201, uploaded.body
    assert store.read_bytes(keys_of(uploaded.json).original) == second
    assert conn.answer().json == created.json


@functools.cache
def good_chunk() -> list[bytes]:
    """6 MiB of framed data without the last chunk: a first part is uploaded (a multipart
    upload begun) before the framing breaks."""
    return list(framed([Body(6 * MiB).read_all()]))[:-1]


MALFORMED = {
    "non-hex size": (b"zz\r\n", "not a hexadecimal number"),
    "negative size": (b"-10\r\n" + b"x" * 16 + b"\r\n", "not a hexadecimal number"),
    "size with a 0x prefix": (b"0x10\r\n", "not a hexadecimal number"),
    "size out of range": (b"1" + b"0" * 16 + b"\r\n", "out of range"),
    "overlong size line": (b"10;" + b"a" * 9000 + b"\r\n", "longer than"),
    "malformed extension": (b"10;=\r\n", "extension is malformed"),
    "no CRLF after data": (b"2\r\nabc\r\n0\r\n\r\n", "not followed by CRLF"),
    "malformed trailer": (b"0\r\nno colon\r\n\r\n", "trailer field is malformed"),
    "oversized trailers": (b"0\r\n" + b"X-Pad: p\r\n" * 4000 + b"\r\n", "trailer section"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_framing_is_a_400_that_leaves_nothing(
    conn: Connection, store: Store, name: str
) -> None:
    broken, detail = MALFORMED[name]
    with conn.sending([conn.upload_head(), *good_chunk(), broken]):
        resp = conn.answer()
        assert_problem(resp, 400, "bad-request")
        assert detail in resp.json["detail"]
        assert resp.header("Connection") == "close"
        assert conn.closed_by_server()
    assert_nothing_left(store)


@pytest.mark.parametrize("where", ["in a size line", "mid-chunk", "before the trailers end"])
def test_a_client_gone_mid_body_is_a_400_that_leaves_nothing(
    conn: Connection, store: Store, where: str
) -> None:
    tail = {
        "in a size line": b"10",
        "mid-chunk": b"100\r\nabc",
        "before the trailers end": b"0\r\nA: b\r\n",
    }
    conn.sock.sendall(conn.upload_head() + b"".join(good_chunk()) + tail[where])
    conn.sock.shutdown(socket.SHUT_WR)  # the client's end of the body: EOF
    assert_problem(conn.answer(), 400, "incomplete-body")
    assert_nothing_left(store)


def test_a_chunk_beyond_the_size_limit_is_a_413(
    start_api: Callable[[dict[str, str]], tuple[Server, Api]], env: dict[str, str], store: Store
) -> None:
    _, small = start_api({**env, "PICSTREAM_MAX_UPLOAD_BYTES": "12MiB"})
    conn = Connection(small)
    try:
        # One chunk that says it is a TiB long: counted against the limit as it arrives.
        pieces = [conn.upload_head(), b"10000000000\r\n", *cut(Body(13 * MiB).read_all(), [MiB])]
        with conn.sending(pieces):
            resp = conn.answer()
            assert_problem(resp, 413, "too-large")
            assert resp.header("Connection") == "close"
    finally:
        conn.close()
    assert_nothing_left(store)


def test_a_stalled_chunked_client_meets_the_read_deadline(conn: Connection, store: Store) -> None:
    # A whole part in, then half a chunk, then nothing: PICSTREAM_READ_TIMEOUT is 2 s here.
    conn.sock.sendall(conn.upload_head() + b"".join(good_chunk()) + b"1000\r\nab")
    resp = conn.answer()
    assert_problem(resp, 408, "body-timeout")
    assert_nothing_left(store)
