"""The S3 store, on the minio SDK's low-level multipart calls.

We do not use `put_object(length=-1)` (minio 7.2.20): it builds each part with `+=`, which
is quadratic when reads come back short (64 KiB reads: 52 MiB/s against 125 MiB/s with
full-part reads); it aborts only on `Exception` (a gunicorn timeout's SystemExit leaves the
upload behind, seen end to end on SeaweedFS); and with its default 3 parallel uploads it
leaks its worker threads on every failed upload. Instead `MultipartUpload` exposes
create/part/complete/abort, registered with a `Tracker` from start to end (complete or
abort unregisters it), and the caller (core/sink.py) aborts on every failure, BaseException
included.

Every provider error is translated here: callers only ever see `StorageUnavailable` or
`NotFound`.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import re
import socket
import ssl
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple, Protocol, cast
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.datatypes import Part as Part  # a stored part, for core/sink.py and core/tus.py
from minio.error import InvalidResponseError, MinioException, S3Error

from core import metrics
from core.errors import NotFound, StorageUnavailable
from core.settings import Settings

log = logging.getLogger(__name__)

# CopyObject (used to attach metadata after a multipart upload) is limited to 5 GiB sources.
COPY_LIMIT = 5 * 1024**3
_NOT_FOUND = {"NoSuchKey", "NoSuchUpload", "NoSuchBucket", "ResourceNotFound"}


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    content_type: str
    metadata: Mapping[str, str]


@contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn minio/urllib3 errors into domain errors; the detail never carries credentials.
    Each call is timed, and counted when it failed, under `action` (core/metrics.py)."""
    try:
        with metrics.S3_DURATION.labels(action).time():
            yield
    except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        code = _s3_code(exc)
        if code in _NOT_FOUND:
            raise NotFound(f"{action}: not found") from exc
        metrics.S3_ERRORS.labels(action).inc()
        reason = f"S3 error {code}" if code else type(exc).__name__
        raise StorageUnavailable(f"{action} failed: {reason}") from exc


def _s3_code(exc: Exception) -> str | None:
    """The S3 error code of an error answer, if the store sent one.

    The SDK parses error bodies only when they come as `application/xml`; rclone sends
    `text/xml`, so its codes (NoSuchKey for a GET, NoSuchUpload) arrive as the raw body in
    an InvalidResponseError's message.
    """
    if isinstance(exc, S3Error):
        return exc.code
    if isinstance(exc, InvalidResponseError):
        found = re.search(r"<Code>([^<]{1,64})</Code>", str(exc))
        return found.group(1) if found else None
    return None


def _client(
    settings: Settings, endpoint: str, http: urllib3.PoolManager | None = None
) -> Minio:
    """The one place a minio client is made: for the store itself, or for presigning on the
    endpoint clients see."""
    parts = urlsplit(endpoint)
    return Minio(
        parts.netloc,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=parts.scheme == "https",
        region=settings.s3_region,  # else the SDK spends a request looking it up
        http_client=http,
    )


Headers = dict[str, str | list[str] | tuple[str]]


def _headers(content_type: str, metadata: Mapping[str, str]) -> Headers:
    headers: Headers = {"Content-Type": content_type}
    headers.update({f"x-amz-meta-{k}": v for k, v in metadata.items()})
    return headers


def _body(data: bytes | memoryview) -> bytes:
    # The SDK is annotated for bytes, but only takes len() and hashes the body, and urllib3
    # sends any buffer: a memoryview of the part buffer avoids copying 16 MiB per part.
    return cast("bytes", data)


class Writable(Protocol):
    """Where `download` puts bytes: a file, or anything else with `write`."""

    def write(self, data: bytes, /) -> object: ...


class Tracker(Protocol):
    """Told when a multipart upload starts and ends (core/leases.py registers it, so the
    janitor can abort it if this process dies). `started` may raise to refuse it."""

    def started(self, key: str, upload_id: str) -> None: ...

    def ended(self, key: str, upload_id: str) -> None: ...


class _Untracked:
    def started(self, key: str, upload_id: str) -> None:
        pass

    def ended(self, key: str, upload_id: str) -> None:
        pass


