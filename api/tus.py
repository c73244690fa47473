"""Resumable uploads over tus 1.0 (https://tus.io/protocols/resumable-upload):
`/v1/tus` (creation URL) and `/v1/tus/{upload_id}`.

Core protocol plus the creation, creation-with-upload, creation-defer-length, termination,
expiration and checksum extensions. `Upload-Metadata` keys: `filename`, `filetype` (kept
for the client, never used to decide anything), `id` (a client-chosen image id: PUT's rules
and idempotency), `profile`, `callback`, `alt` and `metadata` (the image's alt text and
JSON metadata, refused at creation when invalid). When the last byte arrives the upload
becomes an image exactly as a plain upload does (api/uploads.py `adopt`): same sniffing, limits,
record, job, events and webhooks; that PATCH's answer and every later HEAD carry
`Picstream-Image: /v1/images/{id}`. core/tus.py holds the state and the writer; this module
is the protocol.

A non-image is refused by the first PATCH that carries its head (the upload is then
terminated: nothing of it stays); a checksum mismatch (460) keeps nothing of that PATCH.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import falcon
from redis.client import Pipeline

from api.body import upload_body
from api.grants import narrowed, resolve, spend
from api.limits import Slots
from api.uploads import Uploads
from core.errors import (
    BadRequest,
    CorruptImage,
    EmptyBody,
    ImageExists,
    NotAnImage,
    NotFound,
    OffsetMismatch,
    PicstreamError,
    QueueUnavailable,
    TokenRevoked,
    TooLarge,
    TooManyPixels,
    TusVersionUnsupported,
    UnsupportedFormat,
    UploadExhausted,
    UploadExpired,
    UploadInProgress,
    UploadLocked,
    WrongContentType,
)
from core.ingest import Ingested, Limits
from core.leases import UploadLease
from core.models import (
    Annotations,
    clean_filename,
    new_generation,
    new_image_id,
    validate_image_id,
)
from core.profiles import Profiles
from core.records import PURGES_KEY, Records
from core.storage import MultipartUpload, Store
from core.tokens import UploadTokens
from core.tus import (
    Checksum,
    Hashers,
    PatchWriter,
    TusState,
    TusStates,
    changes,
    new_upload_id,
    state_key,
)
from core.webhooks import check_url

TUS_VERSION = "1.0.0"
EXTENSIONS = (
    "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum"
)
CHECKSUMS = ("md5", "sha1", "sha256", "sha512")
OFFSET_STREAM = "application/offset+octet-stream"
IMAGE_HEADER = "Picstream-Image"
MAX_METADATA = 4096
_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DIGITS = re.compile(r"\d{1,19}")
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{22}")
# What the head decides: an upload refused for these can never succeed, so it is ended.
_HOPELESS = (
    NotAnImage,
    UnsupportedFormat,
    CorruptImage,
    TooManyPixels,
    EmptyBody,
    UploadExhausted,
)


@dataclass(frozen=True, slots=True)
class Metadata:
    """Upload-Metadata: the raw header (echoed by HEAD) and its decoded values."""

    raw: str
    values: dict[str, str]

    @classmethod
    def parse(cls, header: str | None) -> Metadata:
        raw = (header or "").strip()
        if len(raw) > MAX_METADATA:
            raise BadRequest(f"Upload-Metadata is longer than {MAX_METADATA} characters")
        values: dict[str, str] = {}
        for pair in raw.split(","):
            pair = pair.strip()
            if not pair:
                continue
            key, _, encoded = pair.partition(" ")
            if not _KEY_RE.fullmatch(key) or key in values:
                raise BadRequest(f"Upload-Metadata has a bad or repeated key {key[:64]!r}")
            try:
                values[key] = base64.b64decode(encoded.strip(), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise BadRequest(f"Upload-Metadata {key!r} is not base64 of UTF-8 text") from None
        return cls(raw, values)

    def get(self, key: str) -> str | None:
        return self.values.get(key) or None


class Resumable:
    """The use case: create, append to, finish and end resumable uploads."""

    def __init__(
        self,
        store: Store,
        records: Records,
        states: TusStates,
        uploads: Uploads,
        tokens: UploadTokens,
        part_uploads: Executor,
        *,
        limits: Limits,
        profiles: Profiles,
        expiry: float,
        webhook_hosts: frozenset[str],
    ) -> None:
        self.store = store
        self.records = records
        self.states = states
        self.uploads = uploads
        self.tokens = tokens
        self.part_uploads = part_uploads
        self.limits = limits
        self.profiles = profiles
        self.expiry = expiry
        self.webhook_hosts = webhook_hosts
        self.hashers = Hashers()

    def create(
        self, owner: str, grant: Any, length: int | None, meta: Metadata, jti: str
    ) -> TusState:
        """A new upload (its token use is the caller's to spend). Refuses at once what can
        never succeed: too large, an id already holding an image of another size."""
        asked = resolve(
            grant,
            image_id=meta.get("id"),
            profile=meta.get("profile"),
            callback=meta.get("callback"),
        )
        limits = narrowed(self.limits, grant)
        if length is not None and length > limits.max_bytes:
            raise TooLarge(f"Upload-Length is above the limit of {limits.max_bytes} bytes")
        if length == 0:
            raise EmptyBody("an upload of 0 bytes cannot be an image")
        profile = self.profiles.require(asked.profile)
        callback = check_url(asked.callback, self.webhook_hosts) if asked.callback else ""
        image_id = validate_image_id(asked.image_id) if asked.image_id else new_image_id()
        # An empty `alt` is kept: alt="" marks a decorative image.
        annotations = Annotations.parse(meta.values.get("alt"), meta.get("metadata"))
        if asked.image_id and length is not None:
            self._same_size_or_conflict(owner, image_id, length)
        state = TusState(
            uid=new_upload_id(),
            owner=owner,
            image_id=image_id,
            gen=new_generation(),
            length=length,
            expires=time.time() + self.expiry,
            profile=profile.name,
            metadata=meta.raw,
            max_bytes=limits.max_bytes,
            formats=tuple(sorted(limits.allowed_formats)),
            filename=clean_filename(meta.get("filename")) or "",
            callback=callback,
            alt=annotations.alt,
            image_metadata=annotations.metadata,
            jti=jti,
        )
        self.states.create(state)
        return state

    def _same_size_or_conflict(self, owner: str, image_id: str, length: int) -> None:
        """An id that holds an image of another size can never take this upload: 409 now,
        not after the last byte. The same size is decided by the bytes, at the end."""
        try:
            existing = self.records.get(owner, image_id)
        except NotFound:
            return
        if existing.size != length:
            raise ImageExists(f"image {image_id!r} already exists with different content")

    def find(self, owner: str, uid: str) -> TusState:
        """The owner's upload: NotFound for an unknown id (or another owner's), UploadExpired
        once past its expiry and not finished."""
        state = self.states.load(uid) if _UPLOAD_ID.fullmatch(uid) else None
        if state is None or state.owner != owner:
            raise NotFound("no such upload (it may have expired)")
        if not state.done and time.time() > state.expires:
            raise UploadExpired("this upload expired before it was finished; start a new one")
        return state

    def append(
        self,
        state: TusState,
        offset: int,
        body: Any,
        checksum: Checksum | None,
        length: int | None,
    ) -> TusState:
        """A PATCH: its body at `offset`, then the image made once the last byte is in."""
        if state.done:
            if offset != state.length:
                raise OffsetMismatch(f"the upload is complete at offset {state.length}")
            return state
        with self.states.locked(state) as lease:
            state = self._reload(state)
            if state.done:  # finished by the request this one waited for
                if offset != state.length:
                    raise OffsetMismatch(f"the upload is complete at offset {state.length}")
                return state
            if offset != state.offset:
                raise OffsetMismatch(f"the upload is at offset {state.offset}, not {offset}")
            if length is not None:
                self._set_length(state, lease, length)
            if not state.stored:
                self._write(state, lease, body, checksum)
            if state.stored:
                self._finish(state, lease)
        return state

    def settle(self, state: TusState) -> TusState:
        """HEAD of an upload whose bytes are all in but whose image is not made (its final
        PATCH failed after storing them): finish it now, as tus clients that see the
        whole length in HEAD send nothing more."""
        received = state.length is not None and state.offset == state.length
        if state.done or not received:
            return state
        with self.states.locked(state) as lease:
            state = self._reload(state)
            if not state.done:
                if not state.stored:
                    self._write(state, lease, _NOTHING, None)
                self._finish(state, lease)
        return state

    def terminate(self, state: TusState) -> None:
        """DELETE: abort and delete everything the upload wrote; a finished upload's image
        stays (only the upload is forgotten)."""
        with self.states.locked(state):
            state = self._reload(state)
            if not state.done:
                self._discard(state)
            self.states.forget(state)
            self.hashers.drop(state.uid)

    def _reload(self, state: TusState) -> TusState:
        fresh = self.states.load(state.uid)
        if fresh is None:
            raise NotFound("no such upload (it may have expired)")
        return fresh

    def _set_length(self, state: TusState, lease: UploadLease, length: int) -> None:
        if state.length is not None:
            if length != state.length:
                raise BadRequest("Upload-Length cannot change once set")
            return
        if length > state.max_bytes:
            raise TooLarge(f"Upload-Length is above the limit of {state.max_bytes} bytes")
        if length < state.offset or length == 0:
            raise BadRequest(f"Upload-Length {length} is below what was already received")
        self.states.save(state, lease, length=length)

    def _write(
        self, state: TusState, lease: UploadLease, body: Any, checksum: Checksum | None
    ) -> None:
        writer = PatchWriter(
            self.store, self.states, lease, state, self.limits, self.part_uploads, self.hashers
        )
        try:
            writer.run(body.source, checksum)
        except _HOPELESS:
            self._discard(state)
            self.states.forget(state)
            raise
        except TooLarge:
            if state.length is None:  # a deferred length past the limit: hopeless too
                self._discard(state)
                self.states.forget(state)
            raise

    def _finish(self, state: TusState, lease: UploadLease) -> None:
        """All bytes are stored: make the image, and mark the upload done in the same
        transaction (so its answer and the system agree)."""
        head = state.head
        assert head is not None and state.length is not None
        ingested = Ingested(state.length, state.blake3, head)
        key, guard = state_key(state.uid), state.guard

        def also(pipe: Pipeline) -> None:
            pipe.hset(key, mapping=changes(done=True))  # type: ignore[arg-type]
            pipe.zrem(PURGES_KEY, guard)

        try:
            record, created = self.uploads.adopt(
                state.keys,
                ingested,
                state.filename or None,
                self.profiles.require(state.profile),
                state.callback or None,
                also,
                annotations=Annotations(state.alt, state.image_metadata),
            )
        except UploadInProgress:
            raise UploadLocked(
                f"a plain upload of image {state.image_id!r} is in progress; retry"
            ) from None
        except ImageExists:
            self._discard(state)
            self.states.forget(state)
            raise
        except QueueUnavailable:
            if self._taken_back(state):
                # Its `done` was committed with the record, then the record was taken back
                # (no replica acknowledged it, core/records.py `commit`) and its objects are
                # to be purged: end the upload, so that no HEAD reports it complete.
                self._discard(state)
                self.states.forget(state)
            raise
        if not created:
            if record.gen != state.gen:  # the same bytes were already this image: a copy
                self._discard(state)
            # (The same incarnation: this upload was committed by a request this one raced;
            # its objects are the image's now and must stay.)
            self.states.save(state, lease, done=True)
        state.done = True

    def _taken_back(self, state: TusState) -> bool:
        """After a failed commit: whether it did commit (the upload marked done in the same
        transaction) and was then taken back (this incarnation has no record). False when
        Redis cannot tell: the upload is then left as it is."""
        try:
            fresh = self.states.load(state.uid)
            if fresh is None or not fresh.done:
                return False
            return self.records.get(state.owner, state.image_id).gen != state.gen
        except NotFound:
            return True
        except PicstreamError:
            return False

    def _discard(self, state: TusState) -> None:
        """Abort the multipart upload and delete this upload's objects (its incarnation's
        prefix is its own); what fails is left to the janitor, under the upload's guard."""
        if state.upload_id:  # unregistered from the janitor unless the abort failed
            tracker = self.states.tracker(state)
            MultipartUpload(self.store, state.keys.original, state.upload_id, tracker).abort()
        try:
            self.store.delete_prefix(state.keys.prefix)
        except NotFound:
            pass
        except PicstreamError:
            return  # the guard (due after the expiry) and the janitor finish it
        with contextlib.suppress(PicstreamError):  # the purge then finds nothing left
            self.states.unguard(state)


