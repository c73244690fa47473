"""Job entry points, named in core/jobs.py by dotted path: the wiring around worker/convert.

Jobs take their settings and clients from the worker's composition root
(`JobServices.current()`, worker/services.py), never from the environment; the profiles file
is the one thing read again for every job (`current_profiles`).

`convert(owner, image_id, gen, vset)` makes variant set `vset` of incarnation `gen`:

1. read the record: it must still be incarnation `gen` and still want set `vset` — either
   as its current `variants` (a fresh upload) or as its `pending` set (a reconvert);
   otherwise the job was superseded (image deleted, re-uploaded or reconverted again);
2. download the original to a temporary file (constant memory, whatever its size) and
   decode it once (worker/convert.py); the plan is written to the record (every variant
   `pending`, the decoded dimensions and the placeholder filled in) with a `status` event,
   so a page has the placeholder while the variants are still being made. A reconvert
   makes it again from its own decode (the same image, so much the same placeholder); one
   that cannot be made leaves the record's as it was (null for a fresh upload) and fails
   nothing;
3. each variant, as soon as it is encoded (the smallest size first, so a page has its
   thumbnail while the large ones are still being made; worker/convert.py `render_all`):
   PUT under the set's own prefix, mark it `ready` (or `failed` with the encoder's reason)
   with a `variant` event;
4. finish: a fresh upload's set makes the image `ready` (every variant ready) or `failed`;
   a reconvert's set replaces the served one in the same transaction, and the old set's
   objects are deleted a minute later (by the janitor, so downloads already under way
   end). Exactly one final `status` event and one webhook per run; a run whose set is no
   longer wanted ends silently. Then the bucket copy of the record follows.

Fencing: every record change is a WATCH/MULTI update that checks the incarnation and the
set first and never recreates a deleted record. A superseded job deletes the objects of its
own set (a prefix nobody else writes or lists) and ends quietly; a purge scheduled by
whoever superseded it deletes them again after the job timeout, should the job die first.
A job that runs again after its run ended (rq retries it when a step after the final
write failed, or runs a duplicate) finds its set current and finished: it changes nothing
and sends nothing, it only brings the bucket copy up to date.

Timings: each job logs one INFO line with how long each step took (`Timeline`), which
bench/e2e.py reads.

Failures: a bad input (ConversionError) is permanent: recorded as `failed` with the reason,
and the job returns normally, so rq never retries it. S3 or Redis being unreachable is
transient: the job raises and rq retries it after the configured intervals;
`conversion_failed` (rq's failure callback) and `horse_killed` (the worker's handler for a
conversion process that died) record `failed` once no retry is left, so no image stays
`processing` for ever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal, ParamSpec, TypeVar

from blake3 import blake3
from redis import Redis
from redis.client import Pipeline
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from core import events, metrics
from core.errors import NotFound, PicstreamError, ProfileNotFound
from core.inflight import Flight, landed
from core.jobs import enqueue_delivery, make_queue
from core.migrate import migrate_image
from core.mirror import mirror_record
from core.models import META_BLAKE3, ImageRecord, ObjectKeys, PendingSet, Variant, planned
from core.profiles import Profile, ProfileError, Profiles, load_profiles
from core.records import Purge
from core.settings import ConversionSettings
from worker.convert import Conversion, ConversionError, DecodeLimits, Failed, Rendered, open_image
from worker.services import JobServices

log = logging.getLogger(__name__)

Target = Literal["current", "pending"]
P = ParamSpec("P")
R = TypeVar("R")
# How long a replaced variant set stays readable after the record switched away from it.
RETIRE_GRACE = 60.0


class Timeline:
    """How long the steps of one job took, for one INFO line at its end: `name=ms` for each
    step, `@name=ms` for moments since the job began (bench/e2e.py reads them)."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.entries: list[tuple[str, float]] = []

    def timed(self, name: str, step: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """`step(*args, **kwargs)`, timed as `name`."""
        start = time.perf_counter()
        try:
            return step(*args, **kwargs)
        finally:
            self.entries.append((name, time.perf_counter() - start))

    def mark(self, name: str) -> None:
        self.entries.append((name, time.perf_counter() - self.began))

    def __str__(self) -> str:
        total = time.perf_counter() - self.began
        return " ".join(f"{name}={s * 1000:.0f}" for name, s in [*self.entries, ("total", total)])


class Superseded(Exception):
    """The record is another incarnation now, or no longer wants this job's set."""


class Replanned(Exception):
    """Another run of this very set started since with another plan (the profiles file
    changed) that lacks a variant this run made: that run owns the set now. Nothing of the
    set is deleted, the record lists it."""


class Ended(Exception):
    """This job's set is the record's current one and its run has already ended: an
    earlier attempt (or a duplicate) finished it, then failed after its final write (the
    bucket copy, a lost EXEC answer). Nothing is left to do, and the set is served."""


def convert(owner: str, image_id: str, gen: str = "", vset: str = "") -> None:
    """rq job: make one variant set (see the module docstring)."""
    clock = Timeline()
    services = clock.timed("services", JobServices.current)
    if not gen:
        # Queued before incarnations existed: move the image to the current layout,
        # which queues its conversion anew.
        migrate_image(services.store, services.records, services.settings, owner, image_id)
        return
    ImageJob(services, owner, image_id, gen, vset, clock).run()


class ImageJob:
    """One run of `convert` for set `vset` of incarnation `gen` of an image."""

    def __init__(
        self,
        services: JobServices,
        owner: str,
        image_id: str,
        gen: str,
        vset: str,
        clock: Timeline | None = None,
    ) -> None:
        self.store = services.store
        self.records = services.records
        self.conversion = services.settings.conversion
        self.webhooks = services.settings.webhooks
        self.keys = ObjectKeys(owner, image_id, gen)
        self.vset = vset
        self.clock = clock or Timeline()

    @property
    def name(self) -> str:
        return f"{self.keys.owner}/{self.keys.image_id} {self.keys.gen}/{self.vset}"

    @property
    def flight(self) -> Flight:
        return Flight(self.keys.owner, self.keys.image_id, self.keys.gen, self.vset)

    def run(self) -> None:
        try:
            record = self.clock.timed(
                "record", self.records.get, self.keys.owner, self.keys.image_id
            )
            self._convert(record, self._target(record))
        except (Superseded, NotFound):
            log.info("%s: superseded (deleted, re-uploaded or reconverted)", self.name)
            self._discard_own()
        except Replanned:
            log.info("%s: replanned by another run of this set; leaving the set to it", self.name)
        except Ended:
            # Never a second final event or webhook, never the served variants back to
            # `pending`: only the bucket copy may still be behind.
            log.info("%s: already finished by an earlier attempt", self.name)
            self._mirror_again()

    # ------------------------------------------------------------------ which set is ours

    def _target(self, record: ImageRecord) -> Target:
        if record.gen != self.keys.gen:
            raise Superseded
        if record.vset == self.vset:
            if record.run_ended():
                raise Ended
            return "current"
        if record.pending is not None and record.pending.vset == self.vset:
            return "pending"
        raise Superseded

    @staticmethod
    def _set_of(record: ImageRecord, target: Target) -> tuple[Variant, ...]:
        if target == "pending":
            assert record.pending is not None
            return record.pending.variants
        return record.variants

    @staticmethod
    def _with_set(
        record: ImageRecord, target: Target, variants: tuple[Variant, ...]
    ) -> ImageRecord:
        if target == "pending":
            assert record.pending is not None
            return replace(record, pending=replace(record.pending, variants=variants))
        return replace(record, variants=variants)

    # ------------------------------------------------------------------ the work

    def _convert(self, record: ImageRecord, target: Target) -> None:
        profile_name = record.pending.profile if target == "pending" and record.pending else None
        profile_name = profile_name or record.profile
        try:
            profile = current_profiles(self.conversion).require(profile_name)
        except ProfileNotFound:
            self.fail(f"the profile {profile_name!r} no longer exists")
            return
        clock = self.clock
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="picstream-") as tmp:
            conversion = self._open(os.path.join(tmp, "original"), record, profile)
            if conversion is None:
                return
            self._start(conversion)
            # Closed at once if a variant's update finds the job superseded: the encoders
            # still queued are cancelled rather than run for nothing.
            with contextlib.closing(conversion.render_all(self.conversion.threads)) as results:
                while (result := clock.timed("wait", next, results, None)) is not None:
                    variant = clock.timed(f"put:{result.spec.name}", self._store, result)
                    clock.timed(f"update:{result.spec.name}", self._set_variant, variant)
                    clock.mark(f"@{result.spec.name}")
        self._finish()
        elapsed = time.perf_counter() - started
        metrics.CONVERSION_DURATION.labels(metrics.format_label(record.format)).observe(elapsed)
        log.info("%s: converted; %s", self.name, clock)

    def _open(self, path: str, record: ImageRecord, profile: Profile) -> Conversion | None:
        """Download and decode the original; a permanent failure is recorded -> None."""
        try:
            with open(path, "wb") as out:
                self.clock.timed("download", self.store.download, self.keys.original, out)
            limits = DecodeLimits(self.conversion.max_pixels, self.conversion.max_frames)
            return self.clock.timed("decode", open_image, path, record.format, profile, limits)
        except NotFound:
            # Deleted meanwhile (then the record is gone too), or lost from the bucket.
            self.fail("the original is missing from storage")
        except ConversionError as exc:
            self.fail(str(exc))
        return None

    def _store(self, rendered: Rendered | Failed) -> Variant:
        """PUT one variant under this set's prefix; its entry for the record."""
        spec = rendered.spec
        if isinstance(rendered, Failed):
            return Variant(spec.name, "failed", format=spec.format, error=rendered.error)
        digest = blake3(rendered.data, max_threads=1).hexdigest()  # AUTO hangs after fork
        key = self.keys.variant(self.vset, spec.name)
        self.store.put(key, rendered.data, spec.encoder.content_type, {META_BLAKE3: digest})
        metrics.VARIANT_BYTES.labels(spec.format, spec.size.name).inc(len(rendered.data))
        return Variant(
            spec.name,
            "ready",
            format=spec.format,
            width=rendered.width,
            height=rendered.height,
            size=len(rendered.data),
            blake3=digest,
        )

    # ------------------------------------------------------------------ record changes

    def _start(self, conversion: Conversion) -> None:
        # Made once, outside the change: that may run again after a WATCH conflict.
        placeholder = self.clock.timed("placeholder", conversion.placeholder)

        def start(record: ImageRecord) -> ImageRecord:
            target = self._target(record)
            # A variant another run of this set already made stays ready (this run makes it
            # again, the same): a duplicate starting beside a live run (a retry or a requeue
            # after a false alarm) must not send its variants back to `pending`.
            made = {v.name: v for v in self._set_of(record, target) if v.status == "ready"}
            wanted = tuple(made.get(v.name, v) for v in planned(conversion.plan))
            record = replace(
                record,
                width=conversion.width,
                height=conversion.height,
                placeholder=placeholder or record.placeholder,
            )
            if target == "current":
                record = replace(record, status="processing", error=None)
            return self._with_set(record, target, wanted)

        self.clock.timed(
            "start",
            self._update,
            start,
            lambda pipe, rec: events.append(pipe, rec, events.status_event(rec)),
        )

    def _set_variant(self, variant: Variant) -> None:
        def set_variant(record: ImageRecord) -> ImageRecord:
            target = self._target(record)
            current = self._set_of(record, target)
            if variant.name not in {v.name for v in current}:
                raise Replanned
            updated = tuple(variant if v.name == variant.name else v for v in current)
            return self._with_set(record, target, updated)

        self._update(
            set_variant,
            lambda pipe, rec: events.append(pipe, rec, events.variant_event(variant)),
        )

    def _finish(self) -> None:
        replaced: list[str] = []
        ended: list[str] = []  # the run ended here (metrics)
        others: list[bool] = []  # another run of this set still has variants to make

        def finish(record: ImageRecord) -> ImageRecord:
            target = self._target(record)
            replaced.clear()
            ended.clear()
            others.clear()
            if target == "current" and record.pending is not None:
                return record  # a reconversion is under way: it ends this image's run
            variants = self._set_of(record, target)
            if any(v.status == "pending" for v in variants):
                # Planned by another run of this set (started after this one, with a newer
                # profiles file): that run ends it; should it die, the set stays in flight
                # and the janitor queues it again (core/inflight.py).
                others.append(True)
                return record
            status, error = _outcome(variants)
            ended.append(status)
            if target == "pending":
                assert record.pending is not None
                replaced.append(record.vset)
                record = _switch(record, record.pending)
            return replace(record, status=status, error=error)

        def also(pipe: Pipeline, record: ImageRecord) -> None:
            if not others:
                landed(pipe, self.flight)
            if record.status != "processing":
                self._final_events(pipe, record)
            for old in replaced:
                self._retire(pipe, record, old)

        made = self.clock.timed("update:final", self._update, finish, also)
        for outcome in ended:
            metrics.CONVERSIONS.labels(outcome).inc()
        self.clock.timed("mirror", self._mirror, made)

    def fail(self, reason: str) -> None:
        """Record that this job's set cannot be made, for `reason`. A fresh upload's image
        becomes `failed` (variants not ready fail with the reason); a reconvert's pending
        set is dropped and the image `failed`, its current variants still served."""
        dropped: list[str] = []
        ended: list[str] = []  # the run ended here (metrics)

        def failed(record: ImageRecord) -> ImageRecord:
            target = self._target(record)
            dropped.clear()
            ended[:] = ["failed"]
            if target == "current" and record.pending is not None:
                ended.clear()
                return record  # the reconversion decides how this image ends
            if target == "pending":
                dropped.append(self.vset)
                return replace(record, status="failed", error=reason, pending=None)
            variants = tuple(
                v if v.status == "ready" else replace(v, status="failed", error=v.error or reason)
                for v in record.variants
            )
            return replace(record, status="failed", error=reason, variants=variants)

        def also(pipe: Pipeline, record: ImageRecord) -> None:
            landed(pipe, self.flight)
            if record.status == "failed":
                self._final_events(pipe, record)

        record = self._update(failed, also)
        for outcome in ended:
            metrics.CONVERSIONS.labels(outcome).inc()
        log.warning("%s failed: %s", self.name, reason)
        for vset in dropped:
            self._delete_set(vset)
        self._mirror(record)

    def _update(
        self,
        change: Callable[[ImageRecord], ImageRecord],
        also: Callable[[Pipeline, ImageRecord], object],
    ) -> ImageRecord:
        keys = self.keys
        record = self.records.update(keys.owner, keys.image_id, change, also, keys.gen)
        if record is None:
            raise Superseded
        return record

    def _final_events(self, pipe: Pipeline, record: ImageRecord) -> None:
        """The final status event and the webhook, in the same transaction as the state. The
        delivery waits on the webhook queue: a slow receiver never holds up a conversion."""
        events.append(pipe, record, events.status_event(record))
        hooks = self.webhooks
        url = record.callback or dict(hooks.owner_urls).get(record.owner)
        if url is None:
            return
        queue = make_queue(self.records.redis, hooks.queue, self.conversion.job_timeout)
        enqueue_delivery(queue, url, record, pipe, hooks.retry_intervals)

    # ------------------------------------------------------------------ bucket

    def _retire(self, pipe: Pipeline, record: ImageRecord, vset: str) -> None:
        """Schedule the deletion of a replaced set: after RETIRE_GRACE, so that downloads
        which read the record just before the switch still find their object, and once
        more after any job still writing it has timed out."""
        until = time.time() + self.conversion.job_timeout + 60
        purge = Purge(record.keys.vset_prefix(vset), until)
        self.records.schedule_purge(purge, time.time() + RETIRE_GRACE, pipe)

    def _delete_set(self, vset: str) -> None:
        """Best effort: the purge scheduled with the change deletes it later otherwise."""
        try:
            self.store.delete_prefix(self.keys.vset_prefix(vset))
        except PicstreamError as exc:
            log.warning("could not delete set %s of %s: %s", vset, self.name, exc.detail)

    def _mirror(self, _made: ImageRecord | None = None) -> None:
        """Bring the bucket copy in step with what Redis holds now (core/mirror.py), not
        with the record this job made: a PATCH of its alt text may have landed since."""
        mirror_record(self.records, self.store, self.keys.owner, self.keys.image_id, self.keys.gen)

    def _mirror_again(self) -> None:
        """The bucket copy of the record as it is now, if it still is our incarnation."""
        self._mirror()

    def _discard_own(self) -> None:
        """After Superseded: this job's set is listed by no record; delete its objects."""
        if self.vset:
            self._delete_set(self.vset)


