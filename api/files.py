"""Downloads of an image's files: the original, one variant, the best variant for a client.

Each resource finds the owner's record (another owner's id is a 404), picks the blob the
record describes, and hands it to `Files`, which sends it by the rules of api/downloads.py
or, with `?redirect=1`, answers with a presigned URL of the store.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime

import falcon

from api.downloads import Blob, serve
from api.limits import Slots
from api.negotiation import best_variant
from api.presign import Presigner
from core.errors import NotFound
from core.models import ImageRecord, Variant, validate_image_id
from core.records import Records
from core.sniff import MIME_TYPES
from core.storage import Store


@dataclass(frozen=True, slots=True)
class Files:
    """How this process sends stored bytes: from `store`, relayed with one of `slots` (read
    ahead on `read_ahead` where splice(2) cannot be used), or redirected by `presigner`."""

    store: Store
    read_ahead: Executor
    slots: Slots
    presigner: Presigner

    def send(
        self, req: falcon.Request, resp: falcon.Response, blob: Blob, *, pinnable: bool = True
    ) -> None:
        serve(req, resp, self.store, blob, self.read_ahead, slots=self.slots, pinnable=pinnable)

    def send_or_redirect(self, req: falcon.Request, resp: falcon.Response, blob: Blob) -> None:
        """`?redirect=1`: a short-lived presigned URL on the public S3 endpoint instead."""
        if not req.get_param_as_bool("redirect", default=False):
            self.send(req, resp, blob)
            return
        url = self.presigner.url(blob.key, blob.content_type)
        resp.status = falcon.HTTP_302
        resp.location = url
        resp.set_header("Cache-Control", "no-store")


class Original:
    """/v1/images/{image_id}/original"""

    def __init__(self, records: Records, files: Files) -> None:
        self.records = records
        self.files = files

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        record = self.records.get(req.context.owner, validate_image_id(image_id))
        self.files.send_or_redirect(req, resp, original_blob(record))

    on_head = on_get


class VariantFile:
    """/v1/images/{image_id}/variants/{name}"""

    def __init__(self, records: Records, files: Files) -> None:
        self.records = records
        self.files = files

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str, name: str) -> None:
        record = self.records.get(req.context.owner, validate_image_id(image_id))
        self.files.send_or_redirect(req, resp, variant_blob(record, ready_variant(record, name)))

    on_head = on_get


class Best:
    """/v1/images/{image_id}/best?width=N"""

    def __init__(self, records: Records, files: Files) -> None:
        self.records = records
        self.files = files

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        record = self.records.get(req.context.owner, validate_image_id(image_id))
        width = req.get_param_as_int("width", min_value=1, max_value=100_000, default=1)
        variant = best_variant(record, width, req.get_header("Accept"))
        resp.set_header("Vary", "Accept")
        # The same URL names other bytes for another Accept or after a reconvert: never
        # immutable, whatever `?v=` it carries.
        self.files.send(req, resp, variant_blob(record, variant), pinnable=False)

    on_head = on_get


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


def _modified(record: ImageRecord) -> datetime:
    return record.created