class Store:
    """One bucket of an S3-compatible server."""

    def __init__(self, client: Minio, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    @classmethod
    def from_settings(cls, settings: Settings, pool_size: int = 10) -> Store:
        """Build the client. Call it in each process after fork: it must not cross one."""
        http = urllib3.PoolManager(
            maxsize=max(pool_size, 10),
            timeout=urllib3.Timeout(connect=10, read=120),
            retries=urllib3.Retry(
                total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        return cls(_client(settings, settings.s3_endpoint, http), settings.s3_bucket)

    @classmethod
    def as_clients_see_it(cls, settings: Settings) -> Store:
        """The bucket at S3_PUBLIC_ENDPOINT, for presigned URLs that clients follow: signing
        is local computation (the region is given), so this store never sends a request."""
        return cls(_client(settings, settings.s3_public_endpoint), settings.s3_bucket)

    def presigned_get(self, key: str, seconds: int, content_type: str | None = None) -> str:
        """A URL that GETs `key` without credentials for `seconds` (answered with
        `content_type` when given)."""
        headers: Headers | None = (
            {"response-content-type": content_type} if content_type else None
        )
        return self.client.presigned_get_object(
            self.bucket, key, expires=timedelta(seconds=seconds), response_headers=headers
        )

    def ping(self) -> None:
        """Raise StorageUnavailable unless the bucket answers."""
        with _translated("bucket check"):
            if not self.client.bucket_exists(self.bucket):
                raise StorageUnavailable(f"bucket {self.bucket!r} does not exist")

    def ensure_bucket(self) -> None:
        with _translated("bucket creation"):
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)

    def put(
        self, key: str, data: bytes | memoryview, content_type: str, metadata: Mapping[str, str]
    ) -> None:
        """One PUT of a body that is already in memory (smaller than a part)."""
        with _translated("upload"):
            self.client._put_object(self.bucket, key, _body(data), _headers(content_type, metadata))

    def start_multipart(
        self,
        key: str,
        content_type: str,
        metadata: Mapping[str, str],
        tracker: Tracker | None = None,
    ) -> MultipartUpload:
        """Create a multipart upload and register it with `tracker` (aborted at once if the
        tracker refuses it). The caller completes it or calls `abort()`."""
        headers = _headers(content_type, metadata)
        with _translated("upload start"):
            upload_id = self.client._create_multipart_upload(self.bucket, key, headers)
        upload = MultipartUpload(self, key, upload_id, tracker or _Untracked())
        try:
            upload.tracker.started(key, upload_id)
        except BaseException:
            upload.abort(untrack=False)
            raise
        return upload

    def replace_metadata(self, key: str, content_type: str, metadata: Mapping[str, str]) -> None:
        """Attach metadata known only after the upload (the BLAKE3 of a multipart body).

        A copy onto itself with REPLACE; MinIO and SeaweedFS update only the metadata
        (measured: 7 ms for 256 MiB on SeaweedFS), they do not copy the bytes. Callers keep
        the source within COPY_LIMIT.

        Sent as the bare CopyObject request: the SDK's `copy_object` first HEADs the source
        (one more round trip) and insists on an ETag in the answer, which rclone leaves out
        of a copy onto itself (`<CopyObjectResult></CopyObjectResult>`, metadata replaced).
        """
        headers = _headers(content_type, metadata)
        headers["x-amz-metadata-directive"] = REPLACE
        headers.update(CopySource(self.bucket, key).gen_copy_headers())
        with _translated("metadata update"):
            response = self.client._execute("PUT", self.bucket, key, headers=headers)
        # S3 may answer a failed copy with 200 and an <Error> body.
        if b"<CopyObjectResult" not in response.data:
            raise StorageUnavailable("metadata update failed: the store did not copy")

    def stat(self, key: str) -> ObjectInfo:
        with _translated("stat"):
            st = self.client.stat_object(self.bucket, key)
        meta = {
            k[len("x-amz-meta-") :].lower(): v
            for k, v in (st.metadata or {}).items()
            if k.lower().startswith("x-amz-meta-")
        }
        return ObjectInfo(key, st.size or 0, st.content_type or "", meta)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except NotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error (S3 semantics)."""
        with _translated("delete"):
            self.client.remove_object(self.bucket, key)

    def put_json(self, key: str, value: Any) -> None:
        body = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
        self.put(key, body, "application/json", {})

    def read_bytes(self, key: str) -> bytes:
        """A whole (small) object in memory: records, test and benchmark checks."""
        with _translated("read"):
            response = self.client.get_object(self.bucket, key)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

    def download(self, key: str, out: Writable, chunk_size: int = 1024 * 1024) -> int:
        """Stream one object into a file in `chunk_size` pieces (constant memory, whatever
        the object's size). Returns the byte count."""
        written = 0
        with _translated("download"):
            response = self.client.get_object(self.bucket, key)
            try:
                for chunk in response.stream(chunk_size):
                    out.write(chunk)
                    written += len(chunk)
            finally:
                response.close()
                response.release_conn()
        return written

    def open_range(self, key: str, offset: int, length: int) -> OpenObject:
        """Send a ranged GET for bytes [offset, offset+length) and wait for the store's answer.

        Every failure surfaces here, before the caller has promised its own client anything:
        a missing object is NotFound; a store that is down, or an answer that would not carry
        exactly `length` bytes, is StorageUnavailable. The body is left unread.
        """
        with _translated("download"):
            response = self.client.get_object(self.bucket, key, offset=offset, length=length)
        body = OpenObject(response, length)
        declared = response.headers.get("Content-Length")
        if declared is not None and declared != str(length):
            body.close()
            raise StorageUnavailable(
                f"download failed: the store answered {declared} bytes, not {length}"
            )
        return body

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under a prefix; returns how many."""
        keys = self.keys(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def delete_flat(self, prefix: str) -> int:
        """Delete the objects directly under a prefix, not those under its sub-prefixes."""
        with _translated("list"):
            keys = [
                o.object_name or ""
                for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=False)
                if not o.is_dir
            ]
        for key in keys:
            self.delete(key)
        return len(keys)

    def copy(self, source: str, target: str) -> None:
        """A server-side copy of one object (metadata included)."""
        with _translated("copy"):
            self.client.copy_object(self.bucket, target, CopySource(self.bucket, source))

    def keys(self, prefix: str) -> list[str]:
        with _translated("list"):
            return [
                o.object_name or ""
                for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            ]

    def incomplete_uploads(self, prefix: str = "") -> list[IncompleteUpload]:
        """Every multipart upload neither completed nor aborted.

        Paginated by the last key/id: the SDK's next_upload_id_marker is always None.
        """
        found: list[IncompleteUpload] = []
        key_marker: str | None = None
        id_marker: str | None = None
        with _translated("list uploads"):
            while True:
                try:
                    result = self.client._list_multipart_uploads(
                        self.bucket,
                        prefix=prefix or None,
                        key_marker=key_marker,
                        upload_id_marker=id_marker,
                    )
                except MinioException as exc:
                    # rclone answers a listing made before its first multipart upload in
                    # this bucket with 404 NoSuchUpload: there are none.
                    if _s3_code(exc) == "NoSuchUpload":
                        return found
                    raise
                page = [
                    IncompleteUpload(u.object_name or "", u.upload_id or "", u.initiated_time)
                    for u in result.uploads
                ]
                found.extend(page)
                if not result.is_truncated or not page:
                    return found
                key_marker, id_marker = page[-1].key, page[-1].upload_id

    def abort_upload(self, key: str, upload_id: str) -> None:
        with _translated("upload abort"):
            self.client._abort_multipart_upload(self.bucket, key, upload_id)


class IncompleteUpload(NamedTuple):
    key: str
    upload_id: str
    initiated: datetime | None


class MultipartUpload:
    """An S3 multipart upload in progress. Not thread-safe: one caller drives it."""

    def __init__(
        self, store: Store, key: str, upload_id: str, tracker: Tracker | None = None
    ) -> None:
        self.store = store
        self.key = key
        self.upload_id = upload_id
        self.tracker = tracker or _Untracked()
        self.parts: list[Part] = []
        self.completed = False

    def upload_part(self, number: int, data: memoryview) -> Part:
        """Send one part (safe to call from a helper thread); the caller records it."""
        with _translated("part upload"):
            etag = self.store.client._upload_part(
                self.store.bucket, self.key, _body(data), None, self.upload_id, number
            )
        return Part(number, etag)

    def complete(self, parts: list[Part]) -> None:
        with _translated("upload completion"):
            self.store.client._complete_multipart_upload(
                self.store.bucket,
                self.key,
                self.upload_id,
                sorted(parts, key=lambda p: p.part_number),
            )
        self.completed = True
        self.tracker.ended(self.key, self.upload_id)

    def abort(self, untrack: bool = True) -> bool:
        """Best effort: log, never raise, so the original failure is what propagates.
        False when the upload may still exist: it then stays registered with the tracker
        (the janitor will abort it)."""
        try:
            self.store.abort_upload(self.key, self.upload_id)
        except NotFound:
            pass
        except StorageUnavailable as exc:
            log.warning("could not abort multipart upload of %s: %s", self.key, exc.detail)
            return False
        if untrack:
            self.tracker.ended(self.key, self.upload_id)
        return True


class OpenObject:
    """An S3 GET whose answer has arrived and whose body is still unread.

    One relay reads the body: `chunks()` copies it through Python, `raw_body()` hands its
    socket to a relay that moves it in the kernel. `close()` always ends it.
    """

    def __init__(self, response: Any, length: int) -> None:
        self._response = response
        self.length = length

    @property
    def size(self) -> int | None:
        """The whole object's size, when the store said (`Content-Range: bytes a-b/size`)."""
        total = self._response.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None

    def read(self, n: int) -> bytes:
        """Up to n more body bytes; b"" at the end."""
        with _translated("download"):
            return bytes(self._response.read(n))

    def chunks(self, chunk: int, prefetch: Executor | None = None) -> ObjectStream:
        """The copying relay: the body in `chunk`-sized pieces, read ahead with `prefetch`."""
        return ObjectStream(self, chunk, prefetch)

    def raw_body(self) -> RawBody | None:
        """The plain TCP socket the unread body arrives on, or None whenever relaying it
        byte for byte is not certainly right: TLS (the socket carries ciphertext), chunked
        framing, a length other than asked, or a urllib3/http.client whose internals moved.
        Then read it with `chunks()`.

        This is the one place that reads those private attributes (urllib3's `_fp` and
        `_connection`, http.client's `fp`); tests/integration/test_download_outage.py fails
        loudly when a real response no longer has them.
        """
        plain = getattr(self._response, "_fp", None)
        sock = getattr(getattr(self._response, "_connection", None), "sock", None)
        reader = getattr(plain, "fp", None)
        if (
            isinstance(plain, http.client.HTTPResponse)
            and not getattr(plain, "chunked", True)
            and getattr(plain, "length", None) == self.length
            and isinstance(reader, io.BufferedReader)
            and isinstance(sock, socket.socket)
            and not isinstance(sock, ssl.SSLSocket)
        ):
            return RawBody(sock, reader, self.length)
        return None

    def close(self) -> None:
        """Close the response. Its connection goes back to the pool only if urllib3 read the
        body to the end; otherwise (a kernel relay, a client gone mid-body) it is closed."""
        response, self._response = self._response, None
        if response is not None:
            response.close()
            response.release_conn()


@dataclass(frozen=True, slots=True)
class RawBody:
    """An unread response body as the socket it arrives on. http.client may already have
    read its first bytes together with the headers: send `take_buffered()` first, then
    exactly `length` minus those from `sock`."""

    sock: socket.socket
    reader: io.BufferedReader
    length: int

    def take_buffered(self) -> bytes:
        """The body bytes already read off the socket (waits for some if there are none)."""
        with _translated("download"):
            held = self.reader.peek(1)[: self.length]
            self.reader.read(len(held))
        return held


class ObjectStream:
    """The copying relay: an iterator over an open S3 response that a WSGI server can close
    at any time.

    With an executor, the next chunk is fetched while the caller sends the current one
    (measured: a relay that alternates read and send reaches ~0.7 of a direct GET;
    overlapped it keeps up). `close()` — called by the server when the response ends or the
    client goes away — closes the response, even if iteration never started.
    """

    def __init__(self, body: OpenObject, chunk: int, prefetch: Executor | None = None) -> None:
        self.body = body
        self.chunk = chunk
        self.prefetch = prefetch
        self._next: Future[bytes] | None = None
        self._closed = False

    def __iter__(self) -> ObjectStream:
        return self

    def __next__(self) -> bytes:
        if self._closed:
            raise StopIteration
        chunk = self._next.result() if self._next is not None else self.body.read(self.chunk)
        if not chunk:
            self.close()
            raise StopIteration
        if self.prefetch is not None:
            self._next = self.prefetch.submit(self.body.read, self.chunk)
        return chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._next is not None:
            self._next.cancel()
            with contextlib.suppress(Exception):  # the read in flight no longer matters
                self._next.result(timeout=30)
        self.body.close()
