"""Reconverting an image (`POST /v1/images/{id}/reconvert`), e.g. after its profile changed.

A reconversion makes a new variant set beside the one being served: the record gets a
`pending` set (the profile's variants, all `pending`, under a new variant-set id), goes back
to `processing`, its status event is appended and the job is queued on the bulk queue, all
in one MULTI/EXEC. The current variants keep serving — pinned and signed links included —
until the worker has finished the new set and switches the record to it in one transaction
(worker/jobs.py). A reconvert while another is pending replaces that one: its job notices
and stops without a final event or webhook, and its objects are purged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import falcon
from redis.client import Pipeline
from rq import Queue

from api.views import record_json
from core import events
from core.errors import Conflict, NotFound, StorageUnavailable
from core.jobs import enqueue_convert
from core.models import ImageRecord, PendingSet, new_generation, planned, validate_image_id
from core.profiles import Profiles
from core.records import Purge, Records
from core.storage import Store

log = logging.getLogger(__name__)


class Reconvert:
    """/v1/images/{image_id}/reconvert: convert again (optionally `?profile=NAME`), queued
    behind fresh uploads."""

    def __init__(self, reconversion: Reconversion) -> None:
        self.reconversion = reconversion

    def on_post(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        image_id = validate_image_id(image_id)
        record = self.reconversion.reconvert(req.context.owner, image_id, req.get_param("profile"))
        resp.status = falcon.HTTP_202
        resp.location = f"/v1/images/{record.id}"
        resp.media = record_json(req, record)


class Reconversion:
    """The use case. `bulk_queue` is the queue workers drain after the uploads' one."""

    def __init__(
        self,
        records: Records,
        store: Store,
        bulk_queue: Queue,
        profiles: Profiles,
        *,
        retry_intervals: tuple[int, ...],
        job_timeout: int,
    ) -> None:
        self.records = records
        self.store = store
        self.bulk_queue = bulk_queue
        self.profiles = profiles
        self.retry_intervals = retry_intervals
        self.job_timeout = job_timeout

    def reconvert(self, owner: str, image_id: str, profile_name: str | None) -> ImageRecord:
        """Start a new variant set and queue it. `profile_name` None keeps the image's
        profile. BadRequest for an unknown profile (checked before anything changes),
        NotFound for an unknown image, Conflict for a record in the legacy layout (migrate
        it first)."""
        chosen = self.profiles.require(profile_name) if profile_name is not None else None
        vset = new_generation()
        replaced: list[PendingSet] = []

        def reset(record: ImageRecord) -> ImageRecord:
            if record.keys.legacy:
                raise Conflict(
                    f"image {image_id!r} is stored in the pre-1.0 layout: run"
                    " `picstream-admin migrate` before reconverting it"
                )
            profile = chosen or self.profiles.require(record.profile)
            plan = profile.plan(record.width, record.height, alpha=None)
            replaced[:] = [record.pending] if record.pending else []
            pending = PendingSet(vset, profile.name, planned(plan))
            return replace(record, status="processing", error=None, pending=pending)

        def queue_it(pipe: Pipeline, record: ImageRecord) -> None:
            enqueue_convert(self.bulk_queue, record, vset, pipe, intervals=self.retry_intervals)
            events.append(pipe, record, events.status_event(record))
            for old in replaced:  # never served: delete now and once more after its job's timeout
                until = time.time() + self.job_timeout + 60
                purge = Purge(record.keys.vset_prefix(old.vset), until)
                self.records.schedule_purge(purge, time.time(), pipe)

        record = self.records.update(owner, image_id, reset, queue_it)
        if record is None:
            raise NotFound(f"no image {image_id!r}")
        try:
            self.store.put_json(record.keys.record, record.to_dict())
        except StorageUnavailable as exc:
            # Accepted and queued already; the job brings the bucket copy up to date when it
            # ends, and `rebuild` drops a pending set anyway.
            log.warning("reconvert of %s/%s: bucket copy not written: %s", owner, image_id, exc)
        return record
