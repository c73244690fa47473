"""An image's alt text and metadata: as given with an upload's query or headers, and changed
afterwards with `PATCH /v1/images/{id}` (an RFC 7396 JSON merge patch).

What is allowed (length, characters, size, JSON) is decided once, in core/models.py; the
multipart form fields are read with the body (api/body.py), tus metadata at creation
(api/tus.py). Here: the query parameters and headers of a plain upload, and the PATCH use
case with its body.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

import falcon

from api.body import read_capped
from api.gunicorn import set_read_timeout
from core.errors import BadRequest, NotFound, StorageUnavailable, TooLarge, WrongContentType
from core.mirror import mirror_record
from core.models import (
    Annotations,
    ImageRecord,
    strict_json,
    validate_alt,
    validate_metadata,
)
from core.records import Records
from core.storage import Store

log = logging.getLogger(__name__)

ALT_HEADER = "Picstream-Alt"  # percent-encoded UTF-8: header values are latin-1
METADATA_HEADER = "Picstream-Metadata"  # JSON (UTF-8)
PATCH_TYPES = ("application/merge-patch+json", "application/json")
# A merge patch can hold at most alt text (4 KB as UTF-8) and a metadata object (4 KiB), and
# its JSON some whitespace and escapes: this is plenty, and read whole without a thought.
PATCH_MAX_BYTES = 16 * 1024
EDITABLE = frozenset({"alt", "metadata"})


def upload_annotations(req: falcon.Request) -> Annotations:
    """Alt text and metadata given with an upload outside its body: `?alt=` or the
    `Picstream-Alt` header (percent-encoded UTF-8), `?metadata=` or `Picstream-Metadata`
    (JSON). Decided before the body is read: InvalidAlt/InvalidMetadata for a value that
    cannot be kept, BadRequest for one given twice or not UTF-8."""
    alt = _given(req, "alt", ALT_HEADER, _percent_decoded)
    metadata = _given(req, "metadata", METADATA_HEADER, _utf8)
    return Annotations.parse(alt, metadata)


def _given(
    req: falcon.Request, name: str, header: str, decode: Callable[[str, str], str]
) -> str | None:
    values = _query_values(req, name)
    raw = req.get_header(header)
    if len(values) + (raw is not None) > 1:
        raise BadRequest(f"{name} is given more than once: send ?{name}= or {header}, once")
    if values:
        return values[0]
    return decode(raw, header) if raw is not None else None


def _query_values(req: falcon.Request, name: str) -> list[str]:
    """Every `name=` of the query string, decoded as UTF-8 strictly (falcon replaces bytes
    that are not UTF-8 with U+FFFD, which would be stored as if the client had sent it)."""
    found: list[str] = []
    pairs = parse_qsl(req.query_string, keep_blank_values=True, errors="surrogateescape")
    for key, value in pairs:
        if key != name:
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"?{name}= is not percent-encoded UTF-8") from None
        found.append(value)
    return found


def _percent_decoded(value: str, header: str) -> str:
    # A WSGI header value is the raw bytes read as latin-1: undo that, then the percent-
    # encoding (raw UTF-8 bytes, which some clients send, come through the same way).
    try:
        return unquote_to_bytes(value.encode("latin-1")).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise BadRequest(f"{header} must be percent-encoded UTF-8") from None


def _utf8(value: str, header: str) -> str:
    try:
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise BadRequest(f"{header} must be JSON in UTF-8 (or ASCII with \\u escapes)") from None


# --- PATCH ---------------------------------------------------------------------------------


def read_patch(req: falcon.Request, read_timeout: float) -> dict[str, Any]:
    """The PATCH body: a JSON merge patch (RFC 7396; `application/merge-patch+json` or
    `application/json`) that is an object naming only `alt` and `metadata`, at most
    PATCH_MAX_BYTES. Read from `req.stream` (falcon's `get_media` reads a chunked body as
    empty). WrongContentType, TooLarge or BadRequest otherwise."""
    media_type = (req.content_type or "").partition(";")[0].strip().lower()
    if media_type not in PATCH_TYPES:
        raise WrongContentType("send the changes as application/merge-patch+json (RFC 7396)")
    length = req.content_length
    if length is not None and length > PATCH_MAX_BYTES:
        raise TooLarge(f"a merge patch may be at most {PATCH_MAX_BYTES} bytes")
    set_read_timeout(req.env, read_timeout)
    data = read_capped(req.stream.read, length if length is not None else PATCH_MAX_BYTES + 1)
    if len(data) > PATCH_MAX_BYTES:
        raise TooLarge(f"a merge patch may be at most {PATCH_MAX_BYTES} bytes")
    patch = strict_json(data, "the merge patch")
    if not isinstance(patch, dict):
        raise BadRequest('the merge patch must be a JSON object, e.g. {"alt": "A red bicycle"}')
    unknown = sorted(set(patch) - EDITABLE)
    if unknown:
        names = ", ".join(repr(name[:64]) for name in unknown[:5])
        raise BadRequest(f"only alt and metadata can be changed, not {names}")
    return patch




def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 §2: `patch` applied to `target`. An object merges member by member (null
    removes one, objects inside are merged the same way); anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


class MetadataEdits:
    """The use case of `PATCH /v1/images/{id}`: change an image's alt text and metadata.

    Order, and why Redis and the bucket copy agree after any failure:

    1. The record changes in Redis in one optimistic transaction (core/records.py `update`,
       WATCH/MULTI): the patch is applied to the record as it is at that moment, so a
       conversion writing its variants at the same time loses nothing, nor does this change
       (whichever commits second re-reads and re-applies its change). A patch that makes
       the record invalid is refused there, before anything is written. A Redis failure
       here changes nothing (at worst, with an EXEC whose answer was lost, the change took
       effect and the copy is behind: see 3).
    2. Then the bucket copy is written from what Redis holds *now* and checked against it
       again (core/mirror.py), so a copy written here is never older than Redis.
    3. When the store fails at 2, Redis has the change and the copy is behind: the answer is
       `503 storage-unavailable`, and sending the same PATCH again is safe — a merge patch
       applied twice gives what it gives once — and writes the copy. Any later writer of the
       record (a reconvert, a conversion ending) writes it too. Until then, only a
       `rebuild` after Redis lost its data would bring back the old alt text and metadata.
    """

    def __init__(self, records: Records, store: Store) -> None:
        self.records = records
        self.store = store

    def apply(self, owner: str, image_id: str, patch: dict[str, Any]) -> ImageRecord:
        """The record after `patch` (from `read_patch`): `alt` replaced (null removes it),
        `metadata` merged (RFC 7396; null clears it). NotFound for an unknown image (or
        another owner's); InvalidAlt/InvalidMetadata for a result that cannot be kept."""
        alt = validate_alt(patch["alt"]) if "alt" in patch else None

        def change(record: ImageRecord) -> ImageRecord:
            if "alt" in patch:
                record = replace(record, alt=alt)
            if "metadata" in patch:
                merged = merge_patch(record.metadata, patch["metadata"])
                record = replace(
                    record, metadata=validate_metadata({} if merged is None else merged)
                )
            return record

        record = self.records.update(owner, image_id, change)
        if record is None:
            raise NotFound(f"no image {image_id!r}")
        try:
            mirror_record(self.records, self.store, owner, image_id, record.gen)
        except StorageUnavailable as exc:
            log.warning("%s/%s: changed, bucket copy behind: %s", owner, image_id, exc.detail)
            raise StorageUnavailable(
                "the change is saved, but the store failed while its copy was written:"
                " send the same PATCH again"
            ) from exc
        return record
