"""`python -m worker`: a supervisor around one rq worker process.

`python -m worker` (the Procfile's `worker` entry) runs worker/supervisor.py, which starts
the rq worker as `python -m worker --supervised-by PID` and restarts it when it dies (crash,
out-of-memory kill, SIGKILL). SIGTERM/SIGINT are passed on to it once each: the first is rq's
warm shutdown (the current job finishes), a second one its cold shutdown.

The rq worker listens on `convert webhooks reconvert` (PICSTREAM_QUEUE,
PICSTREAM_WEBHOOK_QUEUE, PICSTREAM_BULK_QUEUE) and drains them strictly in that order: fresh
uploads first, then webhook deliveries (a slow receiver waits in a queue of its own, never in
front of a conversion), then bulk reconversion, so bulk work never starves the other two.
The scheduler runs in the worker so retries with backoff fire. Each job runs in a forked
work-horse. The image libraries are loaded in the rq worker process (not in the supervisor)
before the fork, so a job does not pay for loading them; each horse gets a data-segment limit
(PICSTREAM_JOB_MEMORY) so one image cannot take the machine's memory. Each work-horse logs
(INFO) how long its job waited in the queue and how long it took to start (`pickup=`,
`fork=`, in ms; bench/e2e.py reads them).

This is the worker's composition root: `main` reads the environment once, and `build_worker`
hands the settings to the jobs (`JobServices.configure`); no job reads the environment.

Redis outages: rq alone ends its worker on the first refused connection outside its wait for
a job. This worker instead waits for Redis — a PING after 0.25 s, doubling to every 5 s —
and carries on where it was, logging the outage once when it begins and once when it ends.
A job whose bookkeeping Redis cut off is left to rq's registry cleaning (abandoned: retried
or failed). A Redis that came back without its data gets the worker registered again. rq's
scheduler process dies with the outage (rq logs it) and rq's maintenance starts it again.

Janitor: rq's maintenance, in the worker's main process between jobs, also runs one sweep of
core/janitor.py at most every PICSTREAM_JANITOR_INTERVAL seconds across all workers (a Redis
lock, SET NX EX). It runs there, not in a thread: rq forks work-horses from this process,
and fork with threads running is unsafe. A failed sweep is logged; the worker goes on.

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

import argparse
import contextlib
import ctypes
import logging
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from functools import partial
from types import FrameType
from typing import Any, TypeVar

import redis
from redis import Redis
from redis.client import Pipeline
from rq import Queue, worker_registration
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job
from rq.scheduler import RQScheduler

from core import janitor, metrics
from core.errors import PicstreamError
from core.inflight import Requeue
from core.jobs import make_queue, request_id_of, requeue_for
from core.logs import bind_request_id
from core.logs import configure as configure_logs
from core.records import NS, Records, connect
from core.settings import WORKER_PROCESS, ConfigError, Settings
from core.storage import Store
from worker.metrics import JobMetrics, exported
from worker.services import JobServices
from worker.supervisor import Supervisor

log = logging.getLogger("worker")

WORKER_TTL = 25  # rq waits WORKER_TTL - 15 s for a job between maintenance checks
MAINTENANCE_INTERVAL = 10
# How often the worker heartbeats a running job; rq adds 60 s to get the job's lease.
JOB_MONITORING_INTERVAL = 5
# Waiting for Redis to come back: the first PING after this long, then twice as long each
# time, never more than OUTAGE_MAX_PAUSE apart.
OUTAGE_FIRST_PAUSE = 0.25
OUTAGE_MAX_PAUSE = 5.0
JANITOR_LOCK = f"{NS}:janitor"
# What a Redis that is down, restarting or frozen raises (BusyLoadingError, a Redis still
# loading its data after a restart, is a ConnectionError).
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
PR_SET_PDEATHSIG = 1  # linux/prctl.h

T = TypeVar("T")


class RedisOutage:
    """Waits out Redis outages for one process, logging each once (at `level`) when it
    begins and once when it ends."""

    def __init__(
        self, client: Redis, stopping: Callable[[], bool], level: int = logging.WARNING
    ) -> None:
        self.client = client
        self.stopping = stopping
        self.level = level
        self.since: float | None = None  # when the current outage began (monotonic)
        self.count = 0  # outages so far

    def begin(self, error: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self.count += 1
            log.log(
                self.level,
                "Redis is unreachable (%s); waiting for it, trying every %.0f s at most",
                error,
                OUTAGE_MAX_PAUSE,
            )

    def end(self) -> None:
        if self.since is not None:
            took = time.monotonic() - self.since
            log.log(self.level, "Redis answers again after %.1f s; carrying on", took)
            self.since = None

    def wait(self, error: BaseException) -> None:
        """Return once Redis answers a PING; raise `error` again if the process is asked to
        stop meanwhile (stopping must not wait for Redis)."""
        self.begin(error)
        pause = OUTAGE_FIRST_PAUSE
        while True:
            if self.stopping():
                raise error
            time.sleep(pause)
            try:
                self.client.ping()
            except REDIS_DOWN:
                pause = min(pause * 2, OUTAGE_MAX_PAUSE)
                continue
            self.end()
            return


class PatientScheduler(RQScheduler):
    """rq's scheduler process (it enqueues retries when they are due), waiting out Redis
    outages: rq's own dies with a traceback and is started again by the next maintenance.
    The worker reports the outage; this one logs it at debug level only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopping = False
        self.worker_pid = os.getpid()  # built in the rq worker, which forks it

    def work(self) -> None:
        # In the forked scheduler process. A fork does not inherit PR_SET_PDEATHSIG: without
        # its own, a scheduler whose rq worker died abruptly (SIGTERM before rq installed its
        # handlers, SIGKILL) lived on, waiting for a Redis that was gone, for ever.
        stop_with(self.worker_pid)
        outage = RedisOutage(self.connection, lambda: self.stopping, logging.DEBUG)
        while True:
            try:
                super().work()  # type: ignore[no-untyped-call]
                return
            except REDIS_DOWN as exc:
                try:
                    outage.wait(exc)
                except REDIS_DOWN:
                    return  # stopped while Redis is away: its locks expire on their own

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        self.stopping = True
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]


