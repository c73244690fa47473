"""Bearer-token authentication: every endpoint but the health checks and the API description.

Keys are compared in constant time against every configured key (no early exit, so timing
tells nothing about which key or how much of it matched), and are never logged.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

import falcon

from core.errors import Forbidden, Unauthorized
from core.signing import verify

# SECURITY: exactly these paths are served without a key: the health checks and the API
# description (api/openapi.yaml, public by design: it holds no secret and no owner's data).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/v1/openapi.json"})
# What a signed link may read: an original or a variant.
SIGNABLE = re.compile(r"/v1/images/[A-Za-z0-9_-]{1,64}/(original|variants/[A-Za-z0-9_.-]{1,64})")


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
    def __init__(self, keys: KeyRing, signing_key: bytes | None = None) -> None:
        self.keys = keys
        self.signing_key = signing_key

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict[str, Any]
    ) -> None:
        # SECURITY: no resource means no route matched (falcon answers 404 itself); every
        # other request needs a valid key or signature. A `sig` parameter means signed-link
        # rules only: a bad signature is a 403, never a fallback to the Authorization header.
        if req.path in PUBLIC_PATHS or resource is None:
            return
        if req.get_param("sig") is not None:
            req.context.owner = self._signed_owner(req)
            return
        scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
        owner = self.keys.owner_of(token.strip()) if scheme.lower() == "bearer" else None
        if owner is None:
            raise Unauthorized("send Authorization: Bearer <api key>")
        req.context.owner = owner

    def _signed_owner(self, req: falcon.Request) -> str:
        """A signed link reads exactly the path it was made for, and nothing else."""
        # SECURITY: `owner` comes from the query string and is trusted only because the MAC
        # covers it; GET/HEAD of an original or variant path (SIGNABLE, full match) only.
        owner = req.get_param("owner") or ""
        ok = (
            self.signing_key is not None
            and req.method in ("GET", "HEAD")
            and SIGNABLE.fullmatch(req.path) is not None
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
        return owner
