"""Upload tokens over HTTP: `POST /v1/upload-tokens` mints one (API key only), `DELETE
/v1/upload-tokens/{jti}` revokes one. core/tokens.py has the token and its state; api/auth.py
accepts tokens on upload endpoints; api/grants.py applies them to an upload."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import falcon

from api.body import read_capped
from api.gunicorn import set_read_timeout
from core.errors import BadRequest, WrongContentType
from core.models import validate_image_id
from core.profiles import Profiles
from core.settings import Settings
from core.tokens import UploadGrant, UploadTokens
from core.webhooks import check_url

# The request body names a few limits: anything longer is not one.
MAX_BODY = 16 * 1024
MAX_CALLBACK = 2048
FIELDS = ("expires_in", "max_bytes", "formats", "profile", "id", "uploads", "callback")
NOT_ENABLED = "upload tokens are not enabled here (PICSTREAM_SIGNING_KEY is not set)"


@dataclass(frozen=True, slots=True)
class TokenRules:
    """What a mint request may ask for, and what it gets when it asks for nothing: the
    deployment's settings (PICSTREAM_TOKEN_*, the upload limits, profiles, webhook hosts)."""

    ttl: int
    max_ttl: int
    uploads: int
    max_uploads: int
    max_bytes: int
    formats: frozenset[str]
    profiles: Profiles
    webhook_hosts: frozenset[str]

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenRules:
        return cls(
            ttl=settings.token_ttl,
            max_ttl=settings.token_max_ttl,
            uploads=settings.token_uploads,
            max_uploads=settings.token_max_uploads,
            max_bytes=settings.max_upload_bytes,
            formats=settings.allowed_formats,
            profiles=settings.profiles,
            webhook_hosts=settings.webhook_hosts,
        )

    def mint(
        self, tokens: UploadTokens, owner: str, asked: Mapping[str, object]
    ) -> tuple[str, UploadGrant]:
        """A token for `owner` within these rules; BadRequest naming the first bad field."""
        unknown = sorted(set(asked) - set(FIELDS))
        if unknown:
            raise BadRequest(f"unknown field {unknown[0][:40]!r} (fields: {', '.join(FIELDS)})")
        return tokens.mint(
            owner,
            ttl=_integer(asked, "expires_in", self.ttl, self.max_ttl),
            uploads=_integer(asked, "uploads", self.uploads, self.max_uploads),
            max_bytes=_integer(asked, "max_bytes", self.max_bytes, self.max_bytes),
            formats=self._formats(asked.get("formats")),
            profile=self._profile(asked.get("profile")),
            image_id=_text(asked, "id", validate_image_id),
            callback=_text(asked, "callback", self._callback),
        )

    def _formats(self, value: object) -> frozenset[str]:
        if value is None:
            return self.formats
        accepted = ", ".join(sorted(self.formats))
        if not isinstance(value, list) or not value or not all(isinstance(f, str) for f in value):
            raise BadRequest(f"formats must be a non-empty list of format names ({accepted})")
        for name in value:
            if name not in self.formats:
                raise BadRequest(f"formats: {name[:40]!r} is not accepted here ({accepted} are)")
        return frozenset(value)

    def _profile(self, value: object) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadRequest("profile must be a profile name")
        return self.profiles.require(value).name

    def _callback(self, url: str) -> str:
        if len(url) > MAX_CALLBACK:
            raise BadRequest(f"callback must be at most {MAX_CALLBACK} characters")
        return check_url(url, self.webhook_hosts)


def _integer(asked: Mapping[str, object], name: str, default: int, high: int) -> int:
    value = asked.get(name)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise BadRequest(f"{name} must be an integer from 1 to {high}")
    return value


def _text(asked: Mapping[str, object], name: str, check: Callable[[str], str]) -> str | None:
    value = asked.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    return check(value)


def grant_json(token: str, grant: UploadGrant) -> dict[str, Any]:
    """The mint answer: the token and the limits it carries, as they will apply."""
    return {
        "token": token,
        "jti": grant.jti,
        "expires_at": grant.expires_at,
        "max_bytes": grant.max_bytes,
        "formats": sorted(grant.formats),
        "profile": grant.profile,
        "id": grant.image_id,
        "uploads": grant.uploads,
        "callback": grant.callback,
    }


class MintedTokens:
    """/v1/upload-tokens"""

    def __init__(self, tokens: UploadTokens, rules: TokenRules, *, read_timeout: float) -> None:
        self.tokens = tokens
        self.rules = rules
        self.read_timeout = read_timeout

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self.tokens.enabled:
            raise BadRequest(NOT_ENABLED)
        asked = read_json_object(req, self.read_timeout)
        token, grant = self.rules.mint(self.tokens, req.context.owner, asked)
        resp.status = falcon.HTTP_201
        resp.cache_control = ["no-store"]  # the answer is a credential
        resp.media = grant_json(token, grant)


class MintedToken:
    """/v1/upload-tokens/{jti}"""

    def __init__(self, tokens: UploadTokens) -> None:
        self.tokens = tokens

    def on_delete(self, req: falcon.Request, resp: falcon.Response, jti: str) -> None:
        self.tokens.revoke(req.context.owner, jti)
        resp.status = falcon.HTTP_204


def read_json_object(req: falcon.Request, read_timeout: float) -> dict[str, object]:
    """The request's JSON object body; {} without a body. Read from `req.stream` (falcon's
    `get_media` reads a chunked body as empty: limits would be silently dropped)."""
    length = req.content_length
    if not length and req.get_header("Transfer-Encoding") is None:
        return {}
    media_type = (req.content_type or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise WrongContentType("send the token's limits as application/json")
    if length is not None and length > MAX_BODY:
        raise BadRequest(f"the request body is larger than {MAX_BODY} bytes")
    set_read_timeout(req.env, read_timeout)
    data = read_capped(req.stream.read, length if length is not None else MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise BadRequest(f"the request body is larger than {MAX_BODY} bytes")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("the request body must be a JSON object")
    return value


