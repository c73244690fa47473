"""Bearer-token authentication: every endpoint but the health checks.

Keys are compared in constant time against every configured key (no early exit, so timing
tells nothing about which key or how much of it matched), and are never logged.
"""

from __future__ import annotations

import hmac
from typing import Any

import falcon

from core.errors import Unauthorized

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})


class KeyRing:
    def __init__(self, pairs: tuple[tuple[str, str], ...]) -> None:
        self._pairs = [(owner, key.encode()) for owner, key in pairs]

    def owner_of(self, presented: str) -> str | None:
        candidate = presented.encode()
        found: str | None = None
        for owner, key in self._pairs:
            if hmac.compare_digest(candidate, key):
                found = owner
        return found


class AuthMiddleware:
    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: Any, params: dict[str, Any]
    ) -> None:
        if req.path in PUBLIC_PATHS or resource is None:
            return
        scheme, _, token = (req.get_header("Authorization") or "").partition(" ")
        owner = self.keys.owner_of(token.strip()) if scheme.lower() == "bearer" else None
        if owner is None:
            raise Unauthorized("send Authorization: Bearer <api key>")
        req.context.owner = owner
