"""Zero-copy relay of a download: S3 socket -> pipe -> client socket with splice(2).

The copying relay (core/storage.py ObjectStream) moves every byte into Python and out again;
on a busy machine that kept relayed downloads at ~0.75 of a direct S3 GET
(bench/download.py). Under gunicorn on Linux the bytes can instead move kernel-side.

How it fits WSGI: the S3 response is already open when the relay is chosen (the store has
answered, so the status is known). The response iterator first yields b"" — gunicorn then
sends the status line and headers (Content-Length already set) — and on the next step moves
exactly `length` body bytes itself and ends. Bytes http.client had already buffered behind
the S3 response headers are sent first. The S3 connection is closed afterwards, never
reused: its body was read behind urllib3's back.

Whenever the response's socket cannot be had safely (TLS, chunked, urllib3 internals that
moved: core/storage.py `OpenObject.raw_body`), `relay()` picks the copying relay instead.

A client that stops reading: under gunicorn the client socket is blocking and the send
deadline is the kernel's (TCP_USER_TIMEOUT, api/gunicorn.py): splice() then fails with EPIPE
and the relay ends like any broken connection. A socket with a Python timeout (non-blocking
underneath) is waited on for room at most that long without progress, as sendall() would.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import select
import socket
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor
from typing import Any

from api.gunicorn import client_socket
from core.errors import StorageUnavailable
from core.storage import OpenObject, RawBody

log = logging.getLogger(__name__)

PIPE_SIZE = 1024 * 1024
STEP = 1024 * 1024
S3_READ_TIMEOUT = 120.0
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def available(env: Mapping[str, Any]) -> socket.socket | None:
    """The client's socket when this server lets a splice relay write to it."""
    sock = client_socket(env)
    return sock if hasattr(os, "splice") else None


def relay(
    body: OpenObject, env: Mapping[str, Any], chunk: int, prefetch: Executor | None
) -> Iterator[bytes]:
    """The WSGI response body for an open S3 response: the splice relay when both ends are
    plain sockets, else the copying relay (`chunk`-sized pieces, read ahead on `prefetch`)."""
    client = available(env)
    if client is not None:
        raw = body.raw_body()
        if raw is not None:
            return SpliceRelay(body, raw, client)
        _copying_under_gunicorn()
    return body.chunks(chunk, prefetch)


@functools.cache
def _copying_under_gunicorn() -> None:
    # Once per process: every download of a TLS store takes this path, and so does every
    # download after a urllib3 upgrade that moved the internals raw_body() reads.
    log.warning("S3 responses expose no plain socket: downloads use the copying relay")


class SpliceRelay:
    """A WSGI response body that moves an open S3 response's body to the client in the
    kernel."""

    def __init__(self, body: OpenObject, raw: RawBody, client: socket.socket) -> None:
        self.body = body
        self.raw = raw
        self.client = client
        self._step = 0

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
        held = self.raw.take_buffered()
        if held:
            self.client.sendall(held)
        left = self.raw.length - len(held)
        read_end, write_end = os.pipe()
        try:
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
            while left > 0:
                moved = self._into_pipe(self.raw.sock, write_end, min(left, STEP))
                self._out_of_pipe(read_end, moved)
                left -= moved
        finally:
            os.close(read_end)
            os.close(write_end)

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
            except BlockingIOError:  # only a socket with a timeout is non-blocking
                wait = self.client.gettimeout()
                _, ready, _ = select.select([], [self.client], [], wait)
                if not ready:
                    raise TimeoutError(f"the client accepted no bytes for {wait} s") from None

    def close(self) -> None:
        self.body.close()  # closes the S3 connection: its body was read behind urllib3
