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

This module is also the one adapter to gunicorn's private objects; nothing else in the app
touches them:

- `socket_body()`: a request body read with recv_into straight from the client's socket:
  with Content-Length `SocketBody`, through gunicorn's Body -> LengthReader ->
  SocketUnreader; chunked `ChunkedSocketBody`, through Body -> ChunkedReader (its parser,
  a generator not yet started, and the unreader it was given) -> SocketUnreader, the chunk
  framing parsed in place.
- `body_unread()`: whether gunicorn's LengthReader/ChunkedReader has reached the body's end.
- `force_close()`: gunicorn's Response, reached through the `wsgi.early_hints` closure.

Each checks the exact shape it relies on and falls back to the portable way when it does not
find it; under gunicorn such a fallback is logged as a warning once per process, and the
fast path once when first taken. tests/unit/test_adapters.py checks the shapes against the
installed gunicorn, and tests/integration/test_fast_paths.py that a real gunicorn takes them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import io
import logging
import os
import re
import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from core.errors import BadRequest, ClientDisconnected, ClientTimeout

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


# Log lines the fast-path tests look for in a real gunicorn's output: keep them in step.
RECV_INTO_TAKEN = "request bodies with Content-Length are read with recv_into"
RECV_INTO_MISSED = "gunicorn's body reader has an unexpected shape"
CHUNKED_TAKEN = "chunked request bodies are read with recv_into, their framing parsed in place"
CHUNKED_MISSED = "gunicorn's chunked body reader has an unexpected shape"
FORCE_CLOSE_MISSED = "gunicorn's Response is not reachable through wsgi.early_hints"


def set_read_timeout(env: Mapping[str, Any], seconds: float) -> None:
    """Give the client's socket a read timeout for the body.

    gunicorn sets none: a client that stalls would hold this thread forever. With one set,
    the stalled read raises TimeoutError (-> 408)."""
    sock = env.get("gunicorn.socket")
    if isinstance(sock, socket.socket):
        sock.settimeout(seconds)


def body_read_error(exc: BaseException) -> Exception:
    """What a failed body read means to the client."""
    if isinstance(exc, TimeoutError):
        return ClientTimeout("the client sent no data for too long; upload cancelled")
    # gunicorn raises NoMoreData (an OSError) when the client goes away, and one of its parse
    # errors (gunicorn.http.errors, not OSErrors) for a broken chunked body: answered as
    # ChunkedSocketBody answers broken framing.
    if type(exc).__module__.startswith("gunicorn.http") and not isinstance(exc, OSError):
        return BadRequest(f"malformed chunked body ({type(exc).__name__})")
    return ClientDisconnected(f"the request body could not be read ({type(exc).__name__})")


def socket_body(
    env: Mapping[str, Any], length: int | None
) -> SocketBody | ChunkedSocketBody | None:
    """The fast reader of the request body (`length`: its Content-Length, None when it has
    none), or None: the caller then reads `wsgi.input` the portable way."""
    if length is not None:
        body: SocketBody | ChunkedSocketBody | None = SocketBody.attach(env, length)
        taken, missed = RECV_INTO_TAKEN, RECV_INTO_MISSED
    elif "HTTP_TRANSFER_ENCODING" in env:
        body = ChunkedSocketBody.attach(env)
        taken, missed = CHUNKED_TAKEN, CHUNKED_MISSED
    else:
        return None  # no body declared: nothing to read fast
    if body is not None:
        _log_once(logging.INFO, taken)
    elif "gunicorn.socket" in env:
        _log_once(logging.WARNING, f"{missed}: uploads are copied through it")
    return body


@functools.cache
def _log_once(level: int, message: str) -> None:
    log.log(level, message)


