"""The falcon application factory. It receives its collaborators; api/main.py builds them."""

from __future__ import annotations

import falcon

from api import errors
from api.auth import AuthMiddleware, KeyRing
from api.openapi import OpenAPIDocument
from api.resources import Health, Image, Images, Ready, Reconvert
from api.serving import Best, Events, Original, VariantFile
from api.uploads import Services, Uploads
from core.errors import PicstreamError


def create_app(services: Services) -> falcon.App[falcon.Request, falcon.Response]:
    keys = services.settings.api_keys
    if not keys:
        raise ValueError("PICSTREAM_API_KEYS is empty: no client could authenticate")
    app = falcon.App(middleware=[AuthMiddleware(KeyRing(keys), services.settings.signing_key)])
    # Uploads are streamed by hand; falcon must never try to buffer or parse the body.
    app.req_options.auto_parse_form_urlencoded = False
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Exception, errors.handle_unexpected)
    app.add_error_handler(PicstreamError, errors.handle_domain)
    app.set_error_serializer(errors.serialize_http_error)

    uploads = Uploads(services)
    app.add_route("/healthz", Health())
    app.add_route("/readyz", Ready(services))
    app.add_route("/v1/openapi.json", OpenAPIDocument())
    app.add_route("/v1/images", Images(services, uploads))
    app.add_route("/v1/images/{image_id}", Image(services, uploads))
    app.add_route("/v1/images/{image_id}/reconvert", Reconvert(services))
    app.add_route("/v1/images/{image_id}/original", Original(services))
    app.add_route("/v1/images/{image_id}/variants/{name}", VariantFile(services))
    app.add_route("/v1/images/{image_id}/best", Best(services))
    app.add_route("/v1/images/{image_id}/events", Events(services))
    return app
