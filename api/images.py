"""The image resources: `/v1/images` (list, upload) and `/v1/images/{id}` (read, upload
under an id, change alt text and metadata, delete). Each parses the request, calls its use
case (api/uploads.py, api/listing.py, api/metadata.py, api/deletion.py) and shapes the
response. Nothing more."""

from __future__ import annotations

from typing import Any

import falcon

from api.body import upload_body
from api.deletion import Deletion
from api.digest import parse_repr_digest
from api.grants import Resolved, narrowed, resolve, spend
from api.limits import Slots
from api.listing import Listing
from api.metadata import MetadataEdits, read_patch, upload_annotations
from api.signed_links import SignedLinks
from api.uploads import Uploads
from api.views import record_json
from core.models import ImageRecord, validate_image_id
from core.profiles import Profiles
from core.records import Records
from core.tokens import UploadTokens
from core.webhooks import check_url


class UploadRequests:
    """The HTTP side of an upload, the same for POST and PUT: what an upload token fixes or
    limits is applied (api/grants.py), `?profile=`, `Repr-Digest` and the alt text and
    metadata given in the query or headers (api/metadata.py) are checked first; then,
    with one use of the token spent and holding one of `slots`, the body is opened,
    `?callback=URL` is checked against the webhook allow-list, and the use case reads the
    body. An upload that fails gives its token's use back."""

    def __init__(
        self,
        uploads: Uploads,
        slots: Slots,
        profiles: Profiles,
        tokens: UploadTokens,
        *,
        read_timeout: float,
        webhook_hosts: frozenset[str],
    ) -> None:
        self.uploads = uploads
        self.slots = slots
        self.profiles = profiles
        self.tokens = tokens
        self.read_timeout = read_timeout
        self.webhook_hosts = webhook_hosts

    def create(self, req: falcon.Request) -> tuple[ImageRecord, bool]:
        """POST. Returns (record, created): with a token bound to an image id, the upload
        goes under that id as a PUT would (the same bytes again: the existing record)."""
        wanted = self._resolve(req, None)
        if wanted.image_id is not None:
            return self._put(req, wanted.image_id, wanted)
        profile = self.profiles.require(wanted.profile)
        digests = parse_repr_digest(req.get_header("Repr-Digest"))
        annotations = upload_annotations(req)
        grant = req.context.grant
        with spend(self.tokens, grant), self.slots.hold():
            body = upload_body(req, self.read_timeout)
            record = self.uploads.create(
                req.context.owner,
                body,
                digests,
                profile,
                self._callback(wanted),
                limits=narrowed(self.uploads.limits, grant),
                annotations=annotations,
            )
        return record, True

    def put(self, req: falcon.Request, image_id: str) -> tuple[ImageRecord, bool]:
        return self._put(req, image_id, self._resolve(req, image_id))

    def _put(
        self, req: falcon.Request, image_id: str, wanted: Resolved
    ) -> tuple[ImageRecord, bool]:
        profile = self.profiles.require(wanted.profile)
        digests = parse_repr_digest(req.get_header("Repr-Digest"))
        annotations = upload_annotations(req)
        grant = req.context.grant
        with spend(self.tokens, grant), self.slots.hold():
            body = upload_body(req, self.read_timeout)
            return self.uploads.put(
                req.context.owner,
                image_id,
                body,
                digests,
                profile,
                self._callback(wanted),
                limits=narrowed(self.uploads.limits, grant),
                annotations=annotations,
            )

    def _resolve(self, req: falcon.Request, image_id: str | None) -> Resolved:
        return resolve(
            req.context.grant,
            image_id=image_id,
            profile=req.get_param("profile"),
            callback=req.get_param("callback"),
        )

    def _callback(self, wanted: Resolved) -> str | None:
        # Checked at every upload, a token's too: the allow-list may have changed since.
        url = wanted.callback
        return check_url(url, self.webhook_hosts) if url else None


class Images:
    """/v1/images"""

    upload_methods = frozenset({"POST"})  # an upload token may POST here (api/auth.py)

    def __init__(self, listing: Listing, uploads: UploadRequests) -> None:
        self.listing = listing
        self.uploads = uploads

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = req.get_param_as_int("limit", min_value=1, max_value=1000, default=50)
        records, next_cursor = self.listing.page(req.context.owner, limit, req.get_param("cursor"))
        page: dict[str, Any] = {"images": [record_json(req, r) for r in records]}
        page["next_cursor"] = next_cursor
        resp.media = page

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        record, created = self.uploads.create(req)
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.location = f"/v1/images/{record.id}"
        resp.media = record_json(req, record)


class Image:
    """/v1/images/{image_id}"""

    # An upload token may PUT here (api/auth.py); never PATCH: tokens only upload.
    upload_methods = frozenset({"PUT"})

    def __init__(
        self,
        records: Records,
        links: SignedLinks,
        uploads: UploadRequests,
        deletion: Deletion,
        edits: MetadataEdits,
        *,
        read_timeout: float,
    ) -> None:
        self.records = records
        self.links = links
        self.uploads = uploads
        self.deletion = deletion
        self.edits = edits
        self.read_timeout = read_timeout

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        record = self.records.get(req.context.owner, validate_image_id(image_id))
        resp.media = record_json(req, record, self.links.signer(req))

    def on_patch(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        """Change the alt text and metadata with a JSON merge patch (api/metadata.py)."""
        image_id = validate_image_id(image_id)
        record = self.edits.apply(req.context.owner, image_id, read_patch(req, self.read_timeout))
        resp.media = record_json(req, record)

    def on_delete(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        done = self.deletion.delete_image(req.context.owner, validate_image_id(image_id))
        resp.status = falcon.HTTP_204 if done else falcon.HTTP_202

    def on_put(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        record, created = self.uploads.put(req, validate_image_id(image_id))
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.location = f"/v1/images/{record.id}"
        resp.media = record_json(req, record)
