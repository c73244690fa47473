"""Guards for the whole suite."""

from __future__ import annotations

from collections import Counter

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, tests are handed to workers by node id: tests that share one (as
    schemathesis' operations do) would collapse into a single run and the others never
    run. Such files run in the serial pass of `make test`; refuse them in a parallel one."""
    if not hasattr(config, "workerinput"):
        return
    shared = sorted(nodeid for nodeid, n in Counter(i.nodeid for i in items).items() if n > 1)
    if shared:
        raise pytest.UsageError(
            "these tests share a node id and cannot run under pytest-xdist (run them in the"
            f" serial pass of `make test`): {', '.join(shared)}"
        )
