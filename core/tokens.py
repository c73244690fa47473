"""Upload tokens: short-lived credentials a backend mints with its API key and hands to a
browser, which may then upload (and do nothing else) without ever seeing the key.

    pst_<base64url(claims JSON)>.<base64url(HMAC-SHA256)>

The token is self-contained: its claims (`UploadGrant`: jti, owner, expiry and the limits)
travel in it, signed, so `unseal`/`UploadTokens.verify` decide "forged" and "expired"
without Redis. What must hold across every web process lives in Redis, one hash per token:

  picstream:token:{jti}   owner, uploads (granted), left (uploads not yet used), revoked
                          expiring with the token (plus a minute for clock skew)

`consume` takes one use atomically (a Lua script: with k uses, at most k uploads start, in
any number of processes); `refund` gives it back when an upload fails before its commit;
`revoke` marks the hash, which every later `consume` refuses. A token whose hash is gone
(expired, or Redis lost its data) is refused: a lost hash must never revive a revoked or
used-up token (fail closed).

Every Redis error is translated to `QueueUnavailable` here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import redis
from redis import Redis

from core.errors import (
    BadRequest,
    InvalidToken,
    NotFound,
    TokenExpired,
    TokenRevoked,
    TokenUsedUp,
)
from core.records import redis_errors

log = logging.getLogger(__name__)

PREFIX = "pst_"
# SECURITY: domain separation from signed links (core/signing.py), which MAC
# "GET\n{path}\n{owner}\n{expires}" with the signing key itself. Tokens are MACed with a key
# derived from it for this purpose alone, over a message that starts with its own label, so
# a token MAC is never a valid link signature nor a link signature a valid token MAC.
_KEY_LABEL = b"picstream/upload-token/key/v1"
_MESSAGE_LABEL = b"picstream/upload-token/v1\n"
# A token longer than this is refused before any HMAC is computed (a header is ≤ 8 KiB).
MAX_TOKEN_LENGTH = 4096
_SHAPE = re.compile(r"pst_([A-Za-z0-9_-]{1,4000})\.([A-Za-z0-9_-]{43})")
JTI_RE = re.compile(r"[A-Za-z0-9_-]{22}")
# Redis keeps a token's state this long past its expiry: a web host whose clock runs behind
# Redis's must not find the state of a token it still deems valid already gone.
_SKEW = 60


@dataclass(frozen=True, slots=True)
class UploadGrant:
    """The verified claims of an upload token: who it uploads for, until when, and within
    which limits. `profile`, `image_id` and `callback` are None when the token leaves the
    choice to the uploader."""

    jti: str
    owner: str
    exp: int  # Unix seconds; the token is valid while now < exp
    uploads: int
    max_bytes: int
    formats: frozenset[str]
    profile: str | None = None
    image_id: str | None = None
    callback: str | None = None

    @property
    def expires_at(self) -> str:
        """`exp` as ISO 8601 UTC, e.g. 2026-11-21T12:00:00Z."""
        return datetime.fromtimestamp(self.exp, UTC).isoformat().replace("+00:00", "Z")

    def claims(self) -> dict[str, Any]:
        return {
            "jti": self.jti,
            "owner": self.owner,
            "exp": self.exp,
            "uploads": self.uploads,
            "max_bytes": self.max_bytes,
            "formats": sorted(self.formats),
            "profile": self.profile,
            "id": self.image_id,
            "callback": self.callback,
        }

    @classmethod
    def from_claims(cls, data: object) -> UploadGrant:
        """The grant these claims describe; ValueError if they are not exactly its shape."""
        if not isinstance(data, dict) or set(data) != _CLAIMS:
            raise ValueError("unexpected claims")
        formats = data["formats"]
        if not isinstance(formats, list) or not all(isinstance(f, str) for f in formats):
            raise ValueError("formats")
        return cls(
            jti=_text(data["jti"]),
            owner=_text(data["owner"]),
            exp=_count(data["exp"]),
            uploads=_count(data["uploads"]),
            max_bytes=_count(data["max_bytes"]),
            formats=frozenset(formats),
            profile=_optional(data["profile"]),
            image_id=_optional(data["id"]),
            callback=_optional(data["callback"]),
        )


_CLAIMS = frozenset(
    {"jti", "owner", "exp", "uploads", "max_bytes", "formats", "profile", "id", "callback"}
)


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("text")
    return value


def _optional(value: object) -> str | None:
    return None if value is None else _text(value)


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("count")
    return value


def token_key(signing_key: bytes) -> bytes:
    """The key that MACs tokens: derived from PICSTREAM_SIGNING_KEY for tokens alone."""
    return hmac.new(signing_key, _KEY_LABEL, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: str) -> str:
    return _b64(hmac.new(key, _MESSAGE_LABEL + payload.encode("ascii"), hashlib.sha256).digest())


def seal(key: bytes, grant: UploadGrant) -> str:
    """The token carrying `grant`, MACed with `key` (a `token_key`)."""
    claims = json.dumps(grant.claims(), separators=(",", ":"), sort_keys=True)
    payload = _b64(claims.encode("utf-8"))
    return f"{PREFIX}{payload}.{_mac(key, payload)}"


def unseal(key: bytes, token: str, now: float) -> UploadGrant:
    """The grant a token carries, if `key` MACed it and it has not expired at `now`.

    InvalidToken for anything malformed, tampered with or MACed with another key;
    TokenExpired once `now` reaches its expiry. Constant time in the MAC comparison; no I/O.
    """
    # SECURITY: the token comes from an unauthenticated header. Its shape is checked first
    # (ASCII, bounded length), the MAC compared in constant time over the exact text sent,
    # and the claims parsed only once the MAC holds. Details never echo the token.
    match = _SHAPE.fullmatch(token) if len(token) <= MAX_TOKEN_LENGTH else None
    if match is None:
        raise InvalidToken("this is not an upload token")
    payload, sig = match.groups()
    if not hmac.compare_digest(_mac(key, payload).encode(), sig.encode()):
        raise InvalidToken("this upload token is not valid here")
    try:
        grant = UploadGrant.from_claims(json.loads(_unb64(payload)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        # Our own MAC over claims we cannot read: a token of a future or past format.
        raise InvalidToken("this upload token is not valid here") from None
    if now >= grant.exp:
        raise TokenExpired(f"this upload token expired at {grant.expires_at}")
    return grant


def looks_like_token(credential: str) -> bool:
    """Whether a bearer credential is meant as an upload token (API keys are tried first)."""
    return credential.startswith(PREFIX)


def _state_key(jti: str) -> str:
    return f"picstream:token:{jti}"


# Take one use. -3: no such token for this owner (expired state, lost, forged jti);
# -2: revoked; -1: used up; else the uses left after this one.
_CONSUME = """
local h = redis.call('HMGET', KEYS[1], 'owner', 'left', 'revoked')
if not h[1] or h[1] ~= ARGV[1] then return -3 end
if h[3] then return -2 end
local left = tonumber(h[2])
if not left or left <= 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'left', -1)
"""
# Give one back, never beyond what was granted; nothing if the state is gone.
_REFUND = """
local h = redis.call('HMGET', KEYS[1], 'left', 'uploads')
if h[1] and h[2] and tonumber(h[1]) < tonumber(h[2]) then
  return redis.call('HINCRBY', KEYS[1], 'left', 1)
