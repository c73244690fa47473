"""A tus 1.0 client (https://tus.io/protocols/resumable-upload) for one file at a time.

- `create`: `POST /v1/tus` with `Upload-Length` and `Upload-Metadata`; the answer's
  `Location` is the upload.
- `send`: `PATCH`es of up to `chunk_size` bytes, each streamed from disk in 1 MiB blocks
  (never the whole file in memory), from the offset the server holds, until the answer
  carries `Picstream-Image`.
- After a network failure, a `423 upload-locked` (the server still holds the lock of a
  request it has not noticed is gone), a `409 offset-mismatch`, a `408` or a `5xx`, it
  waits (backoff, or the server's `Retry-After`) and asks `HEAD` where the upload stands,
  then goes on from there. Consecutive failures without progress are bounded; any
  progress resets the count.
- Every other problem (`415 not-an-image`, `413`, `409 conflict`, `404`/`410` for an upload
  that is gone…) is final and raised as `ApiError`.

The server saves what a cut PATCH delivered, so a chunk is a unit of sending, not of
saving: a cut costs at most the bytes in flight.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx2

from cli.client import (
    BACKOFF,
    MAX_RETRY_AFTER,
    Api,
    ApiError,
    Interrupted,
    NetworkError,
    problem_of,
    transient,
)

TUS_VERSION = "1.0.0"
MiB = 1024 * 1024
CHUNK_SIZE = 16 * MiB
BLOCK = 1 * MiB

Report = Callable[[int], None]
T = TypeVar("T")


class FileChanged(Exception):
    """The file changed while it was being sent."""


@dataclass(frozen=True)
class Standing:
    """Where an upload stands: the bytes the server holds, and the image it became."""

    offset: int
    image: str | None


def encode_metadata(values: Mapping[str, str | None]) -> str:
    """`Upload-Metadata`: `key base64(value)` pairs, comma-separated; None values left out."""
    return ",".join(
        f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items() if v is not None
    )


class TusClient:
    """Creates and sends uploads to one server. `stop` (set on Ctrl-C) ends waits and sends
    at the next block."""

    def __init__(
        self, api: Api, stop: threading.Event | None = None, chunk_size: int = CHUNK_SIZE
    ) -> None:
        self.api = api
        self.stop = stop or threading.Event()
        self.chunk_size = chunk_size

    def create(self, size: int, metadata: Mapping[str, str | None]) -> str:
        """A new upload of `size` bytes; its absolute URL."""
        headers = {
            "Tus-Resumable": TUS_VERSION,
            "Upload-Length": str(size),
            "Upload-Metadata": encode_metadata(metadata),
        }

        def post() -> str:
            resp = self.api.send("POST", "/v1/tus", headers=headers)
            if resp.status_code != 201 or "location" not in resp.headers:
                raise problem_of(resp)
            return self.api.absolute(resp.headers["location"])

        return self._retrying(post)

    def standing(self, url: str) -> Standing:
        """HEAD: where the upload stands (retried like every request)."""
        return self._retrying(lambda: self._head(url))

    def send(self, url: str, file: Path, size: int, offset: int, report: Report) -> str:
        """Send the file from `offset` to the end; the image path (`/v1/images/{id}`)."""
        failures = 0
        best = offset
        need_head = False
        while True:
            self._check_stop()
            try:
                standing = (
                    self._head(url) if need_head else self._patch(url, file, offset, size, report)
                )
            except (httpx2.TransportError, ApiError) as exc:
                failures = self._failed(exc, failures)
                need_head = True
                continue
            offset = standing.offset
            report(offset)
            if standing.image:
                return standing.image
            if offset > best:
                best, failures = offset, 0
            need_head = offset >= size
            if need_head:  # every byte is in but no image yet: the commit failed; HEAD retries it
                failures = self._failed(None, failures)

    def _retrying(self, request: Callable[[], T]) -> T:
        failures = 0
        while True:
            self._check_stop()
            try:
                return request()
            except (httpx2.TransportError, ApiError) as exc:
                failures = self._failed(exc, failures)

    def _failed(self, exc: Exception | None, failures: int) -> int:
        """Raise `exc` if it is final or the retries are spent; else wait and count it."""
        if isinstance(exc, ApiError) and not transient(exc):
            raise exc
        failures += 1
        if failures > len(BACKOFF):
            if isinstance(exc, httpx2.TransportError):
                raise NetworkError(self.api.url, exc) from None
            if exc is not None:
                raise exc
            raise ApiError(
                503, "Upload not committed", "the server holds every byte but made no image"
            )
        delay = BACKOFF[failures - 1]
        if isinstance(exc, ApiError) and exc.retry_after is not None:
            delay = min(exc.retry_after, MAX_RETRY_AFTER)
        self.stop.wait(delay)
        return failures

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted()

    def _head(self, url: str) -> Standing:
        resp = self.api.send("HEAD", url, headers={"Tus-Resumable": TUS_VERSION})
        if resp.status_code != 200:
            raise problem_of(resp)
        return _standing(resp)

    def _patch(self, url: str, file: Path, offset: int, size: int, report: Report) -> Standing:
        end = min(size, offset + self.chunk_size)
        headers = {
            "Tus-Resumable": TUS_VERSION,
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(end - offset),
        }
        resp = self.api.send(
            "PATCH", url, headers=headers, content=self._blocks(file, offset, end, report)
        )
        if resp.status_code != 204:
            raise problem_of(resp)
        return _standing(resp)

    def _blocks(self, file: Path, start: int, end: int, report: Report) -> Iterator[bytes]:
        with open(file, "rb") as f:
            f.seek(start)
            pos = start
            while pos < end:
                self._check_stop()
                block = f.read(min(BLOCK, end - pos))
                if not block:
                    raise FileChanged(f"{file} became shorter while it was being uploaded")
                yield block
                pos += len(block)
                report(pos)


def _standing(resp: httpx2.Response) -> Standing:
    try:
        offset = int(resp.headers.get("upload-offset", ""))
    except ValueError:
        raise ApiError(
            resp.status_code, "Not a tus server", "no Upload-Offset in its answer"
        ) from None
    return Standing(offset, resp.headers.get("picstream-image") or None)