def current_profiles(conversion: ConversionSettings) -> Profiles:
    """The profiles file as it is now: workers read it for every job, so an edited file
    applies from the next conversion on, without a restart (the API reads it at start-up).
    A file that no longer reads or parses leaves the profiles read at start-up in force,
    with an error in the log: conversions go on with the last profiles known to be good."""
    path = conversion.profiles_path
    if not path:
        return conversion.profiles
    try:
        return load_profiles(path)
    except (OSError, ProfileError, UnicodeDecodeError) as exc:
        log.error("PICSTREAM_PROFILES %s: %s; using the profiles read at start-up", path, exc)
        return conversion.profiles


def _outcome(variants: tuple[Variant, ...]) -> tuple[Literal["ready", "failed"], str | None]:
    failed = [v for v in variants if v.status != "ready"]
    if not failed:
        return "ready", None
    reasons = "; ".join(f"{v.name}: {v.error or v.status}" for v in failed)
    return "failed", f"{len(failed)} of {len(variants)} variants failed: {reasons}"


def _switch(record: ImageRecord, pending: PendingSet) -> ImageRecord:
    """The record serving the pending set instead of its current one."""
    return replace(
        record,
        variants=pending.variants,
        vset=pending.vset,
        profile=pending.profile,
        pending=None,
    )