class JanitorSchedule:
    """One janitor sweep at most every `interval` seconds across all workers: the worker
    that sets the lock (SET NX EX interval) sweeps, the others skip. A sweep that takes longer
    than the interval may overlap the next one; sweeps are idempotent."""

    def __init__(
        self, store: Store, records: Records, interval: float, requeue: Requeue | None = None
    ) -> None:
        self.store = store
        self.records = records
        self.lock_seconds = max(1, math.ceil(interval))
        self.requeue = requeue

    def sweep_if_due(self) -> None:
        """Never raises: a store or Redis failure, or a bug in a sweep, is logged and the
        worker goes on converting."""
        try:
            if not self.records.redis.set(JANITOR_LOCK, os.getpid(), nx=True, ex=self.lock_seconds):
                return
            started = time.monotonic()
            swept = janitor.run_once(self.store, self.records, requeue=self.requeue)
            metrics.janitor_swept(
                swept.abandoned, swept.stale, swept.purged, swept.requeued, swept.redelivered
            )
            log.info("janitor: %s (%.1f s)", swept, time.monotonic() - started)
        except StopRequested:
            raise  # rq's signal handler, asking for a warm shutdown mid-sweep
        except (PicstreamError, redis.RedisError) as exc:
            log.warning("janitor sweep failed: %s", exc)
        except Exception:  # a bug in one sweep must not take conversions down with it
            log.exception("janitor sweep failed")