class TusCreation:
    """/v1/tus"""

    upload_methods = frozenset({"POST", "OPTIONS"})

    def __init__(self, resumable: Resumable, slots: Slots, read_timeout: float) -> None:
        self.resumable = resumable
        self.slots = slots
        self.read_timeout = read_timeout

    def on_options(self, req: falcon.Request, resp: falcon.Response) -> None:
        _describe_server(resp, self.resumable.limits.max_bytes)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        _speaks_tus(req, resp)
        length = _creation_length(req)
        meta = Metadata.parse(req.get_header("Upload-Metadata"))
        grant = getattr(req.context, "grant", None)
        body = _has_body(req)
        declared = req.content_length
        if body and declared is not None and length is not None and declared > length:
            raise TooLarge(f"the body goes past the Upload-Length of {length} bytes")
        checksum = _checksum(req)
        # The use is spent once the upload exists; a body refused later does not give it
        # back (as for a PATCH): the upload was made.
        with spend(self.resumable.tokens, grant):
            state = self.resumable.create(
                req.context.owner, grant, length, meta, grant.jti if grant else ""
            )
        if body:
            with self.slots.hold():
                opened = _patch_body(req, self.read_timeout)
                state = self.resumable.append(state, 0, opened, checksum, None)
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/tus/{state.uid}"
        _progress(resp, state)


