"""Reading the processes' logs in tests: JSON lines, lines naming a request id, waiting."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from typing import Any

from tests.http import Api, Response


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line of `output` as a JSON object; AssertionError naming the first that is not."""
    parsed = []
    for n, line in enumerate(output.splitlines(), start=1):
        try:
            value = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {n} is not JSON: {line[:300]!r}") from None
        assert isinstance(value, dict), f"line {n} is not an object: {line[:300]!r}"
        parsed.append(value)
    return parsed


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` every 0.1 s until it holds; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def headers_only(api: Api, path: str, headers: dict[str, str]) -> Response:
    """The status and headers of a GET whose body may never end (an event stream). A header
    sent more than once comes back with its values joined by ", "."""
    conn = http.client.HTTPConnection(api.host, api.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {api.key}", **headers})
        resp = conn.getresponse()
        joined: dict[str, str] = {}
        for name, value in resp.getheaders():
            key = name.lower()
            joined[key] = f"{joined[key]}, {value}" if key in joined else value
        return Response(resp.status, joined, b"")
    finally:
        conn.close()