# ---------------------------------------------------------------------- giving up


def conversion_failed(
    job: Job, connection: Redis, exc_type: type[BaseException] | None, exc: Any, tb: Any
) -> None:
    """rq failure callback (every failed attempt, and abandoned jobs): once no retry is
    left, record the image as failed so it never stays `processing`."""
    if job.should_retry:
        log.info("job %s failed (%s); rq will retry it", job.id, _describe(exc, job))
        return
    give_up(job, _describe(exc, job))


def horse_killed(job: Job, retpid: int | None, ret_val: int | None, rusage: Any) -> None:
    """Worker hook: the conversion process died (segfault, out-of-memory kill, or the
    worker killed it after the timeout). rq retries it if it can; else record failed."""
    if job.should_retry:
        return
    signum = os.WTERMSIG(ret_val) if ret_val and os.WIFSIGNALED(ret_val) else None
    why = f" by signal {signum}" if signum else ""
    give_up(job, f"the conversion process died{why} (out of memory or a crash in a decoder)")


def give_up(job: Job, reason: str) -> None:
    """Record `reason` for the job's set. Never raises: this runs inside rq's bookkeeping."""
    kwargs = job.kwargs
    try:
        services = JobServices.current()
        owner, image_id = kwargs["owner"], kwargs["image_id"]
        # A legacy job ({owner, image_id}: queued before incarnations) names gen "" and
        # set "", which is what a legacy record has: it is failed in place, unless it was
        # migrated (superseded) or is no longer processing (ended) meanwhile.
        gen, vset = kwargs.get("gen", ""), kwargs.get("vset", "")
        ImageJob(services, owner, image_id, gen, vset).fail(reason)
    except (Superseded, Ended):
        pass
    except (PicstreamError, KeyError) as exc:
        log.error("could not record the failure of job %s (%s): %s", job.id, reason, exc)


def _describe(exc: Any, job: Job) -> str:
    attempts = len(job.retry_intervals or ()) - (job.retries_left or 0) + 1
    if isinstance(exc, JobTimeoutException):
        return f"the conversion took longer than {job.timeout} s"
    if isinstance(exc, PicstreamError):
        return f"gave up after {attempts} attempts: {exc.detail}"
    if isinstance(exc, AbandonedJobError):
        return "the worker converting this image stopped (crashed or was killed)"
    return f"internal error ({type(exc).__name__}); see the worker log"
