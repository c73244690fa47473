"""`ObjectSink`: the PartSink that writes an upload body to S3.

A body smaller than one part goes as a single PUT. A larger one becomes a multipart upload
whose parts are sent by a helper thread while the caller reads the next part from the
client, so receiving and uploading overlap. At most one part is in flight, so an upload holds
at most two part buffers. `abort()` waits for the in-flight part (S3 may otherwise keep a
part that lands after the abort), then aborts the multipart upload.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout

from core.ingest import Ingested, PartBuffer
from core.models import META_BLAKE3, META_FORMAT
from core.sniff import Sniffed
from core.storage import COPY_LIMIT, MultipartUpload, Part, Store, Tracker

log = logging.getLogger(__name__)

# How long an abort waits for the part in flight before giving up on it.
ABORT_WAIT = 60.0


def object_metadata(
    sniffed_format: str, blake3: str | None, extra: Mapping[str, str]
) -> dict[str, str]:
    meta = {META_FORMAT: sniffed_format, **extra}
    if blake3:
        meta[META_BLAKE3] = blake3
    return meta


# What an upload adds to its object's metadata once the whole body is known.
Describe = Callable[[Ingested], Mapping[str, str]]


class ObjectSink:
    """`describe`, when given, is asked for more metadata once the body has been read; what
    it returns is stored with the object when the object can still take it (always for a
    single PUT and for a multipart upload whose metadata is attached by a copy), and
    `described` then says so."""

    def __init__(
        self,
        store: Store,
        key: str,
        executor: Executor,
        metadata: Mapping[str, str],
        tracker: Tracker | None = None,
        describe: Describe | None = None,
    ) -> None:
        self.tracker = tracker
        self.store = store
        self.key = key
        self.executor = executor
        self.metadata = dict(metadata)
        self.describe = describe
        self.described = False  # the object carries what `describe` returned
        self.upload: MultipartUpload | None = None
        self.parts: list[Part] = []
        self.inflight: tuple[Future[Part], PartBuffer] | None = None
        self.stored = False  # the object exists in the bucket (the caller may delete it)
        self.began = False  # a write to the bucket was attempted

    def write_part(self, part: PartBuffer, sniffed: Sniffed) -> PartBuffer | None:
        free = self._settle()
        self.began = True
        if self.upload is None:
            meta = object_metadata(sniffed.format, None, self.metadata)
            self.upload = self.store.start_multipart(
                self.key, sniffed.content_type, meta, self.tracker
            )
        number = len(self.parts) + 1
        future = self.executor.submit(self.upload.upload_part, number, part.view())
        self.inflight = (future, part)
        return free

    def finish(self, last: PartBuffer, result: Ingested) -> None:
        sniffed = result.sniffed
        extra = self.describe(result) if self.describe is not None else {}
        meta = object_metadata(sniffed.format, result.blake3, {**self.metadata, **extra})
        self.began = True
        if self.upload is None:
            self.store.put(self.key, last.view(), sniffed.content_type, meta)
            self.stored = True
            self.described = bool(extra)
            return
        self._settle()
        self.parts.append(self.upload.upload_part(len(self.parts) + 1, last.view()))
        self.upload.complete(self.parts)
        self.stored = True
        self.upload = None
        # Multipart metadata is fixed at creation, before the hash is known: attach it now.
        if result.size <= COPY_LIMIT:
            self.store.replace_metadata(self.key, sniffed.content_type, meta)
            self.described = bool(extra)

    def abort(self) -> None:
        if self.inflight is not None:
            future, _ = self.inflight
            self.inflight = None
            try:
                future.result(timeout=ABORT_WAIT)
            except (Exception, FutureTimeout) as exc:  # noqa: BLE001 - the abort matters now
                log.info("part in flight for %s failed during abort: %s", self.key, exc)
        if self.upload is not None:
            self.upload.abort()  # unregistered unless it may still exist (the janitor's then)
            self.upload = None
        if self.stored:  # completed, then a later step failed: leave nothing behind
            self.discard()

    def discard(self) -> None:
        """Delete the stored object (best effort: logged, never raised)."""
        try:
            self.store.delete(self.key)
        except Exception as exc:  # noqa: BLE001 - the original failure must propagate
            log.warning("could not delete %s after a failed upload: %s", self.key, exc)
        self.stored = False

    def _settle(self) -> PartBuffer | None:
        """Wait for the part in flight; return its buffer for reuse. Raises its error."""
        if self.inflight is None:
            return None
        future, buffer = self.inflight
        self.inflight = None
        self.parts.append(future.result())
        return buffer