class ConversionWorker(JobMetrics):
    """rq's forking worker, with a memory limit on each work-horse, that waits out Redis
    outages instead of exiting and runs the janitor from its maintenance (see the module
    docstring). The methods overridden here are rq 3.0's; tests/integration/
    test_supervision.py fails when one of them is renamed."""

    def __init__(
        self,
        *args: Any,
        job_memory: int = 0,
        janitor: JanitorSchedule | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.job_memory = job_memory
        self.janitor = janitor
        self.stopping = False
        self.outage = RedisOutage(self.connection, lambda: self.stopping)
        self.dequeued_at = time.time()  # when the last job was taken from its queue

    @property
    def dequeue_timeout(self) -> int:
        # rq runs its maintenance (and so the janitor) only between waits for a job.
        return max(1, min(int(super().dequeue_timeout), math.ceil(self.maintenance_interval)))

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        # Every line of this horse, rq's included, names the request that queued the job.
        bind_request_id(request_id_of(job))
        self._log_pickup(job)
        if self.job_memory:
            # RLIMIT_DATA counts heap, thread stacks and private mappings. Past it, Python
            # raises MemoryError (recorded as a permanent failure) or GLib aborts the horse
            # (rq retries, then horse_killed records it): never the host's OOM killer.
            resource.setrlimit(resource.RLIMIT_DATA, (self.job_memory, self.job_memory))
        super().main_work_horse(job, queue)

    def start_scheduler(self, logging_level: str) -> None:
        """Start the scheduler process; then `work(with_scheduler=False)`: rq's maintenance
        starts it again if it died, and rq's shutdown stops it, as with its own."""
        self.scheduler = PatientScheduler(
            self.queues,
            connection=self.connection,
            logging_level=logging_level,
            serializer=self.serializer,
        )
        self.scheduler.acquire_locks(auto_start=True)  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ the main loop's steps

    def check_for_suspension(self, burst: bool) -> None:
        self._through_outages(partial(super().check_for_suspension, burst))

    def run_maintenance_tasks(self) -> None:
        self._through_outages(super().run_maintenance_tasks)
        if self.janitor is not None:
            self.janitor.sweep_if_due()

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        # rq retries its own wait for a job; this catches what it does around it.
        result: tuple[Job, Queue] | None = self._through_outages(
            partial(super().dequeue_job_and_maintain_ttl, timeout, max_idle_time)
        )
        self.dequeued_at = time.time()
        return result

    def _log_pickup(self, job: Job) -> None:
        """In the work-horse: how long the job waited in its queue (`pickup`, from its
        enqueueing to the rq worker having it), and from there to this horse running
        (`fork`: rq's bookkeeping and the fork). One INFO line; bench/e2e.py reads it."""
        now = time.time()
        queued = job.enqueued_at.timestamp() if job.enqueued_at else now  # UTC, aware
        log.info(
            "job %s (%s): pickup=%.0f fork=%.0f",
            job.id,
            job.kwargs.get("image_id", ""),
            (self.dequeued_at - queued) * 1000,
            (now - self.dequeued_at) * 1000,
        )

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        if pipeline is not None:  # only adds commands to the caller's pipeline
            super().heartbeat(timeout, pipeline)
            return
        self._through_outages(partial(super().heartbeat, timeout))

    def execute_job(self, job: Job, queue: Queue) -> None:
        outages = self.outage.count
        try:
            super().execute_job(job, queue)
        except REDIS_DOWN as exc:
            # The horse has ended or never started (its heartbeats do not raise, below). Not
            # run again: what rq could not record about the job is left to its registry
            # cleaning, which takes it for abandoned (retried, or failed by our callback).
            if self.is_horse or self.stopping:
                raise
            self.outage.wait(exc)
        if self.outage.count != outages:  # Redis was away during the job
            self._through_outages(self._register_again_if_forgotten)

    def maintain_heartbeats(self, job: Job, execution: Execution) -> None:
        # While the horse works, a missed heartbeat is harmless (the job's lease is 60 s
        # longer); waiting for Redis here would leave the horse unwatched.
        try:
            super().maintain_heartbeats(job, execution)
        except REDIS_DOWN as exc:
            self.outage.begin(exc)
        else:
            self.outage.end()

    # ------------------------------------------------------------------ stopping

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True  # before rq's handler: it may raise out of an outage wait
        super().request_stop(signum, frame)  # type: ignore[no-untyped-call]

    def set_shutdown_requested_date(self) -> None:
        with contextlib.suppress(*REDIS_DOWN):  # informational: the shutdown goes on anyway
            super().set_shutdown_requested_date()  # type: ignore[no-untyped-call]

    def _pubsub_exception_handler(self, exc: Exception, pubsub: Any, pubsub_thread: Any) -> None:
        # rq's handler logs an error every 2 s of an outage; the main loop reports it once.
        if isinstance(exc, REDIS_DOWN):
            time.sleep(2.0)
            return
        super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)

    # ------------------------------------------------------------------ outages

    def _through_outages(self, step: Callable[[], T]) -> T:
        """Run one step of rq's main loop; while Redis is unreachable, wait for it and run the
        step again (these steps are safe to repeat: none has taken a job off a queue yet)."""
        outage_seen = False
        while True:
            try:
                if outage_seen:
                    self._register_again_if_forgotten()
                return step()
            except REDIS_DOWN as exc:
                if self.is_horse or self.stopping:
                    raise
                self.outage.wait(exc)
                outage_seen = True

    def _register_again_if_forgotten(self) -> None:
        """A Redis that restarted without its data (or failed over to an empty replica) no
        longer lists this worker: list it again, for rq's tools and registry cleaning."""
        if not self.connection.exists(self.key):
            log.warning("Redis lost this worker's registration; registering it again")
            self.register_birth()  # type: ignore[no-untyped-call]
        elif not self.connection.sismember(self.redis_workers_keys, self.key):
            # rq's heartbeat during a job recreated the worker's hash, not its listing.
            log.warning("Redis lost this worker's registration; registering it again")
            worker_registration.register(self)


