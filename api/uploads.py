"""The upload use case: body -> S3 object + bucket record copy + Redis record + queued job.

No HTTP here (api/images.py adapts it). The order of the steps is what guarantees "no half
state": the upload takes a lease on its id (core/leases.py), writes the original and its JSON
copy under a new incarnation's prefix, then commits the Redis record and the job in one
transaction fenced by the lease (core/records.py `commit`), whose outcome is known before
the client is answered; if it did not commit, the objects are deleted again.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import replace

from redis.client import Pipeline
from rq import Queue

from api.body import UploadBody
from core import metrics
from core.errors import ImageExists, PicstreamError, TooLarge
from core.ingest import Ingest, Ingested, Limits, NullSink
from core.jobs import enqueue_convert
from core.leases import Leases, UploadLease
from core.mirror import record_metadata
from core.models import (
    META_GEN,
    META_ID,
    META_OWNER,
    NO_ANNOTATIONS,
    Annotations,
    ImageRecord,
    ObjectKeys,
    new_generation,
    new_image_id,
    planned,
    utc_now,
)
from core.profiles import Profile
from core.records import Records, image_key
from core.settings import Settings
from core.sink import ObjectSink
from core.storage import Store

log = logging.getLogger(__name__)

# A multipart envelope may exceed the image by its headers and skipped fields.
_SLACK = 2 * 1024 * 1024


def upload_limits(settings: Settings) -> Limits:
    """What one upload may be: its size, pixels, header length, formats; its part size."""
    return Limits(
        part_size=settings.part_size,
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_pixels,
        max_head=settings.max_head_bytes,
        allowed_formats=settings.allowed_formats,
    )


class Uploads:
    """The use case. Parts are uploaded on `part_uploads` while the next one is received;
    the job goes to `queue` (the one workers drain first)."""

    def __init__(
        self,
        store: Store,
        records: Records,
        leases: Leases,
        queue: Queue,
        part_uploads: Executor,
        *,
        limits: Limits,
        retry_intervals: tuple[int, ...],
        redis_timeout: float,
    ) -> None:
        self.store = store
        self.records = records
        self.leases = leases
        self.queue = queue
        self.part_uploads = part_uploads
        self.limits = limits
        self.retry_intervals = retry_intervals
        # The commit must reach Redis within this, or never take effect (core/records.py).
        self.fence = 2 * redis_timeout

    def create(
        self,
        owner: str,
        body: UploadBody,
        digests: Mapping[str, bytes],
        profile: Profile,
        callback: str | None = None,
        *,
        limits: Limits | None = None,
        annotations: Annotations = NO_ANNOTATIONS,
    ) -> ImageRecord:
        """POST: a new image under a server-chosen id, to be converted with `profile`;
        `callback` receives the final record (a webhook). `limits` replaces the use case's
        own (an upload token's, narrowed within them: api/grants.py). `annotations` (alt
        text, metadata) go into the record, with a multipart body's fields
        (api/body.py `UploadBody.annotations`)."""
        uploads = self._within(limits)
        uploads._check_envelope(body)
        keys = ObjectKeys(owner, new_image_id(), new_generation())
        # The guard comes with the lease: purged unless committed, even if this process dies.
        with self.leases.hold(owner, keys.image_id, guard=keys.prefix) as lease:
            return uploads._store_new(lease, keys, body, digests, profile, callback, annotations)

    def put(
        self,
        owner: str,
        image_id: str,
        body: UploadBody,
        digests: Mapping[str, bytes],
        profile: Profile,
        callback: str | None = None,
        *,
        limits: Limits | None = None,
        annotations: Annotations = NO_ANNOTATIONS,
    ) -> tuple[ImageRecord, bool]:
        """PUT: idempotent. Returns (record, created). Same bytes again -> the existing record
        (its profile, alt text and metadata unchanged: reconvert and PATCH change those);
        different bytes under an existing id -> ImageExists; another upload of the id in
        progress -> UploadInProgress. `limits` and `annotations` as for `create`."""
        uploads = self._within(limits)
        uploads._check_envelope(body)
        records = self.records
        if not records.exists(owner, image_id):
            keys = ObjectKeys(owner, image_id, new_generation())
            committed = image_key(owner, image_id)
            # Re-checked as the lease is taken (`unless`): a concurrent PUT may have just
            # committed. The guard comes with the lease unless it has.
            with self.leases.hold(owner, image_id, keys.prefix, unless=committed) as lease:
                if not lease.found:
                    stored = uploads._store_new(
                        lease, keys, body, digests, profile, callback, annotations
                    )
                    return stored, True
        existing = records.get(owner, image_id)
        return uploads._same_or_conflict(existing, body, digests, annotations), False

    def _within(self, limits: Limits | None) -> Uploads:
        """This use case with `limits` in place of its own: a shallow copy, as it keeps no
        per-upload state, so every step (envelope, ingest, same-bytes check) sees them."""
        if limits is None or limits == self.limits:
            return self
        within = copy.copy(self)
        within.limits = limits
        return within

    def _store_new(
        self,
        lease: UploadLease,
        keys: ObjectKeys,
        body: UploadBody,
        digests: Mapping[str, bytes],
        profile: Profile,
        callback: str | None,
        given: Annotations,
    ) -> ImageRecord:
        """Store and commit a new incarnation `keys`, whose guard `lease` set as it was
        taken (core/leases.py)."""
        owner, image_id = keys.owner, keys.image_id
        vset = new_generation()
        meta = {META_OWNER: owner, META_ID: image_id, META_GEN: keys.gen}
        made: list[ImageRecord] = []

        def new_record(ingested: Ingested) -> ImageRecord:
            # A multipart body's fields may follow the file: they are known only now.
            annotations = body.annotations(given)
            record = _new_record(owner, image_id, ingested, body.filename, profile, annotations)
            return replace(record, callback=callback, gen=keys.gen, vset=vset)

        def describe(ingested: Ingested) -> dict[str, str]:
            # The record rides on the original when it may (core/mirror.py): the bucket copy
            # then costs no second PUT. A refused field is raised below, after the ingest,
            # exactly as for a record that goes to record.json.
            try:
                made.append(new_record(ingested))
            except PicstreamError:
                return {}
            return record_metadata(made[0])

        sink = ObjectSink(
            self.store, keys.original, self.part_uploads, meta, tracker=lease, describe=describe
        )
        with self._undone_on_failure(keys, sink, lease) as ingesting:
            ingested = Ingest(body.source, self.limits, sink, body.declared_size, digests).run()
            ingesting.done = True
            record = made[0] if made else new_record(ingested)
            self._commit(record, keys, lease, copied=sink.described)
        return record

    @contextmanager
    def _undone_on_failure(
        self, keys: ObjectKeys, sink: ObjectSink, lease: UploadLease
    ) -> Iterator[_Progress]:
        """The one place a plain upload that fails is undone, whatever failed (BaseException
        too: a gunicorn timeout, Ctrl-C):
        - refused before any S3 call: the guard is lifted, nothing else exists;
        - failed while receiving: the ingest has aborted the sink (its part in flight, its
          multipart upload, an object already stored); the guard stays, so the janitor
          purges the prefix should an abort have failed;
        - failed after the body was in (a refused form field, the record copy, the commit):
          everything under the incarnation's prefix is deleted and the guard lifted
          (`_discard`)."""
        progress = _Progress()
        try:
            yield progress
        except BaseException:
            if progress.done:
                self._discard(keys, sink, lease)
            elif not sink.began:
                lease.unguard()
            raise

    def adopt(
        self,
        keys: ObjectKeys,
        ingested: Ingested,
        filename: str | None,
        profile: Profile,
        callback: str | None,
        also: Callable[[Pipeline], object],
        *,
        annotations: Annotations = NO_ANNOTATIONS,
    ) -> tuple[ImageRecord, bool]:
        """Make an original already stored under `keys` (a resumable upload's, api/tus.py)
        an image, as a plain upload commits one: under the id's lease, the record's bucket
        copy, then the record and its job in one fenced transaction, which `also` joins.
        An id that exists already: the same bytes -> (that record, False), other bytes ->
        ImageExists; the stored original is then the caller's to delete. Raises
        UploadInProgress while a plain upload holds the id. `annotations` go into a new
        record only."""
        owner, image_id = keys.owner, keys.image_id
        with self.leases.hold(owner, image_id) as lease:
            if self.records.exists(owner, image_id):
                existing = self.records.get(owner, image_id)
                if existing.blake3 != ingested.blake3 or existing.size != ingested.size:
                    raise ImageExists(f"image {image_id!r} already exists with different content")
                return existing, False
            record = replace(
                _new_record(owner, image_id, ingested, filename, profile, annotations),
                callback=callback,
                gen=keys.gen,
                vset=new_generation(),
            )
            self._commit(record, keys, lease, also)
            return record, True

    def _commit(
        self,
        record: ImageRecord,
        keys: ObjectKeys,
        lease: UploadLease,
        also: Callable[[Pipeline], object] | None = None,
        *,
        copied: bool = False,
    ) -> None:
        """The record's copy in the bucket (unless the original carries it: `copied`), then
        the record and its conversion job (and `also`) in one transaction fenced by the
        lease (core/records.py `commit`)."""
        if not copied:
            self.store.put_json(keys.record, record.to_dict())
        queue, intervals = self.queue, self.retry_intervals

        def in_transaction(pipe: Pipeline) -> None:
            enqueue_convert(queue, record, record.vset, pipe, intervals=intervals)
            if also is not None:
                also(pipe)

        self.records.commit(record, lease, in_transaction, self.fence)
        metrics.upload_accepted(record.size)
        log.info(
            "stored %s/%s (%s): %s %d bytes %sx%s",
            record.owner,
            record.id,
            keys.gen,
            record.format,
            record.size,
            record.width,
            record.height,
        )

    def _same_or_conflict(
        self,
        existing: ImageRecord,
        body: UploadBody,
        digests: Mapping[str, bytes],
        given: Annotations,
    ) -> ImageRecord:
        if body.declared_size is not None and body.declared_size != existing.size:
            raise ImageExists(f"image {existing.id!r} already exists with different content")
        ingested = Ingest(body.source, self.limits, NullSink(), body.declared_size, digests).run()
        if ingested.blake3 != existing.blake3 or ingested.size != existing.size:
            raise ImageExists(f"image {existing.id!r} already exists with different content")
        body.annotations(given)  # refused as for a new image, though the record keeps its own
        return existing

    def _discard(self, keys: ObjectKeys, sink: ObjectSink, lease: UploadLease) -> None:
        """Delete what an upload that did not commit wrote; if the store fails, leave it
        to the janitor (the incarnation's prefix is this upload's alone)."""
        sink.stored = False
        try:
            self.store.delete_prefix(keys.prefix)
            lease.unguard()
            return
        except PicstreamError as exc:
            log.warning("could not delete %s after a failed upload: %s", keys.prefix, exc)
        try:
            self.records.queue_purge(keys.prefix)
        except PicstreamError as exc:
            log.error("%s is left in the bucket (store and Redis failed): %s", keys.prefix, exc)

    def _check_envelope(self, body: UploadBody) -> None:
        """A multipart envelope far larger than the limit can only hold a too-large file."""
        length = body.request_length
        if body.declared_size is None and length and length > self.limits.max_bytes + _SLACK:
            raise TooLarge(f"the body is larger than the limit of {self.limits.max_bytes} bytes")


class _Progress:
    """How far an upload got before it failed (`Uploads._undone_on_failure`)."""

    done = False  # the whole body is in the store


def _new_record(
    owner: str,
    image_id: str,
    ingested: Ingested,
    filename: str | None,
    profile: Profile,
    annotations: Annotations,
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
        variants=planned(plan),
        alt=annotations.alt,
        metadata=annotations.metadata or {},
    )
