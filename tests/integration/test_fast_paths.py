"""The fast paths through gunicorn's internals are taken by the real server.

Each one falls back quietly to the portable (slower) way when gunicorn's objects do not have
the shape it expects; api/gunicorn.py logs both outcomes, and these tests read the session
gunicorn's output, so a gunicorn upgrade that moves an internal fails here rather than only
showing in a benchmark. (tests/unit/test_adapters.py checks the shapes themselves.)
"""

from __future__ import annotations

import time

from api.gunicorn import FORCE_CLOSE_MISSED, RECV_INTO_MISSED, RECV_INTO_TAKEN
from tests.http import Api
from tests.images import png
from tests.integration.conftest import MiB
from tests.servers import Server


def logged(server: Server, line: str, timeout: float = 10) -> bool:
    """Whether `line` shows in the server's output within `timeout` s (it is written by
    another process: poll)."""
    deadline = time.monotonic() + timeout
    while line not in server.output():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_content_length_upload_is_read_with_recv_into(api: Api, gunicorn: Server) -> None:
    resp = api.upload(png())  # bytes: http.client sends Content-Length
    assert resp.status == 201, resp.body
    assert logged(gunicorn, RECV_INTO_TAKEN), gunicorn.output()[-3000:]
    assert RECV_INTO_MISSED not in gunicorn.output()


def test_a_body_refused_unread_closes_through_gunicorns_response(
    api: Api, gunicorn: Server
) -> None:
    # Refused on its headers (the test limit is 300 MiB), the body never sent.
    request = api.headers_for("POST", "/v1/images", f"Content-Length: {301 * MiB}\r\n")
    sock, answer = api.raw(request)
    try:
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert head.startswith(b"http/1.1 413"), answer[:500]
        assert b"\r\nconnection: close" in head
        assert sock.recv(1) == b""  # and gunicorn did close it, without draining
    finally:
        sock.close()
    assert FORCE_CLOSE_MISSED not in gunicorn.output()
