"""The falcon application factory. It receives its collaborators; api/main.py builds them.

Each resource gets only what it uses (its use case, the records, a bundle like `Files`);
`Collaborators` is the factory's argument alone and never reaches a resource.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

import falcon
from rq import Queue

from api import errors
from api.auth import AuthMiddleware, KeyRing
from api.console import console_routes
from api.cors import Cors
from api.deletion import Deletion
from api.downloads import SignedCaching
from api.events import EventHub, Events
from api.files import Best, Files, Original, VariantFile
from api.health import Health, Ready
from api.images import Image, Images, UploadRequests
from api.limits import Slots
from api.listing import Listing
from api.metadata import MetadataEdits
from api.metrics import RequestMetrics
from api.openapi import OpenAPIDocument
from api.presign import Presigner
from api.reconvert import Reconversion, Reconvert
from api.requestid import RequestIds
from api.signed_links import SignedLinks
from api.tokens import MintedToken, MintedTokens, TokenRules
from api.tus import Resumable, TusCreation, TusUpload
from api.uploads import Uploads, upload_limits
from core.errors import PicstreamError
from core.leases import Leases
from core.records import Records
from core.settings import Settings
from core.storage import Store
from core.tokens import UploadTokens
from core.tus import TusStates


@dataclass(frozen=True, slots=True)
class Collaborators:
    """What one web process builds once, after fork (api/main.py), for `create_app`."""

    settings: Settings
    store: Store
    records: Records
    leases: Leases
    queue: Queue
    bulk_queue: Queue  # reconversions: workers drain `queue` first
    hub: EventHub
    presigner: Presigner
    part_uploads: Executor
    download_pool: Executor  # read-ahead of the copying relay
    upload_slots: Slots
    stream_slots: Slots
    download_slots: Slots  # downloads whose body the process relays
    tokens: UploadTokens  # upload tokens: minted, verified, spent (state in Redis)


def create_app(c: Collaborators) -> falcon.App[falcon.Request, falcon.Response]:
    """The WSGI app of one web process, serving with what `c` holds."""
    keys = c.settings.api_keys
    if not keys:
        raise ValueError("PICSTREAM_API_KEYS is empty: no client could authenticate")
    auth = AuthMiddleware(KeyRing(keys), c.settings.signing_key, c.tokens)
    cors = Cors(c.settings.cors_origins)  # first: a preflight never reaches authentication
    routes = _routes(c)
    # Right after RequestIds: it times and counts every request, refused ones too.
    measured = RequestMetrics(path for path, _ in routes)
    app: falcon.App[falcon.Request, falcon.Response] = falcon.App(
        # RequestIds first of all: every answer, a refused preflight too, carries the id.
        middleware=[
            RequestIds(),
            measured,
            cors,
            auth,
            SignedCaching(c.settings.signed_cache_public),
        ]
    )
    # Uploads are streamed by hand; falcon must never try to buffer or parse the body.
    app.req_options.auto_parse_form_urlencoded = False
    app.req_options.strip_url_path_trailing_slash = True
    app.add_error_handler(Exception, errors.handle_unexpected)
    app.add_error_handler(PicstreamError, errors.handle_domain)
    app.set_error_serializer(errors.serialize_http_error)
    for path, resource in routes:
        app.add_route(path, resource)
    return app


def _routes(c: Collaborators) -> list[tuple[str, object]]:
    """Every route and its resource, each given the collaborators it uses."""
    settings, records, store = c.settings, c.records, c.store
    links = SignedLinks(settings.signing_key)
    files = Files(store, c.download_pool, c.download_slots, c.presigner)
    upload_case = Uploads(
        store,
        records,
        c.leases,
        c.queue,
        c.part_uploads,
        limits=upload_limits(settings),
        retry_intervals=settings.retry_intervals,
        redis_timeout=settings.redis_timeout,
    )
    uploads = UploadRequests(
        upload_case,
        c.upload_slots,
        settings.profiles,
        c.tokens,
        read_timeout=settings.read_timeout,
        webhook_hosts=settings.webhook_hosts,
    )
    reconversion = Reconversion(
        records,
        store,
        c.bulk_queue,
        settings.profiles,
        retry_intervals=settings.retry_intervals,
        job_timeout=settings.job_timeout,
    )
    deletion = Deletion(records, store, settings.job_timeout)
    events = Events(records, c.hub, c.stream_slots, links, heartbeat=settings.sse_heartbeat)
    resumable = Resumable(
        store,
        records,
        TusStates(records.redis, c.leases),
        upload_case,
        c.tokens,
        c.part_uploads,
        limits=upload_limits(settings),
        profiles=settings.profiles,
        expiry=settings.tus_expiry,
        webhook_hosts=settings.webhook_hosts,
    )
    read_timeout = settings.read_timeout
    return [
        ("/healthz", Health()),
        ("/readyz", Ready(records, store)),
        ("/v1/openapi.json", OpenAPIDocument()),
        ("/v1/images", Images(Listing(records), uploads)),
        (
            "/v1/images/{image_id}",
            Image(
                records,
                links,
                uploads,
                deletion,
                MetadataEdits(records, store),
                read_timeout=read_timeout,
            ),
        ),
        ("/v1/images/{image_id}/reconvert", Reconvert(reconversion)),
        ("/v1/images/{image_id}/original", Original(records, files)),
        ("/v1/images/{image_id}/variants/{name}", VariantFile(records, files)),
        ("/v1/images/{image_id}/best", Best(records, files)),
        ("/v1/images/{image_id}/events", events),
        (
            "/v1/upload-tokens",
            MintedTokens(
                c.tokens, TokenRules.from_settings(settings), read_timeout=settings.read_timeout
            ),
        ),
        ("/v1/upload-tokens/{jti}", MintedToken(c.tokens)),
        ("/v1/tus", TusCreation(resumable, c.upload_slots, read_timeout)),
        ("/v1/tus/{upload_id}", TusUpload(resumable, c.tokens, c.upload_slots, read_timeout)),
        *console_routes(),  # the web console's static files at / and /console/… (no key)
    ]
