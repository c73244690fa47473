"""Progress events of one image, for clients that follow a conversion (SSE builds on this).

Every change of an image's or a variant's status appends one entry to the Redis stream

    picstream:events:{owner}:{id}:{gen}   XADD ... MAXLEN ~ 1000, expires a day after the last

(one stream per incarnation, so the events of a deleted image never mix with those of the
image uploaded under its id afterwards; legacy records without `gen` use the old key)

in the same MULTI/EXEC as the record change it reports, so the stream and the record never
disagree. The entry's id (`1732190400000-0`) orders events and is what a client resumes from.
Fields (all strings):

    type     "status" (the image) | "variant" (one variant) | "deleted" (the image was
             deleted: the last event of its stream; appended by the API's DELETE)
    status   image: processing | ready | failed;  variant: pending | ready | failed
    name     variant name, e.g. "w1024.webp"                        (variant events only)
    error    why it failed                                         (failed only, optional)
    record   the whole record as JSON (`ImageRecord.to_dict()`)     (status events only)

A status event is appended when a conversion starts (with the planned variants, all
pending) and when it ends (ready or failed), so the final event always carries the final
record. The same JSON object is also PUBLISHed on the channel of the same name, for
listeners that prefer pub/sub to polling the stream.
"""

from __future__ import annotations

import json

from redis.client import Pipeline

from core.models import ImageRecord, Variant
from core.records import NS

MAXLEN = 1000
TTL = 24 * 3600


def events_key(owner: str, image_id: str, gen: str) -> str:
    base = f"{NS}:events:{owner}:{image_id}"
    return f"{base}:{gen}" if gen else base


def status_event(record: ImageRecord) -> dict[str, str]:
    event = {"type": "status", "status": record.status, "record": _json(record)}
    if record.error:
        event["error"] = record.error
    return event


def variant_event(variant: Variant) -> dict[str, str]:
    event = {"type": "variant", "name": variant.name, "status": variant.status}
    if variant.error:
        event["error"] = variant.error
    return event


def append(pipe: Pipeline, record: ImageRecord, event: dict[str, str]) -> None:
    """Queue the XADD (+ expiry, + PUBLISH) on a pipeline; the caller executes it."""
    key = events_key(record.owner, record.id, record.gen)
    pipe.xadd(key, event, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
    pipe.expire(key, TTL)
    pipe.publish(key, json.dumps(event, separators=(",", ":")))


def _json(record: ImageRecord) -> str:
    return json.dumps(record.to_dict(), separators=(",", ":"))
