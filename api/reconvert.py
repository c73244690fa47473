"""The reconvert use case: convert an image again, e.g. after its profile changed.

The record goes back to `processing` with the (new) profile's variants `pending`, its
status event is appended and the job is queued on the bulk queue, all in one MULTI/EXEC.
Workers drain the upload queue first, so bulk reconversion never delays fresh uploads.
"""

from __future__ import annotations

from dataclasses import replace

from redis.client import Pipeline

from api.uploads import Services
from core import events
from core.errors import NotFound
from core.jobs import enqueue_convert
from core.models import ImageRecord, Variant, record_key


def reconvert(s: Services, owner: str, image_id: str, profile_name: str | None) -> ImageRecord:
    """Reset and queue. `profile_name` None keeps the image's profile. BadRequest for an
    unknown profile (checked before anything changes), NotFound for an unknown image."""
    chosen = s.settings.profiles.require(profile_name) if profile_name is not None else None

    def reset(record: ImageRecord) -> ImageRecord:
        profile = chosen or s.settings.profiles.require(record.profile)
        plan = profile.plan(record.width, record.height, alpha=None)
        return replace(
            record,
            status="processing",
            error=None,
            profile=profile.name,
            variants=tuple(Variant(spec.name) for spec in plan),
        )

    def queue_it(pipe: Pipeline, record: ImageRecord) -> None:
        enqueue_convert(s.bulk_queue, owner, image_id, pipe, s.settings.retry_intervals)
        events.append(pipe, owner, image_id, events.status_event(record))

    record = s.records.update(owner, image_id, reset, queue_it)
    if record is None:
        raise NotFound(f"no image {image_id!r}")
    s.store.put_json(record_key(owner, image_id), record.to_dict())
    return record
