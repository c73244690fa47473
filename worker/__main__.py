"""`python -m worker`: one rq worker on the fresh-upload queue, then the bulk queue.

Listening on `convert reconvert` drains fresh uploads strictly first, so bulk reconversion
never starves new uploads. The scheduler runs in the worker so retries with backoff fire.

Each job runs in a forked work-horse. The image libraries are imported here, before the
fork, so a job does not pay for loading them; each horse gets a data-segment limit
(PICSTREAM_JOB_MEMORY) so one image cannot take the machine's memory.

Recovery when a worker dies with its horse (host crash, SIGKILL): the job stays in rq's
StartedJobRegistry until its lease lapses, `JOB_MONITORING_INTERVAL` + 60 s after the last
heartbeat (rq adds the 60), i.e. 60-65 s after the crash. Any live worker cleans the
registries every `MAINTENANCE_INTERVAL` s, but only between waits for a job, which last
`WORKER_TTL` - 15 s: both are 10 s here. The cleaning hands the abandoned job to its Retry
(rq 3.0 retries an abandoned job that has retries left, else fails it; our failure callback
records `failed` then) and the scheduler re-enqueues it after the first retry interval.
Measured: completed on another worker 72 s after the crash (rq's defaults: ~13 min).
"""

from __future__ import annotations

import logging
import os
import resource

from rq import Queue, Worker
from rq.job import Job

import worker.convert  # noqa: F401 - pyvips/Pillow loaded once, before the fork
from core.janitor import run_periodically
from core.jobs import make_queue
from core.records import connect
from core.settings import Settings
from worker.jobs import horse_killed

WORKER_TTL = 25  # rq waits WORKER_TTL - 15 s for a job between maintenance checks
MAINTENANCE_INTERVAL = 10
# How often the worker heartbeats a running job; rq adds 60 s to get the job's lease.
JOB_MONITORING_INTERVAL = 5


class ConversionWorker(Worker):
    """rq's forking worker, with a memory limit on each work-horse."""

    job_memory = 0

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        if self.job_memory:
            # RLIMIT_DATA counts heap, thread stacks and private mappings. Past it, Python
            # raises MemoryError (recorded as a permanent failure) or GLib aborts the horse
            # (rq retries, then horse_killed records it): never the host's OOM killer.
            resource.setrlimit(resource.RLIMIT_DATA, (self.job_memory, self.job_memory))
        super().main_work_horse(job, queue)


def main() -> None:
    settings = Settings.from_env(os.environ)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    # pyvips forwards libvips' chatter ("VIPS: thumbnailing ...") at INFO.
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    redis = connect(settings)
    queues = [
        make_queue(redis, name, settings.job_timeout)
        for name in (settings.queue, settings.bulk_queue)
    ]
    worker = ConversionWorker(
        queues,
        connection=redis,
        serializer=queues[0].serializer,
        worker_ttl=WORKER_TTL,
        maintenance_interval=MAINTENANCE_INTERVAL,
        job_monitoring_interval=JOB_MONITORING_INTERVAL,
        work_horse_killed_handler=horse_killed,
    )
    worker.job_memory = settings.job_memory
    run_periodically(settings)  # stale multipart uploads and pending purges
    worker.work(with_scheduler=True, logging_level=settings.log_level.upper())


if __name__ == "__main__":
    main()
