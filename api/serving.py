"""The read side: downloads (original, variants, best match), listing, deletion, events.

Every resource is owner-scoped through the record lookup: another owner's id is a 404.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import falcon
from redis.client import Pipeline

from api.downloads import Blob, serve
from api.events import EventStream, parse_last_event_id
from api.negotiation import best_variant
from api.uploads import Services
from api.views import Signer, record_json
from core import events
from core.errors import BadRequest, NotFound, QueueUnavailable, StorageUnavailable
from core.migrate import migration_keys
from core.models import ImageRecord, Variant, validate_image_id
from core.records import Purge
from core.signing import sign
from core.sniff import MIME_TYPES
from core.webhooks import check_url

log = logging.getLogger(__name__)


def _modified(record: ImageRecord) -> datetime:
    return datetime.fromisoformat(record.created_at.replace("Z", "+00:00"))


def _record(services: Services, req: falcon.Request, image_id: str) -> ImageRecord:
    return services.records.get(req.context.owner, validate_image_id(image_id))


def original_blob(record: ImageRecord) -> Blob:
    return Blob(
        key=record.keys.original,
        size=record.size,
        blake3=record.blake3,
        content_type=record.content_type,
        modified=_modified(record),
        filename=record.filename,
    )


def variant_blob(record: ImageRecord, variant: Variant) -> Blob:
    assert variant.format and variant.size is not None and variant.blake3
    stem = (record.filename or record.id).rsplit(".", 1)[0]
    return Blob(
        key=record.keys.variant(record.vset, variant.name),
        size=variant.size,
        blake3=variant.blake3,
        content_type=MIME_TYPES.get(variant.format, "application/octet-stream"),
        modified=_modified(record),
        filename=f"{stem}-{variant.name}",
    )


def ready_variant(record: ImageRecord, name: str) -> Variant:
    for variant in record.variants:
        if variant.name == name and variant.status == "ready":
            return variant
    raise NotFound(f"image {record.id!r} has no ready variant {name!r}")


def _maybe_redirect(
    services: Services, req: falcon.Request, resp: falcon.Response, blob: Blob
) -> bool:
    """`?redirect=1`: a short-lived presigned URL on the public S3 endpoint instead."""
    if not req.get_param_as_bool("redirect", default=False):
        return False
    url = services.presigner.url(blob.key, blob.content_type)
    resp.status = falcon.HTTP_302
    resp.location = url
    resp.set_header("Cache-Control", "no-store")
    return True


class Original:
    """/v1/images/{image_id}/original"""

    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        blob = original_blob(_record(self.s, req, image_id))
        if not _maybe_redirect(self.s, req, resp, blob):
            serve(req, resp, self.s.store, blob, self.s.download_pool, slots=self.s.download_slots)

    on_head = on_get


class VariantFile:
    """/v1/images/{image_id}/variants/{name}"""

    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str, name: str) -> None:
        record = _record(self.s, req, image_id)
        blob = variant_blob(record, ready_variant(record, name))
        if not _maybe_redirect(self.s, req, resp, blob):
            serve(req, resp, self.s.store, blob, self.s.download_pool, slots=self.s.download_slots)

    on_head = on_get


class Best:
    """/v1/images/{image_id}/best?width=N"""

    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        record = _record(self.s, req, image_id)
        width = req.get_param_as_int("width", min_value=1, max_value=100_000, default=1)
        variant = best_variant(record, width, req.get_header("Accept"))
        resp.set_header("Vary", "Accept")
        serve(
            req,
            resp,
            self.s.store,
            variant_blob(record, variant),
            self.s.download_pool,
            slots=self.s.download_slots,
        )

    on_head = on_get


def _encode_cursor(score: int, image_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score}:{image_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, _, image_id = raw.partition(":")
        return int(score), validate_image_id(image_id)
    except (binascii.Error, UnicodeDecodeError, ValueError, BadRequest):
        raise BadRequest("cursor is not one this API returned") from None


def list_page(
    services: Services, req: falcon.Request, limit: int, cursor: str | None
) -> dict[str, Any]:
    after = _decode_cursor(cursor) if cursor else None
    records, last = services.records.page(req.context.owner, limit, after)
    page: dict[str, Any] = {"images": [record_json(req, r) for r in records]}
    page["next_cursor"] = _encode_cursor(*last) if last else None
    return page


class Events:
    """/v1/images/{image_id}/events: Server-Sent Events until the image is ready/failed or
    deleted; the protocol (Last-Event-ID, 204, slots) is described in api/events.py."""

    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        resume = parse_last_event_id(req.get_header("Last-Event-ID"))
        sign = signer(self.s, req)
        try:
            record = _record(self.s, req, image_id)
            stream = EventStream(
                self.s.hub,
                events.events_key(record.owner, record.id, record.gen),
                lambda r: record_json(req, r, sign),
                self.s.settings.sse_heartbeat,
            )
            body = stream.open(lambda: _record(self.s, req, image_id), resume)
        except NotFound:
            if resume is None:
                raise
            body = None  # a reconnect after `deleted`: nothing more will come
        resp.set_header("Cache-Control", "no-store")
        if body is None:
            resp.status = falcon.HTTP_204  # what stops a browser's EventSource
            return
        resp.content_type = "text/event-stream"
        resp.set_header("X-Accel-Buffering", "no")  # tell nginx not to buffer the stream
        if isinstance(body, bytes):
            resp.data = body  # complete already: no thread held, no slot taken
            return
        self.s.stream_slots.admit()
        resp.stream = self.s.stream_slots.counted(body)


@contextmanager
def upload_slot(services: Services) -> Iterator[None]:
    """Hold one of the process's upload slots for the duration of an upload."""
    services.upload_slots.admit()
    try:
        yield
    finally:
        services.upload_slots.release()