class SocketBody:
    """A Content-Length body read with recv_into from gunicorn's socket.

    gunicorn's own body reader copies every byte about six times through BytesIO buffers,
    which cost more CPU than hashing and uploading together (bench/upload.py). Bytes gunicorn
    already buffered (read together with the headers) are served first; the count is written
    back to gunicorn's LengthReader so keep-alive finds the body consumed. Only attached when
    gunicorn's objects have exactly the expected shape.
    """

    def __init__(self, reader: Any, unreader: Any, sock: socket.socket, length: int) -> None:
        self.reader = reader
        self.unreader = unreader
        self.sock = sock
        self.left = length

    @classmethod
    def attach(cls, env: Mapping[str, Any], length: int) -> SocketBody | None:
        body = env.get("wsgi.input")
        reader = getattr(body, "reader", None)
        unreader = getattr(reader, "unreader", None)
        sock = getattr(unreader, "sock", None)
        shaped = (
            type(reader).__name__ == "LengthReader"
            and getattr(reader, "length", None) == length
            and isinstance(getattr(body, "buf", None), io.BytesIO)
            and body.buf.getbuffer().nbytes == 0  # type: ignore[union-attr]
            and isinstance(getattr(unreader, "buf", None), io.BytesIO)
            and isinstance(sock, socket.socket)
        )
        return cls(reader, unreader, sock, length) if shaped else None  # type: ignore[arg-type]

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), self.left)
        if n == 0:
            return 0
        try:
            got = self._buffered_into(view, n) or self.sock.recv_into(view, n)
        except Exception as exc:
            raise body_read_error(exc) from exc
        if got == 0:  # the client closed the connection mid-body
            raise ClientDisconnected(f"request body ended {self.left} bytes early")
        self.left -= got
        self.reader.length -= got
        return int(got)

    def _buffered_into(self, view: memoryview, n: int) -> int:
        held: io.BytesIO = self.unreader.buf
        data = held.getvalue()
        if not data:
            return 0
        take = min(n, len(data))
        view[:take] = data[:take]
        rest = io.BytesIO()
        rest.write(data[take:])  # anything past the body stays for gunicorn (pipelining)
        self.unreader.buf = rest
        return take


# RFC 9112 7.1: chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF, ended by a last chunk
# (size 0), a trailer section of field lines and a CRLF. chunk-ext and field names are
# RFC 9110 tokens, extension values tokens or quoted strings, with BWS (spaces, tabs) only
# around ";" and "=".
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_EXTENSIONS = re.compile(
    rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*"
)
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_TRAILER_LINE = re.compile(_TOKEN + rb":[\t\x20-\x7e\x80-\xff]*")
# 16 hex digits is 2**64 - 1 bytes, far past any upload limit (which the ingest counts
# against); more is refused before int() is asked to read an arbitrarily long number.
_MAX_SIZE_DIGITS = 16
# One recv() for framing: the size line, the CRLF after the data, trailers. Whatever data it
# brings along is copied once into the caller's view; the rest of each chunk goes there with
# recv_into. 16 KiB is < 2 % extra copying for 1 MiB chunks, and a body of many tiny chunks
# is still parsed from memory, hundreds of chunks per recv().
_FRAME_READ = 16 * 1024
# Trailers are checked, then dropped: nothing in the app reads them. gunicorn caps them at its
# whole header buffer, limit_request_fields x (field size + 2): 64 MiB with
# deploy/gunicorn.conf.py's 8192 fields. Ours is what nginx allows a whole request head
# (4 x 8 KiB), or gunicorn's if that is smaller.
_MAX_TRAILERS = 32 * 1024

_SIZE, _DATA, _CRLF, _TRAILERS, _DONE = "size", "data", "crlf", "trailers", "done"


class _BadFraming(Exception):
    """The chunked framing breaks RFC 9112 (-> BadRequest)."""


class _Ended(Exception):
    """The client closed the connection before the last chunk (-> ClientDisconnected)."""