end
return -1
"""
# Revoke, only for the owner who minted it.
_REVOKE = """
if redis.call('HGET', KEYS[1], 'owner') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'revoked', '1')
  return 1
end
return 0
"""


class UploadTokens:
    """Minting, verifying and spending upload tokens. Without a signing key, minting is a
    BadRequest and every token is invalid. `clock` is injectable for tests."""

    def __init__(
        self,
        client: Redis,
        signing_key: bytes | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = client
        self._key = token_key(signing_key) if signing_key is not None else None
        self.clock = clock
        self._consume = client.register_script(_CONSUME)
        self._refund = client.register_script(_REFUND)
        self._revoke = client.register_script(_REVOKE)

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def mint(
        self,
        owner: str,
        *,
        ttl: int,
        uploads: int,
        max_bytes: int,
        formats: frozenset[str],
        profile: str | None = None,
        image_id: str | None = None,
        callback: str | None = None,
    ) -> tuple[str, UploadGrant]:
        """A new token for `owner` and its grant; its state is recorded in Redis first.
        The limits are taken as given: the caller (api/tokens.py) has checked them."""
        if self._key is None:
            raise BadRequest(
                "upload tokens are not enabled here (PICSTREAM_SIGNING_KEY is not set)"
            )
        grant = UploadGrant(
            jti=secrets.token_urlsafe(16),  # 128 random bits, 22 url-safe characters
            owner=owner,
            exp=int(self.clock()) + ttl,
            uploads=uploads,
            max_bytes=max_bytes,
            formats=formats,
            profile=profile,
            image_id=image_id,
            callback=callback,
        )
        key = _state_key(grant.jti)
        with redis_errors("recording the upload token"):
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(key, mapping={"owner": owner, "uploads": uploads, "left": uploads})
            pipe.expireat(key, grant.exp + _SKEW)
            pipe.execute()
        return seal(self._key, grant), grant

    def verify(self, token: str) -> UploadGrant:
        """The token's grant: InvalidToken (malformed, forged, other key) or TokenExpired.
        No Redis: revocation and uses are checked by `consume`/`is_revoked`."""
        if self._key is None:
            raise InvalidToken("upload tokens are not enabled here")
        return unseal(self._key, token, self.clock())

    def consume(self, grant: UploadGrant) -> int:
        """Take one use of the token, atomically across every process; the uses left.
        TokenRevoked, TokenUsedUp, InvalidToken (its state is gone: fail closed),
        QueueUnavailable (Redis failed: nothing taken, or taken and lost — fail closed)."""
        with redis_errors("spending an upload token"):
            left = cast(int, self._consume(keys=[_state_key(grant.jti)], args=[grant.owner]))
        if left == -3:
            raise InvalidToken("this upload token is no longer known here")
        if left == -2:
            raise TokenRevoked("this upload token was revoked")
        if left == -1:
            raise TokenUsedUp(f"every upload of this token has been used ({grant.uploads})")
        return left

    def refund(self, grant: UploadGrant) -> None:
        """Give back a use taken by `consume` for an upload that did not commit. Best
        effort: a Redis failure is logged and the use stays spent (fail closed)."""
        try:
            self._refund(keys=[_state_key(grant.jti)])
        except redis.RedisError as exc:
            log.warning("upload token %s: a use was not given back: %s", grant.jti, exc)

    def revoke(self, owner: str, jti: str) -> None:
        """Refuse every later upload with this token. NotFound unless `owner` minted it and
        it has not expired."""
        if not JTI_RE.fullmatch(jti):
            raise NotFound("no such upload token")
        with redis_errors("revoking the upload token"):
            done = self._revoke(keys=[_state_key(jti)], args=[owner])
        if not done:
            raise NotFound("no such upload token")

    def is_revoked(self, grant: UploadGrant) -> bool:
        """Whether the token may no longer be used: revoked, or its state is gone (fail
        closed). For requests that continue an upload already paid for (a tus PATCH)."""
        with redis_errors("reading the upload token"):
            owner, revoked = self.redis.hmget(_state_key(grant.jti), ["owner", "revoked"])
        ours = isinstance(owner, bytes) and owner.decode() == grant.owner
        return not ours or revoked is not None

    def left(self, grant: UploadGrant) -> int | None:
        """The uses left, or None when the token's state is gone (for tests and tooling)."""
        with redis_errors("reading the upload token"):
            value = self.redis.hget(_state_key(grant.jti), "left")
        return None if value is None else int(value)