def signer(services: Services, req: falcon.Request) -> Signer | None:
    """With `?signed=SECONDS`, a signer for links valid that long (at most a week)."""
    ttl = req.get_param_as_int("signed", min_value=1, max_value=7 * 86_400)
    if ttl is None:
        return None
    key = services.settings.signing_key
    if key is None:
        raise BadRequest("signed links are not enabled here (PICSTREAM_SIGNING_KEY is not set)")
    owner = req.context.owner
    return lambda path: sign(key, path, owner, ttl)


def delete_image(services: Services, owner: str, image_id: str) -> bool:
    """Remove the record (a conversion in flight stops writing), then every object of this
    incarnation — never anything under another incarnation of the same id. True when all
    is gone now; False when the store failed and the objects are left to the janitor (the
    image is already gone for every client).

    A purge of the incarnation is scheduled in the same transaction for after the job
    timeout: a conversion that was mid-PUT when the record went away may still write one
    variant before it notices, and that purge removes it."""
    until = time.time() + services.settings.job_timeout + 60

    def also(pipe: Pipeline, record: ImageRecord) -> None:
        events.append(pipe, record, DELETED)
        for purge in _doomed(record, until):
            services.records.schedule_purge(purge, purge.until, pipe)

    doomed = _doomed(services.records.delete(owner, image_id, also=also), until)
    try:
        for purge in doomed:
            if purge.flat:
                services.store.delete_flat(purge.prefix)
            else:
                services.store.delete_prefix(purge.prefix)
    except StorageUnavailable as exc:
        log.warning("deleting %s failed (%s); queued for the janitor", doomed[0].prefix, exc.detail)
        try:
            for purge in doomed:  # the same purges, due now (and again at their `until`)
                services.records.schedule_purge(purge, time.time())
        except QueueUnavailable as again:
            # The purges committed with the deletion still run, only later: the image is
            # gone all the same, so the answer stays 202.
            log.warning("could not bring the purge of %s forward: %s", doomed[0].prefix, again)
        return False
    return True


def _doomed(record: ImageRecord, until: float) -> list[Purge]:
    """What deleting `record` removes: its incarnation; for a legacy record (flat keys) also
    the copies an interrupted `migrate` made, which no record can name once it is gone."""
    keys = record.keys
    if not keys.legacy:
        return [Purge(keys.prefix, until)]
    return [Purge(keys.prefix, until, flat=True), Purge(migration_keys(record).prefix, until)]


DELETED = {"type": "deleted", "status": "deleted"}


def callback(services: Services, req: falcon.Request) -> str | None:
    """`?callback=URL`: checked against the webhook allow-list before the body is read."""
    url = req.get_param("callback")
    return check_url(url, services.settings.webhook_hosts) if url else None
