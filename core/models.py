"""The image record: the one wire contract shared by Redis, the bucket copy, the API and jobs.

A record is immutable; changes make a new one with `dataclasses.replace`. `to_dict` gives the
JSON form used everywhere (the API adds links on top of it, nothing else).
"""

from __future__ import annotations

import copy
import json
import math
import re
import secrets
import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from core.errors import BadRequest, InvalidAlt, InvalidImageId, InvalidMetadata

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
# The record as it was committed, on an upload's original (core/mirror.py `record_metadata`).
META_RECORD = "picstream-record"


class Named(Protocol):
    @property
    def name(self) -> str: ...


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


def planned(specs: Iterable[Named]) -> tuple[Variant, ...]:
    """The variants a plan (core/profiles.py `Profile.plan`) names, each still pending."""
    return tuple(Variant(spec.name) for spec in specs)


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
        # Written out rather than `dataclasses.asdict`: that deep-copies every value and
        # was a third of the web process's CPU per small upload (bench/small.py, profiled).
        data = _fields(self)
        data["variants"] = [_fields(v) for v in self.variants]
        if self.pending is not None:
            data["pending"] = {
                **_fields(self.pending),
                "variants": [_fields(v) for v in self.pending.variants],
            }
        if self.placeholder is not None:
            data["placeholder"] = _fields(self.placeholder)
        # The caller owns the result (the API adds links to it): nothing in it may be shared.
        data["metadata"] = copy.deepcopy(self.metadata) if self.metadata else {}
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

    def run_ended(self) -> bool:
        """Whether the run of the current set has ended: the image is ready or failed, or a
        reconversion is under way (which ends the image's run) and no variant of the current
        set is left to make. A set is current and unfinished only while `processing`."""
        if self.status != "processing":
            return True
        return self.pending is not None and all(v.status != "pending" for v in self.variants)

    def wants(self, gen: str, vset: str) -> bool:
        """Whether set `vset` of incarnation `gen` still needs converting: the current set
        while the image is `processing` with no reconversion under way (that replaces it),
        or the reconversion's pending set."""
        if gen != self.gen:
            return False
        if vset == self.vset:
            return self.status == "processing" and self.pending is None
        return self.pending is not None and self.pending.vset == vset

    @property
    def created(self) -> datetime:
        """`created_at` as an aware datetime (UTC)."""
        return datetime.fromisoformat(self.created_at.replace("Z", "+00:00"))


def _fields(instance: Any) -> dict[str, Any]:
    """A dataclass's fields by name, values as they are (the caller converts nested ones)."""
    return {name: getattr(instance, name) for name in instance.__dataclass_fields__}


def validate_image_id(value: str) -> str:
    """A client-chosen id: `[A-Za-z0-9_-]{1,64}`, anything else is a 400."""
    if not IMAGE_ID_RE.fullmatch(value):
        raise InvalidImageId("image id must be 1-64 characters from A-Z, a-z, 0-9, '_' and '-'")
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


# What the owner says about an image: alternative text and a small JSON object of their own.
# Both are set on upload (api/body.py, api/tus.py) or changed with PATCH (api/metadata.py),
# and checked by the functions below wherever they come from.
ALT_MAX_CHARS = 1000
METADATA_MAX_BYTES = 4096  # the object as compact UTF-8 JSON, as Redis and the bucket keep it
METADATA_MAX_DEPTH = 32  # objects and arrays inside each other
# JSON text longer than this is refused before it is parsed (whitespace may make the text of
# a valid object longer than its compact form, but not without bound).
METADATA_MAX_TEXT = 16 * 1024
# Bidi embeddings, overrides and isolates (the LRM/RLM/ALM marks stay allowed): one opened
# and never closed reorders whatever a page shows after the alt text.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Control characters (NUL, tab, CR, LF...), lone surrogates (not UTF-8), line and paragraph
# separators.
_REFUSED_IN_ALT = frozenset({"Cc", "Cs", "Zl", "Zp"})


@dataclass(frozen=True, slots=True)
class Annotations:
    """Alt text and metadata given with an upload, already validated; None = not given
    (the record then has `alt` null and `metadata` {})."""

    alt: str | None = None
    metadata: dict[str, Any] | None = None

    @classmethod
    def parse(cls, alt: str | None, metadata: str | None) -> Annotations:
        """From text as the client sent it, the metadata as JSON text. InvalidAlt or
        InvalidMetadata (400) for what `validate_alt` / `parse_metadata` refuse."""
        return cls(validate_alt(alt), None if metadata is None else parse_metadata(metadata))


NO_ANNOTATIONS = Annotations()


