"""The private APIs our fast paths rely on, checked against the installed libraries.

Each fast path falls back quietly (and correctly, only slower) when a library's internals
move; these tests make such a move loud instead: upgrade gunicorn or minio, and the line
that names the moved attribute fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser
from minio import Minio
from minio.datatypes import ListMultipartUploadsResult, Part, Upload

from api import gunicorn

BODY = b"0123456789" * 100


@pytest.fixture()
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def gunicorn_request(server: socket.socket, client: socket.socket, head: bytes) -> Any:
    """The environ and Response gunicorn itself builds for a request sent on `client`."""
    client.sendall(head)
    cfg = Config()
    request = next(RequestParser(cfg, server, ("127.0.0.1", 1)))
    return wsgi.create(request, server, ("127.0.0.1", 1), ("127.0.0.1", 2), cfg)


def test_a_content_length_body_is_read_with_recv_into(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    head = f"POST /v1/images HTTP/1.1\r\nHost: h\r\nContent-Length: {len(BODY)}\r\n\r\n"
    # Part of the body arrives with the headers (gunicorn buffers it), the rest later.
    _, env = gunicorn_request(server, client, head.encode() + BODY[:100])
    body = gunicorn.socket_body(env, len(BODY))
    assert isinstance(body, gunicorn.SocketBody), "gunicorn's body reader changed shape"
    assert gunicorn.body_unread(env)
    client.sendall(BODY[100:] + b"GET /next HTTP/1.1\r\n")
    received = bytearray()
    view = memoryview(bytearray(300))
    while n := body.readinto(view):
        received += view[:n]
    assert bytes(received) == BODY
    assert not gunicorn.body_unread(env)  # the count went back to gunicorn's LengthReader
    assert env["wsgi.input"].read() == b""  # and gunicorn sees the body consumed


def test_a_chunked_body_reports_its_end(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    head = b"POST /v1/images HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    _, env = gunicorn_request(server, client, head + b"3\r\nabc\r\n0\r\n\r\n")
    assert type(env["wsgi.input"].reader).__name__ == "ChunkedReader"
    assert gunicorn.body_unread(env)
    assert env["wsgi.input"].read() == b"abc"
    assert not gunicorn.body_unread(env)


def test_force_close_reaches_gunicorns_response(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    response, env = gunicorn_request(server, client, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert not response.must_close
    assert gunicorn.force_close(env), "wsgi.early_hints no longer leads to the Response"
    assert response.must_close


def test_the_client_socket_is_gunicorns(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    _, env = gunicorn_request(server, client, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert gunicorn.client_socket(env) is server


# What core/storage.py passes to minio's low-level calls (put_object would buffer parts
# quadratically and abort only on Exception: see its docstring).
MINIO_CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "_put_object": (("bucket", "key", b"data", {"Content-Type": "x"}), {}),
    "_create_multipart_upload": (("bucket", "key", {"Content-Type": "x"}), {}),
    "_upload_part": (("bucket", "key", b"data", None, "upload-id", 1), {}),
    "_complete_multipart_upload": (("bucket", "key", "upload-id", [Part(1, "etag")]), {}),
    "_abort_multipart_upload": (("bucket", "key", "upload-id"), {}),
    # The bare CopyObject of Store.replace_metadata (its answer's `.data` is read).
    "_execute": (("PUT", "bucket", "key"), {"headers": {"x-amz-metadata-directive": "REPLACE"}}),
    "_list_multipart_uploads": (
        ("bucket",),
        {"prefix": "p/", "key_marker": None, "upload_id_marker": None},
    ),
}


@pytest.mark.parametrize("name", sorted(MINIO_CALLS))
def test_minio_low_level_calls_take_our_arguments(name: str) -> None:
    method = getattr(Minio, name, None)
    assert method is not None, f"minio has no {name} any more"
    args, kwargs = MINIO_CALLS[name]
    inspect.signature(method).bind(object(), *args, **kwargs)  # TypeError when it moved


def test_minio_upload_listing_has_the_fields_we_read() -> None:
    assert {"uploads", "is_truncated"} <= {
        f.name for f in dataclasses.fields(ListMultipartUploadsResult)
    }
    assert {"object_name", "upload_id", "initiated_time"} <= {
        f.name for f in dataclasses.fields(Upload)
    }
