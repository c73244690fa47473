"""Flat domain exceptions.

Every failure a caller can act on is one of these, named for what went wrong in the
domain, never for an HTTP status. Provider errors (minio, redis) are translated where they
are caught, so nothing above the storage/queue layer ever sees them. The API maps each class
to an HTTP status and a problem type in one table (api/errors.py), and nowhere else.

A few are kinds of `BadRequest` (an unknown profile, a webhook URL that may not be called):
code that only needs "the request asked for something impossible" catches the base class,
and clients see the same problem type as before they had names of their own.
"""

from __future__ import annotations


class PicstreamError(Exception):
    """Base of every domain error. `detail` is safe to show to the client."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(PicstreamError):
    """The request itself is malformed (bad id, bad header, malformed multipart body)."""


class InvalidImageId(BadRequest):
    """An image id outside `[A-Za-z0-9_-]{1,64}` (path, tus metadata, token)."""


class ProfileNotFound(BadRequest):
    """No conversion profile has this name (`?profile=`, or a record's profile that was
    removed from the profiles file)."""


class InvalidWebhookUrl(BadRequest):
    """A webhook URL that can never be called: not an absolute http(s) URL, carrying
    credentials, or with a host or port that cannot be read."""


class WebhookHostNotAllowed(BadRequest):
    """A webhook URL whose host is not on the allow-list (PICSTREAM_WEBHOOK_HOSTS)."""


class InvalidAlt(BadRequest):
    """Alternative text that cannot be kept: not a string, too long, or carrying control
    characters or bidi overrides (core/models.py `validate_alt`)."""


class InvalidMetadata(BadRequest):
    """An image's metadata that cannot be kept: not a JSON object, malformed JSON, too large
    or too deep, non-finite numbers (core/models.py `validate_metadata`)."""


class EmptyBody(PicstreamError):
    """The upload carried no bytes."""


class NotAnImage(PicstreamError):
    """The bytes start with no image signature we know."""


class UnsupportedFormat(PicstreamError):
    """A known image format that this deployment does not accept (workers cannot decode it)."""


class CorruptImage(PicstreamError):
    """The format is known but its header is invalid (bad checksum, zero or absurd size...)."""


class TooLarge(PicstreamError):
    """Declared or counted body size above the configured limit."""


class TooManyPixels(PicstreamError):
    """Dimensions above the configured pixel limit (decompression-bomb guard)."""


class DigestMismatch(PicstreamError):
    """The client-supplied digest does not match the bytes received."""


class ClientTimeout(PicstreamError):
    """The client stalled mid-body longer than the read timeout."""


class ClientDisconnected(PicstreamError):
    """The body ended before the declared length (the client went away)."""


class Unauthorized(PicstreamError):
    """Missing or wrong API key."""


class InvalidToken(Unauthorized):
    """An upload token that is malformed, forged or signed with another key."""


class TokenExpired(Unauthorized):
    """An upload token past its `expires_at`."""


class TokenUsedUp(Unauthorized):
    """An upload token whose every upload has been used."""


class TokenRevoked(Unauthorized):
    """An upload token revoked by its owner (DELETE /v1/upload-tokens/{jti})."""


class NotFound(PicstreamError):
    """No such image for this owner (also what another owner's image looks like)."""


class Conflict(PicstreamError):
    """A different image already exists under this id."""


class ImageExists(Conflict):
    """An image with other bytes already exists under this id."""


class UploadInProgress(Conflict):
    """Another upload of this image id holds its lease right now."""


class OffsetMismatch(Conflict):
    """A tus PATCH whose Upload-Offset is not where the upload stands."""


class UploadLocked(PicstreamError):
    """Another request is writing to this resumable upload right now."""


class UploadExpired(PicstreamError):
    """A resumable upload that passed its Upload-Expires (or was terminated)."""


class UploadExhausted(PicstreamError):
    """A resumable upload that used up S3's 10,000 part numbers (too many of its PATCHes
    were cut or refused): it can never be completed, so it is ended."""


class ChecksumMismatch(PicstreamError):
    """A tus PATCH whose Upload-Checksum does not match its body; nothing of it was kept."""


class WrongContentType(PicstreamError):
    """A request body of a media type this endpoint does not take."""


class TusVersionUnsupported(PicstreamError):
    """A tus request speaking a protocol version other than 1.0.0."""


class StorageUnavailable(PicstreamError):
    """The S3 store failed or could not be reached."""


class QueueUnavailable(PicstreamError):
    """Redis failed or could not be reached."""


class Busy(PicstreamError):
    """This process is at its limit for this kind of request; try again shortly."""

    def __init__(self, detail: str, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Forbidden(PicstreamError):
    """A signed link that is expired, tampered with, or used for something else."""


class TokenNotAllowed(Forbidden):
    """A valid upload token used where only an API key will do (reads, deletes, minting)."""
