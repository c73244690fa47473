"""Signed links on the in-process app: an image converted with them, and a link as the
app's own path (tests/integration/test_cdn.py, test_cors.py)."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import falcon.testing

from tests.images import png
from tests.integration.conftest import ALICE_KEY

AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}


def converted(client: falcon.testing.TestClient, run_jobs: Callable[[], None]) -> dict[str, Any]:
    """`holiday-1`, converted, with signed links valid for 10 minutes."""
    put = client.simulate_put("/v1/images/holiday-1", body=png(40, 30), headers=AS_ALICE)
    assert put.status_code == 201, put.text
    run_jobs()
    record: dict[str, Any] = client.simulate_get(
        "/v1/images/holiday-1", headers=AS_ALICE, query_string="signed=600"
    ).json
    assert record["status"] == "ready", record
    return record


def local(url: str) -> str:
    """A link from a record as a path and query (the in-process app's host is made up)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path
