"""Listing an owner's images, newest first, a page at a time (`GET /v1/images`).

The cursor a client gets is opaque: the (creation ms, id) of the last image of its page,
base64url-encoded. A cursor this API did not return is a 400.
"""

from __future__ import annotations

import base64
import binascii

from core.errors import BadRequest
from core.models import ImageRecord, validate_image_id
from core.records import Records


class Listing:
    def __init__(self, records: Records) -> None:
        self.records = records

    def page(
        self, owner: str, limit: int, cursor: str | None
    ) -> tuple[list[ImageRecord], str | None]:
        """Up to `limit` of the owner's records after `cursor`, and the cursor of the next
        page (None on the last)."""
        after = _decode_cursor(cursor) if cursor else None
        records, last = self.records.page(owner, limit, after)
        return records, (_encode_cursor(*last) if last else None)


def _encode_cursor(score: int, image_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score}:{image_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, _, image_id = raw.partition(":")
        return int(score), validate_image_id(image_id)
    except (binascii.Error, UnicodeDecodeError, ValueError, BadRequest):
        raise BadRequest("cursor is not one this API returned") from None
