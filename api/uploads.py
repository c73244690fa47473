"""The upload use case: body -> S3 object + bucket record copy + Redis record + queued job.

No HTTP here (api/resources.py adapts it). The order of the steps is what guarantees "no half
state": the original and its JSON copy are written first; the Redis record and the job are
committed last, in one transaction; if that commit fails the objects are deleted again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace

from rq import Queue

from api.body import UploadBody
from api.events import EventHub
from api.limits import Slots
from api.presign import Presigner
from core.errors import Conflict, PicstreamError, TooLarge
from core.ingest import Ingest, Ingested, Limits, NullSink, Source
from core.jobs import enqueue_convert
from core.models import ImageRecord, Variant, new_image_id, original_key, record_key, utc_now
from core.profiles import Profile
from core.records import Records
from core.settings import Settings
from core.sink import ObjectSink
from core.storage import Store

log = logging.getLogger(__name__)

# A multipart envelope may exceed the image by its headers and skipped fields.
_SLACK = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Services:
    """The collaborators of the web process, built once per worker process after fork."""

    settings: Settings
    store: Store
    records: Records
    queue: Queue
    bulk_queue: Queue  # reconversions: workers drain `queue` first
    executor: Executor  # part uploads
    download_pool: Executor  # read-ahead of downloads
    upload_slots: Slots
    stream_slots: Slots
    hub: EventHub
    presigner: Presigner


class Uploads:
    def __init__(self, services: Services) -> None:
        self.s = services
        settings = services.settings
        self.limits = Limits(
            part_size=settings.part_size,
            max_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_pixels,
            max_head=settings.max_head_bytes,
            allowed_formats=settings.allowed_formats,
        )
        # A PUT's id stays claimed while its body streams; refreshed as bytes arrive, so
        # it lapses soon after a crashed process stops refreshing it.
        self.reserve_ttl = int(max(60, 4 * settings.read_timeout))

    def create(
        self,
        owner: str,
        body: UploadBody,
        digests: Mapping[str, bytes],
        profile: Profile,
        callback: str | None = None,
    ) -> ImageRecord:
        """POST: a new image under a server-chosen id, to be converted with `profile`;
        `callback` receives the final record (a webhook)."""
        self._check_envelope(body)
        image_id = new_image_id()
        return self._store_new(owner, image_id, body, body.source, digests, profile, callback)

    def put(
        self,
        owner: str,
        image_id: str,
        body: UploadBody,
        digests: Mapping[str, bytes],
        profile: Profile,
        callback: str | None = None,
    ) -> tuple[ImageRecord, bool]:
        """PUT: idempotent. Returns (record, created). Same bytes again -> the existing record
        (its profile unchanged: reconvert changes profiles); different bytes under an
        existing id -> Conflict."""
        self._check_envelope(body)
        records = self.s.records
        if not records.exists(owner, image_id):
            if not records.reserve(owner, image_id, self.reserve_ttl):
                raise Conflict(f"an upload to image {image_id!r} is already in progress")
            try:
                # Re-check under the reservation: a concurrent PUT may have just committed.
                if not records.exists(owner, image_id):
                    source = _KeepReserved(body.source, records, owner, image_id, self.reserve_ttl)
                    record = self._store_new(
                        owner, image_id, body, source, digests, profile, callback
                    )
                    return record, True
            finally:
                records.release(owner, image_id)
        return self._same_or_conflict(records.get(owner, image_id), body, digests), False

    def _store_new(
        self,
        owner: str,
        image_id: str,
        body: UploadBody,
        source: Source,
        digests: Mapping[str, bytes],
        profile: Profile,
        callback: str | None,
    ) -> ImageRecord:
        key = original_key(owner, image_id)
        meta = {"picstream-owner": owner, "picstream-id": image_id}
        sink = ObjectSink(self.s.store, key, self.s.executor, meta)
        ingested = Ingest(source, self.limits, sink, body.declared_size, digests).run()
        record = replace(
            _new_record(owner, image_id, ingested, body.filename, profile), callback=callback
        )
        try:
            self.s.store.put_json(record_key(owner, image_id), record.to_dict())
            queue, intervals = self.s.queue, self.s.settings.retry_intervals
            self.s.records.create(
                record, lambda pipe: enqueue_convert(queue, owner, image_id, pipe, intervals)
            )
        except BaseException:
            self._discard(owner, image_id, sink)
            raise
        log.info(
            "stored %s/%s: %s %d bytes %sx%s",
            owner,
            image_id,
            record.format,
            record.size,
            record.width,
            record.height,
        )
        return record

    def _same_or_conflict(
        self, existing: ImageRecord, body: UploadBody, digests: Mapping[str, bytes]
    ) -> ImageRecord:
        if body.declared_size is not None and body.declared_size != existing.size:
            raise Conflict(f"image {existing.id!r} already exists with different content")
        ingested = Ingest(body.source, self.limits, NullSink(), body.declared_size, digests).run()
        if ingested.blake3 != existing.blake3 or ingested.size != existing.size:
            raise Conflict(f"image {existing.id!r} already exists with different content")
        return existing

    def _discard(self, owner: str, image_id: str, sink: ObjectSink) -> None:
        sink.discard()
        try:
            self.s.store.delete(record_key(owner, image_id))
        except PicstreamError as exc:
            log.warning("could not delete the record copy of %s/%s: %s", owner, image_id, exc)

    def _check_envelope(self, body: UploadBody) -> None:
        """A multipart envelope far larger than the limit can only hold a too-large file."""
        length = body.request_length
        if body.declared_size is None and length and length > self.limits.max_bytes + _SLACK:
            raise TooLarge(f"the body is larger than the limit of {self.limits.max_bytes} bytes")


class _KeepReserved:
    """Refreshes a PUT's id reservation every so often while its body streams."""

    def __init__(
        self, source: Source, records: Records, owner: str, image_id: str, ttl: int
    ) -> None:
        self.source = source
        self.records = records
        self.key = (owner, image_id)
        self.ttl = ttl
        self.last = time.monotonic()

    def readinto(self, view: memoryview) -> int:
        got = self.source.readinto(view)
        now = time.monotonic()
        if now - self.last > self.ttl / 4:
            self.last = now
            self.records.extend(*self.key, self.ttl)
        return got


def _new_record(
    owner: str, image_id: str, ingested: Ingested, filename: str | None, profile: Profile
) -> ImageRecord:
    sniffed = ingested.sniffed
    # The variants the header lets us foresee; the worker replaces them with its own plan
    # once it has decoded the image (alpha, exact size). Only JPEG surely has no alpha.
    alpha = False if sniffed.format == "jpeg" else None
    plan = profile.plan(sniffed.width, sniffed.height, alpha)
    return ImageRecord(
        id=image_id,
        owner=owner,
        size=ingested.size,
        blake3=ingested.blake3,
        format=sniffed.format,
        content_type=sniffed.content_type,
        width=sniffed.width,
        height=sniffed.height,
        orientation=sniffed.orientation,
        filename=filename,
        created_at=utc_now(),
        profile=profile.name,
        variants=tuple(Variant(spec.name) for spec in plan),
    )
