"""The chunked body read with recv_into (api/gunicorn.py `ChunkedSocketBody`), against the
objects the installed gunicorn builds for a request on a real socket pair.

Framing arrives split at every position between what gunicorn read together with the
headers and what comes later from the socket, and dripped a byte at a time; the data must
come out byte for byte, broken framing must be refused, and gunicorn must find the body
consumed (keep-alive) only when it was read to its end.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser

from api import gunicorn
from core.errors import BadRequest, ClientDisconnected, ClientTimeout

HEAD = b"POST /v1/images HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"


def chunked(*pieces: bytes, trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n" + trailers + b"\r\n"


DATA = bytes(range(256)) + b"tail"
FRAMINGS = {
    "one-chunk": (chunked(DATA), DATA),
    "one-byte-chunks": (chunked(*(DATA[i : i + 1] for i in range(40))), DATA[:40]),
    "odd-sizes": (chunked(DATA[:1], DATA[1:8], DATA[8:255], DATA[255:]), DATA),
    "upper-hex-leading-zeros": (
        b"000000000000000000000A\r\n0123456789\r\n0\r\n\r\n",
        b"0123456789",
    ),
    "extensions": (
        b'3 ; name=value;flag;q="a \\" ; b"\r\nabc\r\n2;x=y\r\nde\r\n0;last\r\n\r\n',
        b"abcde",
    ),
    "trailers": (chunked(b"abc", trailers=b"Digest: sha-256=x\r\nX-Empty:\r\n"), b"abc"),
    "empty-body": (b"0\r\n\r\n", b""),
}


@pytest.fixture()
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def gunicorn_env(
    server: socket.socket, client: socket.socket, sent: bytes, cfg: Config | None = None
) -> tuple[RequestParser, dict[str, Any]]:
    """The parser and environ gunicorn itself builds for a chunked request sent as `sent`
    (whatever of the body came with it is in gunicorn's buffer)."""
    client.sendall(sent)
    cfg = cfg or Config()
    parser = RequestParser(cfg, server, ("127.0.0.1", 1))
    request = next(parser)
    _, env = wsgi.create(request, server, ("127.0.0.1", 1), ("127.0.0.1", 2), cfg)
    return parser, env


def attached(env: dict[str, Any]) -> gunicorn.ChunkedSocketBody:
    body = gunicorn.socket_body(env, None)
    assert isinstance(body, gunicorn.ChunkedSocketBody), "gunicorn's chunked reader moved"
    return body


def read_all(body: gunicorn.ChunkedSocketBody, size: int = 1000) -> bytes:
    received = bytearray()
    buffer = bytearray(size)
    with memoryview(buffer) as view:
        while n := body.readinto(view):
            received += view[:n]
    return bytes(received)


@pytest.mark.parametrize("name", sorted(FRAMINGS))
def test_every_split_between_gunicorns_buffer_and_the_socket(
    pair: tuple[socket.socket, socket.socket], name: str
) -> None:
    server, client = pair
    framed, data = FRAMINGS[name]
    for split in range(len(framed) + 1):
        parser, env = gunicorn_env(server, client, HEAD + framed[:split])
        body = attached(env)
        client.sendall(framed[split:] + NEXT)
        assert read_all(body, size=7) == data, f"split at {split}"
        assert not gunicorn.body_unread(env)
        assert env["wsgi.input"].read() == b""  # gunicorn sees the body consumed
        assert next(parser).path == "/next"  # and the pipelined request is intact


@pytest.mark.parametrize("name", sorted(FRAMINGS))
def test_framing_dripped_a_byte_at_a_time(
    pair: tuple[socket.socket, socket.socket], name: str
) -> None:
    server, client = pair
    framed, data = FRAMINGS[name]
    parser, env = gunicorn_env(server, client, HEAD)
    body = attached(env)

    def drip() -> None:
        for i in range(len(framed)):
            client.sendall(framed[i : i + 1])
        client.sendall(NEXT)

    sender = threading.Thread(target=drip)
    sender.start()
    try:
        assert read_all(body, size=3) == data
    finally:
        sender.join()
    assert next(parser).path == "/next"


def test_many_tiny_chunks_and_a_large_one(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    tiny = [bytes([i % 251]) for i in range(20_000)]
    large = bytes(range(256)) * 8192  # 2 MiB in one chunk: more than the socket buffers
    framed = chunked(*tiny, large, b"end")
    _, env = gunicorn_env(server, client, HEAD)
    body = attached(env)
    sender = threading.Thread(target=client.sendall, args=(framed,))
    sender.start()
    try:
        assert read_all(body, size=1024 * 1024) == b"".join(tiny) + large + b"end"
    finally:
        sender.join()
    assert not gunicorn.body_unread(env)


BROKEN = {
    "non-hex size": (b"zz\r\nab\r\n0\r\n\r\n", "not a hexadecimal number"),
    "negative size": (b"-2\r\nab\r\n0\r\n\r\n", "not a hexadecimal number"),
    "hex prefix": (b"0x2\r\nab\r\n0\r\n\r\n", "not a hexadecimal number"),
    "space inside size": (b"1 0\r\n", "not a hexadecimal number"),
    "empty size": (b"\r\nab\r\n", "not a hexadecimal number"),
    "size overflow": (b"1" + b"0" * 16 + b"\r\nab\r\n", "out of range"),
    "overlong size line": (b"2;" + b"a" * 9000 + b"\r\nab\r\n", "longer than 8190 bytes"),
    "unterminated size line": (b"2" + b"0" * 9000, "longer than 8190 bytes"),
    "bad extension": (b"2;=x\r\nab\r\n0\r\n\r\n", "extension is malformed"),
    "bare CR in extension": (b"2;a\rb\r\nab\r\n0\r\n\r\n", "extension is malformed"),
    "no CRLF after data": (b"2\r\nabc\r\n0\r\n\r\n", "not followed by CRLF"),
    "bare LF after data": (b"2\r\nab\n0\r\n\r\n", "not followed by CRLF"),
    "malformed trailer": (b"2\r\nab\r\n0\r\nno colon here\r\n\r\n", "trailer field"),
    "folded trailer": (b"0\r\nA: b\r\n c\r\n\r\n", "trailer field"),
    "oversized trailers": (
        b"2\r\nab\r\n0\r\n" + b"X-Pad: p\r\n" * 4000 + b"\r\n",
        "trailer section is longer than 32768 bytes",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_framing_is_a_bad_request(
    pair: tuple[socket.socket, socket.socket], name: str
) -> None:
    server, client = pair
    framed, detail = BROKEN[name]
    _, env = gunicorn_env(server, client, HEAD)
    body = attached(env)
    sender = threading.Thread(target=_send_quietly, args=(client, framed + NEXT))
    sender.start()
    try:
        with pytest.raises(BadRequest, match=detail):
            read_all(body)
        with pytest.raises(BadRequest):  # and it stays broken
            read_all(body)
    finally:
        client.shutdown(socket.SHUT_RDWR)
        sender.join()
    assert gunicorn.body_unread(env)  # the error answer closes the connection
    assert env["wsgi.input"].failed  # and gunicorn will not parse on from where we stopped


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the reader refused the body, the test shut the socket
        sock.sendall(data)


@pytest.mark.parametrize(
    "framed", [b"", b"5\r\nab", b"2\r\nab", b"2\r\nab\r\n", b"0\r\n", b"0\r\nX: y\r\n"]
)
def test_a_client_that_hangs_up_early_disconnected(
    pair: tuple[socket.socket, socket.socket], framed: bytes
) -> None:
    server, client = pair
    _, env = gunicorn_env(server, client, HEAD + framed)
    body = attached(env)
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(ClientDisconnected):
        read_all(body)
    assert gunicorn.body_unread(env)


def test_a_stalled_client_meets_the_read_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    _, env = gunicorn_env(server, client, HEAD + b"10\r\nabc")
    gunicorn.set_read_timeout(env, 0.2)
    body = attached(env)
    with pytest.raises(ClientTimeout):
        read_all(body)
    assert gunicorn.body_unread(env)


def test_gunicorns_limits_apply(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    cfg = Config()
    cfg.set("limit_request_field_size", 100)
    _, env = gunicorn_env(server, client, HEAD + b"2;" + b"a" * 120 + b"\r\nab\r\n", cfg)
    with pytest.raises(BadRequest, match="longer than 100 bytes"):
        read_all(attached(env))


def test_a_body_gunicorn_started_reading_is_left_to_it(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    _, env = gunicorn_env(server, client, HEAD + chunked(b"abc", b"def"))
    assert env["wsgi.input"].read(2) == b"ab"
    assert gunicorn.socket_body(env, None) is None
    assert env["wsgi.input"].read() == b"cdef"


def test_an_untouched_body_stays_gunicorns_to_drain(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # Attached but never read (refused before the body): gunicorn's own reader, intact,
    # drains it for keep-alive as it would have.
    server, client = pair
    parser, env = gunicorn_env(server, client, HEAD + chunked(b"abc") + NEXT)
    attached(env)
    assert next(parser).path == "/next"


def test_gunicorns_own_framing_errors_are_bad_requests_too(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # The portable path (a multipart body, or a gunicorn whose internals moved).
    server, client = pair
    _, env = gunicorn_env(server, client, HEAD + b"zz\r\n")
    with pytest.raises(Exception) as raised:
        env["wsgi.input"].read(10)
    assert isinstance(gunicorn.body_read_error(raised.value), BadRequest)
