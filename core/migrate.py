"""Moving images stored before incarnations existed to the current key layout.

Records without `gen` keep working where they are (core/models.py `ObjectKeys` reads the
legacy layout in place), but can't be reconverted, and a conversion job queued for one by
an older version finds nothing to write into. `picstream-admin migrate` moves them all;
a legacy conversion job moves its own image. Per image:

1. server-side copies of the original and the ready variants into a new incarnation's
   prefix; its gen and variant set are derived from the record (creation time + BLAKE3),
   so an interrupted run repeats the same copies instead of leaving other ones behind;
2. the bucket copy of the record under the new prefix;
3. one fenced update: the record gets its gen and set if it is still the same legacy
   image (a delete or re-upload meanwhile wins), with a conversion queued when it was not
   ready; the old stream's watchers get a final status event;
4. the legacy objects (those directly under `{owner}/{id}/`) are deleted.

Idempotent and resumable: an image already migrated only has step 4 repeated. Two runs at
once (`migrate` while a legacy job migrates the same image) copy into the same prefix; the
one whose update comes second leaves it alone, since it is the record's now.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from redis.client import Pipeline

from core import events
from core.errors import NotFound
from core.jobs import enqueue_convert, make_queue
from core.models import ImageRecord, ObjectKeys, Variant
from core.records import Records, created_ms
from core.settings import Settings
from core.storage import Store

log = logging.getLogger(__name__)

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def _derived(record: ImageRecord, salt: int) -> str:
    ms = created_ms(record)
    stamp = "".join(_CROCKFORD[(ms >> shift) & 31] for shift in range(45, -1, -5))
    return stamp + record.blake3[8 * salt : 8 * salt + 8]


def migration_keys(record: ImageRecord) -> ObjectKeys:
    """Where `migrate` copies a legacy record's objects: derived from the record, the same
    on every run (so deleting a legacy image deletes what an interrupted run copied)."""
    return ObjectKeys(record.owner, record.id, _derived(record, 0))


def migrate_image(
    store: Store, records: Records, settings: Settings, owner: str, image_id: str
) -> bool:
    """Move one image to the current layout; True if it was moved by this call."""
    try:
        record = records.get(owner, image_id)
    except NotFound:
        return False
    legacy = ObjectKeys(owner, image_id, "")
    if not record.keys.legacy:
        store.delete_flat(legacy.prefix)  # an earlier run stopped before this step
        return False
    moved = replace(record, gen=migration_keys(record).gen, vset=_derived(record, 1))
    keys = moved.keys
    _copy(store, legacy.original, keys.original)
    complete = True
    for variant in record.variants:
        if variant.status == "ready":
            target = keys.variant(moved.vset, variant.name)
            complete &= _copy(store, legacy.variant("", variant.name), target)
    reconvert = record.status == "processing" or not complete
    if reconvert:
        moved = replace(
            moved,
            status="processing",
            error=None,
            variants=tuple(Variant(v.name) for v in record.variants),
        )
    store.put_json(keys.record, moved.to_dict())
    queue = make_queue(records.redis, settings.queue, settings.job_timeout)

    def change(current: ImageRecord) -> ImageRecord:
        if current.blake3 != record.blake3:
            raise _Changed
        return moved

    def also(pipe: Pipeline, new: ImageRecord) -> None:
        if reconvert:
            enqueue_convert(queue, new, new.vset, pipe, intervals=settings.retry_intervals)
        events.append(pipe, record, events.status_event(new))  # ends the legacy stream
        events.append(pipe, new, events.status_event(new))

    try:
        updated = records.update(owner, image_id, change, also, gen="")
    except _Changed:
        updated = None
    if updated is None:
        if _is_live(records, moved):
            # Another run (`migrate` and a legacy job at once) switched it first, to the
            # same derived incarnation: what we copied is what it serves.
            store.delete_flat(legacy.prefix)
            return False
        # Deleted or re-uploaded: no record can switch to this prefix any more.
        log.info("%s/%s changed during its migration; left as it is now", owner, image_id)
        store.delete_prefix(keys.prefix)
        return False
    store.delete_flat(legacy.prefix)
    log.info("migrated %s/%s to %s", owner, image_id, keys.prefix)
    return True


class _Changed(Exception):
    pass


def _is_live(records: Records, moved: ImageRecord) -> bool:
    try:
        return records.get(moved.owner, moved.id).gen == moved.gen
    except NotFound:
        return False


def _copy(store: Store, source: str, target: str) -> bool:
    """Copy unless an earlier run did; False when the source is lost."""
    try:
        store.copy(source, target)
        return True
    except NotFound:
        return store.exists(target)


def migrate_all(store: Store, records: Records, settings: Settings) -> int:
    """Every legacy record in Redis; returns how many were moved."""
    moved = 0
    for owner, image_id in records.all_ids():
        moved += migrate_image(store, records, settings, owner, image_id)
    return moved
