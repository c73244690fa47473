"""RFC 9457 problem details: one table from domain errors to HTTP, one serializer.

Nothing internal leaks: unexpected exceptions become a bare 500 problem and are logged with
their traceback server-side only. Every problem names the request it answers (api/requestid.py)
as its RFC 9457 `instance` (`urn:picstream:request:<id>`) and as a `request_id` member, the
value a client quotes to an operator, who finds it in every log line of the request.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

import falcon

from api.gunicorn import body_unread, force_close
from core import errors as domain
from core.logs import current_request_id

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:picstream:problem:"
INSTANCE_PREFIX = "urn:picstream:request:"

# Domain exception -> (status, problem type slug, title): the only place that maps them to
# HTTP. The slug makes the problem `type` clients match on; never change one. Each class has
# its row; a subclass without one (added later) is answered as its nearest listed base.
TABLE: dict[type[domain.PicstreamError], tuple[int, str, str]] = {
    domain.BadRequest: (400, "bad-request", "Bad request"),
    domain.InvalidImageId: (400, "bad-request", "Bad request"),
    domain.ProfileNotFound: (400, "bad-request", "Bad request"),
    domain.InvalidWebhookUrl: (400, "bad-request", "Bad request"),
    domain.WebhookHostNotAllowed: (400, "bad-request", "Bad request"),
    domain.InvalidAlt: (400, "bad-request", "Bad request"),
    domain.InvalidMetadata: (400, "bad-request", "Bad request"),
    domain.EmptyBody: (400, "empty-body", "Empty body"),
    domain.ClientDisconnected: (400, "incomplete-body", "Incomplete request body"),
    domain.Unauthorized: (401, "unauthorized", "Missing or invalid API key"),
    domain.InvalidToken: (401, "invalid-token", "Invalid upload token"),
    domain.TokenExpired: (401, "token-expired", "Upload token expired"),
    domain.TokenUsedUp: (401, "token-used-up", "Upload token used up"),
    domain.TokenRevoked: (401, "token-revoked", "Upload token revoked"),
    domain.NotFound: (404, "not-found", "Not found"),
    domain.ClientTimeout: (408, "body-timeout", "Request body timed out"),
    domain.Conflict: (409, "conflict", "Conflict"),
    domain.ImageExists: (409, "conflict", "Conflict"),
    domain.UploadInProgress: (409, "conflict", "Conflict"),
    domain.OffsetMismatch: (409, "offset-mismatch", "Upload-Offset does not match"),
    domain.UploadExpired: (410, "upload-expired", "Upload expired"),
    domain.UploadExhausted: (410, "upload-exhausted", "Upload cannot be completed"),
    domain.TusVersionUnsupported: (412, "tus-version", "Unsupported tus version"),
    domain.WrongContentType: (415, "unsupported-media-type", "Unsupported media type"),
    domain.UploadLocked: (423, "upload-locked", "Upload locked"),
    domain.ChecksumMismatch: (460, "checksum-mismatch", "Checksum mismatch"),
    domain.TooLarge: (413, "too-large", "Upload too large"),
    domain.NotAnImage: (415, "not-an-image", "Not an image"),
    domain.UnsupportedFormat: (415, "unsupported-format", "Unsupported image format"),
    domain.CorruptImage: (422, "corrupt-image", "Corrupt image header"),
    domain.TooManyPixels: (422, "too-many-pixels", "Image dimensions above the limit"),
    domain.DigestMismatch: (422, "digest-mismatch", "Digest mismatch"),
    domain.Forbidden: (403, "forbidden", "Forbidden"),
    domain.TokenNotAllowed: (403, "token-not-allowed", "Upload token not accepted here"),
    domain.Busy: (503, "busy", "Busy"),
    domain.StorageUnavailable: (503, "storage-unavailable", "Storage unavailable"),
    domain.QueueUnavailable: (503, "queue-unavailable", "Queue unavailable"),
}


def problem(status: int, slug: str, title: str, detail: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": TYPE_PREFIX + slug, "title": title, "status": status}
    if detail:
        body["detail"] = detail
    return body


def respond_problem(resp: falcon.Response, body: dict[str, Any]) -> None:
    request_id = current_request_id()
    if request_id is not None:
        body = {**body, "instance": INSTANCE_PREFIX + request_id, "request_id": request_id}
    resp.status = falcon.code_to_http_status(body["status"])
    resp.content_type = PROBLEM_JSON
    resp.text = json.dumps(body)


def handle_domain(
    req: falcon.Request, resp: falcon.Response, ex: domain.PicstreamError, params: dict[str, Any]
) -> None:
    status, slug, title = _row(type(ex))
    if status >= 500:
        log.warning("%s %s -> %d: %s", req.method, req.path, status, ex.detail)
    respond_problem(resp, problem(status, slug, title, ex.detail))
    if isinstance(ex, domain.Busy):
        resp.set_header("Retry-After", str(ex.retry_after))
    if isinstance(ex, domain.Unauthorized):
        resp.set_header("WWW-Authenticate", 'Bearer realm="picstream"')
    _close_if_body_unread(req, resp)


def _row(cls: type[domain.PicstreamError]) -> tuple[int, str, str]:
    for base in cls.__mro__:
        row = TABLE.get(base)
        if row is not None:
            return row
    return 500, "internal", "Internal error"


def handle_unexpected(
    req: falcon.Request, resp: falcon.Response, ex: Exception, params: dict[str, Any]
) -> None:
    if isinstance(ex, falcon.HTTPError):  # falcon's own (404 route, 405...): keep them
        raise ex
    log.exception("unhandled error in %s %s", req.method, req.path)
    respond_problem(resp, problem(500, "internal", "Internal server error"))
    _close_if_body_unread(req, resp, always=True)  # where the request stands is unknown


def serialize_http_error(req: falcon.Request, resp: falcon.Response, ex: falcon.HTTPError) -> None:
    """falcon's own errors (unknown route, wrong method...) as problem+json too."""
    phrase = HTTPStatus(ex.status_code).phrase
    slug = phrase.lower().replace(" ", "-")
    respond_problem(resp, problem(ex.status_code, slug, phrase, ex.description))
    _close_if_body_unread(req, resp)


def _close_if_body_unread(req: falcon.Request, resp: falcon.Response, always: bool = False) -> None:
    """Every error answer given before the request body was read to its end closes the
    connection: the rest of the body must not be drained (a 2 GiB upload refused by its
    headers) nor parsed as the next request. Which errors those are is not listed anywhere:
    any row of the table (and falcon's own errors) can be answered before the body was read
    (`Busy`, `Unauthorized`, `TooLarge`...) or after (`Conflict`, `DigestMismatch`), so
    the body itself is asked. The header tells clients and servers that honour it;
    gunicorn ignores it and needs `force_close` (api/gunicorn.py).
    """
    if always or body_unread(req.env):
        resp.set_header("Connection", "close")
        force_close(req.env)
