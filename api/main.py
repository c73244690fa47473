"""Composition root of the web process: read the environment, build the collaborators.

gunicorn calls `app()` in each worker process after fork (no preload), so the minio client,
its connection pool and the Redis client are never shared across a fork.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from wsgiref.types import WSGIApplication

from api.app import Collaborators, create_app
from api.events import EventHub
from api.gunicorn import Deadlines
from api.limits import Slots
from api.presign import Presigner
from core.jobs import make_queue
from core.leases import Leases
from core.logs import configure as configure_logs
from core.records import Durability, Records, connect
from core.settings import WEB_PROCESS, Settings
from core.storage import Store
from core.tokens import UploadTokens


def build_collaborators(settings: Settings) -> Collaborators:
    uploads = settings.max_uploads
    redis = connect(settings)
    return Collaborators(
        settings=settings,
        # Pool: each request thread and each part-upload thread may hold a connection.
        store=Store.from_settings(settings, pool_size=settings.web_threads + uploads),
        records=Records(redis, Durability.from_settings(settings)),
        leases=Leases(redis, settings.lease_seconds),
        queue=make_queue(redis, settings.queue, settings.job_timeout),
        bulk_queue=make_queue(redis, settings.bulk_queue, settings.job_timeout),
        hub=EventHub(redis),
        presigner=Presigner(settings),
        # One part-upload thread per upload slot: every upload can have a part in flight.
        part_uploads=ThreadPoolExecutor(max_workers=uploads, thread_name_prefix="part-upload"),
        # At most one read ahead per download slot (the copying relay's).
        download_pool=ThreadPoolExecutor(
            max_workers=settings.max_downloads, thread_name_prefix="download-read-ahead"
        ),
        upload_slots=Slots(uploads, "uploads"),
        stream_slots=Slots(settings.max_event_streams, "event streams", retry_after=15),
        download_slots=Slots(settings.max_downloads, "downloads"),
        tokens=UploadTokens(redis, settings.signing_key),
    )


def app() -> WSGIApplication:
    """The web process's WSGI application, as gunicorn loads it (`api.main:app()`). It reads
    the settings the web uses (deploy/gunicorn.conf.py has checked them at start-up)."""
    settings = Settings.from_env(os.environ, WEB_PROCESS)
    configure_logs(settings.log_level, settings.log_format)  # PICSTREAM_LOG_FORMAT, scrubbed
    # The send deadline and the close without waiting are gunicorn's side (api/gunicorn.py).
    return Deadlines(create_app(build_collaborators(settings)), settings.send_timeout)
