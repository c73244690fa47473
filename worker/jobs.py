"""Job entry points, named in core/jobs.py by dotted path: the wiring around worker/convert.

`convert(owner, image_id)` turns one upload into the variants of its profile:

1. read the record (gone: the image was deleted, end quietly) and download the original
   to a temporary file (constant memory, whatever its size);
2. decode once (worker/convert.py); the plan it makes is written to the record (every
   variant `pending`, the decoded dimensions filled in) with a `status` event;
3. each variant: encode, PUT next to the original, mark it `ready` (or `failed` with the
   encoder's reason) with a `variant` event;
4. the image becomes `ready` (every variant ready) or `failed`, with a final `status`
   event; then the bucket copy of the record follows and objects of variants that are no
   longer in the plan (an older profile's) are deleted.

Failures: a bad input (ConversionError) is permanent: the image is recorded `failed` with
the reason and the job returns normally, so rq never retries it. S3 or Redis being
unreachable is transient: the job raises and rq retries it after the configured intervals;
`conversion_failed` (rq's failure callback) and `horse_killed` (the worker's handler for a
conversion process that died) record `failed` once no retry is left, so no image stays
`processing` for ever.

Every record change is a WATCH/MULTI update that never recreates a deleted record. When the
record is gone, or a newer conversion with another profile has taken over (reconvert), the
job deletes the variant objects it wrote that the record does not list, and ends quietly.
Running a job twice gives the same variants: everything is derived from the original and
the profile, and objects are overwritten in place.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from blake3 import blake3
from redis import Redis
from redis.client import Pipeline
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from core import events
from core.errors import BadRequest, NotFound, PicstreamError
from core.jobs import make_queue
from core.models import (
    ImageRecord,
    Variant,
    image_prefix,
    original_key,
    record_key,
    variant_key,
)
from core.profiles import Profile
from core.records import Records, connect
from core.settings import Settings
from core.storage import Store
from core.webhooks import enqueue_delivery
from worker.convert import Conversion, ConversionError, Failed, Limits, Rendered, open_image

log = logging.getLogger(__name__)


class Superseded(Exception):
    """The record is gone, or a conversion with another profile owns it now."""


@dataclass(frozen=True, slots=True)
class Services:
    """What a job talks to, built in the process that runs it (after the fork)."""

    settings: Settings
    store: Store
    records: Records

    @classmethod
    def from_env(cls) -> Services:
        settings = Settings.from_env(os.environ)
        return cls(settings, Store.from_settings(settings), Records(connect(settings)))


def convert(owner: str, image_id: str) -> None:
    """rq job: convert one image (see the module docstring)."""
    ImageJob(Services.from_env(), owner, image_id).run()


class ImageJob:
    def __init__(self, services: Services, owner: str, image_id: str) -> None:
        self.s = services
        self.owner = owner
        self.image_id = image_id
        self.written: list[str] = []  # variant names this job has PUT

    def run(self) -> None:
        try:
            record = self.s.records.get(self.owner, self.image_id)
        except NotFound:
            log.info("%s/%s no longer exists; nothing to convert", self.owner, self.image_id)
            return
        try:
            self._convert(record)
        except Superseded:
            log.info("%s/%s was deleted or reconverted meanwhile", self.owner, self.image_id)
            self._discard_unlisted()

    def _convert(self, record: ImageRecord) -> None:
        try:
            profile = self.s.settings.profiles.require(record.profile)
        except BadRequest:
            self.fail(f"the profile {record.profile!r} no longer exists", record.profile)
            return
        with tempfile.TemporaryDirectory(prefix="picstream-") as tmp:
            conversion = self._open(os.path.join(tmp, "original"), record, profile)
            if conversion is None:
                return
            self._start(conversion, profile)
            for result in conversion.render_all(self.s.settings.convert_threads):
                self._set_variant(self._store(result), profile)
        self._finish(profile)

    def _open(self, path: str, record: ImageRecord, profile: Profile) -> Conversion | None:
        """Download and decode the original; a permanent failure is recorded -> None."""
        try:
            self._download(path)
            return open_image(path, record.format, profile, self._limits())
        except NotFound:
            # Deleted meanwhile (then the record is gone too), or lost from the bucket.
            self.fail("the original is missing from storage", profile.name)
        except ConversionError as exc:
            self.fail(str(exc), profile.name)
        return None

    def _download(self, path: str) -> None:
        with open(path, "wb") as out:
            self.s.store.download(original_key(self.owner, self.image_id), out)

    def _limits(self) -> Limits:
        return Limits(self.s.settings.max_pixels, self.s.settings.max_frames)

    def _store(self, rendered: Rendered | Failed) -> Variant:
        """PUT one variant next to the original; its entry for the record."""
        spec = rendered.spec
        if isinstance(rendered, Failed):
            return Variant(spec.name, "failed", format=spec.format, error=rendered.error)
        digest = blake3(rendered.data, max_threads=1).hexdigest()  # AUTO hangs after fork
        key = variant_key(self.owner, self.image_id, spec.name)
        self.written.append(spec.name)
        self.s.store.put(
            key, rendered.data, spec.encoder.content_type, {"picstream-blake3": digest}
        )
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

    def _start(self, conversion: Conversion, profile: Profile) -> None:
        def start(record: ImageRecord) -> ImageRecord:
            _require_profile(record, profile.name)
            return replace(
                record,
                status="processing",
                error=None,
                width=conversion.width,
                height=conversion.height,
                variants=tuple(Variant(spec.name) for spec in conversion.plan),
            )

        self._update(start, lambda pipe, rec: self._event(pipe, events.status_event(rec)))

    def _set_variant(self, variant: Variant, profile: Profile) -> None:
        def set_variant(record: ImageRecord) -> ImageRecord:
            _require_profile(record, profile.name)
            if variant.name not in {v.name for v in record.variants}:
                raise Superseded
            return replace(
                record,
                variants=tuple(variant if v.name == variant.name else v for v in record.variants),
            )

        self._update(
            set_variant, lambda pipe, rec: self._event(pipe, events.variant_event(variant))
        )

    def _finish(self, profile: Profile) -> None:
        def finish(record: ImageRecord) -> ImageRecord:
            _require_profile(record, profile.name)
            failed = [v for v in record.variants if v.status != "ready"]
            if not failed:
                return replace(record, status="ready", error=None)
            reasons = "; ".join(f"{v.name}: {v.error or v.status}" for v in failed)
            return replace(
                record,
                status="failed",
                error=f"{len(failed)} of {len(record.variants)} variants failed: {reasons}",
            )

        record = self._update(finish, self._status_event)
        self._mirror(record)
        self._remove_stale(record)

    def fail(self, reason: str, profile: str | None = None) -> None:
        """Record the image as failed with `reason` (pending variants fail with it). With
        `profile`, only if the record is still converted with that profile."""

        def failed(record: ImageRecord) -> ImageRecord:
            if profile is not None:
                _require_profile(record, profile)
            variants = tuple(
                v if v.status == "ready" else replace(v, status="failed", error=v.error or reason)
                for v in record.variants
            )
            return replace(record, status="failed", error=reason, variants=variants)

        log.warning("%s/%s failed: %s", self.owner, self.image_id, reason)
        self._mirror(self._update(failed, self._status_event))

    def _update(
        self,
        change: Callable[[ImageRecord], ImageRecord],
        also: Callable[[Pipeline, ImageRecord], object],
    ) -> ImageRecord:
        record = self.s.records.update(self.owner, self.image_id, change, also)
        if record is None:
            raise Superseded
        return record

    def _status_event(self, pipe: Pipeline, record: ImageRecord) -> None:
        self._event(pipe, events.status_event(record))
        self._webhook(pipe, record)

    def _webhook(self, pipe: Pipeline, record: ImageRecord) -> None:
        """Queue the webhook of a final state in the same transaction as that state."""
        settings = self.s.settings
        url = record.callback or dict(settings.webhooks).get(record.owner)
        if url is None or record.status not in ("ready", "failed"):
            return
        queue = make_queue(self.s.records.redis, settings.queue, settings.job_timeout)
        enqueue_delivery(queue, url, record, pipe, settings.webhook_retry_intervals)

    def _event(self, pipe: Pipeline, event: dict[str, str]) -> None:
        events.append(pipe, self.owner, self.image_id, event)

    # ------------------------------------------------------------------ bucket

    def _mirror(self, record: ImageRecord) -> None:
        """Bring the bucket copy of the record in step with Redis."""
        self.s.store.put_json(record_key(self.owner, self.image_id), record.to_dict())
        if not self.s.records.exists(self.owner, self.image_id):
            # Deleted between our update and the PUT: do not leave a copy behind.
            self.s.store.delete(record_key(self.owner, self.image_id))
            raise Superseded

    def _remove_stale(self, record: ImageRecord) -> None:
        """Delete variant objects the record no longer lists (an earlier profile's)."""
        keep = {original_key(self.owner, self.image_id), record_key(self.owner, self.image_id)}
        keep |= {variant_key(self.owner, self.image_id, v.name) for v in record.variants}
        for key in self.s.store.keys(image_prefix(self.owner, self.image_id)):
            if key not in keep:
                self.s.store.delete(key)

    def _discard_unlisted(self) -> None:
        """Best effort, after Superseded: delete what this job wrote that nobody lists."""
        try:
            current = self.s.records.get(self.owner, self.image_id)
            listed = {v.name for v in current.variants}
        except NotFound:
            listed = set()
        except PicstreamError as exc:
            log.warning("could not check %s/%s: %s", self.owner, self.image_id, exc.detail)
            return
        for name in set(self.written) - listed:
            try:
                self.s.store.delete(variant_key(self.owner, self.image_id, name))
            except PicstreamError as exc:
                log.warning("could not delete variant %s: %s", name, exc.detail)


def _require_profile(record: ImageRecord, profile: str) -> None:
    if record.profile != profile:
        raise Superseded


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
    """Record `reason` on the job's image. Never raises: this runs inside rq's bookkeeping."""
    kwargs = job.kwargs
    try:
        ImageJob(Services.from_env(), kwargs["owner"], kwargs["image_id"]).fail(reason)
    except Superseded:
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
