"""Composition root of the web process: read the environment, build the collaborators.

gunicorn calls `app()` in each worker process after fork (no preload), so the minio client,
its connection pool and the Redis client are never shared across a fork.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import falcon

from api.app import create_app
from api.events import EventHub
from api.limits import Slots
from api.presign import Presigner
from api.uploads import Services
from core.jobs import make_queue
from core.leases import Leases
from core.records import Records, connect
from core.settings import Settings
from core.storage import Store


def build_services(settings: Settings) -> Services:
    uploads = settings.max_uploads
    # One part-upload thread per upload slot: every upload can have a part in flight.
    executor = ThreadPoolExecutor(max_workers=uploads, thread_name_prefix="part-upload")
    redis = connect(settings)
    return Services(
        settings=settings,
        # Pool: each request thread and each part-upload thread may hold a connection.
        store=Store.from_settings(settings, pool_size=settings.web_threads + uploads),
        records=Records(redis),
        queue=make_queue(redis, settings.queue, settings.job_timeout),
        bulk_queue=make_queue(redis, settings.bulk_queue, settings.job_timeout),
        executor=executor,
        download_pool=ThreadPoolExecutor(
            max_workers=settings.web_threads, thread_name_prefix="download-read-ahead"
        ),
        upload_slots=Slots(uploads, "uploads"),
        stream_slots=Slots(settings.max_event_streams, "event streams", retry_after=15),
        hub=EventHub(redis),
        presigner=Presigner(settings),
        leases=Leases(redis, settings.lease_seconds),
    )


def app() -> falcon.App[falcon.Request, falcon.Response]:
    settings = Settings.from_env(os.environ)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    return create_app(build_services(settings))
