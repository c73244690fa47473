"""The worker's log stays readable: rq's maintenance chatter is dropped, nothing else."""

from __future__ import annotations

import logging

from worker.__main__ import _without_maintenance_chatter


def record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("rq.worker", level, __file__, 1, msg, ("w1", "convert"), None)


def test_registry_cleaning_is_dropped_and_the_rest_kept() -> None:
    assert not _without_maintenance_chatter(
        record(logging.INFO, "Worker %s: cleaning registries for queue: %s")
    )
    assert _without_maintenance_chatter(record(logging.INFO, "Worker %s: job OK (%s)"))
    assert _without_maintenance_chatter(record(logging.WARNING, "cleaning failed: %s %s"))
