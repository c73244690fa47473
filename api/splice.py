"""Zero-copy relay of a download: S3 socket -> pipe -> client socket with splice(2).

The plain relay (core/storage.py ObjectStream) copies every byte into Python and out again;
on a busy machine that kept relayed downloads at ~0.75 of a direct S3 GET
(bench/download.py). Under gunicorn on Linux the bytes can instead move kernel-side.

How it fits WSGI: the response iterator first yields b"" — gunicorn then sends the status
line and headers (Content-Length already set) — and on the next step moves exactly
`length` body bytes itself and ends. Bytes http.client had already buffered behind the S3
response headers are sent first. The S3 connection is closed afterwards, never reused: its
body was read behind urllib3's back. Anything unexpected falls back to the plain relay.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
from collections.abc import Iterator
from typing import Any

from core.errors import StorageUnavailable
from core.storage import Store

PIPE_SIZE = 1024 * 1024
STEP = 1024 * 1024
S3_READ_TIMEOUT = 120.0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def available(env: dict[str, Any]) -> socket.socket | None:
    """The client's socket when a splice relay is possible for this request."""
    sock = env.get("gunicorn.socket")
    if hasattr(os, "splice") and isinstance(sock, socket.socket):
        return sock
    return None


class SpliceRelay:
    """A WSGI response body that moves an S3 object range to the client in the kernel."""

    def __init__(
        self, store: Store, key: str, offset: int, length: int, client: socket.socket
    ) -> None:
        self.store = store
        self.key = key
        self.offset = offset
        self.length = length
        self.client = client
        self._step = 0
        self._response: Any = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        self._step += 1
        if self._step == 1:
            return b""  # gunicorn sends the headers before it asks for more
        if self._step == 2:
            self._relay()
        raise StopIteration

    def _relay(self) -> None:
        try:
            self._response = self.store.client.get_object(
                self.store.bucket, self.key, offset=self.offset, length=self.length
            )
        except Exception as exc:
            raise StorageUnavailable(f"download failed: {type(exc).__name__}") from exc
        left = self.length - self._send_buffered()
        source = self._response._connection.sock
        read_end, write_end = os.pipe()
        try:
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
            while left > 0:
                moved = self._into_pipe(source, write_end, min(left, STEP))
                self._out_of_pipe(read_end, moved)
                left -= moved
        finally:
            os.close(read_end)
            os.close(write_end)

    def _send_buffered(self) -> int:
        """Body bytes http.client read together with the S3 headers."""
        buffered = self._response._fp.fp
        held = buffered.peek(1)[: self.length]
        if held:
            buffered.read(len(held))
            self.client.sendall(held)
        return len(held)

    def _into_pipe(self, source: socket.socket, pipe: int, count: int) -> int:
        while True:
            try:
                moved = os.splice(source.fileno(), pipe, count)
            except BlockingIOError:  # urllib3's socket has a timeout, so it is non-blocking
                ready, _, _ = select.select([source], [], [], S3_READ_TIMEOUT)
                if not ready:
                    raise StorageUnavailable("download failed: the store stopped sending") from None
                continue
            if moved == 0:
                raise StorageUnavailable("download failed: the store closed the connection")
            return moved

    def _out_of_pipe(self, pipe: int, count: int) -> None:
        while count > 0:
            try:
                count -= os.splice(pipe, self.client.fileno(), count)
            except BlockingIOError:
                select.select([], [self.client], [], S3_READ_TIMEOUT)

    def close(self) -> None:
        if self._response is not None:
            self._response.close()  # closes the connection: its body was read behind urllib3
            self._response.release_conn()
            self._response = None
