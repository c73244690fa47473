"""Which variant `/best` sends: the client's `Accept` header against the variants made.

RFC 9110 12.5.1 with two deliberate choices, because browsers' Accept headers say less than
they seem to:

- AVIF and WebP are sent only to a client that names them (`image/avif`, `image/webp`):
  `image/*` and `*/*` are sent by clients that cannot decode them too.
- JPEG, PNG and GIF, which every client displays, are acceptable unless refused, even to a
  client that names neither them nor a wildcard; such a default counts as the lowest
  preference (q=0.001), below anything the client named.

A format is refused by a weight of zero (`q=0`, `q=0.0`, `Q=0.000`), on its own media range
or, for JPEG/PNG/GIF, on the most specific wildcard that covers it (`image/*;q=0` refuses
them unless listed with a weight; `*/*;q=0` likewise when there is no `image/*`). A member
whose weight is not a valid qvalue (`q=2`, `q=abc`) is ignored. Among the variants of the
chosen width the client's highest weight wins; equal weights go to the smaller format
(AVIF, then WebP, then JPEG, PNG, GIF).
"""

from __future__ import annotations

import re

from core.errors import NotFound
from core.models import ImageRecord, Variant

# Best format first (smallest files for the same quality).
PREFERENCE = ("avif", "webp", "jpeg", "png", "gif")
_NAMED_ONLY = frozenset({"avif", "webp"})
_DEFAULT_WEIGHT = 0.001  # a baseline format the client neither named nor refused

# RFC 9110 12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?", re.ASCII)
_MEDIA_RANGE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+", re.ASCII)


def accepted_formats(accept: str | None) -> dict[str, float]:
    """Our output formats the client takes, each with its weight (0 < q <= 1)."""
    weights = _media_weights(accept or "")
    accepted: dict[str, float] = {}
    for fmt in PREFERENCE:
        q = weights.get(f"image/{fmt}")
        if q is None and fmt not in _NAMED_ONLY:
            q = weights.get("image/*", weights.get("*/*", _DEFAULT_WEIGHT))
        if q:
            accepted[fmt] = q
    return accepted


def best_variant(record: ImageRecord, width: int, accept: str | None) -> Variant:
    """The smallest ready variant at least `width` wide (else the widest), in the format the
    client prefers among those it accepts."""
    acceptable = accepted_formats(accept)
    ready = [v for v in record.variants if v.status == "ready" and v.format in acceptable]
    if not ready:
        raise NotFound(f"image {record.id!r} has no ready variant this client accepts")
    wide_enough = [v for v in ready if (v.width or 0) >= width]
    if wide_enough:
        target = min(v.width or 0 for v in wide_enough)
    else:
        target = max(v.width or 0 for v in ready)
    candidates = [v for v in ready if (v.width or 0) == target]
    return min(
        candidates,
        key=lambda v: (-acceptable[v.format or "png"], PREFERENCE.index(v.format or "png")),
    )


def _media_weights(accept: str) -> dict[str, float]:
    """Lower-case media range -> weight. A range listed twice keeps its lowest weight (a
    refusal is never undone by a repetition)."""
    weights: dict[str, float] = {}
    for member in _split(accept, ","):
        media, *params = _split(member, ";")
        media = media.strip().lower()
        if not _MEDIA_RANGE.fullmatch(media):
            continue
        q = _weight(params)
        if q is None:
            continue
        weights[media] = min(q, weights.get(media, q))
    return weights


def _weight(params: list[str]) -> float | None:
    """The `q` parameter's value (1 when absent), None when it is not a valid qvalue."""
    for param in params:
        name, sep, value = param.partition("=")
        if sep and name.strip().lower() == "q":
            value = value.strip()
            return float(value) if _QVALUE.fullmatch(value) else None
    return 1.0


def _split(text: str, sep: str) -> list[str]:
    """Split on `sep` outside quoted strings (a parameter value may quote a comma)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return parts
