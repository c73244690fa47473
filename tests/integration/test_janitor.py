from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.janitor import abort_stale_uploads
from core.storage import Store


def test_only_stale_incomplete_uploads_are_aborted(store: Store) -> None:
    # As a web process killed mid-upload leaves it: created, never completed nor aborted.
    store.start_multipart("alice/killed/original", "image/jpeg", {})
    assert len(store.incomplete_uploads()) == 1

    assert abort_stale_uploads(store, timedelta(hours=1)) == 0  # too young: may still finish
    assert len(store.incomplete_uploads()) == 1

    later = datetime.now(UTC) + timedelta(hours=2)
    assert abort_stale_uploads(store, timedelta(hours=1), now=later) == 1
    assert store.incomplete_uploads() == []
