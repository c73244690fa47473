"""The README's examples are real answers: each marked block is made here from a real
request and compared with the README, so the examples cannot drift from the API.

    UPDATE_README=1 .venv/bin/pytest tests/integration/test_readme.py   # rewrite the blocks

A block sits between `<!-- example: NAME -->` and `<!-- /example -->`; what changes from run
to run (times, incarnation ids) is replaced by fixed values, the rest is as served.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import falcon.testing

from tests.images import jpeg

README = Path(__file__).resolve().parents[2] / "README.md"
DEV_KEY = "dev-key-for-the-readme-examples"
BLOCK = re.compile(r"(<!-- example: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(<!-- /example -->)", re.S)
FIXED = {
    "created_at": "2026-11-21T12:34:56.789Z",
    "gen": "01m8j5tsmh3ba54a4e",
    "vset": "01m8j5tsmh7f0c21d9",
}
HOST = "http://127.0.0.1:8000"


def photo() -> bytes:
    """A phone photo's size and header: 4032x3024 stored, EXIF orientation 6."""
    head = jpeg(4032, 3024, orientation=6, pad=60_000)
    return head + random.Random(2041).randbytes(3_419_127 - len(head))


def render(result: falcon.testing.Result, headers: tuple[str, ...]) -> str:
    lines = [f"HTTP/1.1 {result.status}"]
    lines += [f"{name}: {result.headers[name.lower()]}" for name in headers]
    return "```http\n" + "\n".join(lines) + "\n\n" + pretty(stable(result.json)) + "\n```\n"


def stable(value: Any) -> Any:
    """The answer with what differs per run fixed, and the test client's host replaced."""
    if isinstance(value, dict):
        return {k: FIXED.get(k, stable(v)) if k in FIXED else stable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [stable(v) for v in value]
    if isinstance(value, str):
        return value.replace("http://falconframework.org", HOST)
    return value


def pretty(record: dict[str, Any]) -> str:
    """One member per line; nested objects on one line each (readable, still valid JSON)."""
    out = ["{"]
    items = list(record.items())
    for n, (key, value) in enumerate(items):
        comma = "," if n < len(items) - 1 else ""
        if isinstance(value, list) and value:
            inner = ",\n".join(f"    {json.dumps(v)}" for v in value)
            out.append(f'  "{key}": [\n{inner}\n  ]{comma}')
        else:
            out.append(f'  "{key}": {json.dumps(value)}{comma}')
    return "\n".join([*out, "}"])


def examples(client: falcon.testing.TestClient) -> dict[str, str]:
    auth = {"Authorization": f"Bearer {DEV_KEY}", "Content-Type": "image/jpeg"}
    created = client.simulate_put(
        "/v1/images/holiday-1", body=photo(), headers=auth, params={"filename": "IMG_2041.jpg"}
    )
    assert created.status_code == 201, created.text
    return {"upload": render(created, ("Location", "Content-Type"))}


def test_the_readme_examples_are_real_answers(
    client_with: Callable[..., falcon.testing.TestClient],
) -> None:
    made = examples(client_with(PICSTREAM_API_KEYS=f"dev:{DEV_KEY}"))
    text = README.read_text(encoding="utf-8")
    found = {m.group("name"): m.group("body") for m in BLOCK.finditer(text)}
    assert set(found) == set(made), "README example markers and this test disagree"
    if os.environ.get("UPDATE_README") == "1":
        text = BLOCK.sub(lambda m: m.group(1) + made[m.group("name")] + m.group(4), text)
        README.write_text(text, encoding="utf-8")
        return
    for name, body in made.items():
        assert found[name] == body, f"README example {name!r} is out of date: UPDATE_README=1"
