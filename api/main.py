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
from api.uploads import Services
from core.jobs import make_queue
from core.records import Records, connect
from core.settings import Settings
from core.storage import Store


def build_services(settings: Settings) -> Services:
    threads = settings.web_threads
    # One part-upload thread per request thread: every upload can have a part in flight.
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="part-upload")
    redis = connect(settings)
    return Services(
        settings=settings,
        # Pool: each request thread and each part-upload thread may hold a connection.
        store=Store.from_settings(settings, pool_size=2 * threads),
        records=Records(redis),
        queue=make_queue(redis, settings.queue, settings.job_timeout),
        executor=executor,
    )


def app() -> falcon.App[falcon.Request, falcon.Response]:
    settings = Settings.from_env(os.environ)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    return create_app(build_services(settings))
