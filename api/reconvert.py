"""The reconvert use case: convert an image again, e.g. after its profile changed.

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

from redis.client import Pipeline

from api.uploads import Services
from core import events
from core.errors import Conflict, NotFound, StorageUnavailable
from core.jobs import enqueue_convert
from core.models import ImageRecord, PendingSet, Variant, new_generation
from core.records import Purge

log = logging.getLogger(__name__)


def reconvert(s: Services, owner: str, image_id: str, profile_name: str | None) -> ImageRecord:
    """Start a new variant set and queue it. `profile_name` None keeps the image's
    profile. BadRequest for an unknown profile (checked before anything changes), NotFound
    for an unknown image, Conflict for a record in the legacy layout (migrate it first)."""
    chosen = s.settings.profiles.require(profile_name) if profile_name is not None else None
    vset = new_generation()
    replaced: list[PendingSet] = []

    def reset(record: ImageRecord) -> ImageRecord:
        if record.keys.legacy:
            raise Conflict(
                f"image {image_id!r} is stored in the pre-1.0 layout: run"
                " `picstream-admin migrate` before reconverting it"
            )
        profile = chosen or s.settings.profiles.require(record.profile)
        plan = profile.plan(record.width, record.height, alpha=None)
        replaced[:] = [record.pending] if record.pending else []
        pending = PendingSet(vset, profile.name, tuple(Variant(spec.name) for spec in plan))
        return replace(record, status="processing", error=None, pending=pending)

    def queue_it(pipe: Pipeline, record: ImageRecord) -> None:
        enqueue_convert(s.bulk_queue, record, vset, pipe, intervals=s.settings.retry_intervals)
        events.append(pipe, record, events.status_event(record))
        for old in replaced:  # never served: delete now and once more after its job's timeout
            until = time.time() + s.settings.job_timeout + 60
            purge = Purge(record.keys.vset_prefix(old.vset), until)
            s.records.schedule_purge(purge, time.time(), pipe)

    record = s.records.update(owner, image_id, reset, queue_it)
    if record is None:
        raise NotFound(f"no image {image_id!r}")
    try:
        s.store.put_json(record.keys.record, record.to_dict())
    except StorageUnavailable as exc:
        # Accepted and queued already; the job brings the bucket copy up to date when it
        # ends, and `rebuild` drops a pending set anyway.
        log.warning("reconvert of %s/%s: bucket copy not written: %s", owner, image_id, exc)
    return record
