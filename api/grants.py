"""What an upload token allows an upload request: the HTTP side of core/tokens.py.

api/auth.py verifies a token (signature and expiry, no Redis) and sets
`req.context.grant` to its `UploadGrant` (None for an API-key request) and
`req.context.owner` to the grant's owner. An upload endpoint then, in this order:

1. `resolve(grant, image_id=..., profile=..., callback=...)` with what the request names
   (None for what it leaves out): the values to upload with. What the token fixes applies
   when the request names nothing, and a request naming something else is a
   `TokenNotAllowed` (403). No I/O, so call it before anything costs.
2. `with spend(tokens, grant):` around the upload, from before its first byte is read to its
   commit: takes one use of the token (TokenRevoked / TokenUsedUp / InvalidToken, 401),
   and gives it back if the block raises (any failure before the commit). A process that
   dies inside the block keeps the use (fail closed). `grant=None` spends nothing.
3. `narrowed(limits, grant)` for the ingest `Limits`: the token's `max_bytes` and
   `formats` within the deployment's (413 / 415 from the ingest loop, the format decided
   from the head before any S3 call).

A request that continues an upload already paid for (a tus PATCH) does not spend again;
it checks `tokens.is_revoked(grant)` if a revocation must stop it midway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from core.errors import TokenNotAllowed
from core.ingest import Limits
from core.tokens import UploadGrant, UploadTokens


@dataclass(frozen=True, slots=True)
class Resolved:
    """What an upload uses: the image id (None: a server-chosen one), the profile name (None:
    the default profile) and the callback URL (None: none)."""

    image_id: str | None
    profile: str | None
    callback: str | None


def resolve(
    grant: UploadGrant | None,
    *,
    image_id: str | None,
    profile: str | None,
    callback: str | None,
) -> Resolved:
    """The request's values, with what the token fixes filled in; TokenNotAllowed when the
    request asks for another id, profile or callback than the token fixes."""
    if grant is None:
        return Resolved(image_id, profile, callback)
    return Resolved(
        _fixed("image id", grant.image_id, image_id, shown=True),
        _fixed("profile", grant.profile, profile, shown=True),
        _fixed("callback", grant.callback, callback, shown=False),
    )


def _fixed(what: str, fixed: str | None, asked: str | None, *, shown: bool) -> str | None:
    if fixed is None or asked is None or asked == fixed:
        return asked if fixed is None else fixed
    # Never the request's value; the token's id or profile only (a URL may carry a secret).
    if shown:
        raise TokenNotAllowed(f"this upload token is for {what} {fixed!r} only")
    raise TokenNotAllowed(f"this upload token fixes its {what}: send none, or the same")


def narrowed(limits: Limits, grant: UploadGrant | None) -> Limits:
    """`limits` within what the token allows: the smaller size, the common formats."""
    if grant is None:
        return limits
    return replace(
        limits,
        max_bytes=min(limits.max_bytes, grant.max_bytes),
        allowed_formats=limits.allowed_formats & grant.formats,
    )


@contextmanager
def spend(tokens: UploadTokens, grant: UploadGrant | None) -> Iterator[None]:
    """One use of the token for the block; given back if the block raises."""
    if grant is None:
        yield
        return
    tokens.consume(grant)
    try:
        yield
    except BaseException:
        # BaseException too: a client gone or a worker timeout did not use the upload.
        tokens.refund(grant)
        raise