def validate_alt(value: object) -> str | None:
    """Alternative text as a record keeps it: None (not set), "" (a decorative image, as
    `alt=""` in HTML) or text of at most 1,000 characters. What cannot be shown safely in a
    page or a header is refused, never silently removed, so what is stored is what was sent:
    control characters (NUL, tab, CR, LF...), line and paragraph separators, lone surrogates
    and bidi embeddings, overrides and isolates."""
    # SECURITY: the text reaches pages (`<img alt>`) and JSON for other programs: no line
    # breaks or NULs to split or end what embeds it, no bidi override to disguise what follows.
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidAlt(f"alt must be a string or null, not {_json_kind(value)}")
    if len(value) > ALT_MAX_CHARS:
        raise InvalidAlt(f"alt is {len(value)} characters long; at most {ALT_MAX_CHARS} are kept")
    for ch in value:
        if ch in _BIDI_CONTROLS or unicodedata.category(ch) in _REFUSED_IN_ALT:
            raise InvalidAlt(
                f"alt contains U+{ord(ch):04X}: control characters, line breaks and bidi"
                " overrides are not allowed in alt text"
            )
    return value


def parse_metadata(text: str) -> dict[str, Any]:
    """Metadata sent as JSON text (a query parameter, a header, a form field, tus metadata):
    read with `strict_json`, then held to `validate_metadata`'s rules."""
    if len(text) > METADATA_MAX_TEXT:
        raise InvalidMetadata(
            f"metadata is {len(text)} characters of JSON; at most {METADATA_MAX_TEXT} are read"
        )
    return validate_metadata(strict_json(text, "metadata", InvalidMetadata))


def validate_metadata(value: object) -> dict[str, Any]:
    """A JSON object of the owner's own, nested values allowed (at most 32 levels deep),
    whose compact UTF-8 JSON is at most 4 KiB. Refused: anything but an object, numbers that
    are not finite (JSON has no NaN or Infinity), strings that are not UTF-8 (lone
    surrogates). Returns the value itself."""
    if not isinstance(value, dict):
        raise InvalidMetadata(f"metadata must be a JSON object, not {_json_kind(value)}")
    _check_json_tree(value)
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > METADATA_MAX_BYTES:
        raise InvalidMetadata(
            f"metadata is {size} bytes as compact JSON; at most {METADATA_MAX_BYTES} are kept"
        )
    return value


def strict_json(text: str | bytes, what: str, error: type[BadRequest] = BadRequest) -> Any:
    """Parse JSON as every reader would: NaN, Infinity and repeated keys in an object (two
    readers could keep different ones) are refused, and nesting stops at 32 levels below the
    top (so the value can be walked recursively). Raises `error` naming `what`."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise error(f"{what} repeats the key {key[:64]!r}")
            obj[key] = value
        return obj

    def constant(name: str) -> Any:
        raise error(f"{what} contains {name}, which JSON does not have")

    try:
        value = json.loads(text, object_pairs_hook=unique, parse_constant=constant)
    except RecursionError:
        raise error(f"{what} nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError, bytes that are not UTF-8, a huge integer
        raise error(f"{what} is not valid JSON: {exc}") from None
    _check_depth(value, what, error)
    return value


def _check_depth(value: Any, what: str, error: type[BadRequest]) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, dict | list):
            continue
        if depth > METADATA_MAX_DEPTH:
            raise error(f"{what} nests objects and arrays more than {METADATA_MAX_DEPTH} deep")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children)


def _check_json_tree(value: dict[str, Any]) -> None:
    """Every value is a JSON value: str keys, UTF-8 strings, finite numbers, bounded depth."""
    _check_depth(value, "metadata", InvalidMetadata)
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, str):
                    raise InvalidMetadata("metadata keys must be strings")
                _check_text(key)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str):
            _check_text(node)
        elif isinstance(node, float) and not math.isfinite(node):
            raise InvalidMetadata("metadata numbers must be finite (JSON has no NaN or Infinity)")
        elif node is not None and not isinstance(node, bool | int | float):
            raise InvalidMetadata(f"metadata can only hold JSON values, not {type(node).__name__}")


def _check_text(text: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidMetadata("metadata contains a lone surrogate (not UTF-8 text)") from None


def _json_kind(value: object) -> str:
    """How a JSON reader would name the value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# Object keys. Only validated owners (settings), ids (IMAGE_ID_RE) and generated ids ever
# reach these. Layout, one prefix per incarnation and one per variant set inside it:
#     {owner}/{id}/{gen}/original
#     {owner}/{id}/{gen}/record.json       the bucket copy of the record (rebuild reads it;
#                                          until it is written the original may carry it)
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