class ChunkedSocketBody:
    """A chunked body read with recv_into from gunicorn's socket, the framing parsed in place.

    gunicorn's ChunkedReader copies every byte several times through BytesIO buffers (as its
    LengthReader does, see SocketBody). Here chunk data goes from the socket straight into the
    caller's view; only framing is read into a small buffer of our own, starting with what
    gunicorn's unreader already holds. A size line may be as long as gunicorn allows
    (limit_request_field_size), the trailer section _MAX_TRAILERS.

    gunicorn must never resume a body we half-parsed: once the first byte is read, its Body
    is marked `failed` (gunicorn then closes the connection rather than drain it), until the
    last chunk and the trailers are read; then its ChunkedReader's parser (never started) is
    set to None, as its own reader does at the end, bytes read past the body (a pipelined
    request) go back to its unreader, and keep-alive finds the body consumed. Only attached
    when gunicorn's objects have exactly the expected shape.
    """

    def __init__(self, body: Any, reader: Any, unreader: Any, sock: socket.socket) -> None:
        self.body = body
        self.reader = reader
        self.unreader = unreader
        self.sock = sock
        self.line_limit: int = reader.limit_chunk_size_line
        self.trailer_limit: int = min(reader.limit_trailer_section, _MAX_TRAILERS)
        self.state = _SIZE
        self.left = 0  # data bytes of the current chunk still to come
        self.held = bytearray()  # framing read ahead, consumed up to `at`
        self.at = 0
        self.claimed = False
        self.broken: Exception | None = None  # raised again if asked to read on after it

    @classmethod
    def attach(cls, env: Mapping[str, Any]) -> ChunkedSocketBody | None:
        body = env.get("wsgi.input")
        reader = getattr(body, "reader", None)
        parser = getattr(reader, "parser", None)
        # The unreader its parser (a generator, not started) was handed, and the request's.
        unreader = _generator_argument(parser, "unreader")
        sock = getattr(unreader, "sock", None)
        shaped = (
            type(reader).__name__ == "ChunkedReader"
            and unreader is not None
            and getattr(getattr(reader, "req", None), "unreader", None) is unreader
            and _empty_bytesio(getattr(reader, "buf", None))
            and _empty_bytesio(getattr(body, "buf", None))
            and getattr(body, "failed", None) is False
            and _positive_int(getattr(reader, "limit_chunk_size_line", None))
            and _positive_int(getattr(reader, "limit_trailer_section", None))
            and isinstance(getattr(unreader, "buf", None), io.BytesIO)
            and callable(getattr(unreader, "unread", None))
            and isinstance(sock, socket.socket)
        )
        return cls(body, reader, unreader, sock) if shaped else None  # type: ignore[arg-type]

    def readinto(self, view: memoryview) -> int:
        if self.broken is not None:
            raise self.broken
        if self.state == _DONE or len(view) == 0:
            return 0
        try:
            if not self.claimed:
                self._claim()
            return self._into(view)
        except _BadFraming as exc:
            self.broken = BadRequest(f"malformed chunked body: {exc}")
        except _Ended:
            self.broken = ClientDisconnected("the request body ended before its last chunk")
        except Exception as exc:
            self.broken = body_read_error(exc)
            raise self.broken from exc
        raise self.broken

    def _claim(self) -> None:
        self.body.failed = True  # until the body is read to its end (see the class docstring)
        self.held += self.unreader.buf.getvalue()  # read together with the headers
        self.unreader.buf = io.BytesIO()
        self.claimed = True

    def _into(self, view: memoryview) -> int:
        """Fill `view` with chunk data; block on the socket only while nothing was got."""
        got = 0
        while got < len(view):
            if self.left == 0:
                if not self._frame(block=got == 0):
                    break
                continue
            want = min(len(view) - got, self.left)
            ahead = len(self.held) - self.at
            if ahead:
                n = min(want, ahead)
                with memoryview(self.held) as held:
                    view[got : got + n] = held[self.at : self.at + n]
                self.at += n
            elif got:
                break  # what we have now, rather than wait for more
            else:
                with view[:want] as target:
                    n = self.sock.recv_into(target, want)
                if n == 0:
                    raise _Ended
            got += n
            self.left -= n
            if self.left == 0:
                self.state = _CRLF
        return got

    def _frame(self, block: bool) -> bool:
        """Parse framing up to the next chunk's data: True when there is a chunk to read;
        False at the body's end, or when (not `block`) that would need another recv()."""
        while True:
            if self.state == _CRLF:
                if not self._have(2, block):
                    return False
                if self.held[self.at : self.at + 2] != b"\r\n":
                    raise _BadFraming("chunk data not followed by CRLF")
                self.at += 2
                self.state = _SIZE
            elif self.state == _SIZE:
                line = self._size_line(block)
                if line is None:
                    return False
                self.left = _chunk_size(line)
                if self.left:
                    self.state = _DATA
                    return True
                self.state = _TRAILERS
            elif self.state == _TRAILERS:
                if self._trailers(block):
                    self._finish()
                return False
            else:
                return False

    def _have(self, n: int, block: bool) -> bool:
        while len(self.held) - self.at < n:
            if not block:
                return False
            self._recv()
        return True

    def _size_line(self, block: bool) -> bytes | None:
        searched = 0
        while (end := self.held.find(b"\r\n", self.at + searched)) < 0:
            pending = len(self.held) - self.at
            if pending > self.line_limit:
                raise _BadFraming(f"a chunk size line is longer than {self.line_limit} bytes")
            if not block:
                return None
            searched = max(0, pending - 1)  # a CR at the end may be completed by the next read
            self._recv()
        if end - self.at > self.line_limit:
            raise _BadFraming(f"a chunk size line is longer than {self.line_limit} bytes")
        line = bytes(self.held[self.at : end])
        self.at = end + 2
        return line

    def _trailers(self, block: bool) -> bool:
        """Read past the trailer section and its final CRLF (the fields are not used)."""
        searched = 0
        while True:
            if self.held[self.at : self.at + 2] == b"\r\n":  # no trailers
                self.at += 2
                return True
            end = self.held.find(b"\r\n\r\n", self.at + searched)
            pending = (end if end >= 0 else len(self.held)) - self.at
            if pending > self.trailer_limit:
                raise _BadFraming(f"the trailer section is longer than {self.trailer_limit} bytes")
            if end >= 0:
                _check_trailers(bytes(self.held[self.at : end]))
                self.at = end + 4
                return True
            if not block:
                return False
            searched = max(0, pending - 3)
            self._recv()

    def _recv(self) -> None:
        if self.at:
            del self.held[: self.at]
            self.at = 0
        data = self.sock.recv(_FRAME_READ)
        if not data:
            raise _Ended
        self.held += data

    def _finish(self) -> None:
        rest = bytes(self.held[self.at :])
        self.held, self.at = bytearray(), 0
        if rest:  # the client's next request, sent before this answer: gunicorn's again
            self.unreader.unread(rest)
        self.reader.parser.close()
        self.reader.parser = None  # what gunicorn's ChunkedReader leaves at the body's end
        self.body.failed = False
        self.state = _DONE


