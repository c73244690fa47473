"""Progress events of one image: the one description of what an event holds.

Every change of an image's or a variant's status appends one entry to the Redis stream

    picstream:events:{owner}:{id}:{gen}   XADD ... MAXLEN ~ 1000, expires a day after the last

(one stream per incarnation, so the events of a deleted image never mix with those of the
image uploaded under its id afterwards; legacy records without `gen` use the old key)

in the same MULTI/EXEC as the record change it reports, so the stream and the record never
disagree. The entry's id (`1732190400000-0`) orders events and is what a client resumes from.
An entry is an `Event`; its fields (all strings in Redis) are

    type     "status" (the image) | "variant" (one variant) | "deleted" (the image was
             deleted: the last event of its stream; appended by the API's DELETE)
    name     variant name, e.g. "w1024.webp"                        (variant events only)
    status   image: processing | ready | failed;  variant: pending | ready | failed;
             deleted: "deleted"
    record   the whole record as JSON (`ImageRecord.to_dict()`)     (status events only)
    error    why it failed                                         (failed only, optional)

A status event is appended when a conversion starts (with the planned variants, all
pending) and when it ends (ready or failed), so the final event always carries the final
record. The same fields, as one JSON object, are also PUBLISHed on the channel of the same
name, for listeners that prefer pub/sub to polling the stream.

Over Server-Sent Events (api/events.py frames them) each entry is one message: `id:` the
entry id, `event:` its `type`, `data:` the JSON object `Event.data` makes of the other fields,
with `record` as `GET /v1/images/{id}` shows it (the record with its links). A stream ends
with its final event (`Event.final`): a status `ready`/`failed`, or `deleted`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from redis.client import Pipeline

from core.models import ImageRecord, Variant
from core.records import NS

MAXLEN = 1000
TTL = 24 * 3600

# The values of `type`, which are also the SSE event names.
STATUS: Final = "status"
VARIANT: Final = "variant"
DELETED: Final = "deleted"
# The image statuses after which nothing more is appended (until a reconvert).
FINAL: Final = ("ready", "failed")


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of an image's event stream (fields as described above)."""

    type: str
    status: str
    name: str | None = None
    record: ImageRecord | None = None
    error: str | None = None

    @property
    def final(self) -> bool:
        """The last event of its stream: the conversion ended, or the image was deleted."""
        return self.type == DELETED or (self.type == STATUS and self.status in FINAL)

    def fields(self) -> dict[str, str]:
        """The stream entry (and the published JSON object)."""
        fields = {"type": self.type}
        if self.name is not None:
            fields["name"] = self.name
        fields["status"] = self.status
        if self.record is not None:
            fields["record"] = json.dumps(self.record.to_dict(), separators=(",", ":"))
        if self.error:
            fields["error"] = self.error
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Event:
        """An entry read back from the stream."""
        record = fields.get("record")
        return cls(
            type=fields.get("type", STATUS),
            status=fields.get("status", ""),
            name=fields.get("name"),
            record=ImageRecord.from_dict(json.loads(record)) if record is not None else None,
            error=fields.get("error"),
        )

    def data(self, view: Callable[[ImageRecord], dict[str, Any]]) -> dict[str, Any]:
        """The SSE `data` of this event: every field but `type`, the record as `view` shows
        it."""
        data: dict[str, Any] = {} if self.name is None else {"name": self.name}
        data["status"] = self.status
        if self.record is not None:
            data["record"] = view(self.record)
        if self.error:
            data["error"] = self.error
        return data


def events_key(owner: str, image_id: str, gen: str) -> str:
    base = f"{NS}:events:{owner}:{image_id}"
    return f"{base}:{gen}" if gen else base


def status_event(record: ImageRecord) -> Event:
    return Event(STATUS, record.status, record=record, error=record.error)


def variant_event(variant: Variant) -> Event:
    return Event(VARIANT, variant.status, name=variant.name, error=variant.error)


def deleted_event() -> Event:
    return Event(DELETED, "deleted")


def append(pipe: Pipeline, record: ImageRecord, event: Event) -> None:
    """Queue the XADD (+ expiry, + PUBLISH) on a pipeline; the caller executes it."""
    key = events_key(record.owner, record.id, record.gen)
    fields = event.fields()
    pipe.xadd(key, fields, maxlen=MAXLEN, approximate=True)  # type: ignore[arg-type]
    pipe.expire(key, TTL)
    pipe.publish(key, json.dumps(fields, separators=(",", ":")))
