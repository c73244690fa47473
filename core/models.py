"""The image record: the one wire contract shared by Redis, the bucket copy, the API and jobs.

A record is immutable; changes make a new one with `dataclasses.replace`. `to_dict` gives the
JSON form used everywhere (the API adds links on top of it, nothing else).
"""

from __future__ import annotations

import re
import secrets
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from core.errors import BadRequest

Status = Literal["processing", "ready", "failed"]
VariantStatus = Literal["pending", "ready", "failed"]

IMAGE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_FILENAME_MAX = 255

# Object metadata (x-amz-meta-*) the store keeps with an original or a variant. Stored data
# carries these names: never change one.
META_FORMAT = "picstream-format"
META_BLAKE3 = "picstream-blake3"
META_OWNER = "picstream-owner"
META_ID = "picstream-id"
META_GEN = "picstream-gen"


@dataclass(frozen=True, slots=True)
class Variant:
    """One rendition of an image (written by the worker)."""

    name: str
    status: VariantStatus = "pending"
    format: str | None = None
    width: int | None = None
    height: int | None = None
    size: int | None = None
    blake3: str | None = None
    error: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Variant:
        fields: dict[str, Any] = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class PendingSet:
    """A variant set being made by a reconvert. The record keeps serving its current set
    until this one is complete; then `variants` becomes this set in one transaction."""

    vset: str
    profile: str
    variants: tuple[Variant, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PendingSet:
        return cls(
            vset=data["vset"],
            profile=data["profile"],
            variants=tuple(Variant.from_dict(v) for v in data.get("variants", ())),
        )


@dataclass(frozen=True, slots=True)
class Placeholder:
    """What a page paints before any variant has loaded (computed by the worker from the
    decoded image): a ThumbHash and the average colour."""

    thumbhash: str  # base64 of the ThumbHash bytes (at most 25)
    color: str  # "#rrggbb"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Placeholder:
        return cls(thumbhash=str(data["thumbhash"]), color=str(data["color"]))


@dataclass(frozen=True, slots=True)
class ImageRecord:
    id: str
    owner: str
    size: int
    blake3: str
    format: str
    content_type: str
    width: int | None
    height: int | None
    orientation: int
    filename: str | None
    created_at: str
    status: Status = "processing"
    profile: str = "default"
    error: str | None = None
    variants: tuple[Variant, ...] = field(default_factory=tuple)
    # Where the final record is POSTed (an allow-listed URL from `?callback=`), if anywhere.
    callback: str | None = None
    # The incarnation: every upload of an id gets a new one, and every object key, job,
    # event stream and purge refers to it, so work for a deleted image can never touch
    # the image uploaded under the same id afterwards. "" = stored before incarnations
    # existed (the legacy key layout; `picstream-admin migrate` moves it).
    gen: str = ""
    # The variant set `variants` describes (its objects live under their own prefix).
    vset: str = ""
    # A reconversion in progress (None when there is none).
    pending: PendingSet | None = None
    # The owner's words about the image: alternative text for `<img alt>` and a small JSON
    # object of their own (set on upload, changed with PATCH).
    alt: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # Set by the worker once it has decoded the image.
    placeholder: Placeholder | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["variants"] = [asdict(v) for v in self.variants]
        if self.pending is not None:
            data["pending"]["variants"] = [asdict(v) for v in self.pending.variants]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageRecord:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["variants"] = tuple(Variant.from_dict(v) for v in data.get("variants", ()))
        pending = data.get("pending")
        fields["pending"] = PendingSet.from_dict(pending) if pending else None
        placeholder = data.get("placeholder")
        fields["placeholder"] = Placeholder.from_dict(placeholder) if placeholder else None
        fields["metadata"] = dict(data.get("metadata") or {})
        return cls(**fields)

    @property
    def keys(self) -> ObjectKeys:
        return ObjectKeys(self.owner, self.id, self.gen)


def validate_image_id(value: str) -> str:
    """A client-chosen id: `[A-Za-z0-9_-]{1,64}`, anything else is a 400."""
    if not IMAGE_ID_RE.fullmatch(value):
        raise BadRequest("image id must be 1-64 characters from A-Z, a-z, 0-9, '_' and '-'")
    return value


def _time_sortable(random_hex: int) -> str:
    ms = time.time_ns() // 1_000_000
    stamp = "".join(_CROCKFORD[(ms >> shift) & 31] for shift in range(45, -1, -5))
    return stamp + secrets.token_hex(random_hex)


def new_image_id() -> str:
    """A server-chosen id that sorts by creation time: 10 chars of milliseconds + 16 random."""
    return _time_sortable(8)


def new_generation() -> str:
    """An incarnation or variant-set id: time-sortable, never reused (10 + 8 chars)."""
    return _time_sortable(4)


GENERATION_RE = re.compile(r"[0-9a-z]{10}[0-9a-f]{8}")


def utc_now() -> str:
    """ISO 8601 UTC with millisecond precision, e.g. 2026-11-21T12:00:00.000Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clean_filename(raw: str | None) -> str | None:
    """Keep a client's file name for display only: last path segment, printable, bounded.

    The name never reaches an object key; the serving side escapes it again for headers.
    """
    # SECURITY: client input, shown back in JSON and (via api/http.py) in a header. Only the
    # last path segment survives, without non-printable characters (CR/LF, NUL, bidi
    # overrides), and never "." or "..".
    if not raw:
        return None
    name = unicodedata.normalize("NFC", raw).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if name in ("", ".", ".."):
        return None
    return name[:_FILENAME_MAX]


# Object keys. Only validated owners (settings), ids (IMAGE_ID_RE) and generated ids ever
# reach these. Layout, one prefix per incarnation and one per variant set inside it:
#     {owner}/{id}/{gen}/original
#     {owner}/{id}/{gen}/record.json       the bucket copy of the record (rebuild reads it)
#     {owner}/{id}/{gen}/{vset}/{name}     the variants of one set
# Records from before incarnations (gen "") keep the flat legacy layout, read in place:
#     {owner}/{id}/original, {owner}/{id}/record.json, {owner}/{id}/{name}
@dataclass(frozen=True, slots=True)
class ObjectKeys:
    owner: str
    image_id: str
    gen: str

    @property
    def legacy(self) -> bool:
        return self.gen == ""

    @property
    def prefix(self) -> str:
        """Everything of this incarnation (for the legacy layout: only the objects directly
        under it, see `legacy`)."""
        base = f"{self.owner}/{self.image_id}/"
        return base if self.legacy else f"{base}{self.gen}/"

    @property
    def original(self) -> str:
        return f"{self.prefix}original"

    @property
    def record(self) -> str:
        return f"{self.prefix}record.json"

    def variant(self, vset: str, name: str) -> str:
        return f"{self.prefix}{name}" if self.legacy else f"{self.vset_prefix(vset)}{name}"

    def vset_prefix(self, vset: str) -> str:
        if self.legacy or not vset:
            raise ValueError("a legacy record has no variant-set prefix")
        return f"{self.prefix}{vset}/"
