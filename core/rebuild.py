"""Recreating the Redis records from the bucket copies (`picstream-admin rebuild`).

Redis holds the live records; every incarnation also has a copy of its record in the bucket
(`record.json` in its prefix, or carried by its original: core/mirror.py). When
Redis lost its data (restarted without persistence, a wiped or replaced instance), clients
see no images although every object is still in the bucket. `rebuild` walks the bucket and,
for each image id, takes its newest incarnation that still has its original:

- an id that has a record in Redis, or an upload in progress, is left alone (Redis is the
  authority while it has the image), so running it on a live system is safe, and twice in a
  row does nothing the second time;
- a record whose variants are all in the bucket comes back as it was; one that was still
  converting (or whose variant objects are missing) comes back `processing` with a new
  variant set and a conversion job, in the same transaction as the record;
- older incarnations of a restored id (deleted ones whose purge was lost with Redis) are
  scheduled for purging;
- an incarnation with a purge pending (deleted while the store was down, or an upload that
  never committed: core/leases.py) is not a candidate: Redis still knows it is gone.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import partial

from core.errors import NotFound, PicstreamError
from core.jobs import enqueue_convert, make_queue
from core.migrate import migrate_image
from core.mirror import read_copy
from core.models import IMAGE_ID_RE, ImageRecord, ObjectKeys, Variant, new_generation
from core.records import Purge, Records
from core.settings import OWNER_RE, Settings
from core.storage import Store

log = logging.getLogger(__name__)


@dataclass
class Rebuilt:
    restored: int = 0
    reconverting: int = 0
    present: int = 0  # already in Redis (or being uploaded): left alone
    skipped: int = 0  # unreadable copy or original missing

    def __str__(self) -> str:
        return (
            f"{self.restored} restored ({self.reconverting} queued for conversion),"
            f" {self.present} already present, {self.skipped} skipped"
        )


def _copies(store: Store) -> dict[tuple[str, str], list[str]]:
    """(owner, id) -> generations that may have a record copy ("" = legacy layout): those
    with a `record.json` or an original (which may carry the record: core/mirror.py)."""
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for key in store.keys(""):
        parts = key.split("/")
        if parts[-1] not in ("record.json", "original") or len(parts) not in (3, 4):
            continue
        owner, image_id = parts[0], parts[1]
        if OWNER_RE.fullmatch(owner) and IMAGE_ID_RE.fullmatch(image_id):
            found[(owner, image_id)].add(parts[2] if len(parts) == 4 else "")
    return {image: list(gens) for image, gens in found.items()}


def rebuild(store: Store, records: Records, settings: Settings) -> Rebuilt:
    report = Rebuilt()
    for (owner, image_id), gens in sorted(_copies(store).items()):
        gens.sort(reverse=True)  # generations sort by time; legacy ("") last
        try:
            outcome = _rebuild_one(store, records, settings, owner, image_id, gens)
        except (PicstreamError, ValueError, KeyError, TypeError) as exc:
            log.warning("could not rebuild %s/%s: %s", owner, image_id, exc)
            outcome = "skipped"
        setattr(report, outcome, getattr(report, outcome) + 1)
        if outcome == "restored" and report_reconverting(store, records, owner, image_id):
            report.reconverting += 1
    return report


def report_reconverting(store: Store, records: Records, owner: str, image_id: str) -> bool:
    try:
        return records.get(owner, image_id).status == "processing"
    except PicstreamError:
        return False


def _rebuild_one(
    store: Store, records: Records, settings: Settings, owner: str, image_id: str, gens: list[str]
) -> str:
    if records.exists(owner, image_id):
        return "present"
    for gen in gens:
        keys = ObjectKeys(owner, image_id, gen)
        try:
            record = read_copy(store, keys)
        except NotFound:
            continue  # an original without a record (a resumable upload's, not committed)
        if (record.owner, record.id, record.gen) != (owner, image_id, gen):
            raise ValueError(f"{keys.record} describes another image")
        # Asked before the store: a purge that is gone by now has deleted the original.
        if records.purging(keys.prefix) or not store.exists(keys.original):
            continue  # deleted (or never committed), its objects not yet purged; or lost
        restored, needs_job = _as_restored(store, record)
        queue = make_queue(records.redis, settings.queue, settings.job_timeout)
        job = partial(
            enqueue_convert, queue, restored, restored.vset, intervals=settings.retry_intervals
        )
        if not records.restore(restored, job if needs_job and not keys.legacy else None):
            return "present"
        if needs_job and keys.legacy:
            migrate_image(store, records, settings, owner, image_id)  # queues its conversion
        for older in gens[gens.index(gen) + 1 :]:
            old = ObjectKeys(owner, image_id, older)
            records.schedule_purge(Purge(old.prefix, 0.0, flat=old.legacy), time.time())
        return "restored"
    return "skipped"


def _as_restored(store: Store, record: ImageRecord) -> tuple[ImageRecord, bool]:
    """The record to restore, and whether it needs a conversion job."""
    record = replace(record, pending=None)  # a reconversion's job was lost with Redis
    present = set(store.keys(record.keys.prefix))
    missing = [
        v
        for v in record.variants
        if v.status == "ready" and record.keys.variant(record.vset, v.name) not in present
    ]
    if record.status != "processing" and not missing:
        return record, False
    vset = record.vset if record.keys.legacy else new_generation()
    variants = tuple(Variant(v.name) for v in record.variants)
    return replace(record, status="processing", error=None, vset=vset, variants=variants), True
