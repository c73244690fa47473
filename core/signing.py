"""Signed links: URLs that work without an API key until they expire.

    /v1/images/{id}/variants/w1024.webp?owner=alice&expires=1764000000&sig=<hex>

`sig` is HMAC-SHA256 over the method class (GET and HEAD share one), the path, the owner and
the expiry, keyed by `PICSTREAM_SIGNING_KEY`. Verification is constant-time; an expired or
tampered link is refused. Nothing but a read of that one path is authorised.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode


def _mac(key: bytes, path: str, owner: str, expires: int) -> str:
    # SECURITY: the fields are joined with newlines, which neither the path (api/auth.py
    # verifies only SIGNABLE paths) nor `expires` (ASCII digits) can hold, so no two
    # (path, owner, expires) share a message: a MAC cannot be moved to another path or owner.
    message = f"GET\n{path}\n{owner}\n{expires}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(key: bytes, path: str, owner: str, ttl: int, now: float | None = None) -> str:
    """The query string that makes `path` readable by anyone for `ttl` seconds."""
    expires = int((now or time.time()) + ttl)
    return urlencode({"owner": owner, "expires": expires, "sig": _mac(key, path, owner, expires)})


def verify(
    key: bytes, path: str, owner: str, expires: str, sig: str, now: float | None = None
) -> bool:
    """True when the signature is ours and the link has not expired."""
    # SECURITY: every part comes from an unauthenticated query string. Compare bytes, in
    # constant time (compare_digest raises TypeError on non-ASCII text); `expires` must be
    # plain ASCII digits (int() also takes "١٢", "+5", " 5", "1_0").
    if not (expires.isascii() and expires.isdigit()) or len(expires) > 12:
        return False
    when = int(expires)
    good = hmac.compare_digest(
        _mac(key, path, owner, when).encode(), sig.lower().encode("utf-8", "surrogateescape")
    )
    return good and when >= (now or time.time())
