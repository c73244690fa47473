"""The worker's metrics: job outcomes from rq's own bookkeeping, and the exporter of a
`python -m worker` process tree (the metrics are defined in core/metrics.py).

One exporter per `python -m worker`: its supervisor prepares the tree's multiprocess
directory before starting the rq worker (which imports prometheus_client only then, and
forks the work-horses and the scheduler), and serves the sum of the tree's files on
PICSTREAM_METRICS_HOST:PICSTREAM_WORKER_METRICS_PORT, with the queue depths asked of Redis
at each scrape. The listener lives in the supervisor, so it answers while the rq worker is
being restarted. Several workers on one host each need a port of their own (a taken port
stops the worker at start with one line); Prometheus scrapes each. The supervisor records
nothing itself: it loaded prometheus_client (through core/records.py) before preparing the
directory, so what it counted would stay in its own memory.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rq import Queue, Worker
from rq.executions import Execution
from rq.job import Job
from rq.registry import StartedJobRegistry

from core import metrics, metrics_dir
from core.records import connect
from core.settings import Settings

log = logging.getLogger(__name__)


class JobMetrics(Worker):
    """rq's worker, counting jobs started (in the work-horse) and how each attempt ended,
    and retiring each work-horse's metrics files when it has exited (core/metrics.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if metrics_dir.ENV in os.environ and not metrics.shared():
            log.error("prometheus_client was loaded before its directory was set: no metrics")

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        metrics.JOBS_STARTED.labels(queue.name).inc()
        super().main_work_horse(job, queue)

    def handle_job_success(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: StartedJobRegistry,
        execution: Execution,
    ) -> None:
        metrics.JOBS_FINISHED.labels(queue.name, "succeeded").inc()
        super().handle_job_success(job, queue, started_job_registry, execution)

    def handle_job_failure(
        self,
        job: Job,
        queue: Queue,
        started_job_registry: StartedJobRegistry | None = None,
        exc_string: str = "",
        execution: Execution | None = None,
    ) -> None:
        # rq retries an attempt that failed when the job has a retry left (rq 3.0).
        outcome = "retried" if job.should_retry else "failed"
        metrics.JOBS_FINISHED.labels(queue.name, outcome).inc()
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)

    def wait_for_horse(self) -> tuple[int | None, int | None, Any]:
        pid, status, rusage = super().wait_for_horse()
        if pid:
            metrics.retire_process(pid)
        return pid, status, rusage


@contextmanager
def exported(settings: Settings) -> Iterator[None]:
    """In the supervisor, around its whole run: the tree's directory and its exporter, when
    PICSTREAM_WORKER_METRICS_PORT is set (see the module docstring)."""
    port = settings.worker_metrics_port
    if not port:
        yield
        return
    tree = metrics_dir.prepare(settings.metrics_dir)
    hooks = settings.webhooks
    queues = (settings.conversion.queue, hooks.queue, settings.conversion.bulk_queue)
    registry = metrics.tree_registry(tree.path, metrics.QueueDepth(connect(settings), queues))
    try:
        server = metrics.serve(settings.metrics_host, port, registry)
    except OSError as exc:
        tree.remove()
        print(f"worker: PICSTREAM_WORKER_METRICS_PORT {port}: {exc.strerror}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("metrics on http://%s:%d/metrics", settings.metrics_host, port)
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        tree.remove()