def listened_queues(settings: Settings, redis_client: Redis) -> list[Queue]:
    """The queues a worker takes jobs from, in the order it drains them: fresh uploads,
    webhook deliveries, bulk reconversion."""
    conversion = settings.conversion
    names = (conversion.queue, settings.webhooks.queue, conversion.bulk_queue)
    return [make_queue(redis_client, name, conversion.job_timeout) for name in names]


def build_worker(settings: Settings, redis_client: Redis) -> ConversionWorker:
    """The rq worker with its janitor. Loads the image libraries (through worker.jobs)."""
    # Imported here, in the rq worker process, so that the supervisor process never loads
    # pyvips/Pillow; rq forks the work-horses from this process, after this import.
    from worker.jobs import horse_killed

    JobServices.configure(settings)  # the jobs' settings; their clients are built per horse
    queues = listened_queues(settings, redis_client)
    janitor_interval = settings.storage.janitor_interval
    sweeps = JanitorSchedule(
        Store.from_settings(settings),
        Records(redis_client),
        janitor_interval,
        requeue_for(redis_client, settings, janitor_interval),
    )
    return ConversionWorker(
        queues,
        connection=redis_client,
        serializer=queues[0].serializer,
        worker_ttl=WORKER_TTL,
        # The janitor runs from the maintenance: as often as it is due, at least.
        maintenance_interval=max(1, min(MAINTENANCE_INTERVAL, int(janitor_interval))),
        job_monitoring_interval=JOB_MONITORING_INTERVAL,
        work_horse_killed_handler=horse_killed,
        job_memory=settings.conversion.job_memory,
        janitor=sweeps,
    )


def run_worker(settings: Settings, supervisor: int) -> int:
    """The rq worker process: 0 once it stopped on request, 1 if rq ended it otherwise."""
    stop_with(supervisor)
    redis_client = connect(settings)
    outage = RedisOutage(redis_client, lambda: False)  # SIGTERM still ends us here
    while True:
        try:
            worker = build_worker(settings, redis_client)  # rq names its connection here
            break
        except REDIS_DOWN as exc:
            outage.wait(exc)
    level = settings.log_level.upper()
    try:
        worker.start_scheduler(level)
        worker.work(with_scheduler=False, logging_level=level)
    except REDIS_DOWN as exc:
        if not worker.stopping:
            raise
        log.warning("stopped while Redis was unreachable (%s)", exc)
    return 0 if worker.stopping else 1


def stop_with(supervisor: int) -> None:
    """Have Linux send this process SIGTERM when its parent (`supervisor`) dies, so a
    SIGKILLed supervisor leaves no rq worker behind, and a dead rq worker no scheduler
    (SIGTERM: rq's warm shutdown)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: the worker outlives a killed supervisor
    if os.getppid() != supervisor:
        raise SystemExit(f"the supervisor (pid {supervisor}) is gone")


def _without_maintenance_chatter(record: logging.LogRecord) -> bool:
    """False for rq's "cleaning registries" lines below WARNING (a logging filter)."""
    return record.levelno >= logging.WARNING or "cleaning" not in str(record.msg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker", description="Conversion worker: an rq worker, supervised."
    )
    parser.add_argument(
        "--supervised-by",
        type=int,
        metavar="PID",
        help="run the rq worker itself (what the supervisor runs); stop when PID dies",
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ, WORKER_PROCESS)
    except ConfigError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    configure_logs(settings.log_level, settings.log_format)  # PICSTREAM_LOG_FORMAT, scrubbed
    # pyvips forwards libvips' chatter ("VIPS: thumbnailing ...") at INFO.
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    # rq logs its registry cleaning at INFO on every maintenance (every 10 s here), which
    # buried everything else in `make run`'s output.
    logging.getLogger("rq.worker").addFilter(_without_maintenance_chatter)
    if args.supervised_by is not None:
        return run_worker(settings, args.supervised_by)
    child = [sys.executable, "-m", "worker", "--supervised-by", str(os.getpid())]
    with exported(settings):  # the tree's metrics directory and listener (worker/metrics.py)
        return Supervisor(child, name="rq worker").run()


if __name__ == "__main__":
    sys.exit(main())