def _chunk_size(line: bytes) -> int:
    size, semicolon, extensions = line.partition(b";")
    if semicolon:
        size = size.rstrip(b" \t")  # BWS is allowed before an extension, nowhere else
        if not _EXTENSIONS.fullmatch(b";" + extensions):
            raise _BadFraming("a chunk extension is malformed")
    if not _HEX.fullmatch(size):
        raise _BadFraming(f"chunk size {size[:20]!r} is not a hexadecimal number")
    if len(size.lstrip(b"0")) > _MAX_SIZE_DIGITS:
        raise _BadFraming("a chunk size is out of range")
    return int(size, 16)


def _check_trailers(section: bytes) -> None:
    for line in section.split(b"\r\n"):
        if not _TRAILER_LINE.fullmatch(line):
            raise _BadFraming("a trailer field is malformed")


def _generator_argument(generator: object, name: str) -> Any:
    """An argument a generator was called with, while it has not started (else None)."""
    if not inspect.isgenerator(generator):
        return None
    frame = generator.gi_frame
    if frame is None or inspect.getgeneratorstate(generator) != inspect.GEN_CREATED:
        return None
    return frame.f_locals.get(name)


def _empty_bytesio(buf: object) -> bool:
    return isinstance(buf, io.BytesIO) and buf.getbuffer().nbytes == 0


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and value > 0


def body_unread(env: Mapping[str, Any]) -> bool:
    """Whether the request declared a body that is not yet read to its end.

    Under gunicorn its reader says so exactly; under any other server a declared body is
    assumed unread (closing a connection too often only costs a reconnect).
    """
    chunked = "HTTP_TRANSFER_ENCODING" in env
    if not chunked and env.get("CONTENT_LENGTH", "0").strip() in ("", "0"):
        return False
    reader: Any = getattr(env.get("wsgi.input"), "reader", None)
    kind = type(reader).__name__
    if kind == "LengthReader" and isinstance(getattr(reader, "length", None), int):
        return bool(reader.length > 0)
    if kind == "ChunkedReader" and hasattr(reader, "parser"):
        return bool(reader.parser is not None)  # None once the last chunk was read
    return True


def force_close(env: Mapping[str, Any]) -> bool:
    """Make gunicorn close the connection after this answer and say `Connection: close`.

    gunicorn drops the application's `Connection` header (hop-by-hop) and has no public way to
    ask for a close: it announces keep-alive, drains up to 64 KiB of the unread body and then
    closes anyway, under a client that was told it could send its next request there. Its
    Response has `force_close()` (what gunicorn itself calls at max_requests); the only way to
    it from a WSGI application is the `wsgi.early_hints` callback gunicorn 27 puts in every
    environ, a closure over that Response. Returns whether it worked.
    """
    response = _gunicorn_response(env)
    if response is None:
        if "gunicorn.socket" in env:
            _log_once(logging.WARNING, f"{FORCE_CLOSE_MISSED}: refused bodies are drained")
        return False
    response.force_close()
    return True


def _gunicorn_response(env: Mapping[str, Any]) -> Any:
    hints = env.get("wsgi.early_hints")
    code, cells = getattr(hints, "__code__", None), getattr(hints, "__closure__", None)
    if code is None or not cells:
        return None
    captured = dict(zip(code.co_freevars, cells, strict=False))
    try:
        response = captured["resp"].cell_contents
    except (KeyError, ValueError):
        return None
    if type(response).__module__ != "gunicorn.http.wsgi" or not hasattr(response, "force_close"):
        return None
    return response
