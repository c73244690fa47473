"""The bucket copy of a record (`record.json` in its incarnation's prefix), kept in step with
Redis by whoever changed the record.

Redis is the authority; the copy exists so that `picstream-admin rebuild` can bring the
records back after Redis lost its data (core/rebuild.py). A writer changes the record in
Redis first (atomically, core/records.py `update`) and then calls `mirror_record`, which
writes what Redis holds *now*, not the record that writer made: with several writers (a
PATCH, a conversion, a reconvert) the last copy written is then never older than Redis was
when its writer looked.
"""

from __future__ import annotations

import logging

from core.errors import NotFound
from core.models import ImageRecord, ObjectKeys
from core.records import Records
from core.storage import Store

log = logging.getLogger(__name__)

# Each further round means another writer changed the record while the copy was written;
# that writer mirrors it too, so giving up after a few rounds loses nothing.
_ROUNDS = 5


def mirror_record(records: Records, store: Store, owner: str, image_id: str, gen: str) -> None:
    """Make the bucket copy of incarnation `gen` of the image what Redis holds now.

    Reads the record, writes it, and reads it again: when another writer changed it in
    between, the copy is written again. When the record is gone, or is another incarnation
    (deleted, or deleted and uploaded again), no copy is written, and one this call wrote is
    deleted again (the deletion's purge would remove it later anyway). StorageUnavailable
    and QueueUnavailable propagate: the copy may then be behind until the record's next
    writer mirrors it.
    """
    keys = ObjectKeys(owner, image_id, gen)
    written: ImageRecord | None = None
    for _ in range(_ROUNDS):
        try:
            current: ImageRecord | None = records.get(owner, image_id)
        except NotFound:
            current = None
        if current is None or current.gen != gen:
            if written is not None:
                store.delete(keys.record)
            return
        if current == written:
            return
        store.put_json(keys.record, current.to_dict())
        written = current
    log.info(
        "%s: the record kept changing while it was mirrored; its last writer mirrors it",
        keys.prefix,
    )
