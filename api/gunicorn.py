"""gunicorn as this app meets it: the client's socket, and what a client that stops reading costs.

What gunicorn 27's gthread worker does with a connection (gunicorn/workers/gthread.py,
gunicorn/http/wsgi.py, gunicorn/util.py), each reproduced against this app:

- It hands the app the client's socket as `environ["gunicorn.socket"]`, blocking and without
  a timeout, and writes every response item with `sock.sendall()` on the request's thread. A
  client that accepts no bytes holds that thread (and the slot of its download or event
  stream) for as long as it keeps the connection open: 16 such downloads pinned all 16
  threads and /healthz timed out.
- A connection it does not keep alive (the client asked to close, HTTP/1.0, its keep-alive
  pool is full) is closed "gracefully" on the worker's main thread: write side shut, then up
  to 2 s of waiting for the client to hang up, during which the process accepts and
  dispatches nothing. 40 clients that asked to close and never hung up kept /healthz
  unanswered for over 10 s.
- It reads request headers on the request threads, blocking and without a deadline, before
  the application is called. Nothing in the app can bound that (README, "Without a proxy").

`Deadlines` wraps the WSGI application and answers the first two:

- Each TCP client socket gets TCP_USER_TIMEOUT = PICSTREAM_SEND_TIMEOUT: the kernel drops a
  connection whose peer acknowledged none of our bytes for that long (it stopped reading, or
  vanished), and a thread blocked in `sendall()` or `splice()` on it wakes with an error, so
  gunicorn closes the response, its slot is freed and the thread moves on. One mechanism for
  gunicorn's own writes (records, problems, event streams, the copying relay), the splice
  relay (api/splice.py), and bytes still queued after a response ended; a client that keeps
  accepting bytes, however slowly, is never cut by it. A cut noticed before gunicorn's next
  write is logged as one line, not as gunicorn's traceback.
- A request without a body whose connection ends with its response — one whose client asked
  to close, or a 503 to a client facing us directly (a refused client is as likely to be part
  of a flood as not) — has the socket's read side shut once the response is out, so
  gunicorn's graceful close sees the end of the stream at once instead of waiting on its main
  thread.

Behind nginx on a unix socket none of this applies (nginx reads eagerly and has its own
timeouts); on a platform without TCP_USER_TIMEOUT the first part is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)


def client_socket(env: Mapping[str, Any]) -> socket.socket | None:
    """The client's socket, when the server is gunicorn and the connection carries this one
    request at a time (HTTP/1.x: an HTTP/2 connection's socket is shared by its streams, and
    bytes written to it bypass the framing)."""
    sock = env.get("gunicorn.socket")
    if not isinstance(sock, socket.socket) or env.get("SERVER_PROTOCOL") == "HTTP/2.0":
        return None
    return sock


class Deadlines:
    """WSGI middleware: the send deadline, and no graceful-close wait for connections that end
    with their response (see the module docstring)."""

    def __init__(self, app: WSGIApplication, send_timeout: float) -> None:
        self.app = app
        self.send_timeout = send_timeout
        if _TCP_USER_TIMEOUT is None:
            log.warning("no TCP_USER_TIMEOUT here: clients that stop reading are never cut")

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sock = client_socket(environ)
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return self.app(environ, start_response)
        self._set_deadline(sock)
        status = ""

        def seen(status_line: str, headers: Any, exc_info: Any = None) -> Any:
            nonlocal status
            status = status_line
            return start_response(status_line, headers, exc_info)

        body = self.app(environ, seen)
        if _is_file(environ, body):
            return body
        ends = _ends_with_response(environ, status)
        request = f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}"
        return SentBody(body, sock, ends, request, self.send_timeout)

    def _set_deadline(self, sock: socket.socket) -> None:
        if _TCP_USER_TIMEOUT is None:
            return
        # OSError: the client is gone already, and the response will fail on its own.
        with contextlib.suppress(OSError):
            ms = max(1, round(self.send_timeout * 1000))
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, ms)


def _ends_with_response(environ: WSGIEnvironment, status: str) -> bool:
    """A request without a body whose connection gunicorn closes after the response, or one
    not worth keeping: a 503 to a client facing us directly. (A proxy, which sets
    X-Forwarded-For, may reuse its connection at once: closed under it, its next request
    would fail with a 502.)"""
    if environ.get("CONTENT_LENGTH", "") not in ("", "0") or "HTTP_TRANSFER_ENCODING" in environ:
        return False  # unread body bytes would turn the close into a reset that eats the answer
    if status.startswith("503") and "HTTP_X_FORWARDED_FOR" not in environ:
        return True
    tokens = {t.strip().lower() for t in environ.get("HTTP_CONNECTION", "").split(",")}
    if "close" in tokens:
        return True
    return environ.get("SERVER_PROTOCOL") == "HTTP/1.0" and "keep-alive" not in tokens


def _is_file(environ: WSGIEnvironment, body: Iterable[bytes]) -> bool:
    # gunicorn sends a wsgi.file_wrapper with sendfile(); wrapping it would lose that.
    wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(wrapper, type) and isinstance(body, wrapper)


class SentBody:
    """A response body on its way to a TCP client.

    Before gunicorn writes each piece, a connection the kernel has dropped for the send
    deadline is reported once, as a cut, and raised as the EPIPE the write would meet:
    gunicorn takes that for a client that went away (otherwise it logs the ETIMEDOUT with a
    traceback). With `shut_read_side`, closing the body also shuts the socket's read side.
    """

    def __init__(
        self,
        body: Iterable[bytes],
        sock: socket.socket,
        shut_read_side: bool,
        request: str,
        send_timeout: float,
    ) -> None:
        self.body = body
        self.items: Iterator[bytes] = iter(body)
        self.sock = sock
        self.shut_read_side = shut_read_side
        self.request = request
        self.send_timeout = send_timeout

    def __iter__(self) -> SentBody:
        return self

    def __next__(self) -> bytes:
        item = next(self.items)
        error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error == errno.ETIMEDOUT:
            log.info("%s: cut, the client took no bytes for %g s", self.request, self.send_timeout)
            raise BrokenPipeError(errno.EPIPE, "the client was cut for not reading")
        if error:
            raise OSError(error, os.strerror(error))
        return item

    def close(self) -> None:
        try:
            closer: Any = getattr(self.body, "close", None)
            if closer is not None:
                closer()
        finally:
            if self.shut_read_side:
                with contextlib.suppress(OSError):  # already gone
                    self.sock.shutdown(socket.SHUT_RD)
