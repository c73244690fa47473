"""`python -m worker`: one rq worker on the fresh-upload queue, then the bulk queue.

Listening on `convert reconvert` drains fresh uploads strictly first. The scheduler runs in
the worker so retries with backoff fire. A short worker TTL and maintenance interval let
another worker recover the job of a worker that died with its horse in about 90 s instead of
rq's default ~13 min (FACTS.md).
"""

from __future__ import annotations

import logging
import os

from rq import Worker

from core.jobs import make_queue
from core.records import connect
from core.settings import Settings

WORKER_TTL = 60
MAINTENANCE_INTERVAL = 20


def main() -> None:
    settings = Settings.from_env(os.environ)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    redis = connect(settings)
    queues = [
        make_queue(redis, name, settings.job_timeout)
        for name in (settings.queue, settings.bulk_queue)
    ]
    worker = Worker(
        queues,
        connection=redis,
        serializer=queues[0].serializer,
        worker_ttl=WORKER_TTL,
        maintenance_interval=MAINTENANCE_INTERVAL,
    )
    worker.work(with_scheduler=True, logging_level=settings.log_level.upper())


if __name__ == "__main__":
    main()
