"""Bearer-token authentication: every endpoint but the health checks and the API description.

Keys are compared in constant time against every configured key (no early exit, so timing
tells nothing about which key or how much of it matched), and are never logged. Upload tokens
(core/tokens.py) are tried after the keys, and only upload endpoints take them.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

import falcon

from api.console import PATHS as CONSOLE_PATHS
from core.errors import Forbidden, InvalidToken, TokenNotAllowed, Unauthorized
from core.signing import verify
from core.tokens import UploadGrant, UploadTokens, looks_like_token

# SECURITY: exactly these paths are served without a key: the health checks, the API
# description (api/openapi.yaml) and the web console's static files (api/console.py `PATHS`:
# `/` and a fixed list under `/console/`), all public by design: they hold no secret and no
# owner's data (the console's page asks its user for a key and sends it with each API call).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v1/openapi.json"}) | CONSOLE_PATHS
# What a signed link may read: an original, a variant, the best variant for the client
# (`?width=` stays free: the path alone is signed) or the events (a browser's EventSource
# cannot send an Authorization header, and reconnects to the same URL with Last-Event-ID).
SIGNABLE = re.compile(
    r"/v1/images/[A-Za-z0-9_-]{1,64}/(original|variants/[A-Za-z0-9_.-]{1,64}|best|events)"
)


class KeyRing:
    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self._pairs = [(owner, key.encode()) for owner, key in pairs]

    def owner_of(self, presented: str) -> str | None:
        # SECURITY: every key is compared, each in constant time, with no early exit: the
        # time taken tells nothing about which key matched or how much of one.
        candidate = presented.encode()
        found: str | None = None
        for owner, key in self._pairs:
            if hmac.compare_digest(candidate, key):
                found = owner
        return found


class AuthMiddleware:
    """Sets `req.context.owner`, and `req.context.grant`: the verified `UploadGrant` of an
    upload token, None for an API key or a signed link.

    Upload tokens (core/tokens.py) are taken only where a resource lists the method in its
    `upload_methods` attribute (and for OPTIONS there: nginx's `Expect: 100-continue` check
    sends one, and it reads nothing); a valid token anywhere else is a 403."""

    def __init__(
        self, keys: KeyRing, signing_key: bytes | None = None, tokens: UploadTokens | None = None
    ) -> None:
        self.keys = keys
        self.signing_key = signing_key
        self.tokens = tokens

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict[str, Any]
    ) -> None:
        # SECURITY: no resource means no route matched (falcon answers 404 itself); every
        # other request needs a valid key or signature. A `sig` parameter means signed-link
        # rules only: a bad signature is a 403, never a fallback to the Authorization header.
        req.context.grant = None
        if req.path in PUBLIC_PATHS or resource is None:
            return
        if req.get_param("sig") is not None:
            req.context.owner = self._signed_owner(req)
            return
        scheme, _, presented = (req.get_header("Authorization") or "").partition(" ")
        credential = presented.strip() if scheme.lower() == "bearer" else None
        owner = self.keys.owner_of(credential) if credential is not None else None
        if owner is None and credential is not None and looks_like_token(credential):
            req.context.grant = self._grant(req, resource, credential)
            owner = req.context.grant.owner
        if owner is None:
            raise Unauthorized("send Authorization: Bearer <api key>")
        req.context.owner = owner

    def _grant(self, req: falcon.Request, resource: Any, token: str) -> UploadGrant:
        """An upload token's grant, for a method of `resource` that takes one."""
        # SECURITY: keys were tried first (constant time, every key). The token's MAC and
        # expiry are checked before anything else is said about it (401); a valid token is
        # then good for its resource's upload methods only (403). Uses and revocation are
        # checked when an upload starts (api/grants.py `spend`), in Redis.
        if self.tokens is None:
            raise InvalidToken("upload tokens are not enabled here")
        grant = self.tokens.verify(token)
        methods: frozenset[str] = getattr(resource, "upload_methods", frozenset())
        if req.method not in methods and not (methods and req.method == "OPTIONS"):
            raise TokenNotAllowed("an upload token can only upload; this request needs the API key")
        return grant

    def _signed_owner(self, req: falcon.Request) -> str:
        """A signed link reads exactly the path it was made for, and nothing else."""
        # SECURITY: `owner` comes from the query string and is trusted only because the MAC
        # covers it; GET/HEAD of a SIGNABLE path (full match) only. A signed link never mints
        # links (`?signed=` on its events would sign the image's files for a week, outliving
        # it): those come from a request with the key.
        owner = req.get_param("owner") or ""
        ok = (
            self.signing_key is not None
            and req.method in ("GET", "HEAD")
            and SIGNABLE.fullmatch(req.path) is not None
            and req.get_param("signed") is None
            and verify(
                self.signing_key,
                req.path,
                owner,
                req.get_param("expires") or "",
                req.get_param("sig") or "",
            )
        )
        if not ok:
            raise Forbidden("this signed link is expired or not valid for this request")
        # Downloads read it (api/downloads.py): a signed answer may go to shared caches.
        req.context.signed = True
        return owner