class TusUpload:
    """/v1/tus/{upload_id}"""

    upload_methods = frozenset({"HEAD", "PATCH", "DELETE", "OPTIONS", "POST"})

    def __init__(
        self, resumable: Resumable, tokens: UploadTokens, slots: Slots, read_timeout: float
    ) -> None:
        self.resumable = resumable
        self.tokens = tokens
        self.slots = slots
        self.read_timeout = read_timeout

    def on_options(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        _describe_server(resp, self.resumable.limits.max_bytes)

    def on_head(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        _speaks_tus(req, resp)
        state = self._find(req, upload_id)
        state = self.resumable.settle(state)
        resp.set_header("Cache-Control", "no-store")
        if state.length is None:
            resp.set_header("Upload-Defer-Length", "1")
        else:
            resp.set_header("Upload-Length", str(state.length))
        if state.metadata:
            resp.set_header("Upload-Metadata", state.metadata)
        _progress(resp, state)

    def on_patch(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        _speaks_tus(req, resp)
        if (req.content_type or "").split(";")[0].strip().lower() != OFFSET_STREAM:
            raise WrongContentType(f"a PATCH body must be {OFFSET_STREAM}")
        offset = _number(req.get_header("Upload-Offset"), "Upload-Offset", required=True)
        assert offset is not None
        length = _number(req.get_header("Upload-Length"), "Upload-Length")
        state = self._find(req, upload_id)
        declared = req.content_length
        total = length if length is not None else state.length
        if declared is not None and total is not None and offset + declared > total:
            raise TooLarge(f"the body goes past the Upload-Length of {total} bytes")
        checksum = _checksum(req)
        with self.slots.hold():
            body = _patch_body(req, self.read_timeout)
            state = self.resumable.append(state, offset, body, checksum, length)
        resp.status = falcon.HTTP_204
        _progress(resp, state)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        _speaks_tus(req, resp)
        self.resumable.terminate(self._find(req, upload_id, expired_ok=True))
        resp.status = falcon.HTTP_204

    def on_post(self, req: falcon.Request, resp: falcon.Response, upload_id: str) -> None:
        """X-HTTP-Method-Override (tus clients behind proxies that allow only GET/POST)."""
        override = (req.get_header("X-HTTP-Method-Override") or "").upper()
        if override == "PATCH":
            self.on_patch(req, resp, upload_id)
        elif override == "DELETE":
            self.on_delete(req, resp, upload_id)
        else:
            raise falcon.HTTPMethodNotAllowed(["HEAD", "PATCH", "DELETE", "OPTIONS"])

    def _find(self, req: falcon.Request, uid: str, expired_ok: bool = False) -> TusState:
        grant = getattr(req.context, "grant", None)
        if grant is not None and self.tokens.is_revoked(grant):
            raise TokenRevoked("this upload token was revoked")
        try:
            state = self.resumable.find(req.context.owner, uid)
        except UploadExpired:
            if not expired_ok:
                raise
            found = self.resumable.states.load(uid)
            assert found is not None
            state = found
        # A token reaches only the uploads it created (not the owner's others, made with
        # the key or another token, with other limits).
        if grant is not None and state.jti != grant.jti:
            raise NotFound("no such upload (it may have expired)")
        return state


def _speaks_tus(req: falcon.Request, resp: falcon.Response) -> None:
    resp.set_header("Tus-Resumable", TUS_VERSION)
    if req.get_header("Tus-Resumable") != TUS_VERSION:
        resp.set_header("Tus-Version", TUS_VERSION)
        raise TusVersionUnsupported(f"send Tus-Resumable: {TUS_VERSION}")


def _describe_server(resp: falcon.Response, max_bytes: int) -> None:
    resp.status = falcon.HTTP_204
    resp.set_header("Tus-Resumable", TUS_VERSION)
    resp.set_header("Tus-Version", TUS_VERSION)
    resp.set_header("Tus-Extension", EXTENSIONS)
    resp.set_header("Tus-Max-Size", str(max_bytes))
    resp.set_header("Tus-Checksum-Algorithm", ",".join(CHECKSUMS))


def _progress(resp: falcon.Response, state: TusState) -> None:
    resp.set_header("Upload-Offset", str(state.offset))
    if not state.done:
        when = datetime.fromtimestamp(state.expires, UTC)
        resp.set_header("Upload-Expires", format_datetime(when, usegmt=True))
    else:
        resp.set_header(IMAGE_HEADER, f"/v1/images/{state.image_id}")


class _Empty:
    """A body with no bytes (a HEAD that finishes an upload whose bytes are all in)."""

    def readinto(self, view: memoryview) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class _NoBody:
    source: _Empty


_NOTHING = _NoBody(_Empty())


def _creation_length(req: falcon.Request) -> int | None:
    length = _number(req.get_header("Upload-Length"), "Upload-Length")
    deferred = req.get_header("Upload-Defer-Length")
    if deferred is not None and deferred.strip() != "1":
        raise BadRequest("Upload-Defer-Length must be 1")
    if (length is None) == (deferred is None):
        raise BadRequest("send exactly one of Upload-Length and Upload-Defer-Length: 1")
    return length


def _number(header: str | None, name: str, required: bool = False) -> int | None:
    if header is None:
        if required:
            raise BadRequest(f"{name} is required")
        return None
    if not _DIGITS.fullmatch(header.strip()):
        raise BadRequest(f"{name} must be a non-negative whole number")
    return int(header.strip())


def _has_body(req: falcon.Request) -> bool:
    if req.content_length:
        if (req.content_type or "").split(";")[0].strip().lower() != OFFSET_STREAM:
            raise WrongContentType(f"an upload's body must be {OFFSET_STREAM}")
        return True
    return req.get_header("Transfer-Encoding") is not None


def _patch_body(req: falcon.Request, read_timeout: float) -> Any:
    return upload_body(req, read_timeout)


def _checksum(req: falcon.Request) -> Checksum | None:
    header = req.get_header("Upload-Checksum")
    if header is None:
        return None
    algorithm, _, encoded = header.strip().partition(" ")
    if algorithm.lower() not in CHECKSUMS:
        raise BadRequest(f"Upload-Checksum algorithm must be one of {', '.join(CHECKSUMS)}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except binascii.Error:
        raise BadRequest("Upload-Checksum must be `<algorithm> <base64 digest>`") from None
    return Checksum(algorithm.lower(), digest)
