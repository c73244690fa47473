"""HTTP resources: parse the request, call the use case, shape the response. Nothing more."""

from __future__ import annotations

import falcon

from api.body import upload_body
from api.digest import parse_repr_digest
from api.errors import problem, respond_problem
from api.reconvert import reconvert
from api.serving import callback, delete_image, list_page, signer, upload_slot
from api.uploads import Services, Uploads
from api.views import record_json
from core.errors import PicstreamError
from core.models import validate_image_id


class Images:
    """/v1/images"""

    def __init__(self, services: Services, uploads: Uploads) -> None:
        self.s = services
        self.uploads = uploads

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        limit = req.get_param_as_int("limit", min_value=1, max_value=1000, default=50)
        resp.media = list_page(self.s, req, limit, req.get_param("cursor"))

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        profile = self.s.settings.profiles.require(req.get_param("profile"))
        digests = parse_repr_digest(req.get_header("Repr-Digest"))
        with upload_slot(self.s):
            body = upload_body(req, self.s.settings.read_timeout)
            record = self.uploads.create(
                req.context.owner, body, digests, profile, callback(self.s, req)
            )
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/images/{record.id}"
        resp.media = record_json(req, record)


class Image:
    """/v1/images/{image_id}"""

    def __init__(self, services: Services, uploads: Uploads) -> None:
        self.s = services
        self.uploads = uploads

    def on_get(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        record = self.s.records.get(req.context.owner, validate_image_id(image_id))
        resp.media = record_json(req, record, signer(self.s, req))

    def on_delete(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        done = delete_image(self.s, req.context.owner, validate_image_id(image_id))
        resp.status = falcon.HTTP_204 if done else falcon.HTTP_202

    def on_put(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        image_id = validate_image_id(image_id)
        profile = self.s.settings.profiles.require(req.get_param("profile"))
        digests = parse_repr_digest(req.get_header("Repr-Digest"))
        with upload_slot(self.s):
            body = upload_body(req, self.s.settings.read_timeout)
            record, created = self.uploads.put(
                req.context.owner, image_id, body, digests, profile, callback(self.s, req)
            )
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.location = f"/v1/images/{record.id}"
        resp.media = record_json(req, record)


class Reconvert:
    """/v1/images/{image_id}/reconvert: convert again (optionally `?profile=NAME`), queued
    behind fresh uploads."""

    def __init__(self, services: Services) -> None:
        self.s = services

    def on_post(self, req: falcon.Request, resp: falcon.Response, image_id: str) -> None:
        image_id = validate_image_id(image_id)
        record = reconvert(self.s, req.context.owner, image_id, req.get_param("profile"))
        resp.status = falcon.HTTP_202
        resp.location = f"/v1/images/{record.id}"
        resp.media = record_json(req, record)


class Health:
    """/healthz: the process is alive. No dependencies checked, no auth."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class Ready:
    """/readyz: Redis and S3 answer. 503 (problem+json) naming what is down otherwise."""

    def __init__(self, services: Services) -> None:
        self.s = services

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        checks: dict[str, str] = {}
        for name, ping in (("redis", self.s.records.ping), ("s3", self.s.store.ping)):
            try:
                ping()
                checks[name] = "ok"
            except PicstreamError as exc:
                checks[name] = exc.detail
        if all(v == "ok" for v in checks.values()):
            resp.media = {"status": "ok", "checks": checks}
            return
        down = ", ".join(k for k, v in checks.items() if v != "ok")
        body = problem(503, "not-ready", "Not ready", f"unreachable: {down}")
        respond_problem(resp, {**body, "checks": checks})
